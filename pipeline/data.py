"""Streaming shard loader: uint8 image batches for training (endless) and evaluation (exactly once).

One owner of sharding: this loader splits the shards by rank and by DataLoader worker
itself, so it must never be passed to `accelerator.prepare` (which would split the
stream a second time). Rank and world size are passed in or read from
`torch.distributed`, then from the RANK/WORLD_SIZE environment variables.

Train mode is an endless stream per (rank, worker): S = ranks x workers streams, and
the trainer's step count alone decides the end. With `sampling="exact"` (the default)
every epoch shows each sample once: epoch e concatenates the shards in a permutation
seeded by (seed, e) alone, the same on every rank, and stream s takes the samples
[s*T//S, (s+1)*T//S) of those T (whole shards in the middle, parts of shards at its two
ends, so fewer shards than streams work too). Shares differ by at most one sample, so
ranks stay in step; a stream that finishes its share goes on with its share of epoch
e+1, so none runs dry. Within its share a stream keeps up to `interleave` segments open
and draws each next sample from a seeded random one of them (weighted by what each has
left) into a shuffle buffer that is drained at the end of the epoch.
`sampling="resampled"` is the earlier scheme: round r of stream s reads one shard chosen
by a seeded shuffle of ALL shards (a fresh order every pass), through a shuffle buffer
drained at the end of each round; streams draw shards with replacement, so an epoch's
worth of batches repeats some samples and misses others.
Either way an epoch's (or round's) content depends only on (seed, stream, epoch or
round), so resuming at a batch index skips whole epochs (rounds) by arithmetic on the
per-shard counts, and within one reads but never decodes the samples it skips.

Eval mode yields every sample exactly once across all ranks and workers ("slots"):
shards round-robin over slots when there are enough of them, otherwise every slot reads
all shards and keeps the samples whose global index falls on it. A corrupt shard or
sample is skipped with a ShardWarning and counted, so `num_seen + num_skipped` summed
over ranks equals the manifest's count (or it raises, with on_error="raise").

Images stay uint8 until `normalize` runs on the device, so host-to-device copies are
a quarter of the size of float32 ones. A batch is B x 3 x H x W in channels-last memory
(a view of the B x H x W x 3 rows the decoders produce): the layout change happens in
`normalize`, on the device, instead of as a transposing copy per sample on the host.

Worker batches reach the main process without a copy: each worker fills shared-memory
buffers that it reuses once the caller has dropped the batch in them (_BatchBuffers).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import os
import random
import re
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from braceexpand import braceexpand
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes

from .shards import (IMAGE_EXTS, MANIFEST_NAME, TarFormatError, iter_samples, manifest_path,
                     read_manifest)
from .utils import PipelineError

try:  # libspng (extra `fast`): ~1.6x torchvision's libpng on 64x64 shard PNGs
    import pyspng
except ImportError:
    pyspng = None
try:  # deprecated since torchvision 0.29 in favour of TorchCodec, but ~1.3x faster than PIL here
    from torchvision.io import ImageReadMode, decode_png
except ImportError:  # a torchvision without it: PNG falls back to PIL
    decode_png = None

MODES = ("train", "eval")
SAMPLING = ("exact", "resampled")  # train mode: exact epochs, or shards drawn per stream
READ_BUFFER = 1 << 20  # bytes buffered per open shard
PREFETCH = 4  # batches each DataLoader worker prepares ahead (its prefetch_factor)
# Reusable shared-memory batch buffers per worker: its prefetched batches, the one the
# caller holds and the one it just dropped (reclaimed at the next batch), plus slack.
BUFFER_SLOTS = PREFETCH + 4
ON_ERROR = ("warn", "raise")
Spec = str | os.PathLike | Sequence[str | os.PathLike]


class ShardWarning(RuntimeWarning):
    """A corrupt shard or sample was skipped (and counted in `num_skipped`)."""


# ---------------------------------------------------------------- shard specs

@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs, with per-shard sample counts when a manifest gives them."""
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    manifest: dict[str, Any] | None

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_COMMA_OUTSIDE_BRACES = re.compile(r",(?![^{]*})")


def _scheme(url: str) -> str:
    return urlparse(url).scheme if _URL_SCHEME.match(url) else ""


def _split_spec_string(text: str) -> list[str]:
    """`a.tar,b-{0..3}.tar c.tar::pipe:cat d.tar` -> patterns; `pipe:` commands keep spaces."""
    items = []
    for chunk in text.split("::"):
        for part in (p.strip() for p in _COMMA_OUTSIDE_BRACES.split(chunk)):
            items += [part] if part.startswith("pipe:") else part.split()
    return items


def _spec_items(spec: Spec) -> list[str]:
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        # An existing path is taken whole, even if it contains spaces or commas.
        items = [text] if os.path.exists(text) else _split_spec_string(text)
    else:  # a list: each element is one URL or brace pattern, taken verbatim
        items = [os.fspath(item) for item in spec]
    if not items:
        raise PipelineError("empty shard spec: give a split directory, a brace pattern "
                            "like dir/train-{000000..000009}.tar, or a list of shard URLs")
    return items


def _is_local_split(item: str) -> bool:
    if _scheme(item):
        return False
    path = Path(item)
    return path.is_dir() or (path.name == MANIFEST_NAME and path.is_file())


