"""`pipeline prepare` on the command line: one option per `PrepareConfig` field, `--merge`
and `--no-progress`; exit status 0, 2 or `EXIT_INTERRUPTED`."""
from __future__ import annotations

import argparse
import sys

from ..config.fields import add_config_arguments, build_config
from ..inputs import printable
from ..utils import PipelineError, available_cpus
from .manifest import merge
from .options import ALIASES, PrepareConfig, check_split_name, split_list
from .pool import stop_on_signals
from .run import SplitSummary, run_job

# Exit status of a job stopped by SIGTERM/SIGINT (BSD's EX_TEMPFAIL, the trainer's
# "preempted, rerun to resume"): finished shards are kept and the same command resumes.
EXIT_INTERRUPTED = 75
# What --help shows after each option; the generic one of `pipeline.config` is "V".
METAVARS = {"input": "ROOT", "output": "OUT", "splits": "LIST", "workers": "N",
            "part": "K/N", "resize": "POLICY", "image_format": "FORMAT", "quality": "Q",
            "image_size": "PX", "shard_size": "N", "seed": "S", "max_failures": "N",
            "max_pixels": "N", "decode_oversampling": "X", "val_labels": "FILE",
            "classes": "FILE"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline prepare",
        description="Turn an ImageNet-style JPEG tree into 64x64 WebDataset shards with a "
                    "manifest (format: shards/README.md). Resumable: re-run the same command "
                    "after an interruption. The resolved job options are saved in "
                    "OUT/<split>/.progress/prepare.yaml (prepare.part-K-of-N.yaml for a part).",
        epilog=f"Exit status: 0 done; 2 bad input or options, more failed inputs than "
               f"--max-failures, an unwritable output, or another job on the same output; "
               f"{EXIT_INTERRUPTED} stopped by SIGTERM or SIGINT (EX_TEMPFAIL): the finished "
               f"shards are kept, re-run the same command to resume. Workers here: "
               f"{available_cpus()} by default.")
    add_config_arguments(p, ALIASES, cls=PrepareConfig, title="job options (saved with the "
                                                               "outputs)")
    for action in p._actions:  # argparse has no public way to set them afterwards
        action.metavar = METAVARS.get(action.dest, action.metavar)
    # Not fields of the config: --merge is another action (no shard is prepared), and
    # --no-progress changes only what the terminal shows.
    p.add_argument("--merge", default=None, metavar="OUT",
                   help="instead of preparing: join the part manifests of OUT's splits into "
                        "manifest.json + failures.jsonl (idempotent)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge is not None:
        return merge_command(args.merge, args.splits)
    config = build_config(None, args, aliases=ALIASES, cls=PrepareConfig)
    with stop_on_signals() as stop:
        try:
            summaries = run_job(config, progress=not args.no_progress)
        except BaseException:
            if stop.received is None:
                raise
            print(f"prepare: stopped by {stop.received.name}; the finished shards are kept, "
                  f"re-run the same command to resume (exit {EXIT_INTERRUPTED})",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
    for summary in summaries:
        print(summary.line())
    return check_failures(summaries, config.max_failures)


def merge_command(output: str, splits_text: str | None) -> int:
    splits = split_list(splits_text)
    for split in splits:
        check_split_name(split)
    for path in merge(output, splits or None):
        print(f"merged -> {printable(str(path))}")
    return 0


def check_failures(summaries: list[SplitSummary], max_failures: int) -> int:
    total = sum(s.num_failures for s in summaries)
    if total > max_failures:
        where = ", ".join(f"{s.failures_path} ({s.num_failures})" for s in summaries
                          if s.num_failures)
        raise PipelineError(f"{total} inputs failed, more than --max-failures {max_failures}; "
                            f"the shards are written, the failed inputs are listed in {where}")
    return 0
