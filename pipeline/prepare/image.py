"""One image: bytes of any format -> the output-size RGB image -> the sample's encoding.

Decoding: JPEGs are decoded at a reduced size by DCT scaling (1/2, 1/4, 1/8) as long as the
crop keeps at least --decode-oversampling (default 1.5 for center-crop, 4 for box) times the
output size in decoded pixels, with the crop box mapped exactly (x -> x / scale) in floating
point: most of the decoding and resizing work is skipped (Huffman decoding, which no scaling
skips, is most of what remains) and the output stays >= 35 dB from a full decode's (tested;
figures in the README's Performance section). EXIF orientation is ignored, as torchvision's
ImageNet and ImageFolder loaders ignore it; ICC profiles are dropped (pixels are taken as
sRGB, as those loaders take them); transparent pixels are composited onto white.

Also used by `pipeline bench prepare` (the full-decode baseline) and `pipeline bench load`
(shards encoded exactly as prepare writes them).
"""
from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from .options import Options

try:  # optional dependency `fast`: libjpeg-turbo's scaled decode, faster than PIL's
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    simplejpeg = None

RESAMPLE = {"center-crop": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}
# zlib's Z_RLE strategy is meant for PNG-filtered data: at 64x64 it is faster than the
# default strategy, most on smooth images, with files no larger (README, Performance).
PNG_COMPRESS_LEVEL = 6
PNG_ZLIB_STRATEGY = zlib.Z_RLE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_AVERAGE_FILTER = 3  # filter type byte of a row: Raw(x) - (Raw(x - 3) + Prior(x)) // 2
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


class BadInput(Exception):
    """An input that cannot become a sample; the message is its failure reason."""


def crop_box(width: int, height: int, policy: str) -> tuple[float, float, float, float]:
    """The region of the source (continuous pixel coordinates) that becomes the output.

    center-crop: the centred square of side min(w, h), kept in floating point (an odd
    difference puts its edges on half pixels; rounding would shift the image by half a
    pixel). box: the whole image, squashed to a square.
    """
    if policy == "box":
        return (0.0, 0.0, float(width), float(height))
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def draft_scale(width: int, height: int, box: tuple[float, ...], target: int,
                oversampling: float) -> int:
    """The largest JPEG DCT downscale (1, 2, 4 or 8) keeping >= oversampling * target
    decoded pixels across the crop in both directions. Powers of two only: libjpeg-turbo's
    other factors (3/8, 5/8...) measured much further from the full decode than 1/2
    (README, Performance)."""
    need_w = oversampling * target * width / (box[2] - box[0])
    need_h = oversampling * target * height / (box[3] - box[1])
    room = min(width / need_w, height / need_h)
    return max((s for s in (8, 4, 2, 1) if s <= room), default=1)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadInput("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The size limit is ours (--max-pixels), checked below; silence PIL's own.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # the content, not the file name, picks the format
    except UnidentifiedImageError:
        raise BadInput("not an image: unrecognised file format") from None
    except Image.DecompressionBombError as e:
        raise BadInput(f"decompression bomb: {e}") from None
    if im.width * im.height > max_pixels:
        raise BadInput(f"decompression bomb: {im.width}x{im.height} = {im.width * im.height} "
                       f"pixels exceeds --max-pixels {max_pixels}")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """CMYK, grey, palette, 16-bit and alpha images -> 8-bit RGB."""
    if im.mode.startswith("I"):  # 16-bit grey (PNG/TIFF): keep the top 8 bits, not a clip
        grey = np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_rgb(im: Image.Image, data: bytes, scale: int) -> tuple[Image.Image, int]:
    """Decode to RGB, reduced by `scale` through DCT scaling where the input is a JPEG;
    returns the image and the scale actually applied (1 for a full decode)."""
    if not isinstance(im, JpegImagePlugin.JpegImageFile) or scale == 1:
        return to_rgb(im), 1
    # libjpeg's scaled size is rounded up; the request to PIL's draft is rounded down
    # because draft picks the scale from integer divisions of the size by the request.
    reduced = (math.ceil(im.width / scale), math.ceil(im.height / scale))
    if simplejpeg is not None and im.mode in ("RGB", "L"):  # not CMYK: turbo can't convert it
        try:
            pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=reduced[0],
                                            min_height=reduced[1])
            if pixels.shape[1::-1] == reduced:
                return Image.fromarray(pixels), scale
        except ValueError:
            pass  # strict about libjpeg warnings PIL tolerates (extraneous bytes...): use PIL
    im.draft("RGB", (im.width // scale, im.height // scale))
    return to_rgb(im), scale if im.size == reduced else 1


def render(data: bytes, options: Options,
           reduced_decode: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes of any image -> the output-size RGB image and the original (width, height)."""
    im = open_image(data, options.max_pixels)
    width, height = im.size
    box = crop_box(width, height, options.resize)
    scale = (draft_scale(width, height, box, options.image_size, options.decode_oversampling)
             if reduced_decode else 1)
    try:
        rgb, applied = decode_rgb(im, data, scale)
        # DCT scaling maps source x to exactly x / scale; the decoded size is rounded up
        # (its last pixel covers a partial block), so the ratio of the sizes is not the
        # scale: using it shifts the crop by up to half a pixel (~11 dB on odd sizes).
        out = rgb.resize((options.image_size,) * 2, RESAMPLE[options.resize],
                         box=tuple(v / applied for v in box))
    except Image.DecompressionBombError as e:
        raise BadInput(f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInput(f"corrupt or truncated image ({im.format}): {e}") from None
    out.info.clear()  # no ICC profile, EXIF or dpi chunks in the output
    return out, (width, height)


def encode_png(pixels: np.ndarray) -> bytes:
    """8-bit RGB H x W x 3 -> PNG bytes: every row Average-filtered, zlib with Z_RLE.

    At 64x64, PIL's `save` spends more time on its own machinery than on filtering and
    compressing, a large share of the job's per-image budget. One fixed filter, computed
    for the whole image in numpy, measured within a fraction of a percent of the size of
    PIL's per-row adaptive choice on ImageNet-like content (figures for the other filters
    in the README's Performance section)."""
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes 8-bit RGB, not {pixels.dtype} x {channels}")
    x = pixels.reshape(height, width * 3).astype(np.int16)
    left, up = np.zeros_like(x), np.zeros_like(x)
    left[:, 3:], up[1:] = x[:, :-3], x[:-1]
    rows = np.empty((height, width * 3 + 1), np.uint8)
    rows[:, 0] = PNG_AVERAGE_FILTER
    rows[:, 1:] = (x - ((left + up) >> 1)) & 0xFF
    compressor = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 9, PNG_ZLIB_STRATEGY)
    data = compressor.compress(rows.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return PNG_SIGNATURE + b"".join(_png_chunk(kind, body) for kind, body in
                                    ((b"IHDR", header), (b"IDAT", data), (b"IEND", b"")))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode(im: Image.Image, options: Options) -> bytes:
    buf = io.BytesIO()
    fmt = options.image_format
    if fmt == "npy":
        np.save(buf, np.asarray(im))  # (H, W, 3) uint8
    elif fmt == "png":
        return encode_png(np.asarray(im))
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=options.quality)
    else:  # jpg: no chroma subsampling, which would blur 64x64 images noticeably
        im.save(buf, format="JPEG", quality=options.quality, subsampling=0)
    return buf.getvalue()
