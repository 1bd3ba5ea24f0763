"""`pipeline report`: compare evaluated checkpoints in one self-contained HTML page + Markdown.

The report reads files only: each checkpoint's `metrics.json` with the image strips written
beside it by `pipeline evaluate`, and the `history.jsonl` training log of its run. It never
imports a model or touches a live run, so it can be rebuilt wherever evaluation outputs were
copied to.

The page is built once as a small document model (sections of text, tables, images, code)
and rendered twice: HTML with every image embedded as a data: URI (one file to mail or
archive), and Markdown that points to the same images written under `assets/`.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Union

from tqdm import tqdm

from .utils import PipelineError, atomic_dir, atomic_write_bytes, atomic_write_text, provenance

REQUIRED_KEYS = ("name", "model", "step", "psnr", "files")
STRIP_SCALE = 2  # 64x64 images shown at 128x128: large enough to judge artifacts, still crisp
PER_CLASS_SHOWN = 10  # hardest and easiest classes listed when there are many
WORST_SHOWN = 10
DEFAULT_TITLE = "Autoencoder checkpoint comparison"


# ---------------------------------------------------------------- metrics table columns

@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str
    better: str | None  # "higher" | "lower"; None = a rate, a trade-off that is not ranked


COLUMNS = (
    Column("psnr", "PSNR dB", "{:.2f}", "higher"),
    Column("psnr_of_mean_mse", "PSNR(mean MSE) dB", "{:.2f}", "higher"),
    Column("ssim", "SSIM", "{:.4f}", "higher"),
    Column("ms_ssim", "MS-SSIM", "{:.4f}", "higher"),
    Column("mse", "MSE", "{:.5f}", "lower"),
    Column("l1", "L1", "{:.4f}", "lower"),
    Column("lpips", "LPIPS", "{:.4f}", "lower"),
    Column("rfid", "rFID", "{:.2f}", "lower"),
    Column("bits_per_image", "bits/image", "{:.1f}", None),
    Column("latent_size", "latent size", "{:.0f}", None),
    Column("codebook_usage", "code usage %", "{:.1f}", "higher"),
    Column("perplexity", "perplexity", "{:.1f}", "higher"),
    Column("images_per_s", "images/s", "{:.0f}", "higher"),
)
IDENTITY_HEADER = ["checkpoint", "model", "arch", "step", "samples"]
SSIM_KEYS = ("ssim", "ms_ssim")
# metrics.json settings.ssim_convention, as pipeline evaluate records it (pipeline.metrics).
SSIM_CONVENTIONS = {
    "skimage-valid/v1": "skimage's convention (11-tap Gaussian window, σ 1.5, the valid "
                        "region only, mean per channel; MS-SSIM over 3 scales, per channel "
                        "as pytorch_msssim), independent of the installed library versions",
}
UNRECORDED_SSIM = ("convention not recorded (an older pipeline evaluate: torchmetrics' "
                   "convention of the version installed then, which changed in 1.5)")
MISSING = "—"
ARROWS = {"higher": " ↑", "lower": " ↓", None: ""}


def format_value(value: float | int | None, fmt: str) -> str:
    return MISSING if value is None else fmt.format(value)


def model_kind(metrics: dict[str, Any]) -> str:
    """`model`, with the quantiser when there is one: VQ and FSQ differ in rate and usage."""
    quantizer = metrics.get("quantizer")
    return f"{metrics['model']} ({quantizer})" if quantizer else str(metrics["model"])


def best_rows(values: list[float | None], better: str | None, fmt: str) -> set[int]:
    """Rows holding the best value of a column as shown (formatted with `fmt`).

    Comparing what the reader sees means values that print the same are all best, never
    one of them for a difference below the shown precision. A column where fewer than two
    checkpoints report a value, or where all of them tie, has no best. Non-finite values
    (json.loads accepts `Infinity` and `NaN`) are shown but never ranked: an infinite
    PSNR is a broken evaluation, not the best one.
    """
    shown = [float(fmt.format(v)) if is_finite(v) else None for v in values]
    present = [v for v in shown if v is not None]
    if better is None or len(present) < 2 or len(set(present)) == 1:
        return set()
    target = max(present) if better == "higher" else min(present)
    return {i for i, v in enumerate(shown) if v == target}


# ---------------------------------------------------------------- loading checkpoints

@dataclass(frozen=True)
class Image:
    """A PNG shown in the report: embedded in HTML, written to assets/ for Markdown."""
    asset: str  # file name under DIR/assets/; generated, never taken from user data
    png: bytes
    alt: str
    width: int  # CSS width in the HTML page
    pixelated: bool = False  # image strips: scale up without smoothing


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
        """The file of `kind` listed in metrics.json `files`, or None when not listed."""
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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def find_metrics_files(inputs: list[str]) -> list[Path]:
    """metrics.json files named directly, or found recursively (sorted) under directories."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(path.rglob("metrics.json"))
            if not matches:
                raise PipelineError(f"{path}: no metrics.json under this directory; pass "
                                    "pipeline evaluate's output directory or metrics.json files")
            found += matches
        elif path.is_file():
            found.append(path)
        else:
            raise PipelineError(f"{path}: no such file or directory")
    # A directory and a file inside it may name the same checkpoint twice: keep it once.
    unique = {p.resolve(): p for p in reversed(found)}
    return [p for p in found if unique[p.resolve()] is p]


