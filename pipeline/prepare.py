"""`pipeline prepare`: an ImageNet-style JPEG tree -> 64x64 WebDataset shards + manifest.

    pipeline prepare --input ROOT --output OUT [--splits train,val] [--workers N]
                     [--part K/N] [--resize center-crop|box] [--image-format png|npy|webp|jpg]
    pipeline prepare --merge OUT

How a run is organised (shards/README.md documents the output):

0. Take the part's lock `OUT/<split>/.progress/lock.part-K-of-N` (a whole job is 0/1),
   refusing, with the holder's PID, host and command, while another job holds the same
   part or one of another N (their shards overlap); `--merge` is refused while any part
   runs. Only then are this part's stale temporary files removed.
1. List every regular file of a split (sorted; FIFOs, sockets, devices, broken links and
   directory loops are recorded as `input_failures` of no shard), label it, give it a
   dot-free key, and assign it to a shard *before* decoding anything: train by a seeded
   permutation (every shard mixes classes), other splits in sorted order. Shard i's
   content is then a pure function of (inputs, options), which is what makes resume and
   `--part K/N` exact.
2. Workers decode chunks of a shard's inputs; the parent checks that each chunk came back
   as exactly its planned inputs (samples + failures, in order: every input is written
   once), appends it to the shard's temporary file as soon as the chunks before it are
   in, renames the file once the shard is complete (see `pipeline.shards.ShardWriter`)
   and then records it in `OUT/<split>/.progress/<shard>.json`. A re-run skips shards
   whose file matches their record and redoes the rest, so a job killed at any point
   re-runs to the same samples.
3. The manifest (or, for a part, `manifest.part-K-of-N.json`) is assembled from the records.

Stopping: SIGTERM or SIGINT removes the temporary files, cancels pending tasks, ends the
workers and exits with status 75 (EX_TEMPFAIL, as the trainer's preemption): re-run the
same command to resume. Workers ignore those signals (the parent decides) and end by
themselves when the parent dies, even by SIGKILL. A full disk or a read-only output ends
in one line, exit 2, with no temporary file left.

Decoding: JPEGs are decoded at a reduced size by DCT scaling (1/2, 1/4, 1/8) as long as the
crop keeps at least --decode-oversampling (default 1.5 for center-crop, 4 for box) times the
output size in decoded pixels, with the crop box mapped exactly (x -> x / scale) in floating
point: decode + resize take ~2.2x less time than from a full decode on ImageNet-like files
(Huffman decoding, which no scaling skips, is most of what remains) and stay >= 35 dB from
it (tested; 40.7 dB mean there). EXIF orientation is
ignored, as torchvision's ImageNet and ImageFolder loaders ignore it; ICC profiles are
dropped (pixels are taken as sRGB, as those loaders take them).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import struct
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import (FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed,
                                wait)
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError
from tqdm import tqdm

from . import __version__
from .inputs import (ClassMap, Item, SplitListing, input_fingerprint, printable,
                     resolve_classes, scan_split)
from .locking import Lock, OutputLocked, acquire, describe_holder, holder_of, mutex
from .shards import (FAILURES_NAME, IMAGE_EXTS, MANIFEST_FORMAT, MANIFEST_NAME,
                     ShardWriter, encode_members, shard_name, write_manifest)
from .utils import (PipelineError, atomic_write_json, atomic_write_text, available_cpus,
                    dumps_json, provenance, sha256_file)

try:  # optional dependency `fast`: libjpeg-turbo's scaled decode, ~15% faster than PIL's
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    simplejpeg = None

RESIZE_POLICIES = ("center-crop", "box")
RESAMPLE = {"center-crop": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}
# Default decoded pixels per output pixel that reduced (DCT-scaled) JPEG decoding must
# keep (--decode-oversampling). Measured on ImageNet-like 470x400 JPEGs against the full
# decode, center-crop: 2 -> 48.9 dB mean / 44.4 dB worst, 1.5 -> 40.7 / 39.0 dB and a
# quarter less time per image (1/4 instead of 1/2 DCT scaling for a 400-pixel short
# side: the resize then starts from 100 instead of 200 pixels). PIL's BOX filter gives
# each source pixel all or nothing (no partial coverage at the window edges), so its
# output depends on the source resolution more than bicubic's: at 2x it measured ~35 dB,
# at 4x >= 40 dB.
OVERSAMPLING = {"center-crop": 1.5, "box": 4.0}
DEFAULT_SHARD_SIZE = 3000
DEFAULT_QUALITY = 90
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
MAX_IMAGE_SIZE = 4096  # --image-size: one 4096x4096 RGB sample is already 50 MB decoded
# zlib's Z_RLE strategy is meant for PNG-filtered data: at 64x64 it measured 2.6x faster
# than the default strategy on smooth images (0.31 vs 0.81 ms) and 1.3x on detailed ones,
# with files no larger.
PNG_COMPRESS_LEVEL = 6
PNG_ZLIB_STRATEGY = zlib.Z_RLE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_AVERAGE_FILTER = 3  # filter type byte of a row: Raw(x) - (Raw(x - 3) + Prior(x)) // 2
WORKER_PRELOAD = ["numpy", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "tqdm",
                  "simplejpeg"]  # heavy imports a forkserver does once (missing ones skipped)
CHUNK_SIZE = 32  # images per worker task: small enough that few shards still fill all workers
# The job's last images go out in quarter-size chunks, so that workers finish together
# instead of one of them decoding a last full chunk alone (~45 ms on 800 images, 6%).
TAPER_IMAGES, TAPER_CHUNK_SIZE = 8 * CHUNK_SIZE, CHUNK_SIZE // 4
JOB_RECORD = "job.json"
PROGRESS_DIR = ".progress"
MUTEX_NAME = "lock"  # .progress/lock: held for a moment to check other jobs' part locks
PART_LOCK = re.compile(r"lock\.part-(\d+)-of-(\d+)$")  # held by a running job of part K/N
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a split is a directory of OUT
# Exit status of a job stopped by SIGTERM/SIGINT (BSD's EX_TEMPFAIL, the trainer's
# "preempted, rerun to resume"): finished shards are kept and the same command resumes.
EXIT_INTERRUPTED = 75
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
SLURM_PART_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


# ---------------------------------------------------------------- options

@dataclass(frozen=True)
class Options:
    """Everything that decides the bytes of a shard; stored with the output and compared
    on re-runs so that shards made with different options are never mixed."""

    image_size: int = 64
    resize: str = "center-crop"
    image_format: str = "png"
    quality: int | None = None  # webp/jpg only
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_oversampling: float | None = None  # default: OVERSAMPLING[resize]

    def __post_init__(self) -> None:
        if self.quality is None and self.image_format in ("webp", "jpg"):
            object.__setattr__(self, "quality", DEFAULT_QUALITY)
        if self.decode_oversampling is None and self.resize in OVERSAMPLING:
            object.__setattr__(self, "decode_oversampling", OVERSAMPLING[self.resize])

    def validate(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise PipelineError(f"--resize must be one of {', '.join(RESIZE_POLICIES)}, "
                                f"got {self.resize!r}")
        if self.image_format not in IMAGE_EXTS:
            raise PipelineError(f"--image-format must be one of {', '.join(IMAGE_EXTS)}, "
                                f"got {self.image_format!r}")
        lossy = self.image_format in ("webp", "jpg")
        if self.quality is not None and not lossy:
            raise PipelineError(f"--quality applies to webp and jpg only; "
                                f"{self.image_format} is lossless")
        if lossy and not 1 <= self.quality <= 100:
            raise PipelineError(f"--quality must be 1-100, got {self.quality}")
        for flag, value in (("--image-size", self.image_size), ("--shard-size", self.shard_size),
                            ("--max-pixels", self.max_pixels),
                            ("--decode-oversampling", self.decode_oversampling)):
            if not value >= 1:  # also refuses NaN
                raise PipelineError(f"{flag} must be at least 1, got {value}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise PipelineError(f"--image-size must be at most {MAX_IMAGE_SIZE}, "
                                f"got {self.image_size}")
        if self.seed < 0:  # numpy's generators take seeds >= 0 only
            raise PipelineError(f"--seed must be at least 0, got {self.seed}")


# Option names as the user typed them, for messages about differing options.
OPTION_FLAGS = {"image_size": "--image-size", "resize": "--resize",
                "image_format": "--image-format", "quality": "--quality",
                "shard_size": "--shard-size", "seed": "--seed", "max_pixels": "--max-pixels",
                "decode_oversampling": "--decode-oversampling"}


# ---------------------------------------------------------------- one image

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
    decoded pixels across the crop in both directions. Powers of two only:
    libjpeg-turbo's other factors (3/8, 5/8...) measured ~36 dB from the full decode
    against ~50 dB at 1/2."""
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

    At 64x64, PIL's `save` spends ~0.25 ms per image on its own machinery, twice the
    filtering and compression themselves (0.15 ms here), which is a sixth of the job's
    whole per-image budget. One fixed filter, computed for the whole image in numpy,
    measured within 0.3% of the size of PIL's per-row adaptive choice on ImageNet-like
    content (Up and Sub alone: +4.5%, Paeth: +0.02% but 40% slower)."""
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


def sample_members(item: Item, root: Path, options: Options,
                   reduced_decode: bool = True) -> dict[str, bytes]:
    """The tar members of one input, or BadInput with the reason it cannot be one."""
    if item.wnid is None:
        raise BadInput("no label: not inside a class folder and not in the val label file")
    try:
        data = (root / item.src).read_bytes()
    except OSError as e:
        raise BadInput(f"unreadable: {e.strerror or e}") from None
    im, orig_size = render(data, options, reduced_decode)
    meta = {"wnid": item.wnid, "src": item.src, "orig_size": list(orig_size)}
    return {options.image_format: encode(im, options), "cls": str(item.label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


# ---------------------------------------------------------------- worker tasks

@dataclass(frozen=True)
class ChunkTask:
    root: str
    options: Options
    shard: int
    chunk: int
    items: list[Item]


@dataclass
class ChunkResult:
    shard: int
    chunk: int
    members: bytes  # the chunk's samples as tar members (shards.encode_members)
    keys: list[str]
    failures: list[dict[str, str]]  # {"src", "reason"}, in input order


def process_chunk(task: ChunkTask) -> ChunkResult:
    """Decode, resize and encode a chunk of one shard's inputs (runs in a worker)."""
    samples, failures = [], []
    root = Path(task.root)
    for item in task.items:
        try:
            samples.append((item.key, sample_members(item, root, task.options)))
        except BadInput as e:
            failures.append({"src": item.src, "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - any decoder crash on untrusted bytes is a
            # failure of that input, never of the job
            failures.append({"src": item.src, "reason": f"{type(e).__name__}: {e}"})
    return ChunkResult(task.shard, task.chunk, *encode_members(samples), failures)


MapFn = Callable[[Iterable[ChunkTask]], Iterator[ChunkResult]]


def pool_context() -> multiprocessing.context.BaseContext:
    """`forkserver` with this module preloaded where available, else `spawn`.

    Never plain `fork`: it is unsafe once threads exist (tqdm's monitor, the caller's).
    A spawned worker imports numpy and PIL itself (~0.3 s of CPU each); forkserver workers
    are forked from one server that imported them once. This module itself is not
    preloaded: a worker re-runs it as `__mp_main__` under `python -m pipeline.prepare`,
    which warns if it is already imported.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(WORKER_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def worker_init() -> None:
    """Runs first in every worker: the parent alone decides when the job stops.

    SIGINT/SIGTERM are ignored (a Ctrl-C or a scheduler's SIGTERM reaches the whole
    process group; the parent then cancels what is pending and ends the workers), and a
    daemon thread ends the worker as soon as its parent is gone, even by SIGKILL: an
    orphaned worker would otherwise wait for tasks forever, holding the caller's stdout
    open (a pipeline reading it would never see EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=exit_with_parent, args=(parent.sentinel,), daemon=True,
                         name="exit-with-parent").start()


def exit_with_parent(sentinel: int) -> None:
    from multiprocessing.connection import wait as wait_for

    wait_for([sentinel])  # readable once the parent process has ended
    os._exit(1)


@contextmanager
def executor(workers: int) -> Iterator[MapFn]:
    """An unordered map over chunk tasks: in this process for one worker, else a pool.

    concurrent.futures rather than multiprocessing.Pool: Pool's worker-handler thread
    wakes up whenever a result waits in its pipe and, with ~300 KB results, spun for
    ~7% of a core in the writing process, taken from the workers on a 2-core machine.
    A worker that dies also fails the job (BrokenProcessPool) instead of losing its
    task and hanging. Leaving the block, also by an exception or an interrupt, cancels
    the tasks not started and waits for the workers to end (see worker_init)."""
    if workers <= 1:
        yield lambda tasks: map(process_chunk, tasks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=worker_init)
    try:
        yield lambda tasks: map_unordered(pool, tasks, in_flight=4 * workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def map_unordered(pool: ProcessPoolExecutor, tasks: Iterable[ChunkTask],
                  in_flight: int) -> Iterator[ChunkResult]:
    """process_chunk over `tasks` in completion order, at most `in_flight` submitted at a
    time (ImageNet is ~40,000 chunk tasks: they are not all queued up front)."""
    pending: set[Future] = set()
    try:
        for task in tasks:
            pending.add(pool.submit(process_chunk, task))
            if len(pending) >= in_flight:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        for future in as_completed(pending):
            yield future.result()
    finally:  # stopped early (an error, or the caller gave up): drop what has not started
        for future in pending:
            future.cancel()


# ---------------------------------------------------------------- shards, records, resume

@dataclass
class ShardRecord:
    """What a finished shard holds; written after the shard's rename."""

    index: int
    info: dict[str, Any]  # ShardInfo.to_dict()
    failures: list[dict[str, str]] = field(default_factory=list)


def plan_shards(items: list[Item], split: str, options: Options) -> list[list[Item]]:
    """Assign inputs to shards before any decoding: train by a seeded permutation, other
    splits in sorted order, so shard i is a pure function of the inputs and options."""
    order = (np.random.default_rng(options.seed).permutation(len(items)) if split == "train"
             else np.arange(len(items)))
    ordered = [items[i] for i in order]
    return [ordered[i:i + options.shard_size] for i in range(0, len(ordered), options.shard_size)]


def record_path(split_dir: Path, name: str) -> Path:
    return split_dir / PROGRESS_DIR / f"{name}.json"


def completed_record(split_dir: Path, index: int, name: str) -> ShardRecord | None:
    """The record of shard `name` if the shard on disk is exactly the one recorded."""
    try:
        record = ShardRecord(**json.loads(record_path(split_dir, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    shard = split_dir / name
    if (not plausible_record(record, index, name) or not shard.is_file()
            or shard.stat().st_size != record.info["bytes"]
            or sha256_file(shard) != record.info["sha256"]):
        return None
    return record


def plausible_record(record: ShardRecord, index: int, name: str) -> bool:
    """A record is data: it goes into the manifest only with the fields readers rely on."""
    info = record.info
    return (record.index == index and isinstance(info, dict) and info.get("name") == name
            and all(type(info.get(k)) is int and info[k] >= 0 for k in ("num_samples", "bytes"))
            and isinstance(info.get("sha256"), str) and isinstance(record.failures, list)
            and all(isinstance(f, dict) and isinstance(f.get("src"), str)
                    for f in record.failures))


def remove_stale_temp_files(split_dir: Path, names: list[str]) -> None:
    """Temp files (`.<name>.tmp-<pid>`) of the files `names` of this part only: another
    part may be writing its own next to them on a shared file system. Called with this
    part's lock held (no other job writes these names), at the start and on the way
    out of an interrupted or failed run. Shard records are `<shard>.json` in the
    progress directory."""
    mine = set(names) | {f"{name}.json" for name in names}
    for directory in (split_dir, split_dir / PROGRESS_DIR):
        if not directory.is_dir():
            continue
        for path in directory.glob(".*.tmp-*"):
            if path.name[1:].split(".tmp-")[0] in mine:
                path.unlink(missing_ok=True)


def write_planned_shards(plan: list[list[Item]], todo: list[int], split: str, split_dir: Path,
                         root: Path, options: Options, run_map: MapFn,
                         bar: tqdm) -> Iterator[ShardRecord]:
    """Process the shards `todo`; yield each one's record as soon as it is on disk."""
    chunks = {i: split_chunks(plan[i], taper=i == todo[-1]) for i in todo}
    tasks = (ChunkTask(str(root), options, i, c, chunk)
             for i in todo for c, chunk in enumerate(chunks[i]))
    in_progress: dict[int, ShardInProgress] = {}
    try:
        for result in run_map(tasks):
            check_chunk_result(result, chunks, split)
            bar.update(len(chunks[result.shard][result.chunk]))
            shard = in_progress.get(result.shard)
            if shard is None:
                shard = in_progress[result.shard] = ShardInProgress(
                    ShardWriter(split_dir / shard_name(split, result.shard)))
            shard.take(result)
            if shard.next_chunk < len(chunks[result.shard]):
                continue
            del in_progress[result.shard]
            info = shard.writer.close()
            record = ShardRecord(result.shard, info.to_dict(), shard.failures)
            atomic_write_json(record_path(split_dir, info.name), asdict(record))
            yield record
    finally:  # interrupted: no temporary shard is left behind
        for shard in in_progress.values():
            shard.writer.abort()


@dataclass
class ShardInProgress:
    """A shard being written: its chunks go to disk in order, as soon as each one's
    predecessors are there, so writing overlaps the workers' decoding of later chunks."""
    writer: ShardWriter
    next_chunk: int = 0
    waiting: dict[int, ChunkResult] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def take(self, result: ChunkResult) -> None:
        if result.chunk < self.next_chunk or result.chunk in self.waiting:
            raise PipelineError(f"{self.writer.path.name}: chunk {result.chunk} came back "
                                f"twice; {WORKER_BUG}")
        self.waiting[result.chunk] = result
        while self.next_chunk in self.waiting:
            ready = self.waiting.pop(self.next_chunk)
            self.writer.add_encoded(ready.members, ready.keys)
            self.failures += ready.failures
            self.next_chunk += 1


WORKER_BUG = ("nothing of that shard was kept; re-run the same command, and report it if it "
              "happens again")


def check_chunk_result(result: ChunkResult, chunks: dict[int, list[list[Item]]],
                       split: str) -> None:
    """A chunk's samples and failures must be exactly its planned inputs, in order: each
    input is then written in its own chunk of its own shard, so once in the whole job,
    with memory for one chunk instead of a job-wide set of keys."""
    planned = chunks.get(result.shard, [])
    if not 0 <= result.chunk < len(planned):
        raise PipelineError(f"{shard_name(split, result.shard)}: a worker returned chunk "
                            f"{result.chunk}, which this job did not plan; {WORKER_BUG}")
    items = planned[result.chunk]
    failed = [f.get("src") for f in result.failures]
    failed_set = set(failed)
    if (result.keys != [i.key for i in items if i.src not in failed_set]
            or failed != [i.src for i in items if i.src in failed_set]):
        raise PipelineError(
            f"{shard_name(split, result.shard)}: chunk {result.chunk} came back with "
            f"{len(result.keys)} samples and {len(failed)} failures that are not its "
            f"{len(items)} planned inputs in order; {WORKER_BUG}")


def split_chunks(items: list[Item], taper: bool) -> list[list[Item]]:
    """A shard's inputs in worker tasks of CHUNK_SIZE; with `taper` (the job's last shard)
    its last TAPER_IMAGES or a little more (the full chunks end on a multiple of
    CHUNK_SIZE) in tasks of TAPER_CHUNK_SIZE. Every input is in exactly one task."""
    cut = (max(0, len(items) - TAPER_IMAGES) // CHUNK_SIZE * CHUNK_SIZE if taper
           else len(items))
    return ([items[c:c + CHUNK_SIZE] for c in range(0, cut, CHUNK_SIZE)]
            + [items[c:c + TAPER_CHUNK_SIZE] for c in range(cut, len(items), TAPER_CHUNK_SIZE)])


# ---------------------------------------------------------------- job record (refuse mixing)

def check_job_record(split_dir: Path, job: dict[str, Any]) -> None:
    """Write the job's identity on first use; refuse a re-run with different options."""
    path = split_dir / PROGRESS_DIR / JOB_RECORD
    if not path.is_file():
        refuse_unknown_contents(split_dir)
        atomic_write_json(path, job)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read {path}: {e}; delete {split_dir} to start over") from e
    differences = describe_differences(old, job)
    if differences:
        raise PipelineError(
            f"{split_dir} holds shards made with different options ({'; '.join(differences)}); "
            "shards of different runs are never mixed: use a new --output, or delete "
            f"{split_dir} to start over")


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old_options, old_input = old.get("options", {}), old.get("input", {})
    found = [f"{OPTION_FLAGS.get(k, k)} {old_options.get(k)!r} there, {v!r} now"
             for k, v in new["options"].items() if old_options.get(k) != v]
    if old_input != new["input"]:
        was, now = old_input.get("num_files"), new["input"]["num_files"]
        found.append(f"input: {was} files there, {now} now" if was != now
                     else "input: different files or labels")
    if old.get("classes_sha256") != new["classes_sha256"]:
        found.append("class map differs")
    return found


# ---------------------------------------------------------------- manifests

def part_suffix(part: tuple[int, int]) -> str:
    return f"part-{part[0]}-of-{part[1]}"


def manifest_name(part: tuple[int, int]) -> str:
    return MANIFEST_NAME if part[1] == 1 else f"manifest.{part_suffix(part)}.json"


def failures_name(part: tuple[int, int]) -> str:
    return FAILURES_NAME if part[1] == 1 else f"failures.{part_suffix(part)}.jsonl"


def resize_description(options: Options) -> dict[str, Any]:
    return {
        "policy": options.resize,
        "filter": "bicubic" if options.resize == "center-crop" else "box (area average)",
        "antialias": True,
        "crop": ("centred square of side min(w, h), float box, no rounding"
                 if options.resize == "center-crop" else "none: whole image squashed"),
        "reduced_decode": f"JPEG DCT scaling by 1/2, 1/4 or 1/8 while the crop keeps "
                          f">= {options.decode_oversampling}x image_size decoded pixels",
        "exif_orientation": "ignored", "icc_profile": "dropped", "alpha": "over white",
    }


def manifest_base(split: str, options: Options, classes: ClassMap, job: dict[str, Any],
                  root: Path, listing: SplitListing, num_shards: int) -> dict[str, Any]:
    """The manifest fields that every part of a job shares. `input_failures` are the
    entries of the tree that are not inputs (FIFOs, broken links, directory loops...):
    they belong to no shard, so every part lists all of them."""
    return {
        "format": MANIFEST_FORMAT, "split": split, "version": __version__,
        "image_size": options.image_size, "image_format": options.image_format,
        "quality": options.quality, "png_compress_level": PNG_COMPRESS_LEVEL,
        "png_zlib_strategy": "Z_RLE", "png_filter": "average",
        "resize": resize_description(options),
        "order": ({"kind": "seeded-shuffle", "seed": options.seed} if split == "train"
                  else {"kind": "sorted-by-path"}),
        "shard_size": options.shard_size, "num_shards": num_shards,
        "classes": classes.wnids,
        "class_names": classes.names if any(classes.names) else None,
        "class_map_source": classes.source, "labels": listing.labelled_by,
        "input": {"root": str(root), **job["input"]},
        "num_inputs": job["input"]["num_files"] + len(listing.failures),
        "input_failures": listing.failures,
        "job": job, "provenance": provenance(),
    }


def assemble_manifest(base: dict[str, Any], records: list[ShardRecord],
                      failures_file: str) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r.index)
    return {**base,
            "num_samples": sum(r.info["num_samples"] for r in records),
            "num_failures": (len(base.get("input_failures", []))
                             + sum(len(r.failures) for r in records)),
            "failures_file": failures_file,
            "shards": [r.info for r in records],
            "shard_failures": {r.info["name"]: r.failures for r in records if r.failures}}


def failures_jsonl(manifest: dict[str, Any]) -> str:
    """One line per failed input: first the listing's (`"shard": null`), then the shards'
    in shard order, so a merged job lists them exactly as a one-machine run does. Names
    that are not UTF-8 are JSON-escaped (`\\udcff`), so they read back as os.listdir gave
    them."""
    lines = [dumps_json({**failure, "shard": None}, indent=None) + "\n"
             for failure in manifest.get("input_failures", [])]
    for shard in manifest["shards"]:
        for failure in manifest["shard_failures"].get(shard["name"], []):
            lines.append(dumps_json({**failure, "shard": shard["name"]}, indent=None) + "\n")
    return "".join(lines)


def write_outputs(split_dir: Path, manifest: dict[str, Any], part: tuple[int, int]) -> None:
    # Failures first: a manifest on disk always has its failures file beside it. If the
    # manifest cannot be written (a full disk), a first run leaves neither.
    failures, manifest_file = split_dir / failures_name(part), split_dir / manifest_name(part)
    had_manifest = manifest_file.exists()
    atomic_write_text(failures, failures_jsonl(manifest))
    try:
        if part[1] == 1:
            write_manifest(split_dir, manifest)
        else:
            atomic_write_json(manifest_file, manifest)
    except BaseException:
        if not had_manifest:
            failures.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- one split

@dataclass
class SplitSummary:
    split: str
    written: int  # samples in shards written by this run
    skipped_shards: int
    num_samples: int
    num_failures: int
    num_shards: int
    seconds: float
    failures_path: Path
    manifest_path: Path

    def line(self) -> str:
        done = (f"{self.written / self.seconds:.0f} images/s" if self.written and self.seconds
                else "nothing left to do")
        return (f"{self.split}: {self.num_samples} samples in {self.num_shards} shards "
                f"({self.skipped_shards} already complete), {self.num_failures} failures, "
                f"{done} -> {printable(str(self.manifest_path))}")


def part_shards(num_shards: int, part: tuple[int, int]) -> list[int]:
    """The shard indices of part K/N: i % N == K."""
    return [i for i in range(num_shards) if i % part[1] == part[0]]


def resume_state(split_dir: Path, split: str, mine: list[int],
                 part: tuple[int, int]) -> dict[int, ShardRecord]:
    """The records of this part's shards `mine` already complete; clears what an
    interrupted run of this part left half-written."""
    remove_stale_temp_files(split_dir, part_file_names(split, mine, part))
    return {i: r for i in mine if (r := completed_record(split_dir, i, shard_name(split, i)))}


def part_file_names(split: str, shards: list[int], part: tuple[int, int]) -> list[str]:
    """The files only this part writes: its shards, its manifest and its failures list."""
    return [shard_name(split, i) for i in shards] + [manifest_name(part), failures_name(part)]


def prepare_split(root: Path, output: Path, split: str, options: Options, classes: ClassMap,
                  val_labels: Path | None, part: tuple[int, int], run_map: MapFn,
                  progress: bool = True) -> SplitSummary:
    """One split of one part. The caller holds the part's lock (`lock_part`) where other
    jobs may share OUT; leaving by any exception (an interrupt, a full disk) removes this
    part's temporary files, so only finished shards, records and manifests remain."""
    start = time.perf_counter()
    listing = scan_split(root, split, classes, val_labels)
    plan = plan_shards(listing.items, split, options)
    split_dir = output / split
    job = {"options": asdict(options), "input": input_fingerprint(listing.items),
           "classes_sha256": hashlib.sha256("\n".join(classes.wnids).encode(
               "utf-8", "surrogateescape")).hexdigest()}
    with mutex(split_dir / PROGRESS_DIR / MUTEX_NAME):  # parts starting together: one writes it
        check_job_record(split_dir, job)
    mine = part_shards(len(plan), part)
    try:
        records = resume_state(split_dir, split, mine, part)
        todo = [i for i in mine if i not in records]
        with tqdm(total=sum(len(plan[i]) for i in todo), unit="img", desc=f"prepare {split}",
                  disable=not progress, smoothing=0.1) as bar:
            for record in write_planned_shards(plan, todo, split, split_dir, root, options,
                                               run_map, bar):
                records[record.index] = record
        base = manifest_base(split, options, classes, job, root, listing, len(plan))
        if part[1] > 1:
            base["part"] = {"index": part[0], "count": part[1]}
        manifest = assemble_manifest(base, list(records.values()), failures_name(part))
        write_outputs(split_dir, manifest, part)
    except BaseException:
        remove_stale_temp_files(split_dir, part_file_names(split, mine, part))
        raise
    return SplitSummary(split, sum(records[i].info["num_samples"] for i in todo),
                        len(mine) - len(todo), manifest["num_samples"],
                        manifest["num_failures"], len(records), time.perf_counter() - start,
                        split_dir / failures_name(part), split_dir / manifest_name(part))


def prepare(root: str | Path, output: str | Path, splits: list[str] | None = None,
            options: Options = Options(), workers: int | None = None,
            part: tuple[int, int] = (0, 1), classes_file: str | Path | None = None,
            val_labels: str | Path | None = None, progress: bool = True) -> list[SplitSummary]:
    """Prepare `splits` of ROOT into OUT; the library entry point behind `main`.

    Every split's part lock is taken before any work (a second job on the same shards is
    refused at once, naming the first) and held until the job ends."""
    root, output = Path(root), Path(output)
    options.validate()
    workers = available_cpus() if workers is None else workers
    if workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {workers}")
    check_local_output(output)
    if not root.is_dir():
        raise PipelineError(f"--input {root} is not a directory")
    splits = splits or [s for s in ("train", "val") if (root / s).is_dir()]
    if not splits:
        raise PipelineError(f"--input {root} holds neither train/ nor val/; pass --splits")
    for split in splits:
        check_split_name(split)
        if not (root / split).is_dir():
            raise PipelineError(f"{root / split} does not exist: --splits names "
                                f"subdirectories of --input ({root})")
    classes = resolve_classes(root, output, splits, Path(classes_file) if classes_file else None)
    with ExitStack() as locks:
        for split in splits:
            refuse_foreign_directory(output / split)
            locks.enter_context(lock_part(output / split, part))
        with executor(workers) as run_map:
            return [prepare_split(root, output, split, options, classes,
                                  Path(val_labels) if val_labels else None, part, run_map,
                                  progress)
                    for split in splits]


def check_split_name(split: str) -> None:
    if not SPLIT_NAME.fullmatch(split):
        raise PipelineError(f"--splits: {printable(split)!r} is not a split name (letters, "
                            "digits, '_' and '-'; it names ROOT/<split> and OUT/<split>)")


def refuse_foreign_directory(split_dir: Path) -> None:
    """Before anything is written into it: OUT/<split> is empty, absent, or prepare's."""
    if split_dir.exists() and not split_dir.is_dir():
        raise PipelineError(f"--output: {split_dir} is a file, not a directory; choose a "
                            "new --output")
    if not (split_dir / PROGRESS_DIR / JOB_RECORD).is_file():
        refuse_unknown_contents(split_dir)


def refuse_unknown_contents(split_dir: Path) -> None:
    # The progress directory alone may be another part's, starting at the same time.
    if split_dir.is_dir() and any(p.name != PROGRESS_DIR for p in split_dir.iterdir()):
        raise PipelineError(
            f"{split_dir} is not empty and holds no {PROGRESS_DIR}/{JOB_RECORD}: it was not "
            "written by `pipeline prepare`; choose a new --output")


# ---------------------------------------------------------------- one job per output

def describe_part(part: tuple[int, int]) -> str:
    return "the whole job" if part[1] == 1 else f"part {part[0]}/{part[1]}"


def part_lock_path(split_dir: Path, part: tuple[int, int]) -> Path:
    return split_dir / PROGRESS_DIR / f"lock.{part_suffix(part)}"


def held_part_locks(split_dir: Path) -> list[tuple[tuple[int, int], dict[str, Any]]]:
    """(part, holder record) of every part lock of the split that a running job holds."""
    held = []
    for path in sorted((split_dir / PROGRESS_DIR).glob("lock.part-*")):
        m = PART_LOCK.match(path.name)
        if m and (holder := holder_of(path)) is not None:
            held.append(((int(m[1]), int(m[2])), holder))
    return held


def lock_part(split_dir: Path, part: tuple[int, int]) -> Lock:
    """Take part K/N's lock of OUT/<split>, or raise OutputLocked naming the job that
    holds an overlapping one: the same K/N, or any other N (0/2 and 1/3 share shard 4;
    the whole job, 0/1, overlaps every part). Checked and taken inside the split's
    mutex, so two jobs starting together cannot both pass."""
    with mutex(split_dir / PROGRESS_DIR / MUTEX_NAME):
        for other, holder in held_part_locks(split_dir):
            if other[1] != part[1] or other == part:
                overlap = ("" if other == part else
                           f", and its shards overlap those of {describe_part(part)}")
                raise OutputLocked(
                    f"--output {split_dir}: {describe_part(other)} is already being prepared "
                    f"by {describe_holder(holder)}{overlap}; wait for it to finish (then "
                    "re-run this command), or choose another --output", holder)
        return acquire(part_lock_path(split_dir, part), f"--output {split_dir} "
                                                         f"({describe_part(part)})")


def check_local_output(output: Path) -> None:
    if "://" in str(output) or str(output).startswith(("s3:/", "gs:/")):
        raise PipelineError(
            f"--output {output}: shards are written to a local (or mounted) directory so "
            "every write can be an atomic rename; prepare locally, then copy with "
            "`aws s3 sync` / `gsutil -m rsync -r` (see shards/README.md)")


# ---------------------------------------------------------------- merge

def merge(output: str | Path, splits: list[str] | None = None) -> list[Path]:
    """Join the part manifests of each split into manifest.json + failures.jsonl."""
    output = Path(output)
    split_dirs = ([output / s for s in splits] if splits
                  else sorted(p.parent for p in output.glob("*/manifest.part-*.json")))
    split_dirs = sorted(set(split_dirs))
    if not split_dirs:
        raise PipelineError(f"--merge {output}: no part manifests (manifest.part-K-of-N.json) "
                            "found; run `pipeline prepare --part K/N` first")
    written = []
    for split_dir in split_dirs:
        if not split_dir.is_dir():
            raise PipelineError(f"--merge: {split_dir} does not exist; run `pipeline prepare "
                                "--part K/N` for that split first")
        with mutex(split_dir / PROGRESS_DIR / MUTEX_NAME):  # no part starts meanwhile
            refuse_running_parts(split_dir)
            manifest = merged_manifest(split_dir)
            write_outputs(split_dir, manifest, (0, 1))
        written.append(split_dir / MANIFEST_NAME)
    return written


def refuse_running_parts(split_dir: Path) -> None:
    held = held_part_locks(split_dir)
    if held:
        part, holder = held[0]
        raise OutputLocked(f"--merge {split_dir}: {describe_part(part)} is still being "
                           f"prepared by {describe_holder(holder)}; merge once every part "
                           "has finished", holder)


def read_part_manifests(split_dir: Path) -> list[dict[str, Any]]:
    pattern = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json$")
    found = {}
    for path in split_dir.glob("manifest.part-*.json"):
        if m := pattern.match(path.name):
            try:
                found[int(m[1]), int(m[2])] = manifest = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise PipelineError(f"cannot read {path}: {e}; re-run that part") from e
            if not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), list)
                    and type(manifest.get("num_shards")) is int and "job" in manifest):
                raise PipelineError(f"{path} is not a part manifest of `pipeline prepare`; "
                                    "re-run that part")
    counts = sorted({n for _, n in found})
    if not counts:
        raise PipelineError(f"{split_dir}: no part manifests to merge")
    if len(counts) > 1:
        raise PipelineError(f"{split_dir} holds part manifests of different --part counts "
                            f"({', '.join(map(str, counts))}); delete the stale ones")
    n = counts[0]
    missing = [k for k in range(n) if (k, n) not in found]
    if missing:
        raise PipelineError(f"{split_dir}: parts {', '.join(f'{k}/{n}' for k in missing)} "
                            f"are missing; run `pipeline prepare --part K/{n}` for them first")
    return [found[k, n] for k in range(n)]


def shard_index(name: str) -> int:
    """`train-000012.tar` -> 12."""
    return int(name.rsplit("-", 1)[1].split(".")[0])


def part_record(split_dir: Path, part: dict[str, Any], shard: Any) -> ShardRecord:
    """A shard entry of a part manifest, which is data: its name must be one of this
    split's shard names (never a path elsewhere) and its counts plausible."""
    name = shard.get("name") if isinstance(shard, dict) else None
    m = re.fullmatch(rf"{re.escape(split_dir.name)}-(\d{{6,}})\.tar", name or "")
    failures = part.get("shard_failures", {})
    record = ShardRecord(int(m[1]) if m else -1, shard,
                         failures.get(name, []) if isinstance(failures, dict) else None)
    if not m or not plausible_record(record, record.index, name):
        raise PipelineError(f"{split_dir}: a part manifest lists shard {name!r}, which is not "
                            "a shard of this split with its counts; re-run that part")
    return record


def merged_manifest(split_dir: Path) -> dict[str, Any]:
    parts = read_part_manifests(split_dir)
    jobs = {json.dumps(p["job"], sort_keys=True) for p in parts}
    if len(jobs) > 1:
        raise PipelineError(f"{split_dir}: the parts were made with different options or "
                            "inputs; re-run the odd ones into a fresh --output")
    listings = {json.dumps(p.get("input_failures", []), sort_keys=True) for p in parts}
    if len(listings) > 1:
        raise PipelineError(f"{split_dir}: the parts found different entries that are not "
                            "inputs (input_failures: the tree changed between them); re-run "
                            "the parts once the input tree is settled")
    records = [part_record(split_dir, p, s) for p in parts for s in p["shards"]]
    expected = parts[0]["num_shards"]
    if sorted(r.index for r in records) != list(range(expected)):
        raise PipelineError(f"{split_dir}: the parts list {len(records)} shards, the job has "
                            f"{expected}; re-run the parts")
    for r in records:
        shard = split_dir / r.info["name"]
        if not shard.is_file() or shard.stat().st_size != r.info["bytes"]:
            raise PipelineError(f"{shard} is missing or differs from its part manifest; "
                                "re-run that part")
    base = {k: v for k, v in parts[0].items() if k != "part"}
    return assemble_manifest(base, records, FAILURES_NAME)


# ---------------------------------------------------------------- command line

def parse_part(text: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """`--part K/N`, else SLURM array variables (0-based from SLURM_ARRAY_TASK_MIN), else 0/1."""
    if text is None:
        if not all(v in env for v in SLURM_PART_VARS):
            return (0, 1)
        origin = "SLURM_ARRAY_TASK_ID/COUNT"
        values = {v: env.get(v, "0").strip() for v in (*SLURM_PART_VARS, "SLURM_ARRAY_TASK_MIN")}
        if not all(re.fullmatch(r"\d+", value) for value in values.values()):
            raise PipelineError(f"{origin}: expected integers, got "
                                + ", ".join(f"{v}={value!r}" for v, value in values.items())
                                + "; or pass --part K/N")
        k = int(values["SLURM_ARRAY_TASK_ID"]) - int(values["SLURM_ARRAY_TASK_MIN"])
        n = int(values["SLURM_ARRAY_TASK_COUNT"])
    else:
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m:
            raise PipelineError(f"--part must look like K/N (e.g. 0/4), got {text!r}")
        k, n = int(m[1]), int(m[2])
        origin = "--part"
    if not 0 <= k < n:
        raise PipelineError(f"{origin}: part {k} of {n} is out of range (0 <= K < N)")
    return (k, n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline prepare",
        description="Turn an ImageNet-style JPEG tree into 64x64 WebDataset shards with a "
                    "manifest (format: shards/README.md). Resumable: re-run the same command "
                    "after an interruption.",
        epilog=f"Exit status: 0 done; 2 bad input or options, more failed inputs than "
               f"--max-failures, an unwritable output, or another job on the same output; "
               f"{EXIT_INTERRUPTED} stopped by SIGTERM or SIGINT (EX_TEMPFAIL): the finished "
               f"shards are kept, re-run the same command to resume.")
    p.add_argument("--input", type=Path, metavar="ROOT",
                   help="tree holding train/<wnid>/*.JPEG and/or val/ (class folders, or flat "
                        "with labels in ROOT: LOC_val_solution.csv, "
                        "ILSVRC2012_validation_ground_truth.txt + devkit, val_labels.csv)")
    p.add_argument("--output", type=Path, metavar="OUT", default=Path("shards"),
                   help="local directory; each split goes to OUT/<split>/ (default: shards, "
                        "the project's shard root)")
    p.add_argument("--merge", type=Path, metavar="OUT",
                   help="instead of preparing: join the part manifests of OUT's splits into "
                        "manifest.json + failures.jsonl (idempotent)")
    p.add_argument("--splits", default=None, metavar="LIST",
                   help="comma-separated splits (default: those of train,val that exist)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding processes (default: the cores this process may use, from "
                        f"SLURM_CPUS_PER_TASK or CPU affinity; here {available_cpus()})")
    p.add_argument("--part", default=None, metavar="K/N",
                   help="do only shards i with i %% N == K (0-based), for N machines; default "
                        "from SLURM_ARRAY_TASK_ID/COUNT if set, else the whole job; join "
                        "with --merge")
    p.add_argument("--resize", default="center-crop", choices=RESIZE_POLICIES,
                   help="center-crop: centred square of the short side, bicubic (default); "
                        "box: whole image squashed, area averaging (Downsampled ImageNet)")
    p.add_argument("--image-format", default="png", choices=IMAGE_EXTS,
                   help="sample image encoding: png (lossless, default), npy (raw HxWx3 "
                        "uint8), webp or jpg (lossy, see --quality)")
    p.add_argument("--quality", type=int, default=None, metavar="Q",
                   help=f"webp/jpg quality 1-100 (default {DEFAULT_QUALITY})")
    p.add_argument("--image-size", type=int, default=64, metavar="PX",
                   help="output side in pixels (default 64)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train shuffle that assigns samples to shards (default 0)")
    p.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="exit non-zero if more than N inputs fail (default 0); failed inputs "
                        "(and entries that are not regular files) are listed in "
                        "OUT/<split>/failures.jsonl either way")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="inputs with more pixels are refused as decompression bombs "
                        f"(default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--decode-oversampling", type=float, default=None, metavar="X",
                   help="JPEGs are decoded DCT-scaled (1/2, 1/4, 1/8) while at least X decoded "
                        "pixels per output pixel remain across the crop (default "
                        f"{OVERSAMPLING['center-crop']} for center-crop: ~41 dB from a full "
                        f"decode, {OVERSAMPLING['box']:g} for box); 2 gives ~49 dB and is "
                        "~25%% slower; a large value always decodes in full")
    p.add_argument("--val-labels", type=Path, default=None, metavar="FILE",
                   help="labels of a flat val/: Kaggle LOC_val_solution.csv, "
                        "ILSVRC2012_validation_ground_truth.txt (with the devkit's meta.mat or "
                        "map_clsloc.txt beside it) or a filename,wnid CSV")
    p.add_argument("--classes", type=Path, default=None, metavar="FILE",
                   help="class order: one wnid per line (optionally followed by its name, as "
                        "in LOC_synset_mapping.txt); default: sorted folders of ROOT/train, "
                        "else the class map of OUT/train/manifest.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    for split in splits or []:
        check_split_name(split)
    if args.merge is not None:
        for path in merge(args.merge, splits):
            print(f"merged -> {printable(str(path))}")
        return 0
    if args.input is None:
        raise PipelineError("--input ROOT is required (or --merge OUT)")
    if args.workers is not None and args.workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {args.workers}")
    if args.max_failures < 0:
        raise PipelineError(f"--max-failures must be at least 0, got {args.max_failures}")
    options = Options(image_size=args.image_size, resize=args.resize,
                      image_format=args.image_format, quality=args.quality,
                      shard_size=args.shard_size, seed=args.seed, max_pixels=args.max_pixels,
                      decode_oversampling=args.decode_oversampling)
    part = parse_part(args.part)
    with stop_on_signals() as stop:
        try:
            summaries = prepare(args.input, args.output, splits, options, args.workers, part,
                                args.classes, args.val_labels, progress=not args.no_progress)
        except BaseException:
            if stop.received is None:
                raise
            print(f"prepare: stopped by {stop.received.name}; the finished shards are kept, "
                  f"re-run the same command to resume (exit {EXIT_INTERRUPTED})",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
    for summary in summaries:
        print(summary.line())
    return check_failures(summaries, args.max_failures)


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT. A BaseException, like
    KeyboardInterrupt: the per-input `except Exception` of process_chunk (which runs in
    this process with one worker) must not record it as a failed input."""


@dataclass
class StopRequest:
    received: signal.Signals | None = None  # the first stop signal


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT stop the job through the normal unwinding path (temporary files
    removed, pending tasks cancelled, workers ended) instead of killing it mid-write. A
    second signal during that cleanup is ignored: cleanup is short and bounded."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if request.received is None:
            request.received = signal.Signals(signum)
            raise Interrupted(request.received.name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_failures(summaries: list[SplitSummary], max_failures: int) -> int:
    total = sum(s.num_failures for s in summaries)
    if total > max_failures:
        where = ", ".join(f"{s.failures_path} ({s.num_failures})" for s in summaries
                          if s.num_failures)
        raise PipelineError(f"{total} inputs failed, more than --max-failures {max_failures}; "
                            f"the shards are written, the failed inputs are listed in {where}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
