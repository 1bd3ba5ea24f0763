"""`pipeline prepare`: an ImageNet-style JPEG tree -> 64x64 WebDataset shards + manifest.

    pipeline prepare --input ROOT --output OUT [--splits train,val] [--workers N]
                     [--part K/N] [--resize center-crop|box] [--image-format png|npy|webp|jpg]
    pipeline prepare --merge OUT

One concern per module (shards/README.md documents the output):

- `options`: `Options` (what decides the bytes of a shard: the job record) and
  `PrepareConfig` (a whole command, one option per field), their ranges and messages.
- `image`: one image, decoded (DCT-scaled for JPEGs), cropped, resized and encoded.
- `pool`: the worker tasks, the process pool and how a job stops on SIGTERM/SIGINT.
- `write`: shards planned before any decoding, written exactly once, resumed from records.
- `job`: the files of `OUT/<split>/`, part locks, the job record that refuses mixing.
- `manifest`: the manifest and failures list from the records, and `--merge`.
- `run`: a job from start to end (`run_job(config)`, `prepare(...)`, `prepare_split`).
- `cli`: the command line (`main`).

Every name below stays importable from `pipeline.prepare` (the same objects); a test that
replaces a function replaces it in the module that calls it (`pool.process_chunk`,
`run.executor`, `manifest.write_manifest`...).
"""
from .cli import EXIT_INTERRUPTED, build_parser, check_failures, main
from .image import (ALPHA_BACKGROUND, PNG_AVERAGE_FILTER, PNG_COMPRESS_LEVEL, PNG_SIGNATURE,
                    PNG_ZLIB_STRATEGY, RESAMPLE, BadInput, crop_box, decode_rgb, draft_scale,
                    encode, encode_png, open_image, render, simplejpeg, to_rgb)
from .job import (CONFIG_NAME, JOB_RECORD, MUTEX_NAME, PART_LOCK, PROGRESS_DIR,
                  check_job_record, check_local_output, config_name, describe_differences,
                  describe_part, failures_name, held_part_locks, job_record, lock_part,
                  manifest_name, part_file_names, part_lock_path, part_suffix, record_path,
                  refuse_foreign_directory, refuse_running_parts, refuse_unknown_contents,
                  remove_stale_temp_files)
from .manifest import (assemble_manifest, failures_jsonl, manifest_base, merge, merged_manifest,
                       part_record, read_part_manifests, resize_description, shard_index,
                       write_outputs)
from .options import (ALIASES, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, DEFAULT_SHARD_SIZE,
                      MAX_IMAGE_SIZE, OPTION_FLAGS, OVERSAMPLING, RESIZE_POLICIES, SLURM_PART_VARS,
                      SPLIT_NAME, Options, PrepareConfig, check_split_name, job_options,
                      option_flag, parse_part)
from .pool import (WORKER_PRELOAD, ChunkResult, ChunkTask, Interrupted, MapFn, StopRequest,
                   executor, exit_with_parent, map_unordered, pool_context, process_chunk,
                   sample_members, stop_on_signals, worker_init)
from .run import SplitSummary, prepare, prepare_split, run_job
from .write import (CHUNK_SIZE, TAPER_CHUNK_SIZE, TAPER_IMAGES, WORKER_BUG, ShardInProgress,
                    ShardRecord, check_chunk_result, completed_record, part_shards,
                    plan_shards, plausible_record, resume_state, split_chunks,
                    write_planned_shards)
# Names of other modules that callers reached through this one before it was a package.
from ..shards import (FAILURES_NAME, IMAGE_EXTS, MANIFEST_FORMAT, MANIFEST_NAME,
                      ShardWriter, encode_members, shard_name, write_manifest)
from ..utils import provenance

__all__ = [
    "ALIASES", "ALPHA_BACKGROUND", "assemble_manifest", "BadInput", "build_parser",
    "check_chunk_result", "check_failures", "check_job_record", "check_local_output",
    "check_split_name", "CHUNK_SIZE", "ChunkResult", "ChunkTask", "completed_record",
    "CONFIG_NAME", "config_name", "crop_box", "decode_rgb", "DEFAULT_MAX_PIXELS",
    "DEFAULT_QUALITY", "DEFAULT_SHARD_SIZE", "describe_differences", "describe_part",
    "draft_scale", "encode", "encode_members", "encode_png", "executor", "EXIT_INTERRUPTED",
    "exit_with_parent", "failures_jsonl", "FAILURES_NAME", "failures_name", "held_part_locks",
    "IMAGE_EXTS", "Interrupted", "job_options", "JOB_RECORD", "job_record", "lock_part",
    "main", "manifest_base", "MANIFEST_FORMAT", "MANIFEST_NAME", "manifest_name",
    "map_unordered", "MapFn", "MAX_IMAGE_SIZE", "merge", "merged_manifest", "MUTEX_NAME",
    "open_image", "option_flag", "OPTION_FLAGS", "Options", "OVERSAMPLING", "parse_part",
    "part_file_names", "PART_LOCK", "part_lock_path", "part_record", "part_shards",
    "part_suffix", "plan_shards", "plausible_record", "PNG_AVERAGE_FILTER",
    "PNG_COMPRESS_LEVEL", "PNG_SIGNATURE", "PNG_ZLIB_STRATEGY", "pool_context", "prepare",
    "prepare_split", "PrepareConfig", "process_chunk", "PROGRESS_DIR", "provenance",
    "read_part_manifests", "record_path", "refuse_foreign_directory", "refuse_running_parts",
    "refuse_unknown_contents", "remove_stale_temp_files", "render", "RESAMPLE",
    "resize_description", "RESIZE_POLICIES", "resume_state", "run_job", "sample_members",
    "shard_index", "shard_name", "ShardInProgress", "ShardRecord", "ShardWriter", "simplejpeg",
    "SLURM_PART_VARS", "split_chunks", "SPLIT_NAME", "SplitSummary", "stop_on_signals",
    "StopRequest", "TAPER_CHUNK_SIZE", "TAPER_IMAGES", "to_rgb", "WORKER_BUG", "worker_init",
    "WORKER_PRELOAD", "write_manifest", "write_outputs", "write_planned_shards"]
