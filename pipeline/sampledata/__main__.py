"""`python -m pipeline.sampledata`: the same as `pipeline sample`."""
import sys

from pipeline.sampledata.cli import main
from pipeline.utils import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
