"""The report's sections, built from the checkpoints and their runs as a `Report` document.

Each builder takes (checkpoints, runs) and returns one `Section`; `SECTION_BUILDERS` is their
order on the page. A section whose inputs are missing says "Not available" with the reason
instead of failing: a report is most needed when an evaluation went partly wrong.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Callable, Sequence

from tqdm import tqdm

from ..layout import HISTORY_NAME, METRIC_COLUMNS
from ..utils import provenance
from .document import MISSING, Block, Cell, Code, Image, Report, Section, Table, Text
from .figures import code_usage_figure, curves_figure, rate_distortion_figure
from .inputs import STRIP_SCALE, Checkpoint, Run, group_runs, is_finite, is_number, model_kind

COLUMNS = METRIC_COLUMNS  # one table of metric columns for evaluate, W&B and the report
IDENTITY_HEADER = ["checkpoint", "model", "arch", "step", "samples"]
PER_CLASS_SHOWN = 10  # hardest and easiest classes listed when there are many
WORST_SHOWN = 10
SSIM_KEYS = ("ssim", "ms_ssim")
# metrics.json settings.ssim_convention, as pipeline evaluate records it (pipeline.metrics).
SSIM_CONVENTIONS = {
    "skimage-valid/v1": "skimage's convention (11-tap Gaussian window, σ 1.5, the valid "
                        "region only, mean per channel; MS-SSIM over 3 scales, per channel "
                        "as pytorch_msssim), independent of the installed library versions",
}
UNRECORDED_SSIM = ("convention not recorded (an older pipeline evaluate: torchmetrics' "
                   "convention of the version installed then, which changed in 1.5)")
ARROWS = {"higher": " ↑", "lower": " ↓", None: ""}


def format_value(value: float | int | None, fmt: str) -> str:
    return MISSING if value is None else fmt.format(value)


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


# ---------------------------------------------------------------- metrics

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


# ---------------------------------------------------------------- plots

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
    blocks.append(figure or Text(f"Not available: no run has a training log ({HISTORY_NAME})."))
    for run in runs:
        if run.run_dir is None:
            blocks.append(Text(f"{run.label}: no curve (run_dir not recorded in metrics.json)."))
        elif run.history is None:
            blocks.append(Text(f"{run.label}: no curve (training log not found: "
                               f"{run.run_dir / HISTORY_NAME})."))
        elif run.bad_lines:
            blocks.append(Text(f"{run.label}: {run.bad_lines} unreadable line(s) of "
                               f"{run.run_dir / HISTORY_NAME} ignored.", note=True))
    return Section("Training curves", "curves", blocks)


# ---------------------------------------------------------------- images

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


def error_map_scale(checkpoints: list[Checkpoint]) -> str:
    """How the error maps were coloured, as the first checkpoint that says so recorded it."""
    return next((str(ck.metrics["settings"]["error_maps"]) for ck in checkpoints
                 if isinstance(ck.metrics.get("settings"), dict)
                 and ck.metrics["settings"].get("error_maps")), "brighter = larger error")


def reconstructions_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    groups: dict[tuple, list[tuple[Checkpoint, Image | None]]] = {}
    for ck in checkpoints:
        originals = ck.strip("originals")
        groups.setdefault(fixed_set_key(ck, originals), []).append((ck, originals))
    blocks: list[Block] = [Text(
        f"The same fixed val images for every checkpoint, shown at {STRIP_SCALE}× without "
        f"smoothing (scroll sideways on narrow screens). "
        f"Error maps: {error_map_scale(checkpoints)}.")]
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


def bottleneck_section(checkpoints: list[Checkpoint], runs: list[Run]) -> Section:
    blocks: list[Block] = []
    priors = [[ck.label, strip] for ck in checkpoints if (strip := ck.strip("prior_samples"))]
    blocks.append(Text("VAE prior samples (decoded from z ~ N(0, I)):"))
    blocks.append(Table(["checkpoint", "samples"], priors) if priors else
                  Text("Not available: no checkpoint has prior samples (VAE only)."))
    blocks.append(Text("Code usage (sorted code counts over the evaluated images; one panel "
                       "per stage for residual quantisers):"))
    figures = [code_usage_figure(ck, counts)
               for ck in checkpoints if (counts := ck.code_counts()) is not None]
    blocks += figures or [Text("Not available: no checkpoint has code usage (VQ/FSQ only).")]
    return Section("Prior samples and code usage", "bottleneck", blocks)


# ---------------------------------------------------------------- per class, worst, details

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


def build_report(checkpoints: list[Checkpoint], title: str,
                 extra: Sequence[Section] = ()) -> Report:
    """The report's sections, then `extra` ones (the hand-off) before the details."""
    runs = group_runs(checkpoints)
    sections = [build(checkpoints, runs)
                for build in tqdm(SECTION_BUILDERS, desc="building report", unit="section")]
    sections[-1:-1] = extra
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = (provenance()["git_commit"] or "unknown")[:12]
    subtitle = (f"{len(checkpoints)} checkpoint(s) from {len(runs)} run(s); generated {when} "
                f"by pipeline report (commit {commit}).")
    return Report(title, subtitle, sections)
