"""`pipeline bench gpu`: what one GPU does with the trainer's own step, fed three ways.

For the seed AE, VAE and VQ-VAE (presets `ae`, `vae`, `vqvae`), the resnet f = 4 VQ-VAE
(`resnet-vqvae`) and the adversarial recipe (`vqgan`, its discriminator on from step 1,
LPIPS through a randomly initialised stand-in backbone: nothing is downloaded), each at
`--batch-size` under bf16 autocast (channels-last on CUDA):

  synthetic    images/s of the trainer's step (`pipeline.train.loop.training_step`:
               forward, loss, backward, the per-step agreement, clip, AdamW, EMA) on one
               uint8 batch already on the device: the model's ceiling
  streaming    the same step fed by the streaming loader (`--workers` workers)
  cache        the same step fed by `--data.cache gpu` (`host` without CUDA), and the
               seconds the cache took to fill
  ratio        streaming / synthetic and cache / synthetic: 1.0 means not input-bound
  compile      synthetic images/s with torch.compile (inductor) over eager, and the
               seconds of the compiling warm-up
  memory       peak GPU memory (eager runs, and compiled)
  eval         images/s of evaluation's encode + decode (`pipeline evaluate`'s
               throughput), no grad, bf16
and once, without training: the streaming loader's samples/s per worker on this host.

Shards: `--shards SPEC`, or PNG shards of natural-looking images written to a temporary
directory (those of `pipeline bench load`). Every measurement runs untimed warm-up steps
(5; 1 with `--tiny`), then at least 5 steps (2) and `--seconds` seconds. All eager
figures come first; compilation, the slow part, then runs model by model while less than
`--budget` seconds have passed (later ones are reported as skipped). A model that fails
gets its row's `error`, a part of it that fails (streaming, cache, eval, compile)
`<part>_error`, and the rest is still measured. The JSON object (`--json` prints it alone
on stdout, the table going to stderr) is written to `--output` after every model, so a
run cut short still leaves what it measured; a line on stderr marks each model done.
`--tiny` (with `--device cpu`) runs the same code at the `debug` preset's sizes in
seconds, for tests.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, NamedTuple

import torch

from pipeline.checkpoint import TrainerState
from pipeline.config import Config, build_config
from pipeline.utils import PipelineError, atomic_write_text, available_cpus, dumps_json

# What the issue asks of one H200 (on paper until measured).
TARGETS = {"ae_cache_images_per_s": 50_000, "cache_ratio": 0.95, "streaming_ratio": 0.9,
           "streaming_workers": 16}


class BenchModel(NamedTuple):
    name: str
    preset: str
    overrides: dict[str, Any]
    tiny: dict[str, Any]  # on top of the debug preset with --tiny


ADVERSARIAL = {"loss.disc_start": 0}  # the discriminator in every timed step
MODELS = (
    BenchModel("ae", "ae", {}, {"model.model": "ae"}),
    BenchModel("vae", "vae", {}, {"model.model": "vae"}),
    BenchModel("vqvae", "vqvae", {}, {"model.model": "vqvae"}),
    BenchModel("vqvae-resnet-f4", "resnet-vqvae", {},
               {"model.model": "vqvae", "model.arch": "resnet"}),
    BenchModel("vqgan", "vqgan", ADVERSARIAL,
               {"model.model": "vqvae", "model.arch": "resnet", "loss.adversarial_weight": 0.8,
                "loss.perceptual_weight": 1.0, "loss.lpips_net": "alex", "disc.channels": 8,
                **ADVERSARIAL}),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch_size: int
    samples: int        # written when no --shards are given
    seconds: float
    min_steps: int
    warmup: int
    eval_batches: int


FULL = Sizes(batch_size=256, samples=20_000, seconds=3.0, min_steps=5, warmup=5, eval_batches=20)
TINY = Sizes(batch_size=8, samples=96, seconds=0.0, min_steps=2, warmup=1, eval_batches=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--models", default=",".join(m.name for m in MODELS),
                   help="comma-separated rows to measure (default: %(default)s)")
    p.add_argument("--shards", default=None, metavar="SPEC",
                   help="train shards to stream and cache (default: temporary PNG shards)")
    p.add_argument("--workers", type=int, default=None,
                   help="streaming loader workers (default: the CPUs this process may use, "
                        "at most 16)")
    p.add_argument("--batch-size", type=int, default=None, help="per step (default: 256)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples of the temporary shards (default: 20000)")
    p.add_argument("--seconds", type=float, default=None,
                   help="timed seconds per measurement (default: 3)")
    p.add_argument("--budget", type=float, default=240.0,
                   help="no compilation starts after this many seconds (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    p.add_argument("--tiny", action="store_true",
                   help="debug-preset sizes, a few steps: the whole bench in seconds on CPU")
    p.add_argument("--output", default="bench-gpu.json",
                   help="the JSON report is written here (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON object alone on stdout (the table goes to stderr)")
    return p


# ---------------------------------------------------------------- settings


def pick_device(name: str | None) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device name torch knows
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise PipelineError(f"--device {name}: cuda (or cuda:N) or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: no CUDA device is visible to this process "
                            f"(check nvidia-smi and CUDA_VISIBLE_DEVICES), or pass --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PipelineError(f"--device {name}: this process sees "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = TINY if args.tiny else FULL
    chosen = {"batch_size": args.batch_size, "samples": args.samples, "seconds": args.seconds}
    sizes = dataclasses.replace(base, **{k: v for k, v in chosen.items() if v is not None})
    if sizes.batch_size < 1 or sizes.samples < 1 or sizes.seconds < 0:
        raise PipelineError("--batch-size and --samples must be >= 1, --seconds >= 0")
    return sizes


def selected_models(text: str) -> list[BenchModel]:
    by_name = {m.name: m for m in MODELS}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise PipelineError(f"--models: unknown {', '.join(unknown) or '(empty)'}; choose from "
                            f"{', '.join(by_name)}")
    return [by_name[n] for n in names]


def bench_config(model: BenchModel, sizes: Sizes, device: torch.device, tiny: bool,
                 shards: str, workers: int, root: Path) -> Config:
    """The row's preset at the bench's sizes; its LPIPS term (if any) on a stand-in."""
    cuda = device.type == "cuda"
    values: dict[str, Any] = dict(model.tiny if tiny else model.overrides)
    values.update({"train.batch_size": sizes.batch_size, "train.output": str(root / "run"),
                   "train.mixed_precision": "bf16" if cuda else "no",
                   "train.channels_last": cuda, "tracker.tracker": "none",
                   "data.train_shards": shards, "data.num_workers": workers})
    cfg = build_config("debug" if tiny else model.preset, argparse.Namespace(**values))
    if cfg.loss.perceptual_weight > 0:
        backbone = root / f"{cfg.loss.lpips_net}-stand-in.pth"
        if not backbone.exists():
            from pipeline.models.lpips import write_random_backbone

            write_random_backbone(backbone, cfg.loss.lpips_net)
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(
            cfg.loss, lpips_backbone=str(backbone)))
    return cfg


# ---------------------------------------------------------------- one run


@contextlib.contextmanager
def bench_run(cfg: Config, device: torch.device, compiled: bool) -> Iterator[Any]:
    """The trainer's Run (model, AdamW, EMA, discriminator, LPIPS) on `device`, without
    a run directory, tracker or checkpoints."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from pipeline.train.setup import (Run, make_objective, prepare_discriminator,
                                      prepare_model, release_accelerate_state)

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.train.mixed_precision,
                              dynamo_backend="inductor" if compiled else "no")
    try:
        set_seed(cfg.train.seed)
        model, optimizer, ema = prepare_model(cfg, accelerator)
        disc, disc_optimizer = prepare_discriminator(cfg, accelerator)
        yield Run(cfg, accelerator, model, optimizer, ema, None, Path(cfg.train.output),
                  disc=disc, disc_optimizer=disc_optimizer,
                  objective=make_objective(cfg, accelerator, disc))
    finally:
        release_accelerate_state()


