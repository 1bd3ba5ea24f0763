"""`pipeline decode LATENT_SHARDS --checkpoint CKPT --output DIR`: a quick look at latents.

Decodes the first N latents of a split written by `pipeline encode` (in manifest order)
with the checkpoint and writes `DIR/decoded.png`, a grid of the images (row by row), and
`DIR/decoded.json` (their keys, the shards, the checkpoint). The VAE decodes the mean of
stored moments, quantisers their codes. The checkpoint should be the one that encoded
the latents: its weights' sha256 is compared with the manifest's, and a different one is
named in a warning (other weights read the same latent space differently).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import add_config_arguments, build_config, flat_aliases, mark_required, opt, \
    require_declared
from .layout import LOCK_NAME
from .utils import PipelineError, atomic_write_bytes, atomic_write_json, run_stage

GRID_NAME = "decoded.png"
KEYS_NAME = "decoded.json"


@require_declared
@dataclass
class DecodeConfig:
    checkpoint: str = opt("", "export (RUN_DIR/model) or checkpoint directory that encoded "
                              "the latents")
    output: str = opt("", f"writes DIR/{GRID_NAME} and DIR/{KEYS_NAME}")
    num_images: int = opt(64, "latents to decode: the first N in manifest order",
                          bounds="[1, 4096]")
    columns: int = opt(8, "images per row of the grid", bounds="[1, 256]")
    batch_size: int = opt(64, "latents per decoder pass", bounds="[1, 65536]")

    def check(self) -> None:
        output = Path(self.output)
        if output.exists() and not output.is_dir():
            raise PipelineError(f"--output {output}: exists and is not a directory")


ALIASES = flat_aliases(DecodeConfig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline decode", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", metavar="LATENT_SHARDS",
                   help="split directory written by `pipeline encode` (or its manifest.json)")
    add_config_arguments(p, ALIASES, cls=DecodeConfig, title="decoding options")
    mark_required(p, ("checkpoint", "output"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = build_config(None, args, cls=DecodeConfig, aliases=ALIASES)
    import torch

    from .data import make_eval_loader
    from .encode.checkpoint import load_checkpoint
    from .locking import acquire

    loader = make_eval_loader(args.shards, cfg.batch_size, num_workers=0, rank=0,
                              world_size=1, max_samples=cfg.num_images, allow_pipe=False)
    if loader.latent is None:
        raise PipelineError(f"{args.shards} holds images, not latents (its manifest is not "
                            f"one of `pipeline encode`)")
    ckpt = load_checkpoint(cfg.checkpoint)
    check_checkpoint(loader, ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ckpt.model.to(device)
    images, keys = [], []
    with torch.inference_mode():
        for latents, _, batch_keys in loader:
            check_codes(latents, model.num_codes, batch_keys, args.shards)
            decoded = model.decode_latents(latents.to(device))
            images.append(((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu())
            keys += batch_keys
    if not keys:
        raise PipelineError(f"no readable latent in {args.shards}")
    grid = image_grid(torch.cat(images).permute(0, 2, 3, 1).numpy(), cfg.columns)
    with acquire(Path(cfg.output) / LOCK_NAME, f"--output {cfg.output}"):
        atomic_write_json(Path(cfg.output) / KEYS_NAME,
                          {"keys": keys, "shards": str(args.shards), "columns": cfg.columns,
                           "checkpoint": str(Path(cfg.checkpoint).resolve())})
        atomic_write_bytes(Path(cfg.output) / GRID_NAME, png_bytes(grid))
    print(f"{len(keys)} decoded latents -> {Path(cfg.output) / GRID_NAME}")
    return 0


def check_checkpoint(loader, ckpt) -> None:
    """The checkpoint must read latents of this kind and shape; other weights warn."""
    fmt, manifest = loader.latent, loader.manifest
    encoded_by = manifest.get("checkpoint") or {}
    expected = readable_shape(ckpt.model, fmt.kind)
    recorded_codes = manifest["latent"].get("num_codes")
    if expected != fmt.shape or (fmt.kind == "codes" and recorded_codes != ckpt.model.num_codes):
        raise PipelineError(f"checkpoint {ckpt.path} ({ckpt.model.kind}) does not read "
                            f"{fmt.kind} latents of shape {fmt.shape} (its own: "
                            f"{expected}, {ckpt.model.num_codes} codes): decode with the "
                            f"checkpoint that encoded them "
                            f"({encoded_by.get('path')})")
    if encoded_by.get("model_sha256") != ckpt.weights_sha256():
        warnings.warn(f"checkpoint {ckpt.path} is not the one that encoded these latents "
                      f"({encoded_by.get('path')}): its decoder reads them with other weights",
                      stacklevel=2)


def check_codes(latents, num_codes: int | None, keys: list[str], shards: str) -> None:
    """Codes are data: one outside the checkpoint's alphabet is named, not an IndexError."""
    if latents.is_floating_point() or num_codes is None:
        return
    bad = ((latents < 0) | (latents >= num_codes)).flatten(1).any(1)
    if bool(bad.any()):
        raise PipelineError(f"{shards}: sample {keys[int(bad.nonzero()[0])]} holds a code "
                            f"outside [0, {num_codes}): the shard does not belong to this "
                            f"checkpoint's latents; re-run `pipeline encode`")


def readable_shape(model, kind: str) -> tuple[int, ...] | None:
    """Shape of the `kind` latents `model` decodes; None if it reads none of that kind.
    A VAE reads its moments and, from `--latent mean|sample`, plain latents."""
    from .encode.store import plan_latents

    if kind == model.latent_kind:
        return plan_latents(model, "auto").shape
    if kind == "latent" and model.latent_kind == "moments":
        return plan_latents(model, "mean").shape
    return None


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """N x H x W x 3 uint8 -> one image of ceil(N / columns) rows, black where none."""
    n, height, width, _ = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:]))
