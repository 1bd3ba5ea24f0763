"""Typed configuration: nested dataclasses <- YAML preset <- command-line overrides.

The resolved `Config` is validated before any process starts training, written to
`RUN_DIR/config.yaml`, logged to the tracker and saved inside every checkpoint.

Command-line overrides use the dotted field path, e.g. ``--model.codebook_size 1024``
or ``--optim.lr 3e-4``; the common ones also have short aliases (``--model``,
``--arch``, ``--batch-size``, ``--max-steps``, ...; see `pipeline train --help`).

Every field declares its valid values next to its default (`opt(..., bounds="(0, inf)")`,
`choices=...`, `nonempty=True`); the type adds the rest (a `tuple[float, float]` holds
exactly two values, strings hold no control characters, only `X | None` fields may be
unset). One generic check (`field_problems`) enforces them all, then `validate` adds the
few rules that relate several fields (latent side, widths vs latent channels, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import yaml

from .utils import PipelineError

MODELS = ("ae", "vae", "vqvae")
ARCHS = ("basic", "resnet")
QUANTIZERS = ("vq", "fsq")
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


# ---------------------------------------------------------------- declared ranges

@dataclass(frozen=True)
class Bounds:
    """An interval written as in mathematics: "[0, 1)", "(0, inf)", "[1, inf)".

    NaN lies in no interval, and an open end at infinity keeps infinities out, so
    "(0, inf)" also means "finite"."""
    low: float
    high: float
    low_open: bool
    high_open: bool

    _SYNTAX = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])$")

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        match = cls._SYNTAX.match(text)
        if not match:
            raise ValueError(f"bounds {text!r}: write an interval such as '[0, 1)' or '(0, inf)'")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), left == "(", right == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)', 'a finite number': what the value must be."""
        low, high = _number(self.low), _number(self.high)
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class Rule:
    """What a field declares beyond its type. For lists and tuples, `bounds` and
    `choices` apply to every element and `nonempty` to the list itself."""
    bounds: Bounds | None = None
    choices: tuple | None = None
    nonempty: bool = False


