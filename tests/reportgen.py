"""Fabricated `pipeline evaluate` outputs, so report tests need no model, shard or evaluator.

Files follow docs/interfaces.md ("Evaluation output", "Run directory"), named as
`pipeline.layout` names them: one folder per checkpoint with metrics.json and the 1024x64
image strips, and a run directory holding history.jsonl. Images are shardgen's smooth patterns; reconstructions are blurred, noisy
copies, so strips and error maps look like the real thing in a screenshot.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.layout import HISTORY_NAME, METRICS_NAME, STRIP_FILES
from shardgen import synthetic_image

NUM_FIXED = 16
FIXED_KEYS = [f"val_{i:06d}" for i in range(NUM_FIXED)]
CLASSES = [f"n{i:08d}" for i in range(10)]


def png_strip(images: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(images, axis=1)).save(buf, format="PNG")
    return buf.getvalue()


def degrade(image: np.ndarray, blur: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A stand-in reconstruction: box blur (lost detail) plus noise (quantisation error)."""
    x = image.astype(np.float32)
    for _ in range(blur):
        x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 5
    x += rng.normal(0, noise, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def error_map(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Mean |error| over RGB through magma, 0 to 0.1 of the range, as evaluate draws them."""
    from matplotlib import colormaps

    err = np.abs(original.astype(np.float32) - recon.astype(np.float32)).mean(axis=-1) / 255
    rgba = colormaps["magma"](np.clip(err / 0.1, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def default_metrics(model: str, step: int, psnr: float) -> dict[str, Any]:
    """Plausible values for each model kind; null where a metric does not apply."""
    mse = 10 ** (-psnr / 10)
    quantised = model == "vqvae"
    kl = 412.5 if model == "vae" else None
    return {
        "num_samples": 160, "num_skipped": 0, "expected_samples": 160,
        "manifest_hash": "3f2a9c" * 10 + "abcd", "shards": ["val-000000.tar"],
        "psnr": psnr, "psnr_of_mean_mse": psnr - 0.4, "ssim": round(0.5 + psnr / 60, 4),
        "ms_ssim": round(0.6 + psnr / 80, 4), "mse": mse, "l1": math.sqrt(mse) * 0.7,
        "lpips": None, "rfid": None,
        "kl": kl, "neg_elbo": 9650.0 if kl else None, "bits_per_dim": 1.13 if kl else None,
        "bits_per_image": 2304.0 if quantised else kl / math.log(2) if kl else None,
        "latent_shape": [4, 16, 16], "latent_size": 1024,
        "quantizer": "vq" if quantised else None,
        "codebook_usage": 82.0 if quantised else None,  # percent of codes used
        "perplexity": 351.7 if quantised else None,
        "images_per_s": {"ae": 1480.0, "vae": 1210.0}.get(model, 890.0) + step,
        "encode_images_per_s": 2400.0, "decode_images_per_s": 2100.0,
        "per_class_psnr": {c: round(psnr - 2 + 0.4 * i, 3) for i, c in enumerate(CLASSES)},
        "worst": [{"key": f"val_{i:06d}", "psnr": round(psnr - 6 + 0.3 * i, 3)}
                  for i in range(12)],
        "fixed_keys": FIXED_KEYS,
        "settings": {"psnr": "mean over images of 10*log10(1/MSE_image)",
                     "ssim_convention": "skimage-valid/v1",
                     "error_maps": "mean |recon - original| over RGB, colormap magma, "
                                   "0 (black) to 0.1 (bright, clipped above)"},
        "provenance": {"git_commit": None, "versions": {"python": "3.11"}},
    }


def write_checkpoint(eval_root: str | Path, name: str, *, run: str, run_dir: str | Path | None,
                     step: int, model: str = "ae", arch: str = "basic", psnr: float = 25.0,
                     folder: str | None = None, **overrides: Any) -> Path:
    """Write `eval_root/<folder or name>/` like pipeline evaluate; returns its metrics.json."""
    out = Path(eval_root) / (folder or name)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(step)
    originals = [synthetic_image(i, i % 10) for i in range(NUM_FIXED)]
    recons = [degrade(img, blur=2, noise=150 / psnr, rng=rng) for img in originals]
    strips = {"originals": originals, "reconstructions": recons,
              "error_maps": [error_map(o, r) for o, r in zip(originals, recons)]}
    if model == "vae":
        strips["prior_samples"] = [degrade(synthetic_image(100 + i, i), 3, 20, rng)
                                   for i in range(NUM_FIXED)]
    files: dict[str, str | None] = {kind: None for kind in STRIP_FILES}
    for kind, images in strips.items():
        (out / STRIP_FILES[kind]).write_bytes(png_strip(images))
        files[kind] = STRIP_FILES[kind]
    if model == "vqvae":
        counts = np.floor(rng.pareto(1.5, 512) * 40).astype(int).tolist()
        (out / STRIP_FILES["code_usage"]).write_text(json.dumps({"counts": counts}))
        files["code_usage"] = STRIP_FILES["code_usage"]
    metrics = {"name": name, "run": run, "run_dir": str(run_dir) if run_dir else None,
               "checkpoint": f"{run_dir}/checkpoints/step-{step}", "step": step,
               "model": model, "arch": arch, "config": {"model": {"kind": model, "arch": arch}},
               **default_metrics(model, step, psnr), "files": files}
    metrics.update(overrides)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2))
    return out / METRICS_NAME


def write_history(run_dir: str | Path, steps: int, final_psnr: float, every: int = 10) -> Path:
    """A decaying loss and rising val PSNR, logged every `every` steps, val every 5th line.

    The loss floor follows the final PSNR so that runs draw distinct curves."""
    path = Path(run_dir) / HISTORY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(every, steps + 1, every):
        floor = 10 ** (-final_psnr / 20)
        record = {"step": step, "train/loss": floor + 0.5 * math.exp(-step / 40),
                  "train/recon": floor + 0.4 * math.exp(-step / 40), "train/lr": 3e-4}
        if step % (5 * every) == 0:
            record |= {"val/recon": 0.05 + 0.3 * math.exp(-step / 50),
                       "val/psnr": final_psnr - 8 * math.exp(-step / 50)}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_comparison(root: str | Path) -> dict[str, Any]:
    """Three runs under `root/runs`, four evaluated checkpoints under `root/eval`.

    - ae: steps 100 and 200, with a training log (two checkpoints, one curve);
    - vae: step 200, prior samples, no training log (the report must say so);
    - vq: step 200, code usage, bits per image, a training log.
    """
    root = Path(root)
    runs, eval_root = root / "runs", root / "eval"
    write_history(runs / "ae", 200, 26.3)
    write_history(runs / "vq", 200, 23.1)
    paths = [
        write_checkpoint(eval_root, "ae-step100", run="ae", run_dir=runs / "ae", step=100,
                         psnr=24.12),
        write_checkpoint(eval_root, "ae-step200", run="ae", run_dir=runs / "ae", step=200,
                         psnr=26.31),
        write_checkpoint(eval_root, "vae-step200", run="vae", run_dir=runs / "vae", step=200,
                         model="vae", arch="resnet", psnr=23.57),
        write_checkpoint(eval_root, "vq-step200", run="vq", run_dir=runs / "vq", step=200,
                         model="vqvae", arch="resnet", psnr=22.84),
    ]
    return {"root": root, "eval": eval_root, "runs": runs, "metrics": paths}
