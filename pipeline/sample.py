"""The old name of `pipeline.sampledata` (the embedded sample tree), kept for users'
scripts: every name this module had is importable from here. The benchmark JPEGs moved to
`pipeline.bench.jpegs`; `pipeline sample` runs `pipeline.sampledata`."""
import sys

from . import sampledata
from .bench.jpegs import (BENCH_CONTRAST, BENCH_SHAPES, TextureBank, bench_image,
                          benchmark_options, fractal_noise, write_benchmark_jpegs)
from .sampledata import *  # noqa: F403

__all__ = sampledata.__all__ + [
    "BENCH_CONTRAST", "BENCH_SHAPES", "TextureBank", "bench_image", "benchmark_options",
    "fractal_noise", "write_benchmark_jpegs"]

if __name__ == "__main__":
    from .utils import run_stage

    sys.exit(run_stage(sampledata.main, sys.argv[1:]))
