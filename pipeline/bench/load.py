"""`pipeline bench load`: samples/s of the streaming loader per worker, per image format.

For each format it measures, one stage added at a time, so the loader's own overhead
is visible next to the bare decode rate:
  decode          decode_image over in-memory samples (the ceiling)
  read            the lean tar reader alone (no decode)
  read+decode     lean reader + decode, one process
  webdataset      webdataset's generic tarfile pipeline + the same decode, one process
  loader 1w       make_train_loader with 1 worker: shuffle buffer, batching, IPC
  loader 2w       the same with 2 workers (total and per worker)
Both loader stages run twice: with exact epochs (the default, `--interleave` shards
mixed per stream) and with sampling="resampled" (shards drawn per stream, the earlier
default). Alongside, from the 2-worker runs: `shards_per_batch_exact` and
`shards_per_batch_resampled`, the distinct shards a train batch draws from (mean over
its batches). Shards are written to a temporary directory (natural-looking 64x64
content: smooth colour fields plus texture, ~9 KB as PNG) unless --shards points at
existing ones.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import prepare
from pipeline.data import PNG_DECODER, decode_image, make_train_loader, open_shard, resolve_spec
from pipeline.shards import (IMAGE_EXTS, MANIFEST_FORMAT, iter_samples, shard_name,
                             write_manifest, write_shard)
from pipeline.utils import PipelineError, available_cpus, dumps_json

# What the issue asks of the loader, per worker process.
TARGETS = {"png": 6000, "npy": 30000}
DISTINCT_IMAGES = 256  # encoded once and cycled: decode cost does not depend on repeats


def natural_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Smooth colour regions plus fine texture: compresses like a downscaled photo (~9 KB PNG)."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    texture = rng.normal(0, 10, (size, size, 1)) + rng.normal(0, 4, (size, size, 3))
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> bytes:
    """Encoded as `pipeline prepare` writes it (PNG settings and all: they set decode speed)."""
    return prepare.encode(Image.fromarray(image), prepare.Options(image_format=fmt))


def write_bench_shards(root: Path, fmt: str, num_samples: int, shard_size: int = 1000) -> Path:
    """A split directory of `num_samples` samples in `fmt`, with a manifest."""
    rng = np.random.default_rng(0)
    pool = [encode(natural_image(rng), fmt) for _ in range(DISTINCT_IMAGES)]
    split = root / fmt
    shards = []
    for index, start in enumerate(range(0, num_samples, shard_size)):
        samples = ((f"bench_{i:07d}", {fmt: pool[i % len(pool)], "cls": str(i % 10).encode(),
                                       "json": json.dumps({"wnid": f"n{i % 10:08d}"}).encode()})
                   for i in range(start, min(start + shard_size, num_samples)))
        shards.append(write_shard(split / shard_name("bench", index), samples).to_dict())
    write_manifest(split, {"format": MANIFEST_FORMAT, "split": "bench",
                           "num_samples": num_samples, "image_size": 64, "image_format": fmt,
                           "classes": [f"n{i:08d}" for i in range(10)], "shards": shards})
    return split


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def timed(samples: Iterable, limit: int, work: Callable | None = None) -> float:
    """Samples/s of consuming `limit` items from `samples`, each passed through `work`."""
    done, start = 0, time.perf_counter()
    for sample in itertools.islice(samples, limit):
        if work is not None:
            work(sample)
        done += 1
    return rate(done, time.perf_counter() - start)


def lean_samples(urls: Iterable[str]):
    for url in urls:
        with open_shard(url) as stream:
            yield from iter_samples(stream)


def webdataset_samples(urls: list[str]):
    import webdataset as wds
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
    return ({k: v for k, v in s.items() if not k.startswith("__")} for s in dataset)


class LoaderRun(NamedTuple):
    rate: float  # samples/s
    keys: list[list[str]]  # the keys of every batch, first one included


def loader_run(spec: str, num_workers: int, num_samples: int, batch_size: int,
               **sampling: Any) -> LoaderRun:
    """Train-mode samples/s after the first batch (worker start-up is not throughput)."""
    batches = iter(make_train_loader(spec, batch_size, num_workers=num_workers, seed=0,
                                     **sampling))
    keys = [next(batches)[2]]
    count, start = 0, time.perf_counter()
    for images, _, batch_keys in batches:
        count += len(images)
        keys.append(batch_keys)  # a reference: nothing is copied while timing
        if count >= num_samples:
            break
    return LoaderRun(rate(count, time.perf_counter() - start), keys)


def shard_of_keys(urls: list[str]) -> dict[str, int]:
    """key -> index of its shard, by reading (not decoding) every shard."""
    return {key: index for index, url in enumerate(urls)
            for key, _ in lean_samples([url])}


def shards_per_batch(run: LoaderRun, shard_of: dict[str, int]) -> float:
    """Distinct shards a batch draws from, mean over the run's batches."""
    return round(float(np.mean([len({shard_of[key] for key in keys}) for keys in run.keys])), 2)