def synthetic_batches(cfg: Config, device: torch.device) -> Iterator:
    """One random uint8 batch on the device, laid out as the loader's (channels-last)."""
    m = cfg.model
    rows = torch.randint(0, 256, (cfg.train.batch_size, m.image_size, m.image_size,
                                  m.in_channels), dtype=torch.uint8, device=device)
    batch = (rows.permute(0, 3, 1, 2), torch.zeros(len(rows), dtype=torch.int64),
             [""] * len(rows))
    while True:
        yield batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(run, batches: Iterator, sizes: Sizes) -> dict[str, float]:
    """Images/s and data-wait fraction of the trainer's step, after the warm-up."""
    from pipeline.train.loop import Window, training_step

    state, stop, device = TrainerState(), SimpleNamespace(received=None), run.accelerator.device
    started = time.perf_counter()
    for _ in range(sizes.warmup):
        training_step(run, state, batches, Window(), stop)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    window, steps, started = Window(), 0, time.perf_counter()
    while steps < sizes.min_steps or time.perf_counter() - started < sizes.seconds:
        training_step(run, state, batches, window, stop)
        steps += 1
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"images_per_s": round(steps * run.cfg.train.batch_size / elapsed, 1),
            "data_wait_frac": round(window.data_wait / elapsed, 4),
            "warmup_s": round(warmup_s, 2)}