def _from_manifest(location: str) -> ShardSet:
    # read_manifest validates the entries: each a plain relative name (never a URL or a
    # command) with an integer count >= 0, the counts adding up to num_samples.
    manifest = read_manifest(location)
    manifest_file = manifest_path(location).resolve()
    urls, counts = [], []
    for entry in manifest["shards"]:
        shard = manifest_file.parent / entry["name"]
        if not shard.is_file():
            raise PipelineError(f"shard {shard} listed in {manifest_file} is missing: "
                                f"re-run `pipeline prepare` or restore the file")
        # Absolute paths: an entry can never be mistaken for a URL when opened.
        urls.append(str(shard))
        counts.append(entry["num_samples"])
    if not urls:
        raise PipelineError(f"shard manifest {manifest_file} lists no shards")
    return ShardSet(tuple(urls), tuple(counts), manifest)


def _neighbour_manifest(urls: list[str]) -> ShardSet:
    """Local shards that all sit beside one manifest.json take their counts from it."""
    parents = {Path(url).resolve().parent for url in urls if not _scheme(url)}
    if len(parents) != 1 or any(_scheme(url) for url in urls):
        return ShardSet(tuple(urls), None, None)
    manifest_file = parents.pop() / MANIFEST_NAME
    if not manifest_file.is_file():
        return ShardSet(tuple(urls), None, None)
    manifest = read_manifest(manifest_file)  # validated: names and counts are sound
    listed = {entry["name"]: entry["num_samples"] for entry in manifest["shards"]}
    names = [Path(url).name for url in urls]
    unlisted = [name for name in names if name not in listed]
    if unlisted:
        warnings.warn(f"{manifest_file} does not list {', '.join(unlisted[:3])}: ignoring it, so "
                      f"sample counts (and eval totals) are unknown", ShardWarning, stacklevel=3)
        return ShardSet(tuple(urls), None, None)
    return ShardSet(tuple(urls), tuple(listed[name] for name in names), manifest)


def _check_url(url: str, spec: Spec, allow_pipe: bool) -> None:
    scheme = _scheme(url)
    if scheme == "pipe" and not allow_pipe:
        raise PipelineError(f"shard spec {spec!r} contains the command {url!r}, but pipe: URLs "
                            f"are not allowed here (allow_pipe=False)")
    if not scheme and not Path(url).is_file():
        raise PipelineError(f"shard file {url} does not exist (from shard spec {spec!r})")
    if not _opened_by_webdataset(scheme):
        try:
            import fsspec  # noqa: F401
        except ImportError:
            raise PipelineError(f"reading {url} needs fsspec: "
                                f"pip install 'ae-pipeline[s3]'") from None


def resolve_spec(spec: Spec, allow_pipe: bool = True) -> ShardSet:
    """Turn a shard spec (split directory, manifest, brace pattern, URL list) into a ShardSet."""
    items = _spec_items(spec)
    if len(items) == 1 and _is_local_split(items[0]):
        return _from_manifest(items[0])
    urls = [url for item in items for url in braceexpand(item)]
    for url in urls:
        _check_url(url, spec, allow_pipe)
    return _neighbour_manifest(urls)


# ---------------------------------------------------------------- opening and decoding

def _opened_by_webdataset(scheme: str) -> bool:
    return scheme in ("", "file") or scheme in gopen_schemes


def open_shard(url: str) -> BinaryIO:
    """Open a shard URL with webdataset's semantics (local path, file:, pipe:, http...);
    schemes webdataset does not know (s3://, az://, memory://) go through fsspec."""
    scheme = _scheme(url)
    if scheme in ("", "file"):
        # webdataset's gopen opens local files with the default 8 KB buffer; a shard is
        # read front to back, and a 1 MB buffer reads it ~30% faster (fewer syscalls).
        return open(re.sub(r"^file://?", "", url), "rb", buffering=READ_BUFFER)
    if _opened_by_webdataset(scheme):
        return gopen(url, "rb", bufsize=READ_BUFFER)
    import fsspec
    return fsspec.open(url, "rb").open()


@functools.lru_cache(maxsize=32)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    """Parse an .npy header dict once: every sample of a shard repeats the same header."""
    import ast
    meta = ast.literal_eval(header.decode("latin1"))
    shape = tuple(meta["shape"])
    return np.dtype(meta["descr"]), shape, math.prod(shape), bool(meta["fortran_order"])


def _decode_npy(data: bytes) -> np.ndarray:
    # np.load re-parses the header with a Python-level reader on every call (~41k/s cap).
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file")
    start = 10 if data[6] == 1 else 12  # format 1.0 has a 2-byte header length, later 4
    end = start + int.from_bytes(data[8:start], "little")
    dtype, shape, count, fortran = _npy_layout(data[start:end])
    if dtype != np.uint8:
        raise ValueError(f".npy array has dtype {dtype}, expected uint8")
    array = np.frombuffer(data, dtype=np.uint8, count=count, offset=end)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    if array.ndim == 2:
        return np.broadcast_to(array[..., None], (*array.shape, 3))
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[2]):
        raise ValueError(f".npy array has shape {array.shape}, expected H x W x 3 or 3 x H x W")
    return array if array.shape[2] == 3 else array.transpose(1, 2, 0)


