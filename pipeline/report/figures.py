"""The report's matplotlib figures, each returned as a PNG `Image` of the document model.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot: no global
state, no GUI backend, so a report builds anywhere (a login node, a laptop, a CI runner).
"""
from __future__ import annotations

import io
import math
from typing import Any

from .document import Image
from .inputs import Checkpoint, Run, is_finite, model_kind, series

RATE_UNITS = {"bits": ("bits per image", "o"), "floats": ("latent size (floats) per image", "s")}


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


def rate_of(metrics: dict[str, Any]) -> tuple[float, str] | None:
    """The rate axis value: coded bits where the model defines them, else the latent size."""
    for key, unit in (("bits_per_image", "bits"), ("latent_size", "floats")):
        value = metrics.get(key)
        if is_finite(value) and value > 0:
            return value, unit
    return None


def rate_distortion_figure(checkpoints: list[Checkpoint], runs: list[Run]) -> Image | None:
    from matplotlib.lines import Line2D

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
            draw_run_points(ax, run, key, rated, colour)
        units = sorted({unit for _, unit in rated.values()})
        log_rate_axis(ax)
        ax.set_xlabel(" / ".join(RATE_UNITS[u][0] for u in units) + " (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colour[k], marker="o", ls="", label=mpl_text(k)) for k in kinds]
    handles += [Line2D([], [], color="grey", marker=RATE_UNITS[u][1], ls="",
                       label=f"x = {RATE_UNITS[u][0]}") for u in sorted(RATE_UNITS)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
               fontsize=8)
    return figure_image(fig, "rate-distortion.png", "rate-distortion plot")


def draw_run_points(ax, run: Run, key: str, rated: dict[int, tuple[float, str]],
                    colour: dict[str, str]) -> None:
    """The rated checkpoints of one run at (rate, `key`), labelled, in step order."""
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


def log_rate_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    # Plain numbers at 1-2-5 steps: matplotlib's default minor labels on a short log
    # range print as overlapping "2 x 10^3"-style text.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


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


def code_stages_of(ck: Checkpoint, counts: list[float]) -> int:
    """Code stages whose counts code_usage.json holds one after the other: the length of
    metrics.json's per-stage usage (RVQ), when the counts split evenly into it."""
    per_stage = ck.metrics.get("codebook_usage_per_stage")
    stages = len(per_stage) if isinstance(per_stage, list) and per_stage else 1
    return stages if len(counts) % stages == 0 else 1


def code_usage_figure(ck: Checkpoint, counts: list[float]) -> Image:
    """Sorted code counts; one panel per stage for a residual quantiser."""
    stages = code_stages_of(ck, counts)
    size = len(counts) // stages
    fig = new_figure(8, 2.4 * stages)
    for stage, ax in enumerate(fig.subplots(stages, 1, squeeze=False)[:, 0]):
        block = counts[stage * size:(stage + 1) * size]
        name = f"{ck.label}, stage {stage}" if stages > 1 else ck.label
        draw_code_counts(ax, block, name)
    return figure_image(fig, f"c{ck.index:02d}-code-usage.png", f"code usage of {ck.label}")


def draw_code_counts(ax, counts: list[float], name: str) -> None:
    ranked = sorted(counts, reverse=True)
    used = sum(1 for c in counts if c > 0)
    ax.fill_between(range(len(ranked)), ranked, step="post", color="C0", alpha=0.8)
    ax.set_xlim(0, max(len(ranked), 1))
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("count")
    total = sum(counts)
    perplexity = f", perplexity {perplexity_of(counts):.1f}" if total > 0 else ""
    ax.set_title(mpl_text(f"{name}: {used} of {len(counts)} codes used "
                          f"({100 * used / max(len(counts), 1):.1f}%){perplexity}"), fontsize=9)
