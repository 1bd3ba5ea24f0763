"""The workers of `pipeline prepare`, and how the job stops.

A worker task is a chunk of one shard's inputs (`ChunkTask`); a worker decodes, resizes
and encodes each input and returns the chunk as tar members (`process_chunk`). Every
worker imports this module (a forkserver once for all of them), so it and the package
stay light: PIL, numpy, yaml and the project's listing, shard and config modules, never
torch (tested).

Stopping: SIGTERM or SIGINT raises `Interrupted` in the parent (`stop_on_signals`), which
unwinds the job: temporary files removed, pending tasks cancelled, workers ended. Workers
ignore those signals (the parent decides) and end by themselves when the parent dies, even
by SIGKILL (`worker_init`).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..inputs import Item
from ..shards import encode_members
from .image import BadInput, encode, render
from .options import Options

# What a forkserver imports once for all its workers (missing ones skipped): the decoders,
# and this module with the project's modules it needs (the config machinery among them).
WORKER_PRELOAD = ["numpy", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "tqdm",
                  "simplejpeg", "pipeline.prepare.pool"]


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
    """`forkserver` with WORKER_PRELOAD imported once where available, else `spawn`.

    Never plain `fork`: it is unsafe once threads exist (tqdm's monitor, the caller's).
    A spawned worker imports numpy, PIL and this package itself; forkserver workers are
    forked from one server that imported them once. Preloading this package is safe under
    `python -m pipeline.prepare`: multiprocessing does not re-run a `__main__` module of a
    package in its workers (a plain module run with -m would be re-run as `__mp_main__`).
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
    wakes up whenever a result waits in its pipe and, with results of a few hundred KB,
    spun for a noticeable share of a core in the writing process, taken from the workers
    on a 2-core machine (README, Performance). A worker that dies also fails the job
    (BrokenProcessPool) instead of losing its task and hanging. Leaving the block, also
    by an exception or an interrupt, cancels the tasks not started and waits for the
    workers to end (see worker_init)."""
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


# ---------------------------------------------------------------- stopping

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