def read_metrics(path: Path) -> dict[str, Any]:
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
    for column in COLUMNS:
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


def read_history(path: Path) -> tuple[list[dict[str, Any]], int] | None:
    if not path.is_file():
        return None
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and is_finite(record.get("step")):
            records.append(record)
        else:
            bad += 1
    return records, bad


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
        log = read_history(run.run_dir / "history.jsonl") if run.run_dir else None
        if log is not None:
            run.history, run.bad_lines = log
    return list(runs.values())


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in history
              if is_finite(r.get(key))]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------- document model

@dataclass
class Text:
    text: str
    note: bool = False  # a warning the reader should not miss


@dataclass
class Code:
    text: str


Cell = Union[str, Image]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) shown in bold


Block = Union[Text, Code, Table, Image]


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block]


# ---------------------------------------------------------------- figures

def mpl_text(text: str) -> str:
    """Matplotlib reads $...$ as math: keep names with dollar signs literal."""
    return text.replace("$", r"\$")


def figure_image(fig, asset: str, alt: str) -> Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=144)
    # Saved at 1.5x the CSS size so that lines stay sharp on high-density screens.
    width = round(fig.get_figwidth() * 144 / 1.5)
    return Image(asset, buf.getvalue(), alt, width)


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


RATE_UNITS = {"bits": ("bits per image", "o"), "floats": ("latent size (floats) per image", "s")}


def rate_of(metrics: dict[str, Any]) -> tuple[float, str] | None:
    """The rate axis value: coded bits where the model defines them, else the latent size."""
    for key, unit in (("bits_per_image", "bits"), ("latent_size", "floats")):
        value = metrics.get(key)
        if is_finite(value) and value > 0:
            return value, unit
    return None


