"""`python -m pipeline.export`: the same as `pipeline export`."""
import sys

from pipeline.export import main
from pipeline.utils import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