def _decode_png(data: bytes) -> np.ndarray:
    image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    if image.dtype != torch.uint8:
        raise ValueError(f"{image.dtype} PNG: shards hold 8-bit images")
    return image.permute(1, 2, 0).numpy()  # decode_png's 3 x H x W is a view of H x W x 3


def _decode_spng(data: bytes) -> np.ndarray:
    return pyspng.load(data, format="RGB")


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _eight_bit_png(decode: Callable[[bytes], np.ndarray]) -> Callable[[bytes], np.ndarray]:
    """Shards hold 8-bit images; decoders would silently convert 16-bit ones each their
    own way, so every PNG decoder refuses them alike (IHDR's bit depth, byte 24)."""
    def decode_8_bit(data: bytes) -> np.ndarray:
        if data[12:16] == b"IHDR" and data[24:25] == b"\x10":
            raise ValueError("16-bit PNG: shards hold 8-bit images")
        return decode(data)
    return decode_8_bit


PNG_DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    name: _eight_bit_png(decoder) for name, decoder, available in [
        ("pyspng", _decode_spng, pyspng is not None),
        ("torchvision", _decode_png, decode_png is not None),
        ("pil", _decode_pil, True)] if available}
PNG_DECODER = next(iter(PNG_DECODERS))  # the fastest one installed
_DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "png": PNG_DECODERS[PNG_DECODER], "npy": _decode_npy, "webp": _decode_pil, "jpg": _decode_pil}


def decode_image(members: dict[str, bytes]) -> np.ndarray:
    """The sample's image as a uint8 H x W x 3 array (possibly a read-only or strided view:
    collation copies it); raises if the sample has no image or it does not decode.

    Rows of RGB pixels are how every decoder delivers an image; batches keep that
    layout in memory (see `_batched`), because a transposing copy to 3 x H x W would
    cost a raw sample more than its whole decode."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return _DECODERS[ext](members[ext])
    raise ValueError(f"no image member (one of {', '.join(IMAGE_EXTS)}) in {sorted(members)}")


# ---------------------------------------------------------------- worker side

# A decoded sample: (image H x W x 3, label, key, mirror it?)
Sample = tuple[np.ndarray, int, str, bool]


class _Batch(NamedTuple):
    images: torch.Tensor | None  # None: the batch is in `buffer`, which the main process has
    labels: np.ndarray
    keys: list[str]
    buffer: tuple[int, int] | None = None  # (worker, slot) of a _BatchBuffers buffer


class _WorkerReport(NamedTuple):
    """A worker's last item: its skip count, or the error that stopped it.

    Errors travel as data so the main process raises one clean PipelineError instead of
    DataLoader's re-raised traceback text."""
    skipped: int
    error: str | None


@dataclass
class _WorkerState:
    skipped: int = 0
    image_size: int | None = None  # from the manifest, else fixed by the first image


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of `buffer_size`, draining it when `items` ends."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class _BatchBuffers:
    """Shared-memory batch buffers that one DataLoader worker reuses, with busy flags.

    Measured per 64x64 raw sample, a fresh shared-memory block per batch costs ≈ 14 µs
    (every page faulted in on first write) and handing its file descriptor to the main
    process a few more, against ≈ 33 µs for a worker's whole budget. So a worker fills
    a free buffer of its own and marks it busy in `flags[worker]`, an array shared with
    the main process. The buffer itself crosses to the main process once, with its
    first batch; later batches in it send only (worker, slot). The main process clears
    the flag once nothing references that batch any more (ShardLoader._reclaim), so a
    batch the caller still holds is never overwritten; with every buffer busy the
    worker falls back to a one-off block and never waits.
    """

    def __init__(self, flags: torch.Tensor, worker: int, send_always: bool):
        self.busy = flags[worker].numpy()
        self.worker = worker
        self.send_always = send_always  # pinned loaders: the pin thread needs the tensor
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int] | None, bool]:
        """(buffer, its (worker, slot) or None for a one-off, send the tensor along?)"""
        for slot, buffer in enumerate(self.buffers):
            if not self.busy[slot] and buffer.shape == shape:
                self.busy[slot] = 1
                return buffer, (self.worker, slot), self.send_always
        batch = torch.empty(shape, dtype=torch.uint8).share_memory_()
        if len(self.buffers) == len(self.busy):
            return batch, None, True
        self.buffers.append(batch)
        self.busy[len(self.buffers) - 1] = 1
        return batch, (self.worker, len(self.buffers) - 1), True


def _batched(samples: Iterator[Sample], batch_size: int,
             buffers: _BatchBuffers | None = None) -> Iterator[_Batch]:
    """Collate in the worker: one IPC message per batch instead of one per sample.

    Images are stacked as they decode, B x H x W x 3 (a plain copy; transposing each to
    3 x H x W would cost ≈ 4 µs a sample), and the main process yields that memory as
    a B x 3 x H x W channels-last view. Stacking and flipping run in numpy on the whole
    batch: torch's uint8 copies cost several times more per image at 64x64. In a
    DataLoader worker the batch is built in a reused shared-memory buffer
    (_BatchBuffers). Labels travel as a numpy array: pickled by value, where a tensor
    would take a shared-memory block and a file-descriptor handover of its own."""
    while chunk := list(itertools.islice(samples, batch_size)):
        arrays, labels, keys, flips = zip(*chunk)
        shape = (len(arrays), *arrays[0].shape)
        batch, buffer, send = (buffers.take(shape) if buffers is not None
                               else (torch.empty(shape, dtype=torch.uint8), None, True))
        images = batch.numpy()
        np.stack(arrays, out=images)
        if any(flips):
            mirrored = np.array(flips)
            images[mirrored] = images[mirrored][:, :, ::-1]
        yield _Batch(batch if send else None, np.array(labels, dtype=np.int64), list(keys),
                     buffer)


