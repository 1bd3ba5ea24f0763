import sys

from pipeline.report import main
from pipeline.utils import run_stage

sys.exit(run_stage(main, sys.argv[1:]))