def measure(spec: str, num_samples: int, batch_size: int, interleave: int,
            progress: tqdm) -> dict:
    urls = list(resolve_spec(spec, allow_pipe=True).urls)
    in_memory = [members for _, members in itertools.islice(lean_samples(urls), 1000)]
    fmt = next(ext for ext in IMAGE_EXTS if ext in in_memory[0])
    exact = {"sampling": "exact", "interleave": interleave}
    resampled = {"sampling": "resampled"}
    stages: dict[str, Callable[[], float | LoaderRun]] = {
        "decode": lambda: timed(itertools.cycle(in_memory), num_samples, decode_image),
        "read": lambda: timed(lean_samples(urls), num_samples),
        "read_decode": lambda: timed(lean_samples(urls), num_samples, lambda s: decode_image(s[1])),
        "webdataset_read_decode": lambda: timed(webdataset_samples(urls), num_samples,
                                                decode_image),
        "loader_1_worker": lambda: loader_run(spec, 1, num_samples, batch_size, **exact),
        "loader_2_workers": lambda: loader_run(spec, 2, num_samples, batch_size, **exact),
        "loader_1_worker_resampled": lambda: loader_run(spec, 1, num_samples, batch_size,
                                                        **resampled),
        "loader_2_workers_resampled": lambda: loader_run(spec, 2, num_samples, batch_size,
                                                         **resampled),
    }
    result: dict = {"format": fmt, "sample_bytes": round(float(np.mean(
        [sum(len(v) for v in members.values()) for members in in_memory])))}
    runs: dict[str, LoaderRun] = {}
    for name, stage in stages.items():
        progress.set_postfix_str(f"{fmt}: {name}")
        outcome = stage()
        if isinstance(outcome, LoaderRun):
            runs[name], outcome = outcome, outcome.rate
        result[name] = outcome
        progress.update()
    shard_of = shard_of_keys(urls)
    for sampling in ("exact", "resampled"):
        suffix = "" if sampling == "exact" else "_resampled"
        result[f"loader_2_workers{suffix}_per_worker"] = round(
            result[f"loader_2_workers{suffix}"] / 2, 1)
        result[f"shards_per_batch_{sampling}"] = shards_per_batch(
            runs[f"loader_2_workers{suffix}"], shard_of)
    result["target_per_worker"] = TARGETS.get(fmt)
    result["decoder"] = PNG_DECODER if fmt == "png" else "numpy" if fmt == "npy" else "pil"
    return result


def print_table(report: dict) -> None:
    columns = [("decode", "decode"), ("read", "read"), ("read_decode", "read+decode"),
               ("webdataset_read_decode", "webdataset"), ("loader_1_worker", "loader 1w"),
               ("loader_2_workers", "loader 2w"), ("loader_2_workers_per_worker", "2w/worker"),
               ("loader_1_worker_resampled", "resampled 1w"),
               ("loader_2_workers_resampled_per_worker", "resampled/w"),
               ("target_per_worker", "target"), ("shards_per_batch_exact", "shards/batch"),
               ("shards_per_batch_resampled", "resampled")]
    print(f"samples/s ({report['samples']} samples a stage, batch {report['batch_size']}, "
          f"{report['cpus']} CPUs, load average {report['load_average']}); loader: exact "
          f"epochs, interleave {report['interleave']}, unless marked resampled; shards a "
          f"batch draws from (2 workers)")
    print(f"{'format':<8}{'decoder':<13}{'bytes':>8}"
          + "".join(f"{title:>13}" for _, title in columns))
    for fmt, row in report["formats"].items():
        cells = "".join(cell(row[key], key.startswith("shards_per_batch")) for key, _ in columns)
        print(f"{fmt:<8}{row['decoder']:<13}{row['sample_bytes']:>8}{cells}")


def cell(value: float | None, fraction: bool) -> str:
    if value is None:
        return f"{'-':>13}"
    return f"{value:>13.2f}" if fraction else f"{value:>13,.0f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline bench load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", action="append", metavar="SPEC",
                        help="measure these shards (split directory, brace pattern or URL list; "
                             "repeatable) instead of writing temporary PNG and npy shards")
    parser.add_argument("--formats", default="png,npy",
                        help="formats of the temporary shards, comma-separated (png, npy, webp, "
                             "jpg; default: %(default)s)")
    parser.add_argument("--samples", type=int, default=10000,
                        help="samples written per format and consumed per stage "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="loader batch size (default: %(default)s)")
    parser.add_argument("--interleave", type=int, default=4,
                        help="shards mixed per stream with exact epochs (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < args.batch_size * 2:
        raise PipelineError(f"--samples {args.samples} must be at least twice --batch-size "
                            f"{args.batch_size} to time the loader after its first batch")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        specs = args.shards or [str(write_bench_shards(Path(tmp), fmt.strip(), args.samples))
                                for fmt in args.formats.split(",")]
        with tqdm(total=8 * len(specs), desc="bench load", unit="stage", file=sys.stderr,
                  disable=None) as progress:
            results = [measure(spec, args.samples, args.batch_size, args.interleave, progress)
                       for spec in specs]
    formats: dict[str, dict] = {}
    for index, result in enumerate(results):
        fmt = result.pop("format")
        formats[fmt if fmt not in formats else f"{fmt}#{index}"] = result
    # Rates are wall-clock: on a shared machine (load above the CPU count) they are lower bounds.
    report = {"samples": args.samples, "batch_size": args.batch_size,
              "interleave": args.interleave, "cpus": available_cpus(),
              "load_average": round(os.getloadavg()[0], 2), "formats": formats}
    if args.json:
        print(dumps_json(report, indent=None))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_stage
    sys.exit(run_stage(main, sys.argv[1:]))
