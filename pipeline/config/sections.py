"""The training config: sections `model`, `loss`, `data`, `optim`, `tracker`, `train`.

The resolved `Config` is validated before any process starts training, written to
`RUN_DIR/config.yaml`, logged to the tracker and saved inside every checkpoint.

Command-line overrides use the dotted field path, e.g. ``--model.codebook_size 1024``
or ``--optim.lr 3e-4``; the common ones also have short aliases (``--model``,
``--arch``, ``--batch-size``, ``--max-steps``, ...; see `pipeline train --help`).

Every field declares its valid values next to its default (`opt(..., bounds="(0, inf)")`,
`choices=...`, `nonempty=True`; see `pipeline.config.fields`); `Config.check` adds the few
rules that relate several fields (latent side, widths vs latent channels, ...: the model
section's own, `ModelConfig.check`). The model section is composed of per-component
classes in `pipeline.config.model`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .fields import opt, require_declared
from .model import ARCHS, MODELS, QUANTIZERS, ModelConfig  # noqa: F401  (re-exported)

SAMPLINGS = ("exact", "resampled")
SEED_MAX = 2**32 - 1  # numpy's global seed (set_seed) takes [0, 2**32)

# Short command-line flags of `pipeline train` -> the dotted field they set. Messages name
# a field by its dotted option and these, so the user finds the flag they typed.
ALIASES = {
    "--model": "model.model", "--arch": "model.arch", "--quantizer": "model.quantizer",
    "--train-shards": "data.train_shards", "--val-shards": "data.val_shards",
    "--num-workers": "data.num_workers", "--lr": "optim.lr", "--ema": "optim.ema",
    "--output": "train.output", "--max-steps": "train.max_steps",
    "--batch-size": "train.batch_size", "--grad-accum": "train.grad_accum",
    "--mixed-precision": "train.mixed_precision", "--compile": "train.compile",
    "--resume": "train.resume", "--seed": "train.seed", "--keep-last": "train.keep_last",
    "--ckpt-every": "train.ckpt_every", "--val-every": "train.val_every",
    "--log-every": "train.log_every", "--tracker": "tracker.tracker",
    "--wandb-project": "tracker.project", "--project": "tracker.project",
    "--entity": "tracker.entity", "--run-name": "tracker.run_name",
    "--group": "tracker.group", "--tags": "tracker.tags",
}


@require_declared
@dataclass
class LossConfig:
    """KL convention: summed over latent elements and averaged over the batch (nats per
    image, logged as `kl`), then divided by the number of pixel values (3*64*64) so that
    beta is comparable to the per-pixel reconstruction loss (`kl_weighted`)."""
    recon: str = opt("l1", "reconstruction loss on images in [-1, 1], mean over pixels: "
                           "l1 | mse", choices=("l1", "mse"))
    kl_weight: float = opt(1.0, "VAE: beta, weight of the per-pixel KL (see LossConfig)",
                           bounds="[0, inf)")
    kl_warmup_steps: int = opt(0, "VAE: beta ramps linearly from 0 over these steps",
                               bounds="[0, inf)")
    commitment_weight: float = opt(0.25, "vq: commitment loss weight (VQ-VAE's beta)",
                                   bounds="[0, inf)")
    codebook_weight: float = opt(1.0, "vq: codebook loss weight (only without codebook_ema)",
                                 bounds="[0, inf)")


@require_declared
@dataclass
class DataConfig:
    train_shards: str = opt("", "train shard spec: split dir with manifest.json, brace "
                                "pattern, URL list or 'pipe:' command")
    val_shards: str = opt("", "val shard spec (same forms)")
    num_workers: int = opt(2, "loader worker processes per rank", bounds="[0, 256]")
    shuffle_buffer: int = opt(2000, "samples in the train shuffle buffer", bounds="[0, inf)")
    flip: bool = opt(True, "random horizontal flip (training only)")
    val_samples: int = opt(256, "first N val samples used for the periodic validation loss",
                           bounds="[1, inf)")
    sampling: str = opt("exact", "train order: exact (every sample once per epoch, a new "
                                 "shard order each epoch) | resampled (each loader stream "
                                 "draws shards with replacement)", choices=SAMPLINGS)
    interleave: int = opt(4, "exact sampling: shard segments each loader stream reads at "
                             "once, drawing samples from a random one of them",
                          bounds="[1, inf)")


@require_declared
@dataclass
class OptimConfig:
    lr: float = opt(2e-4, "AdamW peak learning rate", bounds="(0, inf)")
    weight_decay: float = opt(0.0, "AdamW weight decay", bounds="[0, inf)")
    betas: tuple[float, float] = opt((0.9, 0.99), "AdamW betas (b1 b2)", bounds="[0, 1)")
    warmup_steps: int = opt(100, "linear lr warm-up steps", bounds="[0, inf)")
    min_lr_ratio: float = opt(0.1, "cosine decay ends at lr * min_lr_ratio", bounds="[0, 1]")
    grad_clip: float = opt(1.0, "max global gradient norm; 0 disables clipping",
                           bounds="[0, inf)")
    ema: bool = opt(False, "keep an EMA of the weights; exports use it when on")
    ema_decay: float = opt(0.999, "decay of the weight EMA", bounds="[0, 1)")


@require_declared
@dataclass
class TrackerConfig:
    tracker: str = opt("wandb", "wandb | tensorboard | none (history.jsonl is always written)",
                       choices=("wandb", "tensorboard", "none"))
    project: str = opt("ae-pipeline", "W&B project", nonempty=True)
    entity: str | None = opt(None, "W&B entity (team or user)", nonempty=True)
    run_name: str | None = opt(None, "tracker run name (default: RUN_DIR's name)",
                               nonempty=True)
    group: str | None = opt(None, "W&B group", nonempty=True)
    tags: list[str] = opt([], "W&B tags (comma-separated)")


@require_declared
@dataclass
class TrainConfig:
    output: str = opt("runs/default", "RUN_DIR: checkpoints, exports, logs", nonempty=True)
    max_steps: int = opt(1000, "optimizer steps; the run ends there", bounds="[1, inf)")
    batch_size: int = opt(64, "batch size per device (global = x processes x grad_accum)",
                          bounds="[1, inf)")
    grad_accum: int = opt(1, "micro-batches per optimizer step", bounds="[1, inf)")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (fp16 uses loss scaling)",
                               choices=("no", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the model")
    channels_last: bool = opt(False, "channels-last memory format (faster convs on GPU)")
    sync_bn: bool = opt(False, "SyncBatchNorm for BatchNorm models under DDP (GPU)")
    seed: int = opt(0, "seed of weights, loader order and sampling", bounds=f"[0, {SEED_MAX}]")
    log_every: int = opt(10, "steps between logged metrics", bounds="[1, inf)")
    val_every: int = opt(200, "steps between validation losses", bounds="[1, inf)")
    image_every: int = opt(500, "steps between reconstruction grids", bounds="[1, inf)")
    ckpt_every: int = opt(500, "steps between checkpoints", bounds="[1, inf)")
    keep_last: int = opt(3, "checkpoints kept (older ones pruned after a complete save)",
                         bounds="[1, inf)")
    resume: str | None = opt(None, "auto (newest checkpoint that verifies) | path to step-<N>/")
    nan_policy: str = opt("stop", "on a NaN/inf loss: stop (error naming step and term) | "
                                  "skip (skip the step and count it)", choices=("stop", "skip"))


@require_declared
@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Rules that relate several fields (each field is already within its range)."""
        self.model.check()
