"""`python -m pipeline.prepare`: the same as `pipeline prepare`."""
import sys

from pipeline.prepare.cli import main
from pipeline.utils import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
