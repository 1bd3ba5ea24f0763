"""`python -m pipeline.encode` (also what `torchrun -m pipeline.encode` starts)."""
import sys

from pipeline.encode import main
from pipeline.utils import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
