"""The trainer's guards end to end: out-of-range options, image sizes, the RUN_DIR lock
(also under torchrun), a full disk while checkpointing, damaged checkpoints, the
fractional epoch and the loader options it passes on.

Runs use the `debug` preset on the synthetic shards, one thread each."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline import train
from pipeline.train import cli as train_cli, loop as train_loop  # where names are looked up
from pipeline.cli import run_stage
from pipeline.locking import acquire, holder_of
from pipeline.tracking import read_history
from pipeline.utils import PipelineError
from shardgen import make_split
from test_checkpoint import fail_fsync_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def args_for(train_shards, val_shards, output: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", "debug", "--model", "ae", "--train-shards", str(train_shards),
            "--val-shards", str(val_shards), "--output", str(output),
            "--max-steps", str(steps), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


def torchrun(*args: str, port_offset: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(31500 + port_offset + os.getpid() % 500), *args]


@pytest.fixture(scope="module")
def run4(synthetic_shards, tmp_path_factory):
    """A debug AE run of 4 steps, checkpoints step-2 and step-4, every step logged."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("guards") / "run"
    assert train.main(args_for(synthetic_shards / "train", synthetic_shards / "val", run, 4,
                               "--ckpt-every", "2", "--keep-last", "5", "--log-every", "1")) == 0
    return run


# ---------------------------------------------------------------- options out of range