def rate_distortion_figure(checkpoints: list[Checkpoint], runs: list[Run]) -> Image | None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rated = {ck.index: rate for ck in checkpoints if (rate := rate_of(ck.metrics))}
    if not rated:
        return None
    panels = [("psnr", "PSNR (dB) ↑")]
    if any(ck.metrics.get("ssim") is not None for ck in checkpoints):
        panels.append(("ssim", "SSIM ↑"))
    kinds = sorted({model_kind(ck.metrics) for ck in checkpoints})
    colour = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    fig = new_figure(5.6 * len(panels), 4.2)
    for ax, (key, ylabel) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for run in runs:
            points = sorted(((ck.metrics["step"], *rated[ck.index], ck.metrics[key], ck)
                             for ck in run.checkpoints
                             if ck.index in rated and is_finite(ck.metrics.get(key))),
                            key=lambda point: point[0])
            if len(points) > 1:  # steps of one run: a thin line shows the direction of training
                ax.plot([p[1] for p in points], [p[3] for p in points], lw=0.8, alpha=0.5,
                        color=colour[model_kind(run.checkpoints[0].metrics)])
            for _, x, unit, y, ck in points:
                ax.scatter(x, y, marker=RATE_UNITS[unit][1], s=42, zorder=3,
                           color=colour[model_kind(ck.metrics)])
                ax.annotate(mpl_text(ck.label), (x, y), xytext=(4, 4),
                            textcoords="offset points", fontsize=7)
        units = sorted({unit for _, unit in rated.values()})
        ax.set_xscale("log")
        # Plain numbers at 1-2-5 steps: matplotlib's default minor labels on a short log
        # range print as overlapping "2 x 10^3"-style text.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(" / ".join(RATE_UNITS[u][0] for u in units) + " (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colour[k], marker="o", ls="", label=mpl_text(k)) for k in kinds]
    handles += [Line2D([], [], color="grey", marker=RATE_UNITS[u][1], ls="",
                       label=f"x = {RATE_UNITS[u][0]}") for u in sorted(RATE_UNITS)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
               fontsize=8)
    return figure_image(fig, "rate-distortion.png", "rate-distortion plot")


def curves_figure(runs: list[Run]) -> Image | None:
    logged = [run for run in runs if run.history]
    if not logged:
        return None
    val_key = "val/psnr" if any(series(r.history, "val/psnr")[0] for r in logged) else "val/recon"
    panels = [("train/loss", "train/loss (log scale)", True),
              (val_key, val_key + (" (dB) ↑" if val_key == "val/psnr" else " ↓"), False)]
    fig = new_figure(11, 3.8)
    for ax, (key, ylabel, log_y) in zip(fig.subplots(1, 2), panels):
        for i, run in enumerate(logged):
            steps, values = series(run.history, key)
            if steps:
                ax.plot(steps, values, color=f"C{i % 10}", lw=1.2, label=mpl_text(run.label),
                        marker="." if len(steps) < 30 else None)
        if log_y and ax.has_data() and all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncols=min(len(logged), 5), fontsize=8)
    return figure_image(fig, "training-curves.png", "training curves")


def perplexity_of(counts: list[float]) -> float:
    total = sum(counts)
    entropy = -sum(c / total * math.log(c / total) for c in counts if c > 0)
    return math.exp(entropy)


def code_usage_figure(ck: Checkpoint, counts: list[float]) -> Image:
    ranked = sorted(counts, reverse=True)
    used = sum(1 for c in counts if c > 0)
    fig = new_figure(8, 2.4)
    ax = fig.subplots()
    ax.fill_between(range(len(ranked)), ranked, step="post", color="C0", alpha=0.8)
    ax.set_xlim(0, max(len(ranked), 1))
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("count")
    total = sum(counts)
    perplexity = f", perplexity {perplexity_of(counts):.1f}" if total > 0 else ""
    ax.set_title(mpl_text(f"{ck.label}: {used} of {len(counts)} codes used "
                          f"({100 * used / max(len(counts), 1):.1f}%){perplexity}"), fontsize=9)
    return figure_image(fig, f"c{ck.index:02d}-code-usage.png", f"code usage of {ck.label}")


# ---------------------------------------------------------------- sections

