"""The training config: sections `model`, `loss`, `disc`, `data`, `optim`, `tracker`, `train`.

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

from ..utils import PipelineError
from .fields import opt, require_declared
from .model import ARCHS, MODELS, QUANTIZERS, ModelConfig  # noqa: F401  (re-exported)

SAMPLINGS = ("exact", "resampled")
DATA_CACHES = ("none", "host", "gpu")  # --data.cache: stream, or the train data in memory
# Names of the loss and discriminator choices (torch-free: the modules in
# pipeline/models/ that implement them import these).
LPIPS_NET_NAMES = ("vgg", "alex")
DISC_LOSSES = ("hinge", "non-saturating")
DISC_NORMS = ("group", "batch", "none")
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
    perceptual_weight: float = opt(0.0, "weight of the LPIPS term (0: off; needs "
                                        "--loss.lpips_backbone)", bounds="[0, inf)")
    lpips_net: str = opt("vgg", "LPIPS backbone: vgg (taming's) | alex",
                         choices=LPIPS_NET_NAMES)
    lpips_backbone: str | None = opt(None, "LPIPS: torchvision ImageNet state dict of the "
                                           "backbone (vgg16-397923af.pth, or "
                                           "alexnet-owt-7be5be79.pth with --loss.lpips_net "
                                           "alex); never downloaded", nonempty=True)
    lpips_linear: str | None = opt(None, "LPIPS linear layers, the lpips package's "
                                         "weights/v0.1/<net>.pth; unset: the copy shipped "
                                         "inside torchmetrics", nonempty=True)
    adversarial_weight: float = opt(0.0, "weight of the PatchGAN generator loss (0: no "
                                         "discriminator); times the adaptive weight when "
                                         "that is on", bounds="[0, inf)")
    disc_start: int = opt(0, "steps trained without the discriminator; it is used and "
                             "trained from step disc_start + 1 on", bounds="[0, inf)")
    disc_loss: str = opt("hinge", "adversarial loss: hinge | non-saturating",
                         choices=DISC_LOSSES)
    adaptive_weight: bool = opt(True, "scale the generator loss by taming's adaptive weight "
                                      "(gradient-norm ratio at the decoder's last layer, "
                                      "clamped to [0, 1e4]); false: adversarial_weight alone")

    def check(self, image_size: int, disc: "DiscConfig") -> None:
        """Rules between the loss fields and the image size / discriminator. (The LPIPS
        files are checked when the trainer reads them, before the first step: presets
        name no file, and must validate without one.)"""
        if self.adversarial_weight > 0:
            disc.check(image_size)


@require_declared
@dataclass
class DiscConfig:
    """The PatchGAN discriminator (used when --loss.adversarial_weight > 0). Its Adam
    runs at a constant learning rate (no warm-up or decay), from step
    --loss.disc_start + 1 on."""
    layers: int = opt(2, "stride-2 conv layers: receptive field 16 / 34 / 70 / 142 px for "
                         "1 / 2 / 3 / 4 (taming: 3, for 256 px); logit map side "
                         "image_size/2**layers - 2", bounds="[1, 8]")
    channels: int = opt(64, "width of the first conv (doubling per layer, at most 8x)",
                        bounds="[1, 4096]")
    norm: str = opt("group", "group (per image: the same under DDP and any batch size) | "
                             "batch (taming's; per rank) | none", choices=DISC_NORMS)
    lr: float = opt(2e-4, "Adam learning rate of the discriminator (constant)",
                    bounds="(0, inf)")
    betas: tuple[float, float] = opt((0.5, 0.9), "Adam betas of the discriminator "
                                                 "(taming's)", bounds="[0, 1)")
    grad_clip: float = opt(0.0, "max gradient norm of the discriminator; 0: not clipped "
                                "(its norm is logged either way)", bounds="[0, inf)")

    def check(self, image_size: int) -> None:
        side = image_size // 2 ** self.layers - 2
        if side < 1:
            raise PipelineError(f"--disc.layers {self.layers} leaves no logit for "
                                f"{image_size}px images (output side {side}); use at most "
                                f"{max_disc_layers(image_size)}")


def max_disc_layers(image_size: int) -> int:
    """The most discriminator layers whose logit map is still at least 1×1."""
    layers = 0
    while image_size // 2 ** (layers + 1) - 2 >= 1:
        layers += 1
    return layers


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
    cache: str = opt("none", "train images in memory, each rank's part read once: gpu (one "
                             "uint8 tensor on the GPU) | host (pinned host memory) | none "
                             "(stream from the shards)", choices=DATA_CACHES)

    def check(self) -> None:
        if self.cache != "none" and self.sampling == "resampled":
            raise PipelineError(f"--data.cache {self.cache} draws exact epochs of each rank's "
                                f"part; --data.sampling resampled does not apply to it: drop "
                                f"one of the two")


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
    disc: DiscConfig = field(default_factory=DiscConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Rules that relate several fields (each field is already within its range)."""
        self.model.check()
        self.loss.check(self.model.image_size, self.disc)
        self.data.check()
