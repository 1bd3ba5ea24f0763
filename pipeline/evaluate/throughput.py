"""Encode / decode throughput of a model on the fixed images, timed on the main process."""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor


@torch.inference_mode()
def measure_throughput(model: torch.nn.Module, images: Tensor, device: torch.device,
                       batch_size: int, batches: int) -> dict[str, float]:
    """Images/s of encode, decode and the round trip, timed separately after a warm-up."""
    from ..data import normalize

    repeats = math.ceil(batch_size / len(images))
    x = normalize(images.repeat(repeats, 1, 1, 1)[:batch_size].to(device))
    model.decode(model.encode(x))  # warm-up: allocator, cuDNN autotuning, lazy inits
    encode_s = _timed(lambda: model.encode(x), device, batches)
    z = model.encode(x)
    decode_s = _timed(lambda: model.decode(z), device, batches)
    n = batch_size * batches
    return {"images_per_s": n / (encode_s + decode_s), "encode_images_per_s": n / encode_s,
            "decode_images_per_s": n / decode_s}


def _timed(fn, device: torch.device, repeats: int) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(device)  # CUDA kernels run asynchronously: wait before reading the clock
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