def metrics_table(checkpoints: list[Checkpoint], unranked: frozenset[str] = frozenset()) -> Table:
    """The table of COLUMNS; columns in `unranked` get no best (values not comparable)."""
    rows: list[list[Cell]] = []
    for ck in checkpoints:
        m = ck.metrics
        identity = [ck.label, model_kind(m), str(m.get("arch") or MISSING), str(m["step"]),
                    format_value(m.get("num_samples"), "{}")]
        rows.append(identity + [format_value(m.get(c.key), c.fmt) for c in COLUMNS])
    best = set()
    for j, column in enumerate(COLUMNS, start=len(IDENTITY_HEADER)):
        values = [ck.metrics.get(column.key) for ck in checkpoints]
        better = None if column.key in unranked else column.better
        for i in best_rows(values, better, column.fmt):
            best.add((i, j))
    header = IDENTITY_HEADER + [c.title + ARROWS[c.better] for c in COLUMNS]
    return Table(header, rows, best)


def comparability_notes(checkpoints: list[Checkpoint]) -> list[Text]:
    """Warnings that make numbers in the table not directly comparable."""
    notes = []
    hashes = {ck.metrics.get("manifest_hash") for ck in checkpoints}
    if len(hashes) > 1:
        notes.append(Text("Checkpoints were evaluated on different val sets (manifest hashes "
                          "differ): compare their numbers with care.", note=True))
    if len({ck.metrics.get("num_samples") for ck in checkpoints}) > 1:
        notes.append(Text("Checkpoints were evaluated on different numbers of samples.", note=True))
    for ck in checkpoints:
        m = ck.metrics
        if m.get("num_skipped"):
            notes.append(Text(f"{ck.label}: {m['num_skipped']} unreadable sample(s) skipped.",
                              note=True))
        expected, seen = m.get("expected_samples"), m.get("num_samples")
        if is_number(expected) and is_number(seen) and seen < expected:
            notes.append(Text(f"{ck.label}: evaluated {seen} of {expected} samples.", note=True))
    return notes


def ssim_conventions(checkpoints: list[Checkpoint]) -> dict[str | None, list[str]]:
    """Labels of the checkpoints reporting SSIM or MS-SSIM, by recorded convention."""
    groups: dict[str | None, list[str]] = {}
    for ck in checkpoints:
        if any(is_number(ck.metrics.get(key)) for key in SSIM_KEYS):
            settings = ck.metrics.get("settings")
            recorded = settings.get("ssim_convention") if isinstance(settings, dict) else None
            groups.setdefault(None if recorded is None else str(recorded), []).append(ck.label)
    return groups


def describe_ssim_convention(convention: str | None) -> str:
    if convention is None:
        return UNRECORDED_SSIM
    return SSIM_CONVENTIONS.get(convention, f"convention {convention!r}")


def metrics_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    conventions = ssim_conventions(checkpoints)
    notes = comparability_notes(checkpoints)
    if len(conventions) > 1:
        groups = "; ".join(f"{', '.join(labels)}: {describe_ssim_convention(convention)}"
                           for convention, labels in conventions.items())
        notes.append(Text(f"SSIM and MS-SSIM were computed under different conventions, so "
                          f"they are not ranked: {groups}.", note=True))
    legend = ("↑ higher is better, ↓ lower is better; bold marks the best value of a column "
              "as shown (ties all bold; none when fewer than two checkpoints report it or all "
              "are equal; non-finite values are shown but never ranked). Rate columns "
              f"(bits/image, latent size) are not ranked: a lower rate is cheaper but trades "
              f"against distortion, see the rate–distortion plot. {MISSING} = does not apply "
              f"to this model.")
    if len(conventions) == 1:
        legend += f" SSIM and MS-SSIM: {describe_ssim_convention(next(iter(conventions)))}."
    unranked = frozenset(SSIM_KEYS) if len(conventions) > 1 else frozenset()
    return Section("Metrics", "metrics",
                   [*notes, metrics_table(checkpoints, unranked), Text(legend)])


def rate_distortion_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    figure = rate_distortion_figure(checkpoints, runs)
    if figure is None:
        return Section("Rate–distortion", "rate-distortion", [Text(
            "Not available: no checkpoint reports bits_per_image or latent_size.")])
    return Section("Rate–distortion", "rate-distortion", [Text(
        "Rate is bits_per_image where the evaluation defines it (VQ/FSQ: coded bits of the "
        "latent; VAE: KL in bits) and the latent size in floats otherwise (AE); the two are "
        "different units, told apart by the marker shape. Colour = model kind; thin lines "
        "join the evaluated steps of one run."), figure])


