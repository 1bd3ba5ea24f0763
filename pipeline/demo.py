"""`pipeline demo`: the whole chain on one machine, from nothing to a comparison report.

    sample tree -> shards -> train AE, VAE, VQ-VAE -> evaluate -> report

With no `--data` it generates the embedded sample ImageNet-layout tree, so it runs on a
fresh machine without a download (a few minutes on 2 CPU cores). With
`--data /path/to/imagenet --steps 100000` the same command is the real job. Each stage
calls the stage's own command-line entry, so the demo exercises exactly what a
researcher would type; a re-run skips every stage whose outputs are complete.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ARCHS, MODELS, preset_for
from .utils import PipelineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline demo",
        description="sample -> prepare -> train AE/VAE/VQ-VAE -> evaluate -> report. "
                    "Prints each stage's progress and the report's path last.")
    p.add_argument("--output", default="demo-out",
                   help="directory for everything the demo writes (default: demo-out)")
    p.add_argument("--data", default=None,
                   help="an ImageNet-layout root (train/ and val/) to use instead of the "
                        "generated sample tree")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models to train (default: {','.join(MODELS)})")
    p.add_argument("--arch", default="basic", choices=ARCHS,
                   help="encoder/decoder family for every model (default: basic)")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps per model (default: 300, enough to see the "
                        "models separate on the sample data)")
    p.add_argument("--batch-size", type=int, default=32, help="per-device batch size")
    p.add_argument("--preset", default="demo",
                   help="config preset prefix: each model uses the preset "
                        "`<preset>-<model>` if it exists, else the one `pipeline train` "
                        "picks for the model and --arch (default: demo)")
    p.add_argument("--workers", type=int, default=None,
                   help="preprocessing worker processes (default: the cores available)")
    p.add_argument("--tracker", default="none", choices=("wandb", "tensorboard", "none"),
                   help="experiment tracker for the training runs (default: none)")
    p.add_argument("--sample-classes", type=int, default=10,
                   help="classes in the generated sample tree (ignored with --data)")
    return p


def stage(title: str):
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def call(module_name: str, argv: list[str]) -> None:
    """Run a stage's main(); a non-zero exit stops the demo with the stage's name."""
    import importlib

    module = importlib.import_module(module_name)
    print("$ pipeline " + module_name.rsplit(".", 1)[1] + " " + " ".join(argv), flush=True)
    code = module.main(argv)
    if code:
        raise PipelineError(f"stage {module_name} failed with exit code {code}; "
                            f"see its messages above")


def training_done(run_dir: Path, steps: int) -> bool:
    """A finished run has its final export at the requested step."""
    config = run_dir / "model" / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("step") == steps
    except json.JSONDecodeError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise PipelineError(f"--models: unknown {', '.join(unknown)}; choose from "
                            f"{', '.join(MODELS)}")
    started = time.perf_counter()

    data = Path(args.data) if args.data else out / "sample"
    if args.data is None:
        stage("1/5 sample data (embedded ImageNet-layout tree)")
        call("pipeline.sample", ["--output", str(data), "--classes", str(args.sample_classes)])
    elif not data.is_dir():
        raise PipelineError(f"--data {data} is not a directory")

    stage("2/5 prepare shards")
    shards = out / "shards"
    prepare_args = ["--input", str(data), "--output", str(shards)]
    if args.workers:
        prepare_args += ["--workers", str(args.workers)]
    call("pipeline.prepare", prepare_args)

    checkpoints = []
    for i, model in enumerate(models, 1):
        run_dir = out / "runs" / f"{model}-{args.arch}"
        stage(f"3/5 train {model} ({i}/{len(models)})")
        if training_done(run_dir, args.steps):
            print(f"complete: {run_dir} already holds step {args.steps}; skipping")
        else:
            preset = preset_for(model, args.arch, prefix=args.preset)
            call("pipeline.train", [
                *(["--config", preset] if preset else []), "--model", model,
                "--arch", args.arch, "--train-shards", str(shards / "train"),
                "--val-shards", str(shards / "val"), "--output", str(run_dir),
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--tracker", args.tracker, "--resume", "auto"])
        checkpoints.append(run_dir / "model")

    stage("4/5 evaluate")
    evaluated = out / "eval"
    pending = [c for c in checkpoints
               if not (evaluated / f"{c.parent.name}-step{args.steps}" / "metrics.json").is_file()]
    if pending:
        call("pipeline.evaluate", [*map(str, pending), "--shards", str(shards / "val"),
                                   "--output", str(out / "eval")])
    else:
        print("complete: every checkpoint already has its metrics.json; skipping")

    stage("5/5 report")
    call("pipeline.report", [str(out / "eval"), "--output", str(out / "report")])
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    print(f"report: {(out / 'report' / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    from .cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
