"""`python -m pipeline.evaluate` (also what `torchrun -m pipeline.evaluate` starts)."""
import sys

from pipeline.evaluate import main
from pipeline.utils import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
