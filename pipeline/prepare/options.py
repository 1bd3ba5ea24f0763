"""What `pipeline prepare` is asked to do, as typed configs of `pipeline.config.fields`.

- `Options`: everything that decides the bytes of a shard. A job records them (the `job`
  record of `OUT/<split>/.progress/job.json` and of the manifest) and every re-run must
  match them, so shards made with different options are never mixed.
- `PrepareConfig`: a whole command, the `Options` plus where and how to run them (input,
  output, splits, workers, part, failure budget, label and class files): one option per
  field (`--image-size` is the alias of `--image_size`, and so on), saved with the outputs
  (`job.config_name`).

Each field declares its range next to its default, and constructing either class checks
every value with messages that name the option as users type it (`--image-size must be at
least 1, got 0`): those messages are older than the generic ones of `pipeline.config`
(`must be >= 1`), and scripts and tests match them. The declared ranges and these checks
say the same (tested), so `pipeline.config.validate` accepts whatever got through here.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..config.fields import opt, require_declared
from ..inputs import printable
from ..shards import IMAGE_EXTS
from ..utils import PipelineError

RESIZE_POLICIES = ("center-crop", "box")
LOSSY_FORMATS = ("webp", "jpg")
# Default decoded pixels per output pixel that reduced (DCT-scaled) JPEG decoding keeps
# (--decode-oversampling). center-crop's bicubic filter tolerates 1.5: its output stays
# close to a full decode's while typical ImageNet sizes decode at 1/4 (README,
# Performance). PIL's BOX filter gives each source pixel all or nothing (no partial
# coverage at the window edges), so its output depends on the source resolution more
# than bicubic's and needs more decoded pixels to stay as close.
OVERSAMPLING = {"center-crop": 1.5, "box": 4.0}
DEFAULT_SHARD_SIZE = 3000
DEFAULT_QUALITY = 90
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
MAX_IMAGE_SIZE = 4096  # --image-size: one 4096x4096 RGB sample is already 50 MB decoded
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a split is a directory of OUT
SLURM_PART_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")

# The command line's spelling of the fields whose names have more than one word; the
# others are `--<field>` (`--resize`, `--seed`...). Messages name options this way.
ALIASES = {"--image-size": "image_size", "--image-format": "image_format",
           "--shard-size": "shard_size", "--max-pixels": "max_pixels",
           "--decode-oversampling": "decode_oversampling", "--max-failures": "max_failures",
           "--val-labels": "val_labels"}


def option_flag(name: str) -> str:
    """The option a user types for field `name`: `image_size` -> `--image-size`."""
    return next((flag for flag, field in ALIASES.items() if field == name), f"--{name}")


@require_declared
@dataclass(frozen=True)
class Options:
    """Everything that decides the bytes of a shard; stored with the output and compared
    on re-runs. The names, order and values of these fields are the job record's
    (`asdict(options)`): outputs written by earlier versions resume only while they stay."""

    image_size: int = opt(64, "output side in pixels", bounds=f"[1, {MAX_IMAGE_SIZE}]")
    resize: str = opt("center-crop", "center-crop: centred square of the short side, bicubic; "
                      "box: whole image squashed, area averaging (Downsampled ImageNet)",
                      choices=RESIZE_POLICIES)
    image_format: str = opt("png", "sample image encoding: png (lossless), npy (raw HxWx3 "
                            "uint8), webp or jpg (lossy, see --quality)", choices=IMAGE_EXTS)
    quality: int | None = opt(None, f"webp/jpg quality 1-100 (unset: {DEFAULT_QUALITY})",
                              bounds="[1, 100]")
    shard_size: int = opt(DEFAULT_SHARD_SIZE, "samples per shard", bounds="[1, inf)")
    seed: int = opt(0, "seed of the train shuffle that assigns samples to shards",
                    bounds="[0, inf)")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "inputs with more pixels are refused as "
                          "decompression bombs", bounds="[1, inf)")
    decode_oversampling: float | None = opt(
        None, "JPEGs are decoded DCT-scaled (1/2, 1/4, 1/8) while at least X decoded pixels "
              f"per output pixel remain across the crop (unset: {OVERSAMPLING['center-crop']} "
              f"for center-crop, ~41 dB from a full decode; {OVERSAMPLING['box']:g} for box); "
              "2 gives ~49 dB and is ~25% slower; a large value always decodes in full",
        bounds="[1, inf]")

    def __post_init__(self) -> None:
        if self.quality is None and self.image_format in LOSSY_FORMATS:
            object.__setattr__(self, "quality", DEFAULT_QUALITY)
        if self.decode_oversampling is None and self.resize in OVERSAMPLING:
            object.__setattr__(self, "decode_oversampling", OVERSAMPLING[self.resize])
        self.check()

    def check(self) -> None:
        """Refuse values outside the declared ranges, naming the option as typed."""
        if self.resize not in RESIZE_POLICIES:
            raise PipelineError(f"--resize must be one of {', '.join(RESIZE_POLICIES)}, "
                                f"got {self.resize!r}")
        if self.image_format not in IMAGE_EXTS:
            raise PipelineError(f"--image-format must be one of {', '.join(IMAGE_EXTS)}, "
                                f"got {self.image_format!r}")
        lossy = self.image_format in LOSSY_FORMATS
        if self.quality is not None and not lossy:
            raise PipelineError(f"--quality applies to webp and jpg only; "
                                f"{self.image_format} is lossless")
        if lossy and not 1 <= self.quality <= 100:
            raise PipelineError(f"--quality must be 1-100, got {self.quality}")
        for name in ("image_size", "shard_size", "max_pixels", "decode_oversampling"):
            at_least(name, getattr(self, name), 1)
        if self.image_size > MAX_IMAGE_SIZE:
            raise PipelineError(f"--image-size must be at most {MAX_IMAGE_SIZE}, "
                                f"got {self.image_size}")
        at_least("seed", self.seed, 0)  # numpy's generators take seeds >= 0 only

    def validate(self) -> None:
        """The name callers used before these were config classes."""
        self.check()


def at_least(name: str, value: Any, low: int) -> None:
    if not value >= low:  # also refuses NaN
        raise PipelineError(f"{option_flag(name)} must be at least {low}, got {value}")


# Option names as the user typed them, for messages about differing options.
OPTION_FLAGS = {f.name: option_flag(f.name) for f in dataclasses.fields(Options)}


def job_options(options: Options) -> dict[str, Any]:
    """The `options` entry of a job record: the `Options` fields alone, also of a
    PrepareConfig (whose other fields may differ between the parts and re-runs of a job)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(Options)}


