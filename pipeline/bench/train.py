"""`pipeline bench train`: training-step throughput (images/s) per model x arch.

Each combination is built from its preset (the one `pipeline train` picks: `<model>`,
`resnet-<model>` for the resnet family; or `--preset` for all), then timed on random
images already on the device, so the figure is the model's step cost alone (forward,
loss, backward, AdamW step), without the loader. On CUDA the step runs under bf16
autocast, as `--mixed-precision bf16` would. The first `--warmup` steps (allocator,
cuDNN autotuning, compilation) are not timed.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from pipeline.config import Config, build_config, list_presets, preset_for
from pipeline.models import build_model, compute_loss, list_archs, list_kinds
from pipeline.utils import PipelineError, available_cpus, dumps_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(list_kinds()),
                   help=f"comma-separated models to time (default: {','.join(list_kinds())})")
    p.add_argument("--archs", default=",".join(list_archs()),
                   help=f"comma-separated architecture families (default: "
                        f"{','.join(list_archs())})")
    p.add_argument("--preset", default=None,
                   help="one preset for every combination (e.g. `debug`); default: each "
                        "model's own preset")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for model and inputs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def config_for(model: str, arch: str, preset: str | None) -> Config:
    name = preset or preset_for(model, arch)
    if name not in list_presets():
        raise PipelineError(f"--preset {(name or f'{arch}-{model}')!r} does not exist; "
                            f"presets: {', '.join(list_presets())}")
    args = argparse.Namespace(**{"model.model": model, "model.arch": arch})
    return build_config(name, args)


def time_steps(cfg: Config, batch_size: int, steps: int, warmup: int, device: torch.device,
               channels_last: bool) -> dict[str, float]:
    """Seconds per step and images/s of `steps` full training steps on random images."""
    model = build_model(cfg.model).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    x = (torch.rand(batch_size, 3, 64, 64, device=device) * 2 - 1).contiguous(
        memory_format=memory_format)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        with autocast:
            loss, _parts = compute_loss(model(x), x, cfg.loss, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    return {"ms_per_step": round(seconds * 1000, 2),
            "images_per_s": round(batch_size / seconds, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_names(text: str, valid: list[str], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(valid))
    if unknown or not names:
        raise PipelineError(f"{option}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                            f"{', '.join(valid)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        raise PipelineError("--steps and --batch-size must be >= 1, --warmup >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = split_names(args.models, list_kinds(), "--models")
    archs = split_names(args.archs, list_archs(), "--archs")
    results = []
    for arch in archs:
        for model in models:
            cfg = config_for(model, arch, args.preset)
            figures = time_steps(cfg, args.batch_size, args.steps, args.warmup, device,
                                 args.channels_last)
            results.append({"model": model, "arch": arch, **figures})
            if not args.json:
                print(f"{model:>6} {arch:>7}  {figures['parameters'] / 1e6:7.2f} M params  "
                      f"{figures['ms_per_step']:9.2f} ms/step  "
                      f"{figures['images_per_s']:9.1f} img/s", flush=True)
    settings = {"device": str(device), "batch_size": args.batch_size, "steps": args.steps,
                "warmup": args.warmup, "bf16_autocast": device.type == "cuda",
                "channels_last": args.channels_last, "preset": args.preset,
                "torch_threads": torch.get_num_threads(), "cpus": available_cpus()}
    if args.json:
        print(dumps_json({"settings": settings, "results": results}))
    return 0


if __name__ == "__main__":
    import sys

    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
