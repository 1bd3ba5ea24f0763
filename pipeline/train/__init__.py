"""`pipeline train`: train one AE / VAE / VQ-VAE under Accelerate.

    pipeline train --model vqvae --arch basic --train-shards shards/train \\
        --val-shards shards/val --output runs/vq --max-steps 20000
    accelerate launch -m pipeline.train ...      torchrun --nproc_per_node 8 -m pipeline.train ...

Where each concern lives:

    cli.py         parser, config resolution, `preflight` (checks before any process trains)
    loop.py        `train` and the loop, one step at a time; what gets logged
    setup.py       RUN_DIR lock, Accelerator, model + optimizer (+ EMA, discriminator, LPIPS),
                   `Run`, resume
    validation.py  the fixed val subset, its metrics, image grids
    signals.py     SIGTERM/SIGUSR1, the per-step agreement of all ranks, exit 75
    ema.py         the weight EMA

`--batch-size` is per device. Checkpoints are written and read by `pipeline.checkpoint`
(safetensors + JSON, verified against the hashes in COMPLETE), not by
`accelerator.save_state`, whose pickles would run code on resume. The main process holds
`RUN_DIR/.lock` for the whole run: a second trainer on the same RUN_DIR is refused on every
rank, before it writes anything.

Exit codes: 0 done; 2 a user error (bad config, non-finite loss with --train.nan_policy stop);
75 (`EXIT_PREEMPTED`, EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after writing a checkpoint:
requeue the same command with `--resume auto` (launch/slurm.sbatch does).
"""
# Every name `pipeline.train` had as one module stays importable from here (re-exports).
# ruff: noqa: F401
from ..config import ALIASES
from ..layout import LOCK_NAME, PREEMPTED_NAME
from .cli import (build_parser, check_image_size, check_shards, default_preset, main, preflight,
                  resolve_config)
from .ema import WeightEMA
from .loop import (StepResult, Window, checked_batches, due, epoch_size_of, forward_backward,
                   fractional_epoch, get_lr, handle_nonfinite, loss_terms, make_train_loader,
                   optimizer_step, optimizer_step_with_discriminator, peak_memory_gb,
                   step_together, train, train_loop, train_metrics, training_step)
from .setup import (Run, checkpoint_parts, limit_threads, make_accelerator, make_objective,
                    prepare_discriminator, prepare_model, refuse_if_locked, refuse_overwrite,
                    release_accelerate_state, restore, run_record, set_up_run, take_run_lock)
from .signals import EXIT_PREEMPTED, StopSignal, Verdict, agree, stop_for_preemption
from .validation import (GRID_CAPTIONS, NUM_GRID_IMAGES, ValSet, check_batch_shape,
                         evaluate_now, image_grids, load_val_set, mean_image_error,
                         recon_error, rng_neutral, to_grid, validate)
