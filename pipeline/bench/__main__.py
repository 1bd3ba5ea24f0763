import sys

from pipeline.bench import main
from pipeline.cli import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
