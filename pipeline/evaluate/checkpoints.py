"""The checkpoints `pipeline evaluate` compares, and the output directory each one gets.

`<run>` and `<N>` of `DIR/<run>-step<N>/` come from the checkpoint's config.json, which is
data: the run name is reduced to one safe path component and the step must be an integer
>= 0, so no crafted config can write (or replace a directory) outside DIR.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import layout, metrics
from ..shards import manifest_path
from ..utils import PipelineError

MAX_STEP = 2 ** 63 - 1        # a step is an int64 counter
# Run names become directory names: letters and digits (any script), `_`, `.`, `+`, `-`.
UNSAFE_NAME_CHARS = re.compile(r"[^\w.+-]+")
MAX_RUN_NAME_BYTES = 100      # with "-step<N>" and atomic_dir's ".tmp-..." well under NAME_MAX


@dataclass
class Checkpoint:
    path: Path
    model: torch.nn.Module
    export: dict[str, Any]     # read_export_config(): model, config, step, run_dir, run_name...
    run: str                   # as recorded; checkpoint_identity() ensures a safe name exists
    step: int

    @property
    def name(self) -> str:
        """The output directory's name: always one safe path component."""
        return f"{safe_component(self.run)}-step{self.step}"


def safe_component(text: str) -> str:
    """`text` as one harmless path component, readable names unchanged (`vae-basic`).

    Runs of other characters than letters, digits and `_.+-` (path separators, spaces,
    control characters) become `_`; leading and trailing `._-` go, so the result is never
    `.` or `..`, never hidden like atomic_dir's temporaries, never read as an option; it is
    cut to MAX_RUN_NAME_BYTES of UTF-8. May be empty: the caller picks a fallback.
    """
    cleaned = UNSAFE_NAME_CHARS.sub("_", text).strip("._-")
    cut = cleaned.encode("utf-8")[:MAX_RUN_NAME_BYTES].decode("utf-8", "ignore")
    return cut.rstrip("._-")


def checkpoint_identity(path: Path, export: dict[str, Any]) -> tuple[str, int]:
    """(run, step) from an export's config.json, checked: these values name the output."""
    where = path / layout.EXPORT_CONFIG_NAME
    step = export.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise PipelineError(f"{where}: 'step' must be an integer >= 0, got {step!r}; "
                            f"re-export the model")
    for key in ("run_name", "run_dir"):
        if export.get(key) is not None and not isinstance(export[key], str):
            raise PipelineError(f"{where}: {key!r} must be a string or null, got "
                                f"{export[key]!r}; re-export the model")
    run_dir = export.get("run_dir")
    candidates = (export.get("run_name"), Path(run_dir).name if run_dir else None,
                  path.resolve().name)
    run = next((c for c in candidates if c and safe_component(c)), "checkpoint")
    return run, step


def load_checkpoints(paths: list[str]) -> list[Checkpoint]:
    """Load every checkpoint on the CPU before evaluating any, so a bad one fails fast."""
    from ..models import from_pretrained, read_export_config

    loaded = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            raise PipelineError(f"checkpoint {arg}: no such directory (pass an export "
                                f"directory RUN_DIR/model or RUN_DIR/checkpoints/step-<N>)")
        try:
            export = read_export_config(path)
            run, step = checkpoint_identity(path, export)
            loaded.append(Checkpoint(path, from_pretrained(path).eval(), export, run, step))
        except PipelineError as e:
            raise PipelineError(f"checkpoint {arg}: {e}") from e
    names = [c.name for c in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PipelineError(f"several checkpoints would write {', '.join(duplicates)}: give "
                            f"each run a distinct run name, or evaluate them into different "
                            f"--output directories")
    return loaded


def check_resolution(manifest: dict[str, Any], shards: str, ckpt: Checkpoint) -> None:
    expected, found = ckpt.model.config.image_size, manifest["image_size"]
    if found != expected:
        raise PipelineError(f"shards {manifest_path(shards)} hold {found}x{found} images but "
                            f"checkpoint {ckpt.path} was trained on {expected}x{expected}: "
                            f"evaluate on shards prepared at {expected} px")
    if found < metrics.MS_SSIM_MIN_SIZE:
        raise PipelineError(f"shards {manifest_path(shards)} hold {found}x{found} images: "
                            f"3-scale MS-SSIM needs at least {metrics.MS_SSIM_MIN_SIZE} px")


def checkpoint_dir(output: str | Path, name: str) -> Path:
    """DIR/<name>, refused when it would lead out of DIR (a link already there)."""
    root = Path(output).resolve()
    out_dir = Path(output) / name
    # `name` is one safe component, so only a symlink at DIR/<name> can escape; atomic_dir
    # would rename the link itself and leave its target alone, but nothing good follows.
    if out_dir.is_symlink() or out_dir.resolve().parent != root or out_dir.name != name:
        raise PipelineError(f"{out_dir} is a link or leads out of --output {output}: remove "
                            f"it or choose another --output")
    return out_dir