@pytest.mark.parametrize("option, message", [
    (["--lr", "-1"], "--optim.lr must be > 0, got -1.0 (alias --lr)"),
    (["--lr", "nan"], "--optim.lr must be > 0, got nan (alias --lr)"),
    (["--optim.betas", "2 2"], "--optim.betas [2.0, 2.0]: each value must be in [0, 1), got 2.0"),
    (["--optim.min_lr_ratio", "-5"], "--optim.min_lr_ratio must be in [0, 1], got -5.0"),
    (["--model.widths", ""], "--model.widths must not be empty"),
    (["--model.fsq_levels", ""], "--model.fsq_levels must not be empty"),
    (["--model.code_dim", "0"], "--model.code_dim must be >= 1, got 0"),
])
def test_out_of_range_options_exit_2_in_one_line(synthetic_shards, tmp_path, capsys, option,
                                                 message):
    run = tmp_path / "run"
    argv = args_for(synthetic_shards / "train", synthetic_shards / "val", run, 5, *option)
    assert run_stage(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {message}"]
    assert not run.exists()  # no config.yaml, nothing at all


def test_out_of_range_option_through_the_cli(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train",
         *args_for(synthetic_shards / "train", synthetic_shards / "val", run, 5, "--lr", "nan")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --optim.lr must be > 0, got nan (alias --lr)"]
    assert not run.exists()


# ---------------------------------------------------------------- image size

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """32-px train and val splits with manifests, and the train shards without one."""
    root = tmp_path_factory.mktemp("small_shards")
    make_split(root, "train", 64, 32, size=32)
    make_split(root, "val", 32, 32, size=32)
    bare = root / "bare"
    bare.mkdir()
    for tar in sorted((root / "train").glob("*.tar")):
        shutil.copy(tar, bare / tar.name)
    return {"train": root / "train", "val": root / "val",
            "bare": ",".join(str(p) for p in sorted(bare.glob("*.tar")))}


@pytest.mark.parametrize("split, option", [("train", "--train-shards"), ("val", "--val-shards")])
def test_manifest_of_another_image_size_is_refused_before_launch(synthetic_shards, small_shards,
                                                                 tmp_path, split, option):
    shards = {"train": synthetic_shards / "train", "val": synthetic_shards / "val",
              split: small_shards[split]}
    run = tmp_path / "run"
    with pytest.raises(PipelineError, match=rf"{option} .*: the shards hold 32x32 images \(their "
                                            rf"manifest\), but the model is built for 64px"):
        train.main(args_for(shards["train"], shards["val"], run, 3))
    assert not run.exists()


def test_shards_without_manifest_are_checked_on_their_first_batch(synthetic_shards, small_shards,
                                                                  tmp_path, capsys):
    run = tmp_path / "run"
    argv = args_for(small_shards["bare"], synthetic_shards / "val", run, 3)
    assert run_stage(train.main, argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --train-shards ") and "Traceback" not in last
    assert "the images are 3x32x32" in last and "built for 3x64x64" in last
    assert not (run / "checkpoints").exists() and not (run / "model").exists()
    assert not (run / "history.jsonl").exists()  # refused before the first step is logged


def test_matching_image_size_trains(small_shards, tmp_path):
    run = tmp_path / "run"
    assert train.main(args_for(small_shards["train"], small_shards["val"], run, 2,
                               "--model.image_size", "32", "--model.widths", "16,32",
                               "--model.latent_channels", "32")) == 0
    assert json.loads((run / "model" / "config.json").read_text())["model"]["image_size"] == 32


# ---------------------------------------------------------------- one trainer per RUN_DIR

def test_second_trainer_on_the_same_run_dir_is_refused(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    with acquire(run / ".lock", f"--output {run}"):
        with pytest.raises(PipelineError, match=rf"--output {run} is in use by another job: pid "
                                                rf"{os.getpid()} on host {socket.gethostname()}"):
            train.main(args_for(synthetic_shards / "train", synthetic_shards / "val", run, 3))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written


def test_lock_taken_after_preflight_still_refuses(synthetic_shards, tmp_path, monkeypatch):
    """The race preflight cannot close: the lock itself (taken before anything is
    written) refuses the second job."""
    monkeypatch.setattr(train_cli, "refuse_if_locked", lambda run_dir: None)
    run = tmp_path / "run"
    with acquire(run / ".lock", f"--output {run}"):
        with pytest.raises(PipelineError, match=rf"in use by another job: pid {os.getpid()} on "
                                                rf"host {socket.gethostname()}"):
            train.main(args_for(synthetic_shards / "train", synthetic_shards / "val", run, 3))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_lock_is_held_for_the_whole_run(synthetic_shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    holders = []
    real_checkpoint = train.Run.checkpoint

    def checkpoint(self, state):
        holders.append(holder_of(run / ".lock"))
        return real_checkpoint(self, state)

    monkeypatch.setattr(train.Run, "checkpoint", checkpoint)
    assert train.main(args_for(synthetic_shards / "train", synthetic_shards / "val", run, 2,
                               "--ckpt-every", "1")) == 0
    assert [h["pid"] for h in holders] == [os.getpid(), os.getpid()]
    assert holder_of(run / ".lock") is None  # released at the end


def test_locked_run_dir_stops_every_rank_under_torchrun(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    with acquire(run / ".lock", f"--output {run}"):
        result = subprocess.run(
            torchrun("-m", "pipeline.train", *args_for(synthetic_shards / "train",
                                                       synthetic_shards / "val", run, 3),
                     port_offset=0),
            cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    refusal = f"error: --output {run} is in use by another job: pid {os.getpid()}"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]  # each rank refused, exited
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


COLLECTIVE_SCRIPT = textwrap.dedent('''
    """Two ranks: the lock refused on the main one only, then a checkpoint write that
    fails on rank 1 only; both ranks must raise each time (and exit), none may hang."""
    import errno, os, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from pipeline import checkpoint as ckpt, train
    from pipeline.utils import PipelineError

    run_dir = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    report = open(Path(sys.argv[2]) / f"rank-{rank}.txt", "w")  # one file per rank: no
    say = lambda line: print(line, file=report, flush=True)     # interleaved lines
    try:
        train.take_run_lock(accelerator, run_dir, None)
        say("lock taken")
    except PipelineError as e:
        say(f"lock refused: {e}")

    if rank == 1:
        real = os.fsync
        def fsync(fd):
            if "rng-1" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "rng-1")
            return real(fd)
        os.fsync = fsync
    model = torch.nn.Linear(2, 2)
    parts = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    try:
        ckpt.save_checkpoint(accelerator, run_dir, ckpt.TrainerState(step=1), parts,
                             lambda folder: None, keep_last=2)
        say("saved")
    except OSError as e:
        say(f"save failed here: {e.strerror}")
    except PipelineError as e:
        say(f"save failed elsewhere: {e}")
    accelerator.end_training()
''')


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_refusals_and_failed_saves_reach_every_rank_under_torchrun(tmp_path):
    script = tmp_path / "collective.py"
    script.write_text(COLLECTIVE_SCRIPT)
    run = tmp_path / "run"
    with acquire(run / ".lock", f"--output {run}"):
        result = subprocess.run(torchrun(str(script), str(run), str(tmp_path), port_offset=200),
                                cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = ((tmp_path / f"rank-{r}.txt").read_text().splitlines() for r in (0, 1))
    assert len(main) == len(other) == 2
    assert main[0].startswith(f"lock refused: --output {run} is in use by another job: pid "
                              f"{os.getpid()}")
    assert other[0].startswith(f"lock refused: locking --output {run} failed in another process")
    assert main[1].startswith(f"save failed elsewhere: writing checkpoint {run}/checkpoints/"
                              f"step-1 failed in another process")
    assert other[1] == "save failed here: No space left on device"
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


# ---------------------------------------------------------------- full disk, damage

@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("relative, code", [("state/optimizer.safetensors", errno.ENOSPC),
                                            ("trainer.json", errno.ENOSPC),
                                            ("COMPLETE", errno.EROFS)])
def test_full_disk_while_checkpointing_ends_in_one_line(synthetic_shards, tmp_path, monkeypatch,
                                                        capsys, relative, code):
    """The step-4 save fails; step-2 (written before) stays whole and resumable."""
    run = tmp_path / "run"
    failed = fail_fsync_of(monkeypatch, relative, code, step=4)
    argv = args_for(synthetic_shards / "train", synthetic_shards / "val", run, 4,
                    "--ckpt-every", "2", "--keep-last", "5")
    assert run_stage(train.main, argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and os.strerror(code) in last and "re-run" in last
    assert failed and all(".step-4.tmp" in path for path in failed)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step-2")
    assert ckpt.resolve_resume("auto", run) == run / "checkpoints" / "step-2"
    assert json.loads((run / "model" / "config.json").read_text())["step"] == 2


def test_damaged_newest_checkpoint_auto_falls_back_explicit_refuses(run4, synthetic_shards,
                                                                    tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    damaged = run / "checkpoints" / "step-4" / "state" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    shards = (synthetic_shards / "train", synthetic_shards / "val")
    assert run_stage(train.main, args_for(*shards, run, 4, "--resume",
                                          str(run / "checkpoints" / "step-4"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --resume {run}/checkpoints/step-4: "
                                               f"state/model.safetensors has 1000 bytes")

    assert run_stage(train.main, args_for(*shards, run, 5, "--resume", "auto", "--log-every",
                                          "1", "--ckpt-every", "2", "--keep-last", "5")) == 0
    err = capsys.readouterr().err
    assert (f"--resume auto: skipping {run}/checkpoints/step-4: state/model.safetensors has "
            f"1000 bytes") in err
    assert [h["step"] for h in read_history(run)] == [0, 1, 2, 3, 4, 5]
    ckpt.verify_checkpoint(run / "checkpoints" / "step-4")  # rewritten when step 4 came again


def test_ae_run_resumes_although_an_irrelevant_codebook_size_changed(run4, synthetic_shards,
                                                                      tmp_path):
    """`--model.codebook_size` shapes no weight of an AE: resume continues the run (the
    model check compares only the fields that shape the weights)."""
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    shards = (synthetic_shards / "train", synthetic_shards / "val")
    assert train.main(args_for(*shards, run, 5, "--resume", "auto", "--log-every", "1",
                               "--model.codebook_size", "1024")) == 0
    assert [h["step"] for h in read_history(run)] == [0, 1, 2, 3, 4, 5]
    assert json.loads((run / "model" / "config.json").read_text())["step"] == 5


def test_previous_format_checkpoints_are_refused(run4, synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}" / "COMPLETE").write_text(f"step {step}\n")
    shards = (synthetic_shards / "train", synthetic_shards / "val")
    assert run_stage(train.main, args_for(*shards, run, 6, "--resume", "auto")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --resume auto: no checkpoint in ")
    assert "step-4: written by an earlier version of `pipeline train`" in last
    assert "cannot be resumed without unpickling" in last


# ---------------------------------------------------------------- epoch and loader options

def test_fractional_epoch_is_logged(run4):
    """Samples consumed over all ranks / samples per epoch (600 synthetic train samples,
    batch 16, one process)."""
    rows = [h for h in read_history(run4) if "train/loss" in h]
    assert [h["step"] for h in rows] == [1, 2, 3, 4]
    assert [h["train/epoch"] for h in rows] == [s * 16 / 600 for s in (1, 2, 3, 4)]


def test_sampling_options_reach_the_loader(synthetic_shards, tmp_path, monkeypatch):
    seen = []
    real = train_loop.make_loader

    def make_loader(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("mode", "sampling", "interleave")})
        return real(*args, **kwargs)

    monkeypatch.setattr(train_loop, "make_loader", make_loader)
    run = tmp_path / "run"
    assert train.main(args_for(synthetic_shards / "train", synthetic_shards / "val", run, 2,
                               "--data.sampling", "resampled", "--data.interleave", "2",
                               "--log-every", "1")) == 0
    assert {"mode": "train", "sampling": "resampled", "interleave": 2} in seen
    assert read_history(run)[-1]["train/epoch"] == 2 * 16 / 600
