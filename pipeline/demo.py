"""`pipeline demo`: the whole chain on one machine, from nothing to a comparison report.

    sample tree -> shards -> train AE, VAE, VQ-VAE (+ a VQGAN with --tokenizer) and the
    hand-off VAE -> evaluate -> encode the val split with the hand-off VAE -> export it for
    diffusers -> report

The hand-off VAE (preset `demo-latent`: the kl-f4 layout, shrunk) is the one the demo hands
to a next stage, as a researcher's project ends: its latents of the val split as latent
shards (`pipeline encode`) and the model as a diffusers AutoencoderKL (`pipeline export`;
the seed `basic` family has no diffusers class). `--no-handoff` leaves the three out.

With no `--data` it generates the embedded sample ImageNet-layout tree, so it runs on a
fresh machine without a download (a few minutes on 2 CPU cores). With
`--data /path/to/imagenet --steps 100000` the same command is the real job. Each stage
calls the stage's own command-line entry, so the demo exercises exactly what a
researcher would type; a re-run skips every stage whose outputs are complete.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from .config import ARCHS, MODELS, preset_for
from .utils import PipelineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline demo",
        description="sample -> prepare -> train AE/VAE/VQ-VAE and the hand-off VAE -> "
                    "evaluate -> encode the val split -> export for diffusers -> report. "
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
    p.add_argument("--tokenizer", action="store_true",
                   help="also train one tokenizer-grade model: the resnet VQ-VAE at f=4 "
                        "with a PatchGAN discriminator (preset demo-vqgan), WITHOUT the "
                        "perceptual (LPIPS) term, since the demo has no LPIPS weights and "
                        "downloads nothing; several more minutes on 2 CPU cores")
    p.add_argument("--no-handoff", action="store_true",
                   help="skip the hand-off VAE, its encoding of the val split and its "
                        "diffusers export")
    return p


TOKENIZER_PRESET = "demo-vqgan"
TOKENIZER_NOTE = ("tokenizer: resnet VQ-VAE (f=4) + PatchGAN discriminator from step {start}, "
                  "trained WITHOUT the perceptual (LPIPS) term: the demo has no LPIPS "
                  "weights and downloads nothing (a real run adds --loss.lpips_backbone)")
HANDOFF_PRESET = "demo-latent"
HANDOFF_RUN = "vae-resnet-f4"
STAGES = 7


def stage(title: str):
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def call(module_name: str, argv: list[str]) -> None:
    """Run a stage's main(); a non-zero exit stops the demo with the stage's name."""
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


def training_runs(args: argparse.Namespace,
                  models: list[str]) -> list[tuple[str, str, list[str]]]:
    """(title, run name, preset and model options) of each training run of the demo."""
    runs = []
    for model in models:
        preset = preset_for(model, args.arch, prefix=args.preset)
        runs.append((model, f"{model}-{args.arch}",
                     [*(["--config", preset] if preset else []), "--model", model,
                      "--arch", args.arch]))
    if args.tokenizer:
        # The discriminator joins after a third of the steps, once the autoencoder has
        # learnt a first reconstruction (what --loss.disc_start does in the full recipes).
        runs.append(("vqgan (tokenizer)", "vqgan-resnet",
                     ["--config", TOKENIZER_PRESET, "--loss.disc_start", str(args.steps // 3)]))
    if not args.no_handoff:
        runs.append(("the hand-off VAE", HANDOFF_RUN, ["--config", HANDOFF_PRESET]))
    return runs


HANDOFF_LABELS = {"--latents": "latents", "--export": "diffusers export"}


def hand_off(out: Path, shards: Path) -> list[tuple[str, Path]]:
    """Stages 5 and 6: the hand-off VAE's val latents and its diffusers export, as the
    report's (option, path) pairs."""
    checkpoint = out / "runs" / HANDOFF_RUN / "model"
    stage(f"5/{STAGES} encode the val split with the hand-off VAE")
    latents = encode_val(out, shards, checkpoint)
    stage(f"6/{STAGES} export the hand-off VAE for diffusers")
    export = export_diffusers(out, checkpoint, latents)
    return [("--latents", latents), *([("--export", export)] if export else [])]


