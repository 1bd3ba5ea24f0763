"""`pipeline bench <what>`: throughput measurements with the project's own code paths.

- `prepare`: images/s per core of the shard job vs a naive one-process baseline.
- `load`:    samples/s per loader worker vs the bare decode rate of the same format.
- `train`:   training step throughput (images/s) per model x arch on this device.
- `quality`: the quantisers trained side by side at equal bits and steps, then evaluated
             (PSNR, SSIM, LPIPS with a stand-in network, code usage).
- `gpu`:     one GPU's training images/s from synthetic batches, the streaming loader and
             the cache, compile's speed-up, peak memory, evaluation images/s.

Each prints a readable table, or one JSON object with `--json`. Benchmarks measure;
nothing here asserts a timing or a figure.
"""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "prepare": "pipeline.bench.prepare",
    "load": "pipeline.bench.load",
    "train": "pipeline.bench.train",
    "quality": "pipeline.bench.quality",
    "gpu": "pipeline.bench.gpu",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print("usage: pipeline bench {" + ",".join(BENCHES) + "} [--json] [options]\n\n"
              + (__doc__ or ""))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHES[argv[0]])
    return module.main(argv[1:])