def opt(default: Any, help: str, *, bounds: str | None = None, choices: tuple | None = None,
        nonempty: bool = False) -> Any:
    """A config field with its `--help` text and its valid values (lists are copied per
    instance). `bounds` is an interval ("[0, 1)"), `choices` the allowed values,
    `nonempty` refuses "" and []."""
    rule = Rule(Bounds.parse(bounds) if bounds else None,
                tuple(choices) if choices is not None else None, nonempty)
    metadata = {"help": help, "rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """What the network is. Saved with every export; `from_pretrained` rebuilds from it."""
    model: str = opt("ae", "bottleneck: ae | vae | vqvae", choices=MODELS)
    arch: str = opt("basic", "encoder/decoder family: basic (the seed) | resnet", choices=ARCHS)
    image_size: int = opt(64, "image side in pixels (the shards' image_size)",
                          bounds="[8, 1024]")
    in_channels: int = opt(3, "image channels (the shards hold RGB: 3)", bounds="[1, 4]")
    widths: list[int] = opt([64, 128, 256, 512],
                            "basic: channels of the stride-2 convs; latent side = 64/2**len",
                            bounds="[1, inf)", nonempty=True)
    channels: int = opt(64, "resnet: base width; level i has channels * channel_mult[i]",
                        bounds="[1, inf)")
    channel_mult: list[int] = opt([1, 2, 2], "resnet: width multipliers, one per resolution "
                                             "(len = log2(downsample) + 1)",
                                  bounds="[1, inf)", nonempty=True)
    num_res_blocks: int = opt(2, "resnet: residual blocks per resolution", bounds="[1, inf)")
    attention: bool = opt(True, "resnet: self-attention at the lowest resolution")
    num_groups: int = opt(32, "resnet: GroupNorm groups (clipped to divide the width)",
                          bounds="[1, inf)")
    downsample: int = opt(4, "resnet: f, the latent side is image_size / f (4, 8 or 16)",
                          bounds="[2, 32]")
    latent_channels: int = opt(512, "C of the AE/VAE latent (basic AE: equals widths[-1])",
                               bounds="[1, inf)")
    logvar_clamp: tuple[float, float] = opt((-30.0, 20.0), "VAE: log-variance clamp (min max)",
                                            bounds="(-inf, inf)")
    quantizer: str = opt("vq", "vqvae: vq (codebook) | fsq (finite scalar quantisation)",
                         choices=QUANTIZERS)
    codebook_size: int = opt(512, "vq: K, codes in the codebook", bounds="[2, inf)")
    code_dim: int = opt(64, "vq: D, dimension of a code", bounds="[1, inf)")
    codebook_ema: bool = opt(True, "vq: learn codes by EMA updates (true) or by the codebook "
                                   "loss (false)")
    ema_decay: float = opt(0.99, "vq: EMA decay of the codebook statistics", bounds="[0, 1)")
    l2_normalize_codes: bool = opt(False, "vq: l2-normalise codes and encoder outputs")
    dead_code_threshold: float = opt(1.0, "vq: EMA cluster size under which a code is "
                                          "restarted from encoder outputs", bounds="[0, inf)")
    usage_window: int = opt(100, "vq/fsq: training steps in the code-usage window",
                            bounds="[1, inf)")
    fsq_levels: list[int] = opt([8, 8, 8, 6, 5], "fsq: levels per latent channel",
                                bounds="[2, inf)", nonempty=True)

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
                           "l1 | mse", choices=("l1", "mse"))
    kl_weight: float = opt(1.0, "VAE: beta, weight of the per-pixel KL (see LossConfig)",
                           bounds="[0, inf)")
    kl_warmup_steps: int = opt(0, "VAE: beta ramps linearly from 0 over these steps",
                               bounds="[0, inf)")
    commitment_weight: float = opt(0.25, "vq: commitment loss weight (VQ-VAE's beta)",
                                   bounds="[0, inf)")
    codebook_weight: float = opt(1.0, "vq: codebook loss weight (only without codebook_ema)",
                                 bounds="[0, inf)")


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


def sections() -> Iterator[tuple[str, type]]:
    """(name, dataclass) of every config section, in order."""
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        yield section.name, hints[section.name]


def config_fields() -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type hint) of every field of every section."""
    for name, cls in sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{name}.{f.name}", f, hints[f.name]


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return hint, False


def element_type(hint: Any) -> Any:
    """The scalar type of a field: its own, or that of its list/tuple elements."""
    inner, _ = unwrap_optional(hint)
    if typing.get_origin(inner) in (list, tuple):
        args = typing.get_args(inner)
        return args[0] if args else str
    return inner


# ---------------------------------------------------------------- dict <-> dataclass

class FieldValueError(PipelineError):
    """A value that cannot become its field's type; `where` is e.g. 'config.train.seed'."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where} {problem}")
        self.where, self.problem = where, problem


def from_dict(cls, data: dict[str, Any] | None, where: str = "config"):
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are an error."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PipelineError(f"{where} must be a mapping of field: value, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - known))
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


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML/CLI values to the field type (lists from "a,b" strings, tuples from
    lists, ints to floats...). Ranges are `validate`'s business, not this one's."""
    inner, _optional = unwrap_optional(hint)
    if value is None:
        return None  # only optional fields may be unset: validate says so otherwise
    if typing.get_origin(inner) in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise FieldValueError(where, f"expects a list, got {value!r}")
        out = [_coerce(v, element_type(inner), where) for v in value]
        return tuple(out) if typing.get_origin(inner) is tuple else out
    return _coerce_scalar(value, inner, where)


def _coerce_scalar(value: Any, hint: Any, where: str) -> Any:
    wanted = {bool: "true or false", int: "int", float: "float", str: "a string"}.get(hint)
    if wanted is None:
        return value
    refused = FieldValueError(where, f"expects {wanted}, got {value!r}")
    if isinstance(value, (dict, list, tuple)):
        raise refused
    if hint is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise refused
    if isinstance(value, bool):  # YAML's `yes` is no number and no name
        raise refused
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value.strip()) if isinstance(value, str) else int(value)
        if hint is float:
            return float(value)
    except (ValueError, OverflowError):
        raise refused from None
    return str(value)


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
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"config {name_or_path} is not valid YAML: {e}") from None
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
    for dotted, f, _hint in config_fields():
        flags = [f"--{dotted}"] + [a for a, d in aliases.items() if d == dotted]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        bounds = f.metadata["rule"].bounds
        valid = f"; {bounds.describe()}" if bounds else ""
        group.add_argument(*flags, dest=dotted, default=None, metavar="V",
                           help=f"{text} (default: {default}{valid})".replace("%", "%%"))


def build_config(preset: str | None, args: argparse.Namespace,
                 defaults: dict[str, Any] | None = None,
                 aliases: dict[str, str] = ALIASES) -> Config:
    """Dataclass defaults <- `defaults` <- preset <- command-line values, then validate.
    `aliases` (short flag -> dotted field) lets messages name the flag the user typed."""
    data = merge({}, defaults or {})
    if preset:
        data = merge(data, load_preset(preset))
    for key, value in vars(args).items():
        if "." in key and value is not None:
            set_dotted(data, key, value)
    try:
        cfg = from_dict(Config, data)
    except FieldValueError as e:
        name = OptionName(e.where.removeprefix("config."), aliases)
        raise PipelineError(name.says(e.problem)) from None
    validate(cfg, aliases)
    return cfg


