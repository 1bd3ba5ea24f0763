"""`pipeline bench quality`: the quantisers side by side, at equal bits and equal steps.

Each variant trains the same network (`--preset`, by default `demo-vqvae`: the seed network
at half width, 4×4 latent positions) for the same number of steps on the same shards with
the same seed, its quantiser the only difference, at about 10 bits per latent position:

    vq-plain     VQ, K codes learnt by the codebook loss, no dead-code restart
    vq-ema       VQ, EMA codebook with dead-code restart (the project's default)
    vq-l2        vq-ema with l2-normalised codes
    vq-rotation  vq-ema with the rotation trick instead of the straight-through estimator
    simvq        SimVQ: K frozen random codes through one learnt linear map
    fsq          FSQ on --fsq-levels (default 8,5,5,5: 1,000 codes, 9.97 bits)
    rvq          RVQ: 2 EMA VQ stages of --rvq-codebook-size codes (default 32: 2 x 5 bits)

Then every checkpoint goes through `pipeline evaluate` (PSNR, SSIM, LPIPS, code usage and
perplexity over the val split), LPIPS computed with a randomly initialised stand-in
AlexNet saved to a temporary file (nothing is downloaded, so LPIPS here ranks
reconstructions by a fixed random feature distance, not by the published network's). The
training log adds the usage over the last `usage_window` training steps.

Without `--shards` the embedded sample tree (`pipeline.sampledata`) is drawn and prepared
into the output directory first. Prints a table, or one JSON object with `--json`.
Nothing here asserts a figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.utils import PipelineError, dumps_json

# name -> (what it is, --model.* overrides of the preset); K and the FSQ/RVQ sizes come
# from the options (see `variant_overrides`).
VARIANTS = {
    "vq-plain": "VQ, codebook learnt by its loss, no restart",
    "vq-ema": "VQ, EMA codebook + dead-code restart",
    "vq-l2": "VQ, EMA + restart, l2-normalised codes",
    "vq-rotation": "VQ, EMA + restart, rotation trick",
    "simvq": "SimVQ, frozen codes + learnt linear map",
    "fsq": "FSQ",
    "rvq": "RVQ, 2 EMA VQ stages",
}
COLUMNS = [("variant", "{}"), ("bits_per_image", "{:.0f}"), ("psnr", "{:.2f}"),
           ("ssim", "{:.4f}"), ("lpips", "{:.4f}"), ("codebook_usage", "{:.1f}"),
           ("perplexity", "{:.1f}"), ("train_usage_window", "{:.1f}")]
HEADERS = {"variant": "variant", "bits_per_image": "bits/image", "psnr": "PSNR dB",
           "ssim": "SSIM", "lpips": "LPIPS*", "codebook_usage": "usage % (val)",
           "perplexity": "perplexity (val)", "train_usage_window": "usage % (train window)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated variants (default: all: {','.join(VARIANTS)})")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps per variant (default: 300)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--preset", default="demo-vqvae",
                   help="the config every variant starts from (default: demo-vqvae)")
    p.add_argument("--codebook-size", type=int, default=1024,
                   help="K of the VQ and SimVQ variants (default: 1024, 10 bits)")
    p.add_argument("--fsq-levels", default="8,5,5,5",
                   help="levels of the fsq variant (default: 8,5,5,5, 9.97 bits)")
    p.add_argument("--rvq-codebook-size", type=int, default=32,
                   help="codes per stage of the 2-stage rvq variant (default: 32, 2 x 5 bits)")
    p.add_argument("--shards", default=None,
                   help="a directory with train/ and val/ shard splits (default: the "
                        "embedded sample, drawn and prepared into --output)")
    p.add_argument("--sample-classes", type=int, default=10,
                   help="classes of the generated sample (without --shards)")
    p.add_argument("--train-per-class", type=int, default=100,
                   help="train images per class of the generated sample")
    p.add_argument("--val-per-class", type=int, default=30,
                   help="val images per class of the generated sample (the val set must be "
                        "large enough to use K codes: 10 x 30 images x 16 positions)")
    p.add_argument("--output", default=None,
                   help="keep the sample, shards, runs and evaluations here (default: a "
                        "temporary directory, removed afterwards)")
    p.add_argument("--workers", type=int, default=None,
                   help="prepare's worker processes (default: the cores available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise PipelineError(f"--variants: unknown {', '.join(unknown) or '(empty)'}; choose "
                            f"from {', '.join(VARIANTS)}")
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                          ("--sample-classes", args.sample_classes),
                          ("--train-per-class", args.train_per_class),
                          ("--val-per-class", args.val_per_class)):
        if value < 1:
            raise PipelineError(f"{option} must be >= 1, got {value}")
    if args.shards is not None and not all((Path(args.shards) / s).is_dir()
                                           for s in ("train", "val")):
        raise PipelineError(f"--shards {args.shards}: expected the split directories "
                            f"train/ and val/ inside it (pipeline prepare's output)")
    return names


def variant_overrides(name: str, args: argparse.Namespace) -> dict[str, str]:
    """The `--model.*` options of one variant (as the command line would spell them)."""
    vq = {"quantizer": "vq", "codebook_size": str(args.codebook_size), "codebook_ema": "true",
          "dead_code_threshold": "1.0", "l2_normalize_codes": "false", "rotation_trick": "false"}
    return {
        "vq-plain": {**vq, "codebook_ema": "false", "dead_code_threshold": "0"},
        "vq-ema": vq,
        "vq-l2": {**vq, "l2_normalize_codes": "true"},
        "vq-rotation": {**vq, "rotation_trick": "true"},
        "simvq": {"quantizer": "simvq", "codebook_size": str(args.codebook_size),
                  "rotation_trick": "false"},
        "fsq": {"quantizer": "fsq", "fsq_levels": args.fsq_levels},
        "rvq": {**vq, "quantizer": "rvq", "num_quantizers": "2", "stage_quantizer": "vq",
                "codebook_size": str(args.rvq_codebook_size)},
    }[name]


def prepare_sample(root: Path, args: argparse.Namespace) -> Path:
    """The embedded sample tree drawn and prepared under root; returns the shards dir."""
    from pipeline.prepare import main as prepare_main
    from pipeline.sampledata import write_sample_tree

    write_sample_tree(root / "sample", num_classes=args.sample_classes,
                      train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                      progress=False)
    shards = root / "shards"
    argv = ["--input", str(root / "sample"), "--output", str(shards), "--no-progress"]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if prepare_main(argv):
        raise PipelineError("pipeline prepare failed on the sample tree (see above)")
    return shards


def train_variant(name: str, args: argparse.Namespace, shards: Path, runs: Path) -> Path:
    from pipeline.train import main as train_main

    run_dir = runs / name
    steps = str(args.steps)
    argv = ["--config", args.preset, "--model", "vqvae",
            "--train-shards", str(shards / "train"), "--val-shards", str(shards / "val"),
            "--output", str(run_dir), "--max-steps", steps, "--batch-size", str(args.batch_size),
            "--train.val_every", steps, "--train.image_every", steps, "--train.ckpt_every", steps,
            "--train.seed", "0", "--tracker", "none", "--resume", "auto"]
    for field, value in variant_overrides(name, args).items():
        argv += [f"--model.{field}", value]
    if train_main(argv):
        raise PipelineError(f"training the {name} variant failed (see above)")
    return run_dir


def evaluate_runs(run_dirs: dict[str, Path], shards: Path, out: Path, lpips: Path) -> None:
    from pipeline.evaluate import main as evaluate_main

    argv = [*(str(run / "model") for run in run_dirs.values()), "--shards", str(shards / "val"),
            "--output", str(out), "--lpips-backbone", str(lpips)]
    if evaluate_main(argv):
        raise PipelineError("pipeline evaluate failed (see above)")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def last_logged(run_dir: Path, key: str) -> float | None:
    from pipeline.layout import read_history

    history = read_history(run_dir)
    records = history[0] if history else []
    values = [record[key] for record in records if key in record]
    return values[-1] if values else None


def result_row(name: str, run_dir: Path, eval_dir: Path, steps: int) -> dict[str, Any]:
    metrics = json.loads((eval_dir / f"{run_dir.name}-step{steps}" / "metrics.json").read_text())
    window = last_logged(run_dir, "vq/usage_window")
    row = {"variant": name, "description": VARIANTS[name], "quantizer": metrics["quantizer"],
           "train_usage_window": None if window is None else 100 * window}
    for key in ("bits_per_image", "psnr", "ssim", "ms_ssim", "lpips", "codebook_usage",
                "perplexity", "codebook_usage_per_stage", "num_samples"):
        row[key] = metrics.get(key)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(HEADERS[key] for key, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["—" if row[key] is None or (isinstance(row[key], float)
                                             and not math.isfinite(row[key]))
                 else fmt.format(row[key]) for key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace, names: list[str], root: Path) -> dict[str, Any]:
    from pipeline.models.lpips import write_random_backbone

    started = time.perf_counter()
    shards = Path(args.shards) if args.shards else prepare_sample(root, args)
    lpips = write_random_backbone(root / "alexnet-stand-in.pth", "alex")
    run_dirs = {name: train_variant(name, args, shards, root / "runs") for name in names}
    evaluate_runs(run_dirs, shards, root / "eval", lpips)
    rows = [result_row(name, run_dirs[name], root / "eval", args.steps) for name in names]
    settings = {"steps": args.steps, "batch_size": args.batch_size, "preset": args.preset,
                "codebook_size": args.codebook_size, "fsq_levels": args.fsq_levels,
                "rvq_codebook_size": args.rvq_codebook_size, "shards": str(shards),
                "lpips": "randomly initialised AlexNet stand-in (seed 0)",
                "seconds": round(time.perf_counter() - started, 1)}
    return {"settings": settings, "results": rows}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = check_args(args)
    # With --json, stdout is the JSON object alone: the stages' own lines go to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        if args.output:
            root = Path(args.output)
            root.mkdir(parents=True, exist_ok=True)
            report = run(args, names, root)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
                report = run(args, names, Path(tmp))
    if args.json:
        print(dumps_json(report))
    else:
        print(f"\n{args.steps} steps x batch {args.batch_size} per variant, preset "
              f"{args.preset}, {report['results'][0]['num_samples']} val images; "
              f"{report['settings']['seconds']:.0f} s. LPIPS* = random stand-in AlexNet.")
        print(format_table(report["results"]))
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