@require_declared
@dataclass(frozen=True)
class PrepareConfig(Options):
    """A `pipeline prepare` command: the shard `Options` plus where and how to run them.
    Paths stay strings, as typed; unset values are resolved when the job starts
    (`run.run_job`), and the resolved config is saved with the outputs."""

    input: str | None = opt(None, "tree holding train/<wnid>/*.JPEG and/or val/ (class "
                            "folders, or flat with labels in ROOT: LOC_val_solution.csv, "
                            "ILSVRC2012_validation_ground_truth.txt + devkit, val_labels.csv)")
    output: str = opt("shards", "local directory; each split goes to OUT/<split>/ (the "
                      "project's shard root by default)")
    splits: str | None = opt(None, "comma-separated splits (unset: those of train,val that "
                             "exist)")
    workers: int | None = opt(None, "decoding processes (unset: the cores this process may "
                              "use, from SLURM_CPUS_PER_TASK or CPU affinity)",
                              bounds="[1, inf)")
    part: str | None = opt(None, "K/N: do only shards i with i % N == K (0-based), for N "
                           "machines; unset: from SLURM_ARRAY_TASK_ID/COUNT if set, else the "
                           "whole job; join the parts with --merge")
    max_failures: int = opt(0, "exit non-zero if more than N inputs fail; failed inputs (and "
                            "entries that are not regular files) are listed in "
                            "OUT/<split>/failures.jsonl either way", bounds="[0, inf)")
    val_labels: str | None = opt(None, "labels of a flat val/: Kaggle LOC_val_solution.csv, "
                                 "ILSVRC2012_validation_ground_truth.txt (with the devkit's "
                                 "meta.mat or map_clsloc.txt beside it) or a filename,wnid CSV")
    classes: str | None = opt(None, "class order: one wnid per line (optionally followed by "
                              "its name, as in LOC_synset_mapping.txt); unset: sorted folders "
                              "of ROOT/train, else the class map of OUT/train/manifest.json")

    def check(self) -> None:
        super().check()
        for split in split_list(self.splits):
            check_split_name(split)
        if self.workers is not None:
            at_least("workers", self.workers, 1)
        at_least("max_failures", self.max_failures, 0)
        if self.part is not None:
            parse_part(self.part)

    def shard_options(self) -> Options:
        return Options(**job_options(self))


def split_list(text: str | None) -> list[str]:
    """`--splits train,val` -> ["train", "val"]; unset or empty -> []."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def check_split_name(split: str) -> None:
    if not SPLIT_NAME.fullmatch(split):
        raise PipelineError(f"--splits: {printable(split)!r} is not a split name (letters, "
                            "digits, '_' and '-'; it names ROOT/<split> and OUT/<split>)")


def parse_part(text: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """`--part K/N`, else SLURM array variables (0-based from SLURM_ARRAY_TASK_MIN), else 0/1."""
    if text is None:
        if not all(v in env for v in SLURM_PART_VARS):
            return (0, 1)
        origin = "SLURM_ARRAY_TASK_ID/COUNT"
        values = {v: env.get(v, "0").strip() for v in (*SLURM_PART_VARS, "SLURM_ARRAY_TASK_MIN")}
        if not all(re.fullmatch(r"\d+", value) for value in values.values()):
            raise PipelineError(f"{origin}: expected integers, got "
                                + ", ".join(f"{v}={value!r}" for v, value in values.items())
                                + "; or pass --part K/N")
        k = int(values["SLURM_ARRAY_TASK_ID"]) - int(values["SLURM_ARRAY_TASK_MIN"])
        n = int(values["SLURM_ARRAY_TASK_COUNT"])
    else:
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m:
            raise PipelineError(f"--part must look like K/N (e.g. 0/4), got {text!r}")
        k, n = int(m[1]), int(m[2])
        origin = "--part"
    if not 0 <= k < n:
        raise PipelineError(f"{origin}: part {k} of {n} is out of range (0 <= K < N)")
    return (k, n)


def part_text(part: tuple[int, int]) -> str:
    return f"{part[0]}/{part[1]}"
