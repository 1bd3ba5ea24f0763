"""What the report reads: `metrics.json` files, the strips beside them, runs and their logs.

Everything here is data written elsewhere (by `pipeline evaluate` and `pipeline train`, maybe
on another machine, maybe crafted): it is checked on reading, and a bad file raises a
PipelineError naming it, so the sections can rely on the types they format.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..layout import METRIC_COLUMNS, METRICS_NAME, read_history
from ..utils import PipelineError
from .document import Image

REQUIRED_KEYS = ("name", "model", "step", "psnr", "files")
STRIP_SCALE = 2  # 64x64 images shown at 128x128: large enough to judge artifacts, still crisp


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def model_kind(metrics: dict[str, Any]) -> str:
    """`model`, with the quantiser when there is one: VQ and FSQ differ in rate and usage."""
    quantizer = metrics.get("quantizer")
    return f"{metrics['model']} ({quantizer})" if quantizer else str(metrics["model"])


# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    path: Path  # its metrics.json
    metrics: dict[str, Any]
    index: int
    label: str = ""  # unique display name, set once all checkpoints are known

    @property
    def run_dir(self) -> Path | None:
        """The run directory, found also when it was recorded relative to another cwd.

        Training records run_dir as given on its command line; evaluate records the
        checkpoint path resolved. A relative run_dir that does not exist from here is
        therefore looked up among the checkpoint's parent directories.
        """
        recorded = self.metrics.get("run_dir")
        if not recorded:
            return None
        run_dir = Path(recorded)
        if run_dir.is_absolute() or run_dir.is_dir():
            return run_dir
        checkpoint = self.metrics.get("checkpoint")
        for parent in Path(checkpoint).parents if isinstance(checkpoint, str) else ():
            if parent.parts[-len(run_dir.parts):] == run_dir.parts:
                return parent
        return run_dir

    def file(self, kind: str) -> Path | None:
        """The file of `kind` (a key of `layout.STRIP_FILES`) listed in metrics.json `files`,
        or None when not listed."""
        name = self.metrics["files"].get(kind)
        if not name:
            return None
        if not isinstance(name, str) or Path(name).name != name:
            raise PipelineError(f"{self.path}: files.{kind} must be a file name beside "
                                f"metrics.json, got {name!r}")
        return self.path.parent / name

    def strip(self, kind: str) -> Image | None:
        """An image strip as written by evaluate, or None if not listed or missing."""
        path = self.file(kind)
        if path is None or not path.is_file():
            return None
        png = path.read_bytes()
        width = png_size(png, path)[0]
        return Image(f"c{self.index:02d}-{kind}.png", png, f"{kind} of {self.label}",
                     width * STRIP_SCALE, pixelated=True)

    def code_counts(self) -> list[float] | None:
        path = self.file("code_usage")
        if path is None or not path.is_file():
            return None
        try:
            counts = json.loads(path.read_text())["counts"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise PipelineError(f"{path}: expected JSON {{\"counts\": [...]}} ({e}); "
                                "re-run pipeline evaluate for this checkpoint") from e
        if not isinstance(counts, list) or not all(is_finite(c) and c >= 0 for c in counts):
            raise PipelineError(f"{path}: 'counts' must be a list of finite non-negative "
                                f"numbers")
        return counts


def png_size(data: bytes, path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking it decodes: a broken strip fails here, by name."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            if im.format != "PNG":
                raise ValueError(f"format is {im.format}")
            return im.size
    except Exception as e:  # PIL raises many types for a damaged file
        raise PipelineError(f"{path}: not a readable PNG image ({e}); "
                            "re-run pipeline evaluate for this checkpoint") from e


def find_metrics_files(inputs: list[str]) -> list[Path]:
    """metrics.json files named directly, or found recursively (sorted) under directories."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(path.rglob(METRICS_NAME))
            if not matches:
                raise PipelineError(f"{path}: no {METRICS_NAME} under this directory; pass "
                                    f"pipeline evaluate's output directory or {METRICS_NAME} "
                                    "files")
            found += matches
        elif path.is_file():
            found.append(path)
        else:
            raise PipelineError(f"{path}: no such file or directory")
    # A directory and a file inside it may name the same checkpoint twice: keep it once.
    unique = {p.resolve(): p for p in reversed(found)}
    return [p for p in found if unique[p.resolve()] is p]


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json, checked for what the report relies on (Infinity/NaN are accepted:
    the sections show them and never rank them)."""
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not valid JSON ({e}); re-run pipeline evaluate") from e
    if not isinstance(metrics, dict):
        raise PipelineError(f"{path}: expected a JSON object written by pipeline evaluate")
    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise PipelineError(f"{path}: missing required key(s) {', '.join(missing)}; "
                            "is this a metrics.json written by pipeline evaluate?")
    if not isinstance(metrics["files"], dict):
        raise PipelineError(f"{path}: 'files' must be an object of file names")
    if not is_finite(metrics["step"]):
        raise PipelineError(f"{path}: step must be a finite number, got {metrics['step']!r}")
    for key, kind in (("per_class_psnr", dict), ("worst", list), ("fixed_keys", list)):
        if metrics.get(key) is not None and not isinstance(metrics[key], kind):
            raise PipelineError(f"{path}: {key} must be a JSON {kind.__name__} or null")
    for column in METRIC_COLUMNS:
        value = metrics.get(column.key)
        if value is not None and not is_number(value):
            raise PipelineError(f"{path}: {column.key} must be a number or null, got {value!r}")
    return metrics


def unique_labels(names: list[str], paths: list[Path]) -> list[str]:
    """Names, with identical ones told apart by their folder (then by a counter)."""
    counts = Counter(names)
    dirs = [p.resolve().parent for p in paths]
    common = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else dirs[0].parent
    taken: set[str] = set()
    labels = []
    for name, folder in zip(names, dirs):
        label = name if counts[name] == 1 else f"{name} ({folder.relative_to(common)})"
        candidate, n = label, 1
        while candidate in taken:
            n += 1
            candidate = f"{label} #{n}"
        taken.add(candidate)
        labels.append(candidate)
    return labels


def load_checkpoints(paths: list[Path]) -> list[Checkpoint]:
    checkpoints = [Checkpoint(path, read_metrics(path), i)
                   for i, path in enumerate(tqdm(paths, desc="reading metrics", unit="file"))]
    labels = unique_labels([str(ck.metrics["name"]) for ck in checkpoints], paths)
    for ck, label in zip(checkpoints, labels):
        ck.label = label
    return checkpoints


# ---------------------------------------------------------------- runs and training logs

@dataclass
class Run:
    label: str
    run_dir: Path | None
    checkpoints: list[Checkpoint]
    history: list[dict[str, Any]] | None = None  # None: no log found
    bad_lines: int = 0  # unparsable lines (e.g. the half-written last line of a live run)


def group_runs(checkpoints: list[Checkpoint]) -> list[Run]:
    """One Run per run directory, so several steps of one run draw one training curve."""
    runs: dict[str, Run] = {}
    for ck in checkpoints:
        key = str(ck.run_dir.resolve()) if ck.run_dir else f"no-run-dir:{ck.index}"
        if key not in runs:
            runs[key] = Run(str(ck.metrics.get("run") or ck.metrics["name"]), ck.run_dir, [])
        runs[key].checkpoints.append(ck)
    labels = unique_labels([r.label for r in runs.values()],
                           [r.checkpoints[0].path for r in runs.values()])
    for run, label in zip(runs.values(), labels):
        run.label = label
        # The trainer's own reader: one definition of a readable line for both stages.
        log = read_history(run.run_dir) if run.run_dir else None
        if log is not None:
            run.history, run.bad_lines = log
    return list(runs.values())


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key, in step order, finite values only."""
    points = [(r["step"], r[key]) for r in history
              if is_finite(r.get(key))]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]
