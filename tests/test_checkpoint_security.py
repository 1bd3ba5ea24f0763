"""Resume never unpickles: a crafted pickle (unpickling it creates a marker file) dropped
under every name a checkpoint holds and every name Accelerate's save_state writes, one at
a time, as it is and with COMPLETE's hashes rewritten to match, never runs; `--resume
auto` falls back to the older checkpoint (or refuses), and the loaders themselves refuse
the file or never read it."""
from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline import train
from pipeline.config import Config
from pipeline.models import build_model
from pipeline.tracking import read_history
from pipeline.utils import PipelineError, sha256_file

# Every file name Accelerate's save_state / register_for_checkpointing would write.
ACCELERATE_NAMES = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
                    "random_states_1.pkl", "optimizer.bin", "optimizer_1.bin", "scheduler.bin",
                    "sampler.bin", "dl_state_dict.bin", "scaler.pt", "model.safetensors",
                    "model_1.safetensors", "pytorch_model.bin", "pytorch_model_1.bin"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def args_for(shards: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", "debug", "--model", "ae", "--train-shards", str(shards / "train"),
            "--val-shards", str(shards / "val"), "--output", str(output),
            "--max-steps", str(steps), "--ema", "true", "--ckpt-every", "2", "--keep-last", "5",
            "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def ema_run(synthetic_shards, tmp_path_factory):
    """A debug AE with weight EMA: checkpoints step-2 and step-4."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("security") / "run"
    assert train.main(args_for(synthetic_shards, run, 4)) == 0
    return run


class Plant:
    """Unpickling this creates `marker` (builtins.open in write mode)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(marker: Path, kind: str) -> bytes:
    """A torch.save file (what Accelerate writes) or a bare pickle, both hostile."""
    if kind == "pickle":
        return pickle.dumps(Plant(marker))
    path = marker.with_name("crafted.pt")
    torch.save({"state": Plant(marker)}, path)
    return path.read_bytes()


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path):
    """The premise of this module: the payload is live (torch.load without weights_only)."""
    marker = tmp_path / "marker-torch"
    (tmp_path / "payload").write_bytes(crafted(marker, "torch"))
    torch.load(tmp_path / "payload", weights_only=False)
    assert marker.exists()
    marker = tmp_path / "marker-pickle"
    pickle.loads(crafted(marker, "pickle"))
    assert marker.exists()


def drop_sites(checkpoint: Path) -> list[str]:
    """Every file of the checkpoint, COMPLETE included, and every Accelerate name both in
    state/ (where save_state wrote them) and beside the export."""
    own = [p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()]
    foreign = [f"state/{n}" for n in ACCELERATE_NAMES] + ACCELERATE_NAMES
    return sorted(set(own + foreign))


def rewrite_hashes(checkpoint: Path, name: str) -> None:
    """Make COMPLETE agree with the planted file, as an attacker who can write it would."""
    record = json.loads((checkpoint / "COMPLETE").read_text())
    path = checkpoint / name
    record["files"][name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (checkpoint / "COMPLETE").write_text(json.dumps(record))


def live_parts() -> dict:
    """What the trainer would load into: the debug AE, AdamW and the EMA copy."""
    args = train.build_parser().parse_args(["--config", "debug", "--model", "ae"])
    model = build_model(train.resolve_config(args).model)
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters()),
            "ema": copy.deepcopy(model)}


def exercise_loaders(checkpoint: Path) -> None:
    """Every reader of the resume path, straight on the (tampered) checkpoint."""
    accelerator = SimpleNamespace(process_index=0, step=0, scaler=None)
    readers = [lambda: ckpt.load_checkpoint(accelerator, checkpoint, live_parts()),
               lambda: ckpt.TrainerState.read(checkpoint),
               lambda: ckpt.check_model_matches(checkpoint, Config().model)]
    for read in readers:
        try:
            read()
        except PipelineError:
            pass  # a clear refusal is fine; running the payload is not


@pytest.mark.parametrize("rewrite", [False, True], ids=["as-dropped", "hashes-rewritten"])
@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_no_planted_pickle_ever_runs_on_resume(ema_run, tmp_path, kind, rewrite):
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    newest = run / "checkpoints" / "step-4"
    pristine = {p: p.read_bytes() for p in newest.rglob("*") if p.is_file()}
    marker = tmp_path / "marker"
    payload = crafted(marker, kind)
    for name in drop_sites(newest):
        target = newest / name
        target.write_bytes(payload)
        if rewrite and name != "COMPLETE":
            rewrite_hashes(newest, name)
        notes = []
        try:
            chosen = ckpt.resolve_resume("auto", run, note=notes.append)
        except PipelineError as error:
            chosen, refusal = None, str(error)
            assert "step-4" in refusal, refusal
        if chosen is not None:
            assert chosen == run / "checkpoints" / "step-2", name  # fell back...
            assert len(notes) == 1 and "skipping" in notes[0] and "step-4" in notes[0], name
        exercise_loaders(newest)
        assert not marker.exists(), f"unpickled {name}"
        # Put the checkpoint back as it was for the next name.
        for path in [p for p in newest.rglob("*") if p.is_file() and p not in pristine]:
            path.unlink()
        for path, data in pristine.items():
            path.write_bytes(data)
    ckpt.verify_checkpoint(newest)


def test_planted_files_end_to_end_fall_back_and_train(ema_run, synthetic_shards, tmp_path,
                                                      capsys):
    """`pipeline train --resume auto` with Accelerate's EMA pickle planted in the newest
    checkpoint (where save_state put it, and load_state read it with weights_only=False):
    skipped with a message, the run continues from step-2."""
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    marker = tmp_path / "marker"
    newest = run / "checkpoints" / "step-4"
    (newest / "state" / "custom_checkpoint_0.pkl").write_bytes(crafted(marker, "torch"))
    assert train.main(args_for(synthetic_shards, run, 5, "--resume", "auto")) == 0
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "skipping" in err and "custom_checkpoint_0.pkl" in err
    steps = [h["step"] for h in read_history(run)]
    assert steps == [0, 1, 2, 3, 4, 5]  # 3, 4 redone after the fallback to step-2


def test_resume_path_calls_no_unpickler(ema_run, synthetic_shards, tmp_path, monkeypatch):
    """A whole resume with torch.load and pickle's loaders booby-trapped: nothing on the
    path reaches them."""
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)

    def trap(*args, **kwargs):
        raise AssertionError("the resume path unpickled something")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"),
                        (pickle, "loads")):
        monkeypatch.setattr(owner, name, trap)
    assert train.main(args_for(synthetic_shards, run, 5, "--resume", "auto")) == 0
    monkeypatch.undo()
    trainer = json.loads((run / "checkpoints" / "step-5" / "trainer.json").read_text())
    assert trainer["step"] == 5