def curves_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    blocks: list[Block] = []
    figure = curves_figure(runs)
    blocks.append(figure or Text("Not available: no run has a training log (history.jsonl)."))
    for run in runs:
        if run.run_dir is None:
            blocks.append(Text(f"{run.label}: no curve (run_dir not recorded in metrics.json)."))
        elif run.history is None:
            blocks.append(Text(f"{run.label}: no curve (training log not found: "
                               f"{run.run_dir / 'history.jsonl'})."))
        elif run.bad_lines:
            blocks.append(Text(f"{run.label}: {run.bad_lines} unreadable line(s) of "
                               f"{run.run_dir / 'history.jsonl'} ignored.", note=True))
    return Section("Training curves", "curves", blocks)


def fixed_set_key(ck: Checkpoint, originals: Image | None) -> tuple:
    """Checkpoints that reconstructed the same fixed images share one originals row."""
    keys = ck.metrics.get("fixed_keys")
    if keys:
        return ("keys", *map(str, keys))
    return ("png", originals.png if originals else ck.index)


def reconstruction_rows(ck: Checkpoint) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for kind, title in (("reconstructions", "reconstruction"), ("error_maps", "error map")):
        strip = ck.strip(kind)
        rows.append([ck.label, title, strip or f"not available ({kind} not found)"])
    return rows


def reconstructions_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    groups: dict[tuple, list[tuple[Checkpoint, Image | None]]] = {}
    for ck in checkpoints:
        originals = ck.strip("originals")
        groups.setdefault(fixed_set_key(ck, originals), []).append((ck, originals))
    scale = next((str(ck.metrics["settings"]["error_maps"]) for ck in checkpoints
                  if isinstance(ck.metrics.get("settings"), dict)
                  and ck.metrics["settings"].get("error_maps")), "brighter = larger error")
    blocks: list[Block] = [Text(
        f"The same fixed val images for every checkpoint, shown at {STRIP_SCALE}× without "
        f"smoothing (scroll sideways on narrow screens). Error maps: {scale}.")]
    if len(groups) > 1:
        blocks.append(Text("The checkpoints used different fixed images; each group below has "
                           "its own originals.", note=True))
    for members in groups.values():
        first, originals = members[0]
        keys = first.metrics.get("fixed_keys")
        if keys:
            blocks.append(Text("Images, left to right: " + ", ".join(map(str, keys))))
        rows: list[list[Cell]] = [["originals", "", originals or "not available"]]
        for ck, _ in members:
            rows += reconstruction_rows(ck)
        blocks.append(Table(["checkpoint", "view", "images"], rows))
    return Section("Reconstructions", "reconstructions", blocks)


def per_class_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    tables = {ck.label: ck.metrics.get("per_class_psnr") or {} for ck in checkpoints}
    classes = sorted({c for t in tables.values() for c in t})
    if not classes:
        return Section("Per-class PSNR", "per-class", [Text("Not available.")])

    def mean_psnr(cls: str) -> float:
        values = [t[cls] for t in tables.values() if is_finite(t.get(cls))]
        return sum(values) / len(values) if values else math.inf

    classes.sort(key=mean_psnr)
    blocks: list[Block] = []
    if len(classes) > 2 * PER_CLASS_SHOWN:
        blocks.append(Text(f"The {PER_CLASS_SHOWN} hardest and {PER_CLASS_SHOWN} easiest of "
                           f"{len(classes)} classes, by mean PSNR over the checkpoints (dB)."))
        classes = classes[:PER_CLASS_SHOWN] + classes[-PER_CLASS_SHOWN:]
    rows, best = [], set()
    for i, cls in enumerate(classes):
        values = [tables[label].get(cls) for label in tables]
        values = [v if is_number(v) else None for v in values]
        rows.append([cls] + [format_value(v, "{:.2f}") for v in values])
        best |= {(i, j + 1) for j in best_rows(values, "higher", "{:.2f}")}
    blocks.append(Table(["class"] + list(tables), rows, best))
    return Section("Per-class PSNR", "per-class", blocks)


