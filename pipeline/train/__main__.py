"""`python -m pipeline.train` (also what `accelerate launch -m` and `torchrun -m` run)."""
import sys

from ..utils import run_stage
from .cli import main

sys.exit(run_stage(main, sys.argv[1:]))