@functools.lru_cache(maxsize=4)
def _shard_order(seed: int, stream: int, pass_index: int, num_shards: int) -> tuple[int, ...]:
    order = list(range(num_shards))
    random.Random(f"order/{seed}/{stream}/{pass_index}").shuffle(order)
    return tuple(order)


# ---------------------------------------------------------------- exact epochs: the plan

class Segment(NamedTuple):
    """The samples [start, stop) of shard number `shard` (an index into ShardSet.urls)."""
    shard: int
    start: int
    stop: int


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_shards: int) -> tuple[int, ...]:
    """The shard order of exact epoch `epoch`: seeded by (seed, epoch) alone, so every
    rank and worker derives the same one without talking to the others."""
    order = list(range(num_shards))
    random.Random(f"epoch/{seed}/{epoch}").shuffle(order)
    return tuple(order)


def stream_share(total: int, stream: int, streams: int) -> range:
    """Positions [s*T//S, (s+1)*T//S) of an epoch's T samples: stream s's share, floor or
    ceil of T/S samples, every position in exactly one stream's share."""
    return range(stream * total // streams, (stream + 1) * total // streams)


def stream_segments(counts: Sequence[int], order: Sequence[int], stream: int,
                    streams: int) -> list[Segment]:
    """Stream s's share of an epoch whose shards are concatenated in `order`, as the
    pieces of shards it covers: whole shards, and partial ones at its two ends."""
    share = stream_share(sum(counts), stream, streams)
    segments, offset = [], 0
    for shard in order:
        if offset >= share.stop:
            break
        start, stop = max(share.start, offset), min(share.stop, offset + counts[shard])
        if start < stop:
            segments.append(Segment(shard, start - offset, stop - offset))
        offset += counts[shard]
    return segments


def count_samples(urls: Sequence[str]) -> tuple[int, ...]:
    """Samples per shard by reading (not decoding) every shard once: for shards without a
    manifest, whose epochs (and resume points) must still be planned from counts."""
    counts = []
    for url in urls:
        with closing(open_shard(url)) as stream:
            counts.append(sum(1 for _ in iter_samples(stream)))
    return tuple(counts)


def _check_streams(total: int, world_size: int, workers: int, first_url: str) -> None:
    """Exact epochs need a sample for every stream; fewer would leave a stream empty."""
    streams = world_size * workers
    if total == 0:
        raise PipelineError(f"the shards {first_url}... hold no samples: point the spec at "
                            f"a split that `pipeline prepare` wrote samples to")
    if total < streams:
        raise PipelineError(f"exact epochs deal the {total} samples of the shards "
                            f"{first_url}... to {world_size} rank(s) x {workers} worker(s) = "
                            f"{streams} streams, more streams than samples: use fewer "
                            f"DataLoader workers or ranks (or sampling='resampled')")


def _interleaved(sources: Iterable[tuple[int, Iterator[Any]]], width: int,
                 rng: random.Random) -> Iterator[Any]:
    """Merge `sources`, pairs (planned size, items), with up to `width` of them open.

    Each next item comes from an open source drawn at random, weighted by what it has
    left, so the open sources run out together (a uniformly random merge) and a batch
    mixes all of them. A source that is done, or ends early (a read error), makes room
    for the next one; one planned empty is skipped."""
    pending = ((left, items) for left, items in sources if left > 0)
    opened = [[left, items] for left, items in itertools.islice(pending, width)]
    total = sum(left for left, _ in opened)
    while opened:
        slot = 0
        if len(opened) > 1:
            pick = int(rng.random() * total)  # randrange costs twice as much per item
            while pick >= opened[slot][0]:
                pick -= opened[slot][0]
                slot += 1
        source = opened[slot]
        for item in source[1]:
            source[0] -= 1
            total -= 1
            yield item
            if source[0]:
                break
            # Let the reader finish: it checks the shard's end (a stale count) and closes it.
            for _ in source[1]:
                pass
        else:
            total -= source[0]  # ended early: what it still owed will never come
            source[0] = 0
        if source[0] == 0:
            del opened[slot]
            for left, items in itertools.islice(pending, 1):
                opened.append([left, items])
                total += left


def _samples_lost(read: int, limit: int | None, share: tuple[int, int, int] | None) -> int | None:
    """This worker's samples after the first `read` of a shard (None: unknown count).

    With `share=(slot, slots, start)` the worker owns only the global indices
    `start + i` with `(start + i) % slots == slot`."""
    if limit is None:
        return None
    if share is None:
        return limit - read
    slot, slots, start = share
    first = start + read + (slot - start - read) % slots
    return len(range(first, start + limit, slots))


@dataclass
class ShardStream(IterableDataset):
    """The per-worker sample stream behind make_loader (see the module docstring)."""
    shards: ShardSet
    mode: str
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    start_batch: int = 0
    shuffle_buffer: int = 2000
    flip: bool = False
    max_samples: int | None = None
    on_error: str = "warn"
    image_size: int | None = None
    sampling: str = "exact"
    interleave: int = 4  # exact: segments of a stream's share open (mixed) at once
    sample_counts: tuple[int, ...] | None = None  # per shard, to plan epochs (epoch_counts)
    buffer_flags: torch.Tensor | None = None  # shared busy flags of the workers' buffers
    pinned: bool = False  # the DataLoader pins batches: send every batch to its pin thread
    _state: _WorkerState = field(default_factory=_WorkerState, init=False, repr=False)
    _buffers: _BatchBuffers | None = field(default=None, init=False, repr=False)

    def _batch_buffers(self, worker: int) -> _BatchBuffers | None:
        """This worker's buffers; kept across passes, as persistent (eval) workers live on."""
        if self._buffers is None and self.buffer_flags is not None and get_worker_info():
            self._buffers = _BatchBuffers(self.buffer_flags, worker,
                                          send_always=self.pinned)
        return self._buffers

    def __iter__(self) -> Iterator[_Batch | _WorkerReport]:
        worker, num_workers = _worker_slot()
        self._state = _WorkerState(image_size=self.image_size)
        try:
            if self.mode == "train":
                yield from self._train_batches(worker, num_workers)
            else:
                slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
                yield from _batched(self._eval_samples(slot, slots), self.batch_size,
                                    self._batch_buffers(worker))
        except PipelineError as error:
            yield _WorkerReport(self._state.skipped, str(error))
            return
        yield _WorkerReport(self._state.skipped, None)

    def epoch_counts(self) -> tuple[int, ...]:
        """Samples per shard that epochs (and resume points) are planned from: the
        manifest's, else counted by reading every shard once (make_loader does that in
        the main process for exact epochs, so workers inherit the counts)."""
        if self.sample_counts is None:
            self.sample_counts = (self.shards.counts if self.shards.counts is not None
                                  else count_samples(self.shards.urls))
        return self.sample_counts

    # ------------------------------------------------ reading one shard

    def _read(self, url: str, count: int | None, limit: int | None,
              share: tuple[int, int, int] | None = None, first: int = 0
              ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(index in shard, key, members) from `first` up to `limit`; a read error ends
        the shard. The samples before `first` are read (tar headers and data) but never
        yielded, so nothing decodes them.

        The samples a failing shard takes with it are counted as skipped (or the error
        raises): all of the rest in [first, limit), or with `share=(slot, slots, start)`
        only those whose global index `start + i` falls on this slot."""
        index = 0
        try:
            with closing(open_shard(url)) as stream:
                for key, members in iter_samples(stream):
                    if index == limit:
                        if limit == count:
                            raise PipelineError(f"shard {url} holds more than the {count} samples "
                                                f"its manifest lists: the manifest is stale, "
                                                f"re-run `pipeline prepare`")
                        return
                    if index >= first:
                        yield index, key, members
                    index += 1
            if limit is not None and index < limit:
                raise TarFormatError(f"it ends after {index} samples; its manifest lists {count}")
        except (OSError, ValueError, EOFError) as error:  # TarFormatError is a ValueError
            self._fail(f"shard {url}", error, _samples_lost(max(index, first), limit, share))

    def _fail(self, what: str, error: Exception, lost: int | None) -> None:
        if self.on_error == "raise":
            raise PipelineError(f"cannot read {what}: {error} "
                                f"(on_error='warn' skips it)") from error
        self._state.skipped += lost or 0
        amount = "an unknown number of" if lost is None else str(lost)
        warnings.warn(f"skipping {what}: {error}; {amount} samples lost", ShardWarning)

    def _decode(self, url: str, key: str, members: dict[str, bytes],
                flip: bool = False) -> Sample | None:
        try:
            image, label = decode_image(members), int(members["cls"])
        except Exception as error:  # noqa: BLE001 - PIL, libpng and numpy raise many types
            self._fail(f"sample {key} of shard {url}", error, 1)
            return None
        size = self._state.image_size or image.shape[1]
        self._state.image_size = size
        if image.shape[:2] != (size, size):
            height, width = image.shape[:2]
            raise PipelineError(f"shard {url}: sample {key} is {height}x{width}, but this shard "
                                f"set is {size}x{size}: mixed resolutions; "
                                f"re-run `pipeline prepare` for this shard")
        return image, label, key, flip

    # ------------------------------------------------ train: endless, resumable

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[_Batch]:
        # The DataLoader takes batch b from worker b % W. A resumed loader starts again
        # at worker 0, so worker w plays the stream that produced batch start_batch + w.
        stream = (self.start_batch + worker) % num_workers
        own_batches_done = len(range(stream, self.start_batch, num_workers))
        stream_index, skip = self.rank * num_workers + stream, own_batches_done * self.batch_size
        if self.sampling == "exact":
            samples = self._exact_samples(stream_index, num_workers, skip)
        else:
            samples = self._resampled_samples(stream_index, skip)
        return _batched(samples, self.batch_size, self._batch_buffers(worker))

    # exact epochs

    def _exact_samples(self, stream: int, num_workers: int, skip: int) -> Iterator[Sample]:
        """Stream s's share of epoch after epoch, starting `skip` samples in."""
        counts, streams = self.epoch_counts(), self.world_size * num_workers
        _check_streams(sum(counts), self.world_size, num_workers, self.shards.urls[0])
        # Every epoch gives a stream a share of the same length: skip whole epochs by it.
        first_epoch, skip = divmod(skip, len(stream_share(sum(counts), stream, streams)))
        empty_epochs = 0
        for epoch in itertools.count(first_epoch):
            produced = False
            # Skipped samples still pass the mixing, the shuffle buffer and their flip
            # draw, but are never decoded.
            share = self._epoch_share(stream, streams, epoch)
            for url, key, members, flip in itertools.islice(share, skip, None):
                sample = self._decode(url, key, members, flip)
                if sample is not None:
                    produced = True
                    yield sample
            skip = 0
            empty_epochs = 0 if produced else empty_epochs + 1
            # 2S epochs of one stream's share are as much reading as two passes over all
            # the shards: by then its share of them is unreadable, not unlucky.
            if empty_epochs >= 2 * streams:
                raise PipelineError(f"no readable sample in {empty_epochs} epochs of stream "
                                    f"{stream}'s share of the {len(counts)} shards (first: "
                                    f"{self.shards.urls[0]}); see the warnings, and repair "
                                    f"or re-prepare the shards")

    def _epoch_share(self, stream: int, streams: int, epoch: int
                     ) -> Iterator[tuple[str, str, dict[str, bytes], bool]]:
        """Epoch e of stream s: the raw samples of its share, `interleave` segments mixed
        at a time, through the shuffle buffer (drained at the epoch's end), each with a
        flip draw. Seeded by (seed, stream, epoch) alone, so a resumed stream can rebuild
        any epoch without knowing what came before it."""
        counts = self.epoch_counts()
        order = epoch_order(self.seed, epoch, len(counts))
        segments = stream_segments(counts, order, stream, streams)
        tag = f"{self.seed}/{stream}/{epoch}"
        mixed = _interleaved(((seg.stop - seg.start, self._segment(seg)) for seg in segments),
                             self.interleave, random.Random(f"epoch-mix/{tag}"))
        shuffled = _shuffled(mixed, self.shuffle_buffer, random.Random(f"epoch-shuffle/{tag}"))
        flip_rng = random.Random(f"epoch-flip/{tag}")
        return ((url, key, members, self.flip and flip_rng.random() < 0.5)
                for url, key, members in shuffled)

    def _segment(self, segment: Segment) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        url, count = self.shards.urls[segment.shard], self.epoch_counts()[segment.shard]
        # Nothing is opened until the mixing draws the segment's first sample.
        return ((url, key, members) for _, key, members
                in self._read(url, count, segment.stop, first=segment.start))

    # resampled shards

    def _round_shard(self, stream: int, round_index: int) -> int:
        pass_index, position = divmod(round_index, len(self.shards.urls))
        return _shard_order(self.seed, stream, pass_index, len(self.shards.urls))[position]

    def _first_round(self, stream: int, skip: int) -> tuple[int, int]:
        """Skip whole rounds by their sample counts: (first round to read, samples to drop)."""
        counts = self.epoch_counts()
        if sum(counts) == 0:
            raise PipelineError(f"the shards {self.shards.urls[0]}... hold no samples")
        round_index = 0
        while skip >= counts[self._round_shard(stream, round_index)]:
            skip -= counts[self._round_shard(stream, round_index)]
            round_index += 1
        return round_index, skip

    def _round(self, stream: int, round_index: int) -> tuple[str, Iterator[tuple[str, dict, bool]]]:
        """Round r of a train stream: its shard's raw samples, shuffled, each with a flip draw.

        Everything is seeded by (seed, stream, round) alone, so a resumed stream can
        rebuild any round without knowing what came before it."""
        shard = self._round_shard(stream, round_index)
        url = self.shards.urls[shard]
        count = None if self.shards.counts is None else self.shards.counts[shard]
        shuffle_rng = random.Random(f"shuffle/{self.seed}/{stream}/{round_index}")
        flip_rng = random.Random(f"flip/{self.seed}/{stream}/{round_index}")
        raw = ((key, members) for _, key, members in self._read(url, count, count))
        return url, ((key, members, self.flip and flip_rng.random() < 0.5)
                     for key, members in _shuffled(raw, self.shuffle_buffer, shuffle_rng))

    def _resampled_samples(self, stream: int, skip: int) -> Iterator[Sample]:
        first_round, skip = self._first_round(stream, skip) if skip else (0, 0)
        empty_rounds = 0
        for round_index in itertools.count(first_round):
            url, raw = self._round(stream, round_index)
            produced = False
            # Skipped samples still draw their flip, but are never decoded.
            for key, members, flip in itertools.islice(raw, skip, None):
                sample = self._decode(url, key, members, flip)
                if sample is not None:
                    produced = True
                    yield sample
            skip = 0
            empty_rounds = 0 if produced else empty_rounds + 1
            # 2N consecutive rounds contain one full pass over all N shards.
            if empty_rounds >= 2 * len(self.shards.urls):
                raise PipelineError(f"no readable sample in any of the {len(self.shards.urls)} "
                                    f"shards (first: {self.shards.urls[0]}); see the warnings")

    # ------------------------------------------------ eval: exactly once

    def _eval_plan(self) -> list[tuple[str, int | None, int | None, int | None]]:
        """(url, count, limit, global index of its first sample) of the shards to evaluate."""
        counts = self.shards.counts
        if counts is None:
            return [(url, None, None, None) for url in self.shards.urls]
        budget = self.max_samples if self.max_samples is not None else sum(counts)
        plan, start = [], 0
        for url, count in zip(self.shards.urls, counts):
            if start >= budget:
                break
            plan.append((url, count, min(count, budget - start), start))
            start += count
        return plan

    def _eval_samples(self, slot: int, slots: int) -> Iterator[Sample]:
        plan = self._eval_plan()
        by_shard = len(plan) >= slots
        next_start = 0  # global index when the manifest gives none: all slots read in order
        for url, count, limit, start in (plan[slot::slots] if by_shard else plan):
            start = next_start if start is None else start
            share = None if by_shard else (slot, slots, start)
            read = 0
            for index, key, members in self._read(url, count, limit, share):
                read = index + 1
                if by_shard or (start + index) % slots == slot:
                    sample = self._decode(url, key, members)
                    if sample is not None:
                        yield sample
            next_start = start + read


# ---------------------------------------------------------------- main process side

def _identity(item: Any) -> Any:
    return item


def _pin_memory() -> bool:
    """Pin batches (a pin thread copies each into page-locked memory) when CUDA is there."""
    return torch.cuda.is_available()


def _distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


class ShardLoader:
    """Iterable of `(images uint8 Bx3xHxW, labels int64 B, keys)`; built by make_loader.

    After a pass: `num_seen`, `num_skipped` (this rank) and `expected_total` (all ranks:
    the manifest's count, or max_samples, None without a manifest). `epoch_size` is T,
    the samples of one epoch over all ranks (train; eval: expected_total). Iterating a
    train loader again continues after the last batch it yielded.
    """

    def __init__(self, dataset: ShardStream, num_workers: int):
        self.dataset = dataset
        self.num_workers = num_workers
        self.manifest = dataset.shards.manifest
        self.image_size = dataset.image_size
        self.expected_total = self._expected_total()
        self.num_seen = 0
        self.num_skipped = 0
        self._next_batch = dataset.start_batch
        self._eval_loader: DataLoader | None = None
        # Worker buffers (worker, slot): their mapping here, and a weak reference to the
        # storage of the batch the caller may still hold in each.
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}
        self._lent: dict[tuple[int, int], StorageWeakRef] = {}

    @property
    def epoch_size(self) -> int | None:
        """Samples per epoch over all ranks: the trainer's fractional epoch is the samples
        consumed over all ranks / epoch_size. Without a manifest a resampled train loader
        counts them on first use, reading every shard once."""
        if self.dataset.mode == "eval":
            return self.expected_total
        return sum(self.dataset.epoch_counts())

    def _expected_total(self) -> int | None:
        total, max_samples = self.dataset.shards.total, self.dataset.max_samples
        return total if total is None or max_samples is None else min(total, max_samples)

    def _dataloader(self) -> DataLoader:
        if self.dataset.mode == "eval" and self._eval_loader is not None:
            return self._eval_loader
        workers = self.num_workers
        self._mapped, self._lent = {}, {}  # a new DataLoader: new workers, new buffers
        flags = (torch.zeros((workers, BUFFER_SLOTS), dtype=torch.uint8).share_memory_()
                 if workers else None)
        pinned = _pin_memory()
        dataset = dataclasses.replace(self.dataset, start_batch=self._next_batch,
                                      buffer_flags=flags, pinned=pinned)
        # Our streams are seeded by (seed, rank, worker) alone; a private generator keeps the
        # DataLoader from drawing its base seed from the global torch RNG, which would shift
        # the training random numbers of a resumed run against an uninterrupted one.
        loader = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
                            generator=torch.Generator(), pin_memory=pinned,
                            prefetch_factor=PREFETCH if workers else None,
                            # Eval runs again and again: keep its workers rather than re-fork.
                            persistent_workers=workers > 0 and self.dataset.mode == "eval")
        if self.dataset.mode == "eval":
            self._eval_loader = loader
        return loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        self.num_seen = self.num_skipped = 0
        loader = self._dataloader()
        for item in loader:
            self._reclaim(loader)
            if isinstance(item, _WorkerReport):
                if item.error is not None:
                    raise PipelineError(item.error)
                self.num_skipped += item.skipped
                continue
            images = self._lend(item, loader) if item.buffer is not None else item.images
            self.num_seen += len(item.keys)
            self._next_batch += 1
            # B x H x W x 3 rows -> B x 3 x H x W, channels-last: no copy on the host.
            yield images.permute(0, 3, 1, 2), torch.from_numpy(item.labels), item.keys

    def _lend(self, item: _Batch, loader: DataLoader) -> torch.Tensor:
        """The batch in a worker's reused buffer, without a copy (see _BatchBuffers).

        The caller gets a tensor with a storage of its own over the buffer's memory;
        when that storage is gone (no batch tensor or view of it left) the buffer goes
        back to its worker."""
        buffer = tuple(item.buffer)
        if item.images is not None and item.images.is_pinned():
            self._give_back(loader, buffer)  # the pin thread's copy: the buffer is free
            return item.images
        if item.images is not None:  # a new buffer: keep its mapping for later batches
            self._mapped[buffer] = item.images
        images = torch.from_numpy(self._mapped[buffer].numpy())
        self._lent[buffer] = StorageWeakRef(images.untyped_storage())
        return images

    def _reclaim(self, loader: DataLoader) -> None:
        for buffer, storage in list(self._lent.items()):
            if storage.expired():
                self._give_back(loader, buffer)
                del self._lent[buffer]

    @staticmethod
    def _give_back(loader: DataLoader, buffer: Sequence[int]) -> None:
        worker, slot = buffer
        loader.dataset.buffer_flags[worker, slot] = 0