def worst_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    lists = {ck.label: (ck.metrics.get("worst") or [])[:WORST_SHOWN] for ck in checkpoints}
    depth = max(len(items) for items in lists.values())
    if depth == 0:
        return Section("Worst images", "worst", [Text("Not available.")])
    rows = []
    for rank in range(depth):
        row: list[Cell] = [str(rank + 1)]
        for items in lists.values():
            item = items[rank] if rank < len(items) else None
            row.append(f"{item.get('key')} ({format_value(item.get('psnr'), '{:.2f}')} dB)"
                       if isinstance(item, dict) else MISSING)
        rows.append(row)
    return Section("Worst images", "worst", [
        Text("Val images with the lowest PSNR per checkpoint: the first place to look for "
             "failure modes."), Table(["rank"] + list(lists), rows)])


def bottleneck_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    blocks: list[Block] = []
    priors = [[ck.label, strip] for ck in checkpoints if (strip := ck.strip("prior_samples"))]
    blocks.append(Text("VAE prior samples (decoded from z ~ N(0, I)):"))
    blocks.append(Table(["checkpoint", "samples"], priors) if priors else
                  Text("Not available: no checkpoint has prior samples (VAE only)."))
    blocks.append(Text("Code usage (sorted code counts over the evaluated images):"))
    figures = [code_usage_figure(ck, counts)
               for ck in checkpoints if (counts := ck.code_counts()) is not None]
    blocks += figures or [Text("Not available: no checkpoint has code usage (VQ/FSQ only).")]
    return Section("Prior samples and code usage", "bottleneck", blocks)


def details_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    rows: list[list[Cell]] = []
    for ck in checkpoints:
        m = ck.metrics
        rows.append([ck.label, str(ck.path), str(m.get("checkpoint") or MISSING),
                     str(m.get("run_dir") or MISSING),
                     str(m.get("latent_shape") or MISSING),
                     str(m.get("manifest_hash") or MISSING)[:12]])
    blocks: list[Block] = [Table(["checkpoint", "metrics file", "weights", "run dir",
                                  "latent shape", "val manifest"], rows)]
    settings = {json.dumps(ck.metrics.get("settings"), indent=2, sort_keys=True)
                for ck in checkpoints if ck.metrics.get("settings")}
    if len(settings) == 1:
        blocks += [Text("How the metrics were computed (same for every checkpoint):"),
                   Code(settings.pop())]
    for ck in checkpoints if len(settings) > 1 else []:
        blocks += [Text(f"How the metrics of {ck.label} were computed:"),
                   Code(json.dumps(ck.metrics.get("settings"), indent=2, sort_keys=True))]
    return Section("Checkpoint details", "details", blocks)


SECTION_BUILDERS: tuple[Callable[[list[Checkpoint], list[Run]], Section], ...] = (
    metrics_section, rate_distortion_section, curves_section, reconstructions_section,
    bottleneck_section, per_class_section, worst_section, details_section,
)


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]


def build_report(checkpoints: list[Checkpoint], title: str) -> Report:
    runs = group_runs(checkpoints)
    sections = [build(checkpoints, runs)
                for build in tqdm(SECTION_BUILDERS, desc="building report", unit="section")]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = (provenance()["git_commit"] or "unknown")[:12]
    subtitle = (f"{len(checkpoints)} checkpoint(s) from {len(runs)} run(s); generated {when} "
                f"by pipeline report (commit {commit}).")
    return Report(title, subtitle, sections)


def images_of(report: Report) -> list[Image]:
    images = []
    for section in report.sections:
        for block in section.blocks:
            cells = [c for row in block.rows for c in row] if isinstance(block, Table) else [block]
            images += [c for c in cells if isinstance(c, Image)]
    return images


