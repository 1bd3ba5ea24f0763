"""Typed configuration: nested dataclasses <- YAML preset <- command-line overrides.

The resolved `Config` is validated before any process starts training, written to
`RUN_DIR/config.yaml`, logged to the tracker and saved inside every checkpoint.

Command-line overrides use the dotted field path, e.g. ``--model.codebook_size 1024``
or ``--optim.lr 3e-4``; the common ones also have short aliases (``--model``,
``--arch``, ``--batch-size``, ``--max-steps``, ...; see `pipeline train --help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .utils import PipelineError

MODELS = ("ae", "vae", "vqvae")
ARCHS = ("basic", "resnet")
QUANTIZERS = ("vq", "fsq")


def opt(default: Any, help: str) -> Any:
    """A config field with its `--help` text (lists are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """What the network is. Saved with every export; `from_pretrained` rebuilds from it."""
    model: str = opt("ae", "bottleneck: ae | vae | vqvae")
    arch: str = opt("basic", "encoder/decoder family: basic (the seed) | resnet")
    image_size: int = opt(64, "image side in pixels (the shards' image_size)")
    in_channels: int = opt(3, "image channels")
    widths: list[int] = opt([64, 128, 256, 512],
                            "basic: channels of the stride-2 convs; latent side = 64/2**len")
    channels: int = opt(64, "resnet: base width; level i has channels * channel_mult[i]")
    channel_mult: list[int] = opt([1, 2, 2], "resnet: width multipliers, one per resolution "
                                             "(len = log2(downsample) + 1)")
    num_res_blocks: int = opt(2, "resnet: residual blocks per resolution")
    attention: bool = opt(True, "resnet: self-attention at the lowest resolution")
    num_groups: int = opt(32, "resnet: GroupNorm groups (clipped to divide the width)")
    downsample: int = opt(4, "resnet: f, the latent side is image_size / f (4, 8 or 16)")
    latent_channels: int = opt(512, "C of the AE/VAE latent (basic AE: equals widths[-1])")
    logvar_clamp: tuple[float, float] = opt((-30.0, 20.0), "VAE: log-variance clamp (min max)")
    quantizer: str = opt("vq", "vqvae: vq (codebook) | fsq (finite scalar quantisation)")
    codebook_size: int = opt(512, "vq: K, codes in the codebook")
    code_dim: int = opt(64, "vq: D, dimension of a code")
    codebook_ema: bool = opt(True, "vq: learn codes by EMA updates (true) or by the codebook "
                                   "loss (false)")
    ema_decay: float = opt(0.99, "vq: EMA decay of the codebook statistics")
    l2_normalize_codes: bool = opt(False, "vq: l2-normalise codes and encoder outputs")
    dead_code_threshold: float = opt(1.0, "vq: EMA cluster size under which a code is "
                                          "restarted from encoder outputs")
    usage_window: int = opt(100, "vq/fsq: training steps in the code-usage window")
    fsq_levels: list[int] = opt([8, 8, 8, 6, 5], "fsq: levels per latent channel")

    @property
    def latent_side(self) -> int:
        if self.arch == "basic":
            return self.image_size // 2 ** len(self.widths)
        return self.image_size // self.downsample


@dataclass
class LossConfig:
    """KL convention: summed over latent elements and averaged over the batch (nats per
    image, logged as `kl`), then divided by the number of pixel values (3*64*64) so that
    beta is comparable to the per-pixel reconstruction loss (`kl_weighted`)."""
    recon: str = opt("l1", "reconstruction loss on images in [-1, 1], mean over pixels: "
                           "l1 | mse")
    kl_weight: float = opt(1.0, "VAE: beta, weight of the per-pixel KL (see LossConfig)")
    kl_warmup_steps: int = opt(0, "VAE: beta ramps linearly from 0 over these steps")
    commitment_weight: float = opt(0.25, "vq: commitment loss weight (VQ-VAE's beta)")
    codebook_weight: float = opt(1.0, "vq: codebook loss weight (only without codebook_ema)")


@dataclass
class DataConfig:
    train_shards: str = opt("", "train shard spec: split dir with manifest.json, brace "
                                "pattern, URL list or 'pipe:' command")
    val_shards: str = opt("", "val shard spec (same forms)")
    num_workers: int = opt(2, "loader worker processes per rank")
    shuffle_buffer: int = opt(2000, "samples in the train shuffle buffer")
    flip: bool = opt(True, "random horizontal flip (training only)")
    val_samples: int = opt(256, "first N val samples used for the periodic validation loss")


@dataclass
class OptimConfig:
    lr: float = opt(2e-4, "AdamW peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    betas: tuple[float, float] = opt((0.9, 0.99), "AdamW betas (b1 b2)")
    warmup_steps: int = opt(100, "linear lr warm-up steps")
    min_lr_ratio: float = opt(0.1, "cosine decay ends at lr * min_lr_ratio")
    grad_clip: float = opt(1.0, "max global gradient norm; 0 disables clipping")
    ema: bool = opt(False, "keep an EMA of the weights; exports use it when on")
    ema_decay: float = opt(0.999, "decay of the weight EMA")


@dataclass
class TrackerConfig:
    tracker: str = opt("wandb", "wandb | tensorboard | none (history.jsonl is always written)")
    project: str = opt("ae-pipeline", "W&B project")
    entity: str | None = opt(None, "W&B entity (team or user)")
    run_name: str | None = opt(None, "tracker run name (default: RUN_DIR's name)")
    group: str | None = opt(None, "W&B group")
    tags: list[str] = opt([], "W&B tags (comma-separated)")


@dataclass
class TrainConfig:
    output: str = opt("runs/default", "RUN_DIR: checkpoints, exports, logs")
    max_steps: int = opt(1000, "optimizer steps; the run ends there")
    batch_size: int = opt(64, "batch size per device (global = x processes x grad_accum)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (fp16 uses loss scaling)")
    compile: bool = opt(False, "torch.compile the model")
    channels_last: bool = opt(False, "channels-last memory format (faster convs on GPU)")
    sync_bn: bool = opt(False, "SyncBatchNorm for BatchNorm models under DDP (GPU)")
    seed: int = opt(0, "seed of weights, loader order and sampling")
    log_every: int = opt(10, "steps between logged metrics")
    val_every: int = opt(200, "steps between validation losses")
    image_every: int = opt(500, "steps between reconstruction grids")
    ckpt_every: int = opt(500, "steps between checkpoints")
    keep_last: int = opt(3, "checkpoints kept (older ones pruned after a complete save)")
    resume: str | None = opt(None, "auto (newest complete checkpoint) | path to step-<N>/")
    nan_policy: str = opt("stop", "on a NaN/inf loss: stop (error naming step and term) | "
                                  "skip (skip the step and count it)")


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


# ---------------------------------------------------------------- dict <-> dataclass

def from_dict(cls, data: dict[str, Any] | None, where: str = "config"):
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are an error."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PipelineError(f"unknown field(s) {', '.join(unknown)} in {where}; "
                            f"valid fields: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML/CLI values to the field type (tuples from lists, ints to floats...)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"{where} expects a list, got {value!r}")
        elem = args[0] if args else str
        out = [_coerce(v, elem, where) for v in value]
        return tuple(out) if origin is tuple else out
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return low in ("1", "true", "yes", "on")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except ValueError:
        raise PipelineError(f"{where} expects {getattr(hint, '__name__', hint)}, "
                            f"got {value!r}") from None
    return value


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A YAML preset: a file path, or a name shipped in pipeline/presets/ (e.g. `vqvae`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        preset = resources.files("pipeline") / "presets" / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise PipelineError(f"config {name_or_path!r} is neither a YAML file nor a preset; "
                                f"presets: {', '.join(list_presets())}")
        text = preset.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise PipelineError(f"config {name_or_path} must be a YAML mapping")
    return data


def list_presets() -> list[str]:
    folder = resources.files("pipeline") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- command line

def add_config_arguments(parser: argparse.ArgumentParser, aliases: dict[str, str]) -> None:
    """One `--section.field` option per config field, plus short aliases.

    `aliases` maps a short flag (e.g. ``--max-steps``) to a dotted path
    (``train.max_steps``). Values are kept as strings and coerced by `from_dict`.
    """
    group = parser.add_argument_group("config fields (override the preset)")
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(typing.get_type_hints(Config)[section.name]):
            dotted = f"{section.name}.{f.name}"
            flags = [f"--{dotted}"] + [a for a, d in aliases.items() if d == dotted]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata.get("help", "")
            group.add_argument(*flags, dest=dotted, default=None, metavar="V",
                               help=f"{text} (default: {default})".replace("%", "%%"))


def build_config(preset: str | None, args: argparse.Namespace,
                 defaults: dict[str, Any] | None = None) -> Config:
    """Dataclass defaults <- `defaults` <- preset <- command-line values, then validate."""
    data = merge({}, defaults or {})
    if preset:
        data = merge(data, load_preset(preset))
    for key, value in vars(args).items():
        if "." in key and value is not None:
            set_dotted(data, key, value)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Catch configs that cannot work before any process starts; say what to change."""
    m = cfg.model
    if m.model not in MODELS:
        raise PipelineError(f"unknown --model {m.model!r}; choose one of {', '.join(MODELS)}")
    if m.arch not in ARCHS:
        raise PipelineError(f"unknown --arch {m.arch!r}; choose one of {', '.join(ARCHS)}")
    if m.quantizer not in QUANTIZERS:
        raise PipelineError(f"unknown --model.quantizer {m.quantizer!r}; "
                            f"choose one of {', '.join(QUANTIZERS)}")
    if m.arch == "basic":
        side = m.image_size / 2 ** len(m.widths)
        if side < 1 or not side.is_integer():
            raise PipelineError(f"--model.widths {m.widths} halves {m.image_size}px "
                                f"{len(m.widths)} times: the latent side would be {side}; "
                                f"use at most {int(math.log2(m.image_size))} widths")
        if m.model == "ae" and m.latent_channels != m.widths[-1]:
            raise PipelineError(f"the basic AE's latent is its last encoder width "
                                f"({m.widths[-1]}); set --model.latent_channels "
                                f"{m.widths[-1]} or change --model.widths")
    else:
        if m.downsample not in (2, 4, 8, 16, 32) or m.image_size % m.downsample:
            raise PipelineError(f"--model.downsample {m.downsample} does not fit "
                                f"{m.image_size}px images; use 4, 8 or 16")
        expected = int(math.log2(m.downsample)) + 1
        if len(m.channel_mult) != expected:
            raise PipelineError(f"--model.channel_mult {m.channel_mult} has "
                                f"{len(m.channel_mult)} levels but downsample {m.downsample} "
                                f"needs {expected} (one per resolution)")
    if m.model == "vqvae" and m.quantizer == "vq" and m.codebook_size < 2:
        raise PipelineError("--model.codebook_size must be at least 2")
    if m.model == "vqvae" and m.quantizer == "fsq" and any(l < 2 for l in m.fsq_levels):
        raise PipelineError(f"--model.fsq_levels {m.fsq_levels}: every level must be >= 2")
    if m.model == "vqvae" and m.quantizer == "vq":
        if not 0.0 <= m.ema_decay < 1.0:
            raise PipelineError(f"--model.ema_decay {m.ema_decay} must be in [0, 1)")
        if m.dead_code_threshold < 0:
            raise PipelineError("--model.dead_code_threshold must be >= 0")
    if m.usage_window < 1:
        raise PipelineError("--model.usage_window must be >= 1")
    if cfg.loss.recon not in ("l1", "mse"):
        raise PipelineError(f"--loss.recon {cfg.loss.recon!r}: choose l1 or mse")
    t = cfg.train
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise PipelineError(f"--mixed-precision {t.mixed_precision!r}: choose no, bf16 or fp16")
    if t.nan_policy not in ("stop", "skip"):
        raise PipelineError(f"--train.nan_policy {t.nan_policy!r}: choose stop or skip")
    if cfg.tracker.tracker not in ("wandb", "tensorboard", "none"):
        raise PipelineError(f"--tracker {cfg.tracker.tracker!r}: choose wandb, tensorboard "
                            f"or none")
    for name in ("max_steps", "batch_size", "grad_accum", "log_every", "val_every",
                 "image_every", "ckpt_every", "keep_last"):
        if getattr(t, name) < 1:
            raise PipelineError(f"--train.{name} must be >= 1, got {getattr(t, name)}")