def _check_arguments(mode: str, batch_size: int, num_workers: int, start_batch: int,
                     shuffle_buffer: int, max_samples: int | None, on_error: str,
                     sampling: str, interleave: int) -> None:
    problems = [
        (mode not in MODES, f"mode must be one of {MODES}, not {mode!r}"),
        (on_error not in ON_ERROR, f"on_error must be one of {ON_ERROR}, not {on_error!r}"),
        (sampling not in SAMPLING, f"sampling must be one of {SAMPLING}, not {sampling!r}"),
        (type(interleave) is not int or interleave < 1,
         f"interleave must be an integer >= 1, not {interleave!r}"),
        (batch_size < 1, f"batch_size must be >= 1, not {batch_size}"),
        (num_workers < 0, f"num_workers must be >= 0, not {num_workers}"),
        (start_batch < 0, f"start_batch must be >= 0, not {start_batch}"),
        (shuffle_buffer < 0, f"shuffle_buffer must be >= 0, not {shuffle_buffer}"),
        (max_samples is not None and max_samples < 1,
         f"max_samples must be >= 1, not {max_samples}"),
        (mode == "train" and max_samples is not None, "max_samples selects the eval subset; "
                                                      "it does not apply to mode='train'"),
        (mode == "eval" and start_batch, "start_batch resumes training; eval always reads "
                                         "every sample from the start"),
    ]
    for failed, message in problems:
        if failed:
            raise PipelineError(f"make_loader: {message}")