# ---------------------------------------------------------------- HTML

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2733;
       margin: 0 auto; padding: 20px 28px 60px; max-width: 2400px; }
p { max-width: 1100px; }
h1 { margin-bottom: 2px; } h2 { margin-top: 36px; border-bottom: 1px solid #d5dbe3; }
.subtitle { color: #5b6775; margin-top: 0; }
nav a { margin-right: 14px; }
.scroll { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e4e8ee; text-align: left;
         vertical-align: middle; white-space: nowrap; }
th { background: #f2f4f7; white-space: normal; vertical-align: bottom; }
td { background: #fff; }
tr:nth-child(even) td { background: #fafbfc; }
/* The first column names the row: keep it in view while the table scrolls sideways. */
td:first-child, th:first-child { position: sticky; left: 0; z-index: 1;
                                 box-shadow: 1px 0 0 #e4e8ee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #e3f4e1 !important; }
td.img { padding: 2px 4px; }
img.strip { image-rendering: pixelated; display: block; }
img.plot { max-width: 100%; height: auto; }
.note { background: #fff5d6; border-left: 4px solid #e0a800; padding: 6px 10px; }
pre { background: #f4f6f8; padding: 10px; overflow-x: auto; font-size: 12px; }
"""
NUMBER = re.compile(r"^-?[\d.]+(e[-+]\d+)?$")


def data_uri(image: Image) -> str:
    return "data:image/png;base64," + base64.b64encode(image.png).decode("ascii")


def html_image(image: Image) -> str:
    kind = "strip" if image.pixelated else "plot"
    return (f'<img class="{kind}" src="{data_uri(image)}" alt="{html.escape(image.alt)}" '
            f'width="{image.width}">')


def html_cell(cell: Cell, bold: bool) -> str:
    if isinstance(cell, Image):
        return f'<td class="img">{html_image(cell)}</td>'
    classes = ["num"] if NUMBER.match(cell) else []
    text = html.escape(cell)
    if bold:
        classes.append("best")
        text = f"<b>{text}</b>"
    return f'<td class="{" ".join(classes)}">{text}</td>' if classes else f"<td>{text}</td>"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(html_cell(c, (i, j) in table.best) for j, c in enumerate(row))
                   + "</tr>\n" for i, row in enumerate(table.rows))
    return f'<div class="scroll"><table>\n<tr>{head}</tr>\n{body}</table></div>'


def html_block(block: Block) -> str:
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Image):
        return f'<div class="scroll">{html_image(block)}</div>'
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>"
    css = ' class="note"' if block.note else ""
    return f"<p{css}>{html.escape(block.text)}</p>"


def render_html(report: Report) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in report.sections)
    body = "\n".join(f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>\n'
                     + "\n".join(html_block(b) for b in s.blocks) for s in report.sections)
    title = html.escape(report.title)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f'<h1>{title}</h1>\n<p class="subtitle">{html.escape(report.subtitle)}</p>\n'
            f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")


# ---------------------------------------------------------------- Markdown

MD_SPECIAL = re.compile(r"([\\`\[\]<>|&])")


def md_text(text: str) -> str:
    """Escape what would break a table cell or inject markup: `|`, HTML, links, code."""
    return MD_SPECIAL.sub(r"\\\1", text.replace("\n", " "))


def md_image(image: Image) -> str:
    return f"![{md_text(image.alt)}](assets/{image.asset})"


def md_cell(cell: Cell, bold: bool) -> str:
    if isinstance(cell, Image):
        return md_image(cell)
    return f"**{md_text(cell)}**" if bold else md_text(cell)


def md_table(table: Table) -> str:
    lines = ["| " + " | ".join(md_text(h) for h in table.header) + " |",
             "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(md_cell(c, (i, j) in table.best) for j, c in enumerate(row)) + " |"
              for i, row in enumerate(table.rows)]
    return "\n".join(lines)


def md_block(block: Block) -> str:
    if isinstance(block, Table):
        return md_table(block)
    if isinstance(block, Image):
        return md_image(block)
    if isinstance(block, Code):
        # An indented block cannot be closed early by the text it holds, unlike a fence.
        return "\n".join("    " + line for line in block.text.splitlines())
    return f"> **Note:** {md_text(block.text)}" if block.note else md_text(block.text)


def render_markdown(report: Report) -> str:
    parts = [f"# {md_text(report.title)}", md_text(report.subtitle)]
    for section in report.sections:
        parts.append(f"## {md_text(section.title)}")
        parts += [md_block(b) for b in section.blocks]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- output

def write_report(report: Report, out_dir: Path) -> Path:
    """Write assets/, report.md and report.html; each file appears whole or not at all."""
    with atomic_dir(out_dir / "assets") as assets:  # replaces, so no stale images survive
        for image in images_of(report):
            atomic_write_bytes(assets / image.asset, image.png)
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    atomic_write_text(out_dir / "report.html", render_html(report))
    return out_dir / "report.html"


def wandb_table_rows(checkpoints: list[Checkpoint]) -> tuple[list[str], list[list[Any]]]:
    columns = IDENTITY_HEADER + [c.key for c in COLUMNS]
    rows = [[ck.label, model_kind(ck.metrics), str(ck.metrics.get("arch")),
             ck.metrics["step"], ck.metrics.get("num_samples")]
            + [ck.metrics.get(c.key) for c in COLUMNS] for ck in checkpoints]
    return columns, rows


def log_to_wandb(checkpoints: list[Checkpoint], out_dir: Path, title: str, project: str) -> None:
    """Log the metrics table and the report files (as one artifact) to a new W&B run."""
    import wandb

    try:
        run = wandb.init(project=project, dir=str(out_dir), name=title, job_type="report",
                         config={"metrics_files": [str(ck.path) for ck in checkpoints]})
        columns, rows = wandb_table_rows(checkpoints)
        run.log({"report/metrics": wandb.Table(columns=columns, data=rows)})
        artifact = wandb.Artifact("report", type="report", description=title)
        artifact.add_file(str(out_dir / "report.html"))
        artifact.add_file(str(out_dir / "report.md"))
        artifact.add_dir(str(out_dir / "assets"), name="assets")
        run.log_artifact(artifact)
        run.finish()
    except wandb.errors.Error as e:
        raise PipelineError(f"W&B logging failed ({e}); the report files are written. "
                            "Use WANDB_MODE=offline without network, or --tracker none") from e


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline report",
        description="Compare evaluated checkpoints: writes DIR/report.html (self-contained, "
                    "images embedded), DIR/report.md and its images under DIR/assets/.")
    parser.add_argument("inputs", nargs="+", metavar="METRICS_OR_DIR",
                        help="metrics.json files written by pipeline evaluate, or directories "
                             "searched recursively for metrics.json (sorted by path)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="directory for report.html, report.md and assets/ (created)")
    parser.add_argument("--title", default=DEFAULT_TITLE,
                        help=f"title of the report and of the W&B run (default: {DEFAULT_TITLE!r})")
    parser.add_argument("--tracker", choices=("none", "wandb"), default="none",
                        help="wandb: also log the metrics table and the report files as an "
                             "artifact to a new W&B run under DIR/wandb/ (WANDB_MODE=offline "
                             "works without network); default: none")
    parser.add_argument("--project", default="ae-pipeline",
                        help="W&B project for --tracker wandb (default: ae-pipeline)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"--output {out_dir}: exists and is not a directory")
    checkpoints = load_checkpoints(find_metrics_files(args.inputs))
    report_path = write_report(build_report(checkpoints, args.title), out_dir)
    if args.tracker == "wandb":
        log_to_wandb(checkpoints, out_dir, args.title, args.project)
    print(report_path)
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