def encode_val(out: Path, shards: Path, checkpoint: Path) -> Path:
    """The hand-off VAE's latents of the val split (a re-run resumes: finished shards are
    kept, the manifest rewritten)."""
    latents = out / "latents"
    call("pipeline.encode", [str(checkpoint), "--shards", str(shards / "val"),
                             "--output", str(latents)])
    return latents / "val"


def export_diffusers(out: Path, checkpoint: Path, latents: Path) -> Path | None:
    """The hand-off VAE as a diffusers AutoencoderKL, scaled by its val latents; kept when
    an earlier run exported these same weights."""
    from .layout import EXPORT_RECORD_NAME, WEIGHTS_NAME
    from .utils import read_json, sha256_file

    export = out / "export" / HANDOFF_RUN
    if importlib.util.find_spec("diffusers") is None:
        print("skipped: the diffusers export needs the diffusers package (pip install -e "
              "'.[diffusers]'); the latent shards are written")
        return None
    record = export / EXPORT_RECORD_NAME
    if record.is_file():
        recorded = read_json(record, "export record")
        source = recorded.get("checkpoint") if isinstance(recorded, dict) else None
        if isinstance(source, dict) and source.get("sha256") == sha256_file(
                checkpoint / WEIGHTS_NAME):
            print(f"complete: {export} already holds these weights; skipping")
            return export
    call("pipeline.export", [str(checkpoint), "--format", "diffusers", "--output", str(export),
                             "--latents", str(latents), "--force"])
    return export


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
        stage(f"1/{STAGES} sample data (embedded ImageNet-layout tree)")
        call("pipeline.sample", ["--output", str(data), "--classes", str(args.sample_classes)])
    elif not data.is_dir():
        raise PipelineError(f"--data {data} is not a directory")

    stage(f"2/{STAGES} prepare shards")
    shards = out / "shards"
    prepare_args = ["--input", str(data), "--output", str(shards)]
    if args.workers:
        prepare_args += ["--workers", str(args.workers)]
    call("pipeline.prepare", prepare_args)

    runs = training_runs(args, models)
    checkpoints = []
    for i, (title, name, options) in enumerate(runs, 1):
        run_dir = out / "runs" / name
        stage(f"3/{STAGES} train {title} ({i}/{len(runs)})")
        if name == "vqgan-resnet":
            print(TOKENIZER_NOTE.format(start=args.steps // 3 + 1))
        if training_done(run_dir, args.steps):
            print(f"complete: {run_dir} already holds step {args.steps}; skipping")
        else:
            call("pipeline.train", [
                *options, "--train-shards", str(shards / "train"),
                "--val-shards", str(shards / "val"), "--output", str(run_dir),
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--tracker", args.tracker, "--resume", "auto"])
        checkpoints.append(run_dir / "model")

    stage(f"4/{STAGES} evaluate")
    evaluated = out / "eval"
    pending = [c for c in checkpoints
               if not (evaluated / f"{c.parent.name}-step{args.steps}" / "metrics.json").is_file()]
    if pending:
        call("pipeline.evaluate", [*map(str, pending), "--shards", str(shards / "val"),
                                   "--output", str(out / "eval")])
    else:
        print("complete: every checkpoint already has its metrics.json; skipping")

    handed = [] if args.no_handoff else hand_off(out, shards)

    stage(f"7/{STAGES} report")
    handoff_options = [arg for (option, path) in handed for arg in (option, str(path))]
    call("pipeline.report", [str(out / "eval"), "--output", str(out / "report"),
                             *handoff_options])
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    for option, path in handed:
        print(f"{HANDOFF_LABELS[option]}: {path.resolve()}")
    print(f"report: {(out / 'report' / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    from .cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