# ---------------------------------------------------------------- validation

@dataclass(frozen=True)
class OptionName:
    """How messages name a field: `--optim.lr` first (what the problem follows), then the
    short flags that set it (`alias_note`); `short` is the flag a user most likely typed."""
    dotted: str
    aliases: dict[str, str] | None = None  # None: the dotted option only

    @property
    def option(self) -> str:
        return f"--{self.dotted}"

    @property
    def flags(self) -> list[str]:
        return [a for a, d in (self.aliases or {}).items() if d == self.dotted]

    @property
    def short(self) -> str:
        return (self.flags or [self.option])[0]

    @property
    def alias_note(self) -> str:
        return f" (alias {', '.join(self.flags)})" if self.flags else ""

    def says(self, problem: str) -> str:
        """'--optim.lr must be > 0, got -1.0 (alias --lr)'."""
        return f"{self.option} {problem}{self.alias_note}"


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _scalar_problem(value: Any, hint: Any, rule: Rule) -> str | None:
    """What is wrong with one value (a field's, or one element of a list field), as
    'must be ..., got ...'; None when it is valid."""
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint in (int, float):
        kinds = int if hint is int else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"must be {'an integer' if hint is int else 'a number'}, got {value!r}"
        if rule.bounds is not None and value not in rule.bounds:
            return f"must be {rule.bounds.describe()}, got {value!r}"
    elif hint is str:
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if rule.nonempty and not value:
            return "must not be empty"
        if _CONTROL_CHARACTER.search(value):
            return f"must not contain control characters, got {value!r}"
    if rule.choices is not None and value not in rule.choices:
        return f"must be one of {', '.join(map(str, rule.choices))}, got {value!r}"
    return None


def field_problem(value: Any, hint: Any, rule: Rule, name: OptionName) -> str | None:
    """The message for a field value outside what its type and `rule` allow, else None."""
    inner, optional = unwrap_optional(hint)
    if value is None:
        return None if optional else name.says("must be set, got null")
    container = typing.get_origin(inner)
    if container not in (list, tuple):
        if rule.choices is not None and isinstance(value, str) and value not in rule.choices:
            also = f" (option {name.option})" if name.short != name.option else ""
            return (f"unknown {name.short} {value!r}; choose one of "
                    f"{', '.join(map(str, rule.choices))}{also}")
        problem = _scalar_problem(value, inner, rule)
        return name.says(problem) if problem else None
    if not isinstance(value, (list, tuple)):
        return name.says(f"must be a list, got {value!r}")
    args = typing.get_args(inner)
    if container is tuple and Ellipsis not in args and len(value) != len(args):
        return name.says(f"needs exactly {len(args)} values, got {len(value)}: {list(value)}")
    if rule.nonempty and not value:
        return name.says("must not be empty")
    element_rule = dataclasses.replace(rule, nonempty=element_type(inner) is str)
    for item in value:
        problem = _scalar_problem(item, element_type(inner), element_rule)
        if problem:
            return name.says(f"{list(value)}: each value {problem}")
    return None


def field_problems(cfg: Config, aliases: dict[str, str] | None = ALIASES) -> list[str]:
    """One message per field whose value is outside its declared range."""
    problems = []
    for dotted, f, hint in config_fields():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        problem = field_problem(value, hint, f.metadata["rule"], OptionName(dotted, aliases))
        if problem:
            problems.append(problem)
    return problems


def validate(cfg: Config, aliases: dict[str, str] | None = ALIASES) -> None:
    """Catch configs that cannot work before any process starts; say what to change.
    First every field against its declared range, then the rules between fields."""
    problems = field_problems(cfg, aliases)
    if problems:
        raise PipelineError("; ".join(problems))
    check_consistency(cfg)


def check_consistency(cfg: Config) -> None:
    """Rules that relate several fields (each field is already within its range)."""
    m = cfg.model
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
    low, high = m.logvar_clamp
    if low >= high:
        raise PipelineError(f"--model.logvar_clamp {list(m.logvar_clamp)}: the minimum must be "
                            f"below the maximum")


def undeclared_fields() -> list[str]:
    """Numeric fields (or lists of numbers) that declare neither bounds nor choices.
    Strings and booleans are covered by their type."""
    return [dotted for dotted, f, hint in config_fields()
            if element_type(hint) in (int, float)
            and f.metadata["rule"].bounds is None and f.metadata["rule"].choices is None]


if undeclared_fields():  # a new field without its range is a bug: fail at import
    raise TypeError(f"config fields without a declared range: {', '.join(undeclared_fields())}")
