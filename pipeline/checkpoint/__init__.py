"""Training checkpoints under `RUN_DIR/checkpoints/step-<N>/`: written so that a crash or a
full disk at any moment never leaves a checkpoint that `--resume auto` would pick up
half-written, verified before they are trusted, and read without unpickling anything.

Layout of one checkpoint (format 2; file names from `pipeline.layout`)::

    step-<N>/model.safetensors        the export (EMA weights when EMA is on) + config.json:
    step-<N>/config.json              `from_pretrained(step-<N>/)` evaluates it without the state
    step-<N>/trainer.json             step, batches consumed per rank, W&B run id, skipped steps
    step-<N>/state/<module>.safetensors     weights of each module of the trainer's table
                                      (`model`: the live weights, `ema`: the weight EMA)
    step-<N>/state/<optimizer>.safetensors  an optimizer's state tensors, and beside it
    step-<N>/state/<optimizer>.json         its param_groups and non-tensor state values
    step-<N>/state/accelerator.json   Accelerate's micro-step counter and the fp16 GradScaler
    step-<N>/state/rng-<r>.safetensors      RNG of rank r: torch CPU and CUDA generators,
    step-<N>/state/rng-<r>.json             numpy's and Python's `random` state
    step-<N>/COMPLETE                 written last: {"format", "step", "world_size", "files":
                                      {name: {"size", "sha256"}}} of every other file

Only safetensors and JSON: nothing on the resume path unpickles (Accelerate's
`save_state` stores optimizer, RNG and registered objects as pickles, and reads the last
ones with `weights_only=False`). The state lives in its own subfolder so that the trainer's
`model` weights never collide with the export's `model.safetensors`.

    state.py   the trainer's state <-> safetensors + JSON (`TrainerState`, parts, RNG)
    verify.py  COMPLETE and `verify_checkpoint`
    store.py   finding, resuming, saving (all ranks or none), pruning, publishing
"""
from ..layout import COMPLETE_MARKER, EXPORT_FILES, STATE_SUBDIR, TRAINER_STATE_NAME
from .state import (ACCELERATOR_STATE_NAME, CheckpointError, Part, TrainerState,
                    load_accelerator_state, load_checkpoint, load_module, load_optimizer,
                    load_rng, note_on_main, optimizer_state, optimizer_state_dict, write_part,
                    write_rng, write_state)
from .store import (check_model_matches, checkpoints_dir, collectively, complete_checkpoints,
                    on_main_process,
                    latest_checkpoint, newest_verified, prune, publish_export,
                    remove_stale_temporaries, resolve_resume, save_checkpoint, step_dir)
from .verify import (CHECKPOINT_FORMAT, REQUIRED_FILES, legacy_reason, read_record,
                     trusted_state, verify_checkpoint, write_record)

__all__ = ["ACCELERATOR_STATE_NAME", "CHECKPOINT_FORMAT", "COMPLETE_MARKER", "CheckpointError",
           "EXPORT_FILES", "Part", "REQUIRED_FILES", "STATE_SUBDIR", "TRAINER_STATE_NAME",
           "TrainerState", "check_model_matches", "checkpoints_dir", "collectively", "on_main_process",
           "complete_checkpoints", "latest_checkpoint", "legacy_reason", "load_accelerator_state",
           "load_checkpoint", "load_module", "load_optimizer", "load_rng", "newest_verified",
           "note_on_main", "optimizer_state", "optimizer_state_dict", "prune", "publish_export",
           "read_record", "remove_stale_temporaries", "resolve_resume", "save_checkpoint",
           "step_dir", "trusted_state", "verify_checkpoint", "write_part", "write_record",
           "write_rng", "write_state"]