def make_loader(spec: Spec, batch_size: int, mode: str = "train", num_workers: int = 2,
                seed: int = 0, rank: int | None = None, world_size: int | None = None,
                start_batch: int = 0, shuffle_buffer: int = 2000, flip: bool = False,
                max_samples: int | None = None, on_error: str = "warn",
                allow_pipe: bool = True, sampling: str = "exact",
                interleave: int = 4) -> ShardLoader:
    """A streaming loader over `spec` (split directory, manifest, brace pattern or URL list).

    train: endless, deterministic in (seed, rank, worker), resumable with `start_batch`
    (batches this rank already consumed; same batch size, workers and world size).
    `sampling="exact"`: each epoch (`loader.epoch_size` samples over all ranks) shows
    every sample once, `interleave` shards mixed per stream; it needs at least one
    sample per stream (ranks x workers) and, without a manifest, reads every shard once
    here to count it. `sampling="resampled"`: each stream draws whole shards on its own.
    eval: every sample exactly once over all ranks; `max_samples` keeps the first M in
    manifest order. `allow_pipe=False` refuses `pipe:` commands in the spec; a
    manifest's entries are never run as commands either way.

    Images are uint8 B x 3 x H x W in channels-last memory; `normalize` turns them
    into contiguous (or channels-last) float on the device. A batch with workers lives
    in a buffer its worker refills once no tensor refers to it any more, so holding
    on to batches is safe (the worker then uses other buffers).
    """
    _check_arguments(mode, batch_size, num_workers, start_batch, shuffle_buffer, max_samples,
                     on_error, sampling, interleave)
    shards = resolve_spec(spec, allow_pipe)
    if max_samples is not None and shards.counts is None:
        raise PipelineError(f"max_samples needs per-shard counts from a manifest: point the spec "
                            f"{spec!r} at the split directory that holds {MANIFEST_NAME}")
    rank, world_size = _distributed_position(rank, world_size)
    image_size = shards.manifest.get("image_size") if shards.manifest else None
    dataset = ShardStream(shards, mode, batch_size, seed, rank, world_size, start_batch,
                          shuffle_buffer, flip, max_samples, on_error, image_size,
                          sampling=sampling, interleave=interleave)
    if mode == "train" and sampling == "exact":
        # Counted here once (if no manifest gives the counts), not in every worker.
        _check_streams(sum(dataset.epoch_counts()), world_size, max(1, num_workers),
                       shards.urls[0])
    return ShardLoader(dataset, num_workers)


def normalize(images: torch.Tensor,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] in `memory_format`; call it on the device, after the
    uint8 copy (the loader's channels-last batches are laid out in this same step)."""
    return images.to(torch.float32, memory_format=memory_format).div_(127.5).sub_(1)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
