"""Image decoders: a sample's image member as a uint8 H x W x 3 array.

PNG goes to the fastest decoder installed (`PNG_DECODER`: pyspng, then torchvision, then
PIL); raw `.npy` arrays are read without numpy's per-call header parser (`npy_array`,
which latent shards' members go through too); WebP and JPEG through PIL. Every PNG
decoder refuses 16-bit images alike, since shards hold 8-bit ones.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import math
from typing import Any, Callable

import numpy as np
import torch

from ..shards import IMAGE_EXTS

try:  # libspng (extra `fast`): the fastest PNG decoder here (README, Performance)
    import pyspng
except ImportError:
    pyspng = None

Decoder = Callable[[bytes], np.ndarray]


@functools.lru_cache(maxsize=32)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    """Parse an .npy header dict once: every sample of a shard repeats the same header."""
    import ast
    meta = ast.literal_eval(header.decode("latin1"))
    shape = tuple(meta["shape"])
    return np.dtype(meta["descr"]), shape, math.prod(shape), bool(meta["fortran_order"])


def npy_array(data: bytes) -> np.ndarray:
    """The array of `.npy` bytes, any dtype and shape, as a read-only view of `data`.

    np.load re-parses the header with a Python-level reader on every call, which caps
    its rate well below a raw sample's share of the loader's budget. Nothing is ever
    unpickled: an object dtype cannot be viewed from a buffer (ValueError)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file")
    start = 10 if data[6] == 1 else 12  # format 1.0 has a 2-byte header length, later 4
    end = start + int.from_bytes(data[8:start], "little")
    dtype, shape, count, fortran = _npy_layout(data[start:end])
    array = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _decode_npy(data: bytes) -> np.ndarray:
    array = npy_array(data)
    if array.dtype != np.uint8:
        raise ValueError(f".npy array has dtype {array.dtype}, expected uint8")
    if array.ndim == 2:
        return np.broadcast_to(array[..., None], (*array.shape, 3))
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[2]):
        raise ValueError(f".npy array has shape {array.shape}, expected H x W x 3 or 3 x H x W")
    return array if array.shape[2] == 3 else array.transpose(1, 2, 0)


@functools.cache
def _torchvision_png() -> tuple[Callable[..., torch.Tensor], Any]:
    """torchvision's `decode_png` and its RGB mode, imported on first use: the import costs
    more than the rest of this package's, and with pyspng installed it is only a fallback.
    (Deprecated since torchvision 0.29 in favour of TorchCodec, but faster than PIL here.)"""
    from torchvision.io import ImageReadMode, decode_png
    return decode_png, ImageReadMode.RGB


def _torchvision_listed() -> bool:
    """Whether to offer torchvision's decoder. Where it would be the decoder in use, it is
    imported now, so a torchvision without `decode_png` falls back to PIL instead of
    failing every sample; as a fallback, being installed is enough to list it."""
    if pyspng is None:
        try:
            _torchvision_png()
        except ImportError:
            return False
        return True
    return importlib.util.find_spec("torchvision") is not None


def _decode_png(data: bytes) -> np.ndarray:
    decode_png, rgb = _torchvision_png()
    image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), rgb)
    if image.dtype != torch.uint8:
        raise ValueError(f"{image.dtype} PNG: shards hold 8-bit images")
    return image.permute(1, 2, 0).numpy()  # decode_png's 3 x H x W is a view of H x W x 3


def _decode_spng(data: bytes) -> np.ndarray:
    return pyspng.load(data, format="RGB")


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _eight_bit_png(decode: Decoder) -> Decoder:
    """Shards hold 8-bit images; decoders would silently convert 16-bit ones each their
    own way, so every PNG decoder refuses them alike (IHDR's bit depth, byte 24)."""
    def decode_8_bit(data: bytes) -> np.ndarray:
        if data[12:16] == b"IHDR" and data[24:25] == b"\x10":
            raise ValueError("16-bit PNG: shards hold 8-bit images")
        return decode(data)
    return decode_8_bit


PNG_DECODERS: dict[str, Decoder] = {
    name: _eight_bit_png(decoder) for name, decoder, available in [
        ("pyspng", _decode_spng, pyspng is not None),
        ("torchvision", _decode_png, _torchvision_listed()),
        ("pil", _decode_pil, True)] if available}
PNG_DECODER = next(iter(PNG_DECODERS))  # the fastest one installed
_DECODERS: dict[str, Decoder] = {
    "png": PNG_DECODERS[PNG_DECODER], "npy": _decode_npy, "webp": _decode_pil, "jpg": _decode_pil}


def decode_image(members: dict[str, bytes]) -> np.ndarray:
    """The sample's image as a uint8 H x W x 3 array (possibly a read-only or strided view:
    collation copies it); raises if the sample has no image or it does not decode.

    Rows of RGB pixels are how every decoder delivers an image; batches keep that
    layout in memory (see `handover._batched`), because a transposing copy to 3 x H x W
    would cost a raw sample more than its whole decode."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return _DECODERS[ext](members[ext])
    raise ValueError(f"no image member (one of {', '.join(IMAGE_EXTS)}) in {sorted(members)}")
