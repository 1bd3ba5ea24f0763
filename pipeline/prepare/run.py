"""A prepare job from start to end: `run_job(config)` (the command line's), `prepare(...)`
(the library's, from Python values), and `prepare_split`, one split of one part.

In order: resolve the config (workers, part, splits); take every split's part lock; then
per split list the inputs, check the job record, save the resolved config, plan, skip the
shards already complete, write the others (`write.write_planned_shards`) and assemble the
manifest from the records. Leaving by any exception (SIGTERM/SIGINT, a full disk, a
read-only output) removes the part's temporary files: only finished shards, their records
and complete manifests remain, and the same command resumes.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..config.fields import to_yaml
from ..inputs import ClassMap, printable, resolve_classes, scan_split
from ..utils import PipelineError, atomic_write_text, available_cpus
from .job import (PROGRESS_DIR, check_job_record, check_local_output, config_name,
                  failures_name, job_record, lock_part, manifest_name, part_file_names,
                  refuse_foreign_directory, remove_stale_temp_files, split_mutex)
from .manifest import assemble_manifest, manifest_base, write_outputs
from .options import (Options, PrepareConfig, check_split_name, job_options, parse_part,
                      part_text, split_list)
from .pool import MapFn, executor
from .write import part_shards, plan_shards, resume_state, write_planned_shards


@dataclass
class SplitSummary:
    split: str
    written: int  # samples in shards written by this run
    skipped_shards: int
    num_samples: int
    num_failures: int
    num_shards: int
    seconds: float
    failures_path: Path
    manifest_path: Path

    def line(self) -> str:
        done = (f"{self.written / self.seconds:.0f} images/s" if self.written and self.seconds
                else "nothing left to do")
        return (f"{self.split}: {self.num_samples} samples in {self.num_shards} shards "
                f"({self.skipped_shards} already complete), {self.num_failures} failures, "
                f"{done} -> {printable(str(self.manifest_path))}")


def prepare_split(root: Path, output: Path, split: str, options: Options, classes: ClassMap,
                  val_labels: Path | None, part: tuple[int, int], run_map: MapFn,
                  progress: bool = True, config: PrepareConfig | None = None) -> SplitSummary:
    """One split of one part. The caller holds the part's lock (`lock_part`) where other
    jobs may share OUT; leaving by any exception (an interrupt, a full disk) removes this
    part's temporary files, so only finished shards, records and manifests remain.
    `config`, the job's resolved config, is saved as `.progress/prepare[.part-K-of-N].yaml`."""
    start = time.perf_counter()
    listing = scan_split(root, split, classes, val_labels)
    plan = plan_shards(listing.items, split, options)
    split_dir = output / split
    job = job_record(options, listing.items, classes)
    with split_mutex(split_dir):  # parts starting together: one writes it
        check_job_record(split_dir, job)
    mine = part_shards(len(plan), part)
    try:
        records = resume_state(split_dir, split, mine, part)
        if config is not None:
            atomic_write_text(split_dir / PROGRESS_DIR / config_name(part), to_yaml(config))
        todo = [i for i in mine if i not in records]
        with tqdm(total=sum(len(plan[i]) for i in todo), unit="img", desc=f"prepare {split}",
                  disable=not progress, smoothing=0.1) as bar:
            for record in write_planned_shards(plan, todo, split, split_dir, root, options,
                                               run_map, bar):
                records[record.index] = record
        base = manifest_base(split, options, classes, job, root, listing, len(plan))
        if part[1] > 1:
            base["part"] = {"index": part[0], "count": part[1]}
        manifest = assemble_manifest(base, list(records.values()), failures_name(part))
        write_outputs(split_dir, manifest, part)
    except BaseException:
        remove_stale_temp_files(split_dir, part_file_names(split, mine, part))
        raise
    return SplitSummary(split, sum(records[i].info["num_samples"] for i in todo),
                        len(mine) - len(todo), manifest["num_samples"],
                        manifest["num_failures"], len(records), time.perf_counter() - start,
                        split_dir / failures_name(part), split_dir / manifest_name(part))


def run_job(config: PrepareConfig, progress: bool = True) -> list[SplitSummary]:
    """Prepare the splits of `config.input` into `config.output`: what `pipeline prepare`
    runs. Unset workers, part and splits are resolved first (CPU affinity, SLURM array
    variables, the train/val folders that exist). Every split's part lock is taken before
    any work (a second job on the same shards is refused at once, naming the first) and
    held until the job ends."""
    if config.input is None:
        raise PipelineError("--input ROOT is required (or --merge OUT)")
    root, output = Path(config.input), Path(config.output)
    workers = available_cpus() if config.workers is None else config.workers
    part = parse_part(config.part)
    check_local_output(output)
    if not root.is_dir():
        raise PipelineError(f"--input {root} is not a directory")
    splits = split_list(config.splits) or [s for s in ("train", "val") if (root / s).is_dir()]
    if not splits:
        raise PipelineError(f"--input {root} holds neither train/ nor val/; pass --splits")
    for split in splits:
        if not (root / split).is_dir():
            raise PipelineError(f"{root / split} does not exist: --splits names "
                                f"subdirectories of --input ({root})")
    resolved = dataclasses.replace(config, workers=workers, part=part_text(part),
                                   splits=",".join(splits))
    classes = resolve_classes(root, output, splits, Path(config.classes) if config.classes
                              else None)
    val_labels = Path(config.val_labels) if config.val_labels else None
    options = config.shard_options()
    with ExitStack() as locks:
        for split in splits:
            refuse_foreign_directory(output / split)
            locks.enter_context(lock_part(output / split, part))
        with executor(workers) as run_map:
            return [prepare_split(root, output, split, options, classes, val_labels, part,
                                  run_map, progress, resolved)
                    for split in splits]


def prepare(root: str | Path, output: str | Path, splits: list[str] | None = None,
            options: Options = Options(), workers: int | None = None,
            part: tuple[int, int] = (0, 1), classes_file: str | Path | None = None,
            val_labels: str | Path | None = None, progress: bool = True) -> list[SplitSummary]:
    """Prepare `splits` of ROOT into OUT with `options`: `run_job` from Python values."""
    for split in splits or []:
        check_split_name(split)  # before joining: a name with a comma is no split name
    config = PrepareConfig(**job_options(options), input=str(root), output=str(output),
                           splits=",".join(splits) if splits else None, workers=workers,
                           part=part_text(part),
                           classes=str(classes_file) if classes_file else None,
                           val_labels=str(val_labels) if val_labels else None)
    return run_job(config, progress)