def eval_rate(run, sizes: Sizes) -> float:
    """Evaluation's encode + decode throughput (`pipeline evaluate`'s), bf16 on CUDA."""
    from pipeline.evaluate.throughput import measure_throughput

    cfg, device = run.cfg, run.accelerator.device
    model = run.module.eval()
    m = cfg.model
    images = torch.randint(0, 256, (cfg.train.batch_size, m.in_channels, m.image_size,
                                    m.image_size), dtype=torch.uint8)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        figures = measure_throughput(model, images, device, cfg.train.batch_size,
                                     sizes.eval_batches)
    model.train()
    return round(figures["images_per_s"], 1)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def with_data(cfg: Config, **data: Any) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def measure_eager(cfg: Config, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Synthetic, streaming and cached training, and evaluation, of one model. Without
    the synthetic figure the row fails; a failure of streaming, cache or evaluation (a
    loader's workers, a cache that does not fit) is that part's `<part>_error` alone."""
    row: dict[str, Any] = {}
    reset_peak_memory(device)
    with bench_run(cfg, device, compiled=False) as run:
        row["parameters"] = sum(p.numel() for p in run.module.parameters())
        synthetic = time_training(run, synthetic_batches(cfg, device), sizes)
        row["synthetic_images_per_s"] = synthetic["images_per_s"]
        part(row, "streaming", lambda: measure_streaming(run, sizes))
        part(row, "cache", lambda: measure_cache(run, sizes))
        part(row, "eval", lambda: {"eval_images_per_s": eval_rate(run, sizes)})
    row["streaming_ratio"] = ratio(row.get("streaming_images_per_s"),
                                   row["synthetic_images_per_s"])
    row["cache_ratio"] = ratio(row.get("cache_images_per_s"), row["synthetic_images_per_s"])
    row["peak_mem_gb"] = peak_memory_gb(device)
    return row


def part(row: dict[str, Any], name: str, measure) -> None:
    """`measure()`'s figures into the row, or its failure as `row[name + "_error"]`."""
    try:
        row.update(measure())
    except Exception as error:  # noqa: BLE001 - reported in the row, the rest stands
        row[f"{name}_error"] = describe(error)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed part held, for the parts after it


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def measure_streaming(run, sizes: Sizes) -> dict[str, Any]:
    from pipeline.train.loop import make_train_loader

    figures = time_training(run, iter(make_train_loader(run, TrainerState())), sizes)
    return {"streaming_images_per_s": figures["images_per_s"],
            "streaming_workers": run.cfg.data.num_workers,
            "streaming_data_wait_frac": figures["data_wait_frac"]}


def measure_cache(run, sizes: Sizes) -> dict[str, Any]:
    """The trainer's `--data.cache gpu` (`host` without CUDA): fill, then train from it."""
    from pipeline.train.loop import make_train_loader

    cfg = run.cfg
    place = "gpu" if run.accelerator.device.type == "cuda" else "host"
    run.cfg = with_data(cfg, cache=place)
    try:
        started = time.perf_counter()
        cached = make_train_loader(run, TrainerState())
        fill_s = round(time.perf_counter() - started, 2)
        figures = time_training(run, iter(cached), sizes)
    finally:
        run.cfg = cfg
    return {"cache": place, "cache_fill_s": fill_s,
            "cache_images_per_s": figures["images_per_s"],
            "cache_data_wait_frac": figures["data_wait_frac"]}


def measure_compiled(cfg: Config, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))
    # Every model compiles the same AutoEncoder.forward: earlier models' entries would
    # count towards its recompilation limit.
    import torch._dynamo

    torch._dynamo.reset()
    reset_peak_memory(device)
    with bench_run(cfg, device, compiled=True) as run:
        figures = time_training(run, synthetic_batches(cfg, device), sizes)
    return {"compiled_images_per_s": figures["images_per_s"], "compile_s": figures["warmup_s"],
            "compiled_peak_mem_gb": peak_memory_gb(device)}


def ratio(value: float | None, reference: float | None) -> float | None:
    if not value or not reference:
        return None
    return round(value / reference, 3)


def loader_rate(shards: str, batch_size: int, workers: int, sizes: Sizes) -> dict[str, Any]:
    """The streaming loader alone: samples/s over all workers and per worker."""
    from pipeline.data import make_train_loader

    batches = iter(make_train_loader(shards, batch_size, num_workers=workers, seed=0,
                                     shuffle_buffer=2000))
    for _ in range(max(1, sizes.warmup)):  # worker start-up is not throughput
        next(batches)
    count, started = 0, time.perf_counter()
    while count < sizes.min_steps * batch_size or time.perf_counter() - started < sizes.seconds:
        count += len(next(batches)[0])
    rate = count / (time.perf_counter() - started)
    del batches
    return {"workers": workers, "samples_per_s": round(rate, 1),
            "samples_per_s_per_worker": round(rate / max(1, workers), 1)}


# ---------------------------------------------------------------- the report


def settings_of(args: argparse.Namespace, device: torch.device, sizes: Sizes, workers: int,
                shards: str) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cpus": available_cpus(), "workers": workers, "batch_size": sizes.batch_size,
            "mixed_precision": "bf16" if cuda else "no", "channels_last": cuda,
            "seconds": sizes.seconds, "warmup_steps": sizes.warmup, "tiny": args.tiny,
            "shards": args.shards or f"temporary PNG shards, {sizes.samples} samples",
            "lpips": "randomly initialised stand-in backbone (seed 0)"}


def check_targets(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    by_name = {row["model"]: row for row in rows}
    ae = by_name.get("ae", {})
    meets: dict[str, bool | None] = {
        "ae_cache_images_per_s": (None if ae.get("cache_images_per_s") is None else
                                  ae["cache_images_per_s"] >= TARGETS["ae_cache_images_per_s"])}
    for key in ("cache_ratio", "streaming_ratio"):
        values = [row.get(key) for row in rows if row.get(key) is not None]
        meets[key] = None if not values else min(values) >= TARGETS[key]
    return meets


COLUMNS = (("synthetic_images_per_s", "synthetic", "{:,.0f}"),
           ("streaming_images_per_s", "streaming", "{:,.0f}"),
           ("streaming_ratio", "ratio", "{:.2f}"), ("cache_images_per_s", "cache", "{:,.0f}"),
           ("cache_ratio", "ratio", "{:.2f}"), ("compiled_images_per_s", "compiled", "{:,.0f}"),
           ("compile_speedup", "speed-up", "{:.2f}"), ("compile_s", "compile s", "{:.0f}"),
           ("peak_mem_gb", "peak GB", "{:.2f}"), ("eval_images_per_s", "eval", "{:,.0f}"))


def print_table(report: dict[str, Any], file) -> None:
    s, loader = report["settings"], report["loader"]
    alone = (f"failed: {loader['error']}" if "error" in loader else
             f"{loader['samples_per_s']:,.0f} samples/s = "
             f"{loader['samples_per_s_per_worker']:,.0f} per worker")
    print(f"training images/s on {s['device_name']} ({s['device']}), batch {s['batch_size']}, "
          f"{s['mixed_precision']}, streaming with {s['workers']} workers; loader alone "
          f"{alone}", file=file)
    print(f"{'model':<17}{'params':>9}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS),
          file=file)
    for row in report["models"]:
        if row.get("error"):
            print(f"{row['model']:<17} failed: {row['error']}", file=file)
            continue
        cells = "".join(f"{'-':>11}" if row.get(key) is None else f"{form.format(row[key]):>11}"
                        for key, _, form in COLUMNS)
        print(f"{row['model']:<17}{row['parameters'] / 1e6:>8.2f}M{cells}", file=file)
        for key in sorted(k for k in row if k.endswith("_error") or k == "compile_skipped"):
            print(f"{'':<17} {key}: {row[key]}", file=file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, sizes, models = pick_device(args.device), sizes_of(args), selected_models(args.models)
    workers = args.workers if args.workers is not None else (
        1 if args.tiny else min(16, available_cpus()))
    if workers < 0:
        raise PipelineError(f"--workers must be >= 0, not {workers}")
    check_output(args.output)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        shards = args.shards or str(write_shards(root, sizes.samples))
        report: dict[str, Any] = {"settings": settings_of(args, device, sizes, workers, shards),
                                  "loader": {}, "models": [], "targets": TARGETS}
        try:
            report["loader"] = loader_rate(shards, sizes.batch_size, workers, sizes)
        except Exception as error:  # noqa: BLE001 - reported, the models still run
            report["loader"] = {"workers": workers, "error": describe(error)}
        save(report, args.output, began)
        configs = {}
        for model in models:
            row: dict[str, Any] = {"model": model.name,
                                   "preset": "debug" if args.tiny else model.preset}
            report["models"].append(row)
            try:
                cfg = configs[model.name] = bench_config(model, sizes, device, args.tiny,
                                                         shards, workers, root)
                row.update(measure_eager(cfg, device, sizes))
            except Exception as error:  # noqa: BLE001 - one model's failure is its row's
                row["error"] = describe(error)
            save(report, args.output, began)
            progress(row, began)
        for row in report["models"]:
            cfg = configs.get(row["model"])
            if args.no_compile or cfg is None or row.get("error"):
                continue
            if time.perf_counter() - began > args.budget:
                row["compile_skipped"] = f"time budget of {args.budget:.0f} s spent"
                continue
            try:
                row.update(measure_compiled(cfg, device, sizes))
                row["compile_speedup"] = ratio(row["compiled_images_per_s"],
                                               row["synthetic_images_per_s"])
            except Exception as error:  # noqa: BLE001 - reported, the other rows stand
                row["compile_error"] = describe(error)
            save(report, args.output, began)
            progress(row, began, "compiled")
    report["meets_targets"] = check_targets(report["models"])
    save(report, args.output, began)
    print_table(report, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(dumps_json(report, indent=None))
    return 0


def write_shards(root: Path, samples: int) -> Path:
    from pipeline.bench.load import write_bench_shards

    return write_bench_shards(root, "png", samples)


def check_output(output: str) -> None:
    """Refuse an --output whose directory is missing before anything is measured."""
    folder = Path(output).resolve().parent
    if not folder.is_dir():
        raise PipelineError(f"--output {output}: the directory {folder} does not exist")


def progress(row: dict[str, Any], began: float, what: str = "eager") -> None:
    """One line on stderr per finished measurement: a long run shows where it is."""
    failed = [key for key in row if (key == "compile_error") == (what == "compiled")
              and (key == "error" or key.endswith("_error"))]
    status = f"failed ({', '.join(failed)})" if failed else "done"
    print(f"[{time.perf_counter() - began:6.0f} s] {row['model']}: {what} {status}",
          file=sys.stderr, flush=True)


def save(report: dict[str, Any], output: str, began: float) -> None:
    report["seconds"] = round(time.perf_counter() - began, 1)
    atomic_write_text(output, dumps_json(report) + "\n")


if __name__ == "__main__":
    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
