"""pipeline.checkpoint without the trainer: exact round trips of every piece of state
(optimizers, RNG, loss scaler, weights), verification against COMPLETE, `--resume`
resolution with fallback, and atomic saves that leave nothing behind on a full disk."""
from __future__ import annotations

import collections
import copy
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.config import Config, ModelConfig, weight_fields
from pipeline.models import build_model, save_pretrained
from pipeline.utils import PipelineError, sha256_file

SMALL = ModelConfig(widths=[4, 8], latent_channels=8)


def fake_accelerator(scaler=None, step: int = 0, rank: int = 0, world: int = 1):
    """What pipeline.checkpoint uses of an Accelerator, for one process."""
    return SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=world,
                           device=torch.device("cpu"), step=step, scaler=scaler,
                           reduce=lambda tensor, reduction: tensor)


def small_parts(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model(x).recon.sub(x).abs().mean().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "ema": copy.deepcopy(model)}


def save_small(run_dir: Path, step: int, parts: dict | None = None) -> Path:
    parts = parts or small_parts(step)
    export = lambda folder: save_pretrained(parts["model"], folder, Config(model=SMALL), step)
    state = ckpt.TrainerState(step=step, batches_consumed=2 * step, wandb_run_id="ab12cd34")
    return ckpt.save_checkpoint(fake_accelerator(step=2 * step), run_dir, state, parts, export,
                                keep_last=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with checkpoints step-2 and step-4 (model, optimizer, EMA)."""
    run_dir = tmp_path_factory.mktemp("run")
    save_small(run_dir, 2)
    save_small(run_dir, 4)
    return run_dir


def copy_run(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- exact round trips

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.5, 0.9)),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p),
    "asgd": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for x, y in zip(a["param_groups"], b["param_groups"]):
        assert {k: type(v) for k, v in x.items()} == {k: type(v) for k, v in y.items()}
    assert sorted(a["state"]) == sorted(b["state"])
    for param_id, values in a["state"].items():
        other = b["state"][param_id]
        assert sorted(values) == sorted(other)
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == other[key].dtype and torch.equal(value, other[key]), key
            else:
                assert value == other[key] and type(value) is type(other[key]), key


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(OPTIMIZERS)),
       shapes=st.lists(st.lists(st.integers(1, 4), max_size=3), min_size=1, max_size=4),
       steps=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_optimizer_state_round_trips_exactly(name, shapes, steps, seed):
    """Any optimizer whose state holds tensors and JSON scalars: saved to safetensors +
    JSON and loaded into a fresh one, the state is identical and the next step too."""
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(steps + 1)]
    optimizer = OPTIMIZERS[name](params)
    for step_grads in grads[:steps]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = OPTIMIZERS[name](twins)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "state").mkdir()
        ckpt.write_part(Path(folder) / "state", "optimizer", optimizer)
        ckpt.load_optimizer(Path(folder), "optimizer", fresh)
    assert_same_state(optimizer.state_dict(), fresh.state_dict())
    for group, params_of in ((optimizer, params), (fresh, twins)):
        for p, g in zip(params_of, grads[-1]):
            p.grad = g.clone()
        group.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


def test_optimizer_state_that_json_cannot_hold_is_refused(tmp_path):
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    optimizer.state[param]["history"] = [torch.ones(1)]  # a list of tensors: not supported
    with pytest.raises(TypeError, match="'history' holds a list|only tensors and JSON"):
        ckpt.write_part(tmp_path, "optimizer", optimizer)


def draws() -> tuple:
    return (torch.rand(5).tolist(), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), warm=st.integers(0, 3), rank=st.integers(0, 7))
def test_rng_state_round_trips_exactly(seed, warm, rank):
    """torch, numpy (also a cached Gaussian) and `random` (also gauss_next) continue with
    the very numbers they would have drawn."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    for _ in range(warm):  # odd counts leave a cached Gaussian in numpy and in random
        np.random.randn(1)
        random.gauss(0, 1)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "state").mkdir()
        ckpt.write_rng(Path(folder) / "state", rank)
        expected = draws()
        torch.manual_seed(seed + 1)
        np.random.seed(seed // 2)
        random.seed(seed + 3)
        assert ckpt.load_rng(Path(folder), rank)
        assert draws() == expected
        assert not ckpt.load_rng(Path(folder), rank + 1)  # no state for that rank


def test_scaler_and_accelerator_step_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.load_state_dict({"scale": 2.0**7, "growth_factor": 3.0, "backoff_factor": 0.25,
                            "growth_interval": 11, "_growth_tracker": 5})
    (tmp_path / "state").mkdir()
    ckpt.write_state(fake_accelerator(scaler=scaler, step=14), tmp_path / "state", {})
    fresh = torch.amp.GradScaler("cpu")
    accelerator = fake_accelerator(scaler=fresh, step=0)
    ckpt.load_accelerator_state(tmp_path, accelerator)
    assert accelerator.step == 14
    assert fresh.state_dict() == scaler.state_dict()
    record = json.loads((tmp_path / "state" / "accelerator.json").read_text())
    record["scaler"]["scale"] = "big"
    (tmp_path / "state" / "accelerator.json").write_text(json.dumps(record))
    with pytest.raises(ckpt.CheckpointError, match="scaler state needs numbers"):
        ckpt.load_accelerator_state(tmp_path, fake_accelerator(scaler=torch.amp.GradScaler("cpu")))


def test_checkpoint_restores_every_part(saved):
    parts = small_parts(seed=99)  # other weights and optimizer state
    accelerator = fake_accelerator()
    ckpt.load_checkpoint(accelerator, saved / "checkpoints" / "step-4", parts)
    original = small_parts(seed=4)
    for name in ("model", "ema"):
        a, b = parts[name].state_dict(), original[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_state(parts["optimizer"].state_dict(), original["optimizer"].state_dict())
    assert accelerator.step == 8
    assert ckpt.TrainerState.read(saved / "checkpoints" / "step-4") == ckpt.TrainerState(
        step=4, batches_consumed=8, wandb_run_id="ab12cd34")


def test_a_part_the_checkpoint_lacks_is_named(saved):
    parts = small_parts()
    parts["disc"] = nn.Linear(2, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"state/disc\.safetensors is missing"):
        ckpt.load_checkpoint(fake_accelerator(), saved / "checkpoints" / "step-4", parts)


def test_layout_is_safetensors_and_json_only(saved):
    folder = saved / "checkpoints" / "step-4"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == ["COMPLETE", "config.json", "model.safetensors", "state/accelerator.json",
                     "state/ema.safetensors", "state/model.safetensors", "state/optimizer.json",
                     "state/optimizer.safetensors", "state/rng-0.json", "state/rng-0.safetensors",
                     "trainer.json"]
    record = json.loads((folder / "COMPLETE").read_text())
    assert record["format"] == 2 and record["step"] == 4 and record["world_size"] == 1
    assert sorted(record["files"]) == [n for n in names if n != "COMPLETE"]
    for name, entry in record["files"].items():
        assert entry == {"size": (folder / name).stat().st_size,
                         "sha256": sha256_file(folder / name)}


# ---------------------------------------------------------------- verification

def file_names(checkpoint: Path) -> list[str]:
    return sorted(json.loads((checkpoint / "COMPLETE").read_text())["files"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_any_file_is_named(saved, data):
    """Truncated, extended, one byte changed, or deleted: whichever file and wherever,
    verification refuses the checkpoint naming that file."""
    checkpoint = saved / "checkpoints" / "step-4"
    name = data.draw(st.sampled_from(file_names(checkpoint)), label="file")
    path = checkpoint / name
    original = path.read_bytes()
    damage = data.draw(st.sampled_from(["truncate", "extend", "flip", "delete"]), label="damage")
    try:
        if damage == "truncate":
            path.write_bytes(original[:data.draw(st.integers(0, len(original) - 1))])
        elif damage == "extend":
            path.write_bytes(original + data.draw(st.binary(min_size=1, max_size=64)))
        elif damage == "flip":
            at = data.draw(st.integers(0, len(original) - 1))
            bit = data.draw(st.integers(0, 7))
            path.write_bytes(original[:at] + bytes([original[at] ^ (1 << bit)]) + original[at + 1:])
        else:
            path.unlink()
        with pytest.raises(ckpt.CheckpointError) as error:
            ckpt.verify_checkpoint(checkpoint)
        assert error.value.reason.startswith(name), error.value.reason
    finally:
        path.write_bytes(original)
    ckpt.verify_checkpoint(checkpoint)


def rewrite_record(checkpoint: Path, change) -> None:
    record = json.loads((checkpoint / "COMPLETE").read_text())
    change(record)
    (checkpoint / "COMPLETE").write_text(json.dumps(record))


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "state/optimizer.bin",
                                  "state/random_states_0.pkl", "state/../trainer.json",
                                  "state/sub/x.json", ".hidden.json"])
def test_names_in_complete_are_data(saved, tmp_path, name):
    """COMPLETE can only name files of this layout: no path outside, no pickle name."""
    run = copy_run(saved, tmp_path)
    checkpoint = run / "checkpoints" / "step-4"
    rewrite_record(checkpoint, lambda r: r["files"].update({name: {"size": 0,
                                                                   "sha256": "0" * 64}}))
    with pytest.raises(ckpt.CheckpointError, match="not a file this trainer writes"):
        ckpt.verify_checkpoint(checkpoint)


def test_unrecorded_file_and_symlink_are_refused(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    checkpoint = run / "checkpoints" / "step-4"
    (checkpoint / "state" / "scheduler.bin").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match=r"state/scheduler\.bin is not recorded"):
        ckpt.verify_checkpoint(checkpoint)
    (checkpoint / "state" / "scheduler.bin").unlink()
    target = tmp_path / "elsewhere.json"
    shutil.move(checkpoint / "state" / "optimizer.json", target)
    (checkpoint / "state" / "optimizer.json").symlink_to(target)  # same bytes, same hash
    with pytest.raises(ckpt.CheckpointError, match=r"state/optimizer\.json is missing \(or not "
                                                   r"a plain file\)"):
        ckpt.verify_checkpoint(checkpoint)


def test_record_must_match_its_folder_and_list_the_core_files(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    checkpoint = run / "checkpoints" / "step-4"
    rewrite_record(checkpoint, lambda r: r.update(step=5))
    with pytest.raises(ckpt.CheckpointError, match="records step 5, but the folder is step-4"):
        ckpt.verify_checkpoint(checkpoint)
    rewrite_record(checkpoint, lambda r: (r.update(step=4), r["files"].pop("trainer.json")))
    with pytest.raises(ckpt.CheckpointError, match="does not list trainer.json"):
        ckpt.verify_checkpoint(checkpoint)


def test_trainer_state_and_rng_files_must_agree_with_complete(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    checkpoint = run / "checkpoints" / "step-4"
    rewrite_record(checkpoint, lambda r: r.update(world_size=2))  # rank 1's RNG is not there
    with pytest.raises(ckpt.CheckpointError, match=r"does not list state/rng-1\.safetensors, "
                                                   r"state/rng-1\.json"):
        ckpt.verify_checkpoint(checkpoint)
    rewrite_record(checkpoint, lambda r: r.update(world_size=1))
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    (checkpoint / "trainer.json").write_text(json.dumps({**trainer, "step": 3}))
    rewrite_record(checkpoint, lambda r: r["files"].update({"trainer.json": {
        "size": (checkpoint / "trainer.json").stat().st_size,
        "sha256": sha256_file(checkpoint / "trainer.json")}}))
    ckpt.verify_checkpoint(checkpoint)  # the files themselves are intact
    with pytest.raises(PipelineError, match=r"trainer\.json is at step 3, COMPLETE at step 4"):
        ckpt.resolve_resume(str(checkpoint), run)


@pytest.mark.parametrize("field, value, message", [
    ("step", -1, "step must be an integer >= 0"),
    ("batches_consumed", True, "batches_consumed must be an integer >= 0"),
    ("nonfinite_skipped", 1.5, "nonfinite_skipped must be an integer >= 0"),
    ("wandb_run_id", "../../elsewhere", "is not a W&B run id"),
    ("wandb_run_id", 7, "is not a W&B run id"),
])
def test_trainer_state_values_are_checked(tmp_path, field, value, message):
    data = {"step": 3, "batches_consumed": 3, "wandb_run_id": None, "nonfinite_skipped": 0}
    (tmp_path / "trainer.json").write_text(json.dumps({**data, field: value}))
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.TrainerState.read(tmp_path)


# ---------------------------------------------------------------- --resume

def test_auto_resume_falls_back_to_newest_that_verifies(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    damaged = run / "checkpoints" / "step-4" / "state" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    notes = []
    assert ckpt.resolve_resume("auto", run, note=notes.append) == run / "checkpoints" / "step-2"
    assert len(notes) == 1
    assert "skipping" in notes[0] and "step-4" in notes[0]
    assert "state/optimizer.safetensors has 100 bytes" in notes[0]

    with pytest.raises(PipelineError, match=r"--resume .*step-4: state/optimizer\.safetensors "
                                            r"has 100 bytes.*truncated"):
        ckpt.resolve_resume(str(run / "checkpoints" / "step-4"), run)

    (run / "checkpoints" / "step-2" / "trainer.json").write_text("{")
    notes.clear()
    with pytest.raises(PipelineError, match=r"no checkpoint in .* can be resumed \(step-4: .*; "
                                            r"step-2: .*trainer\.json"):
        ckpt.resolve_resume("auto", run, note=notes.append)
    assert [n.split(":")[0] for n in notes] == ["--resume auto"] * 2


def changed(value):
    """Another value of the same type (the model check compares values, it validates none)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return type(value)([*value, value[-1]] if isinstance(value, list) else [v + 1 for v in value])


# The fields that pick the model's parts are left alone: with them, the parts (and so the
# fields that shape the weights) would change too.
KIND_FIELDS = ("model", "arch", "quantizer")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.sets(st.sampled_from([f.name for f in dataclasses.fields(ModelConfig)
                                       if f.name not in KIND_FIELDS])))
def test_model_check_compares_only_the_fields_that_shape_the_weights(saved, chosen):
    """An AE checkpoint resumes with any change to fields its network does not use
    (codebook size, FSQ levels, resnet widths...) and is refused, naming exactly the
    changed fields, when one that shapes its weights differs."""
    checkpoint = saved / "checkpoints" / "step-4"
    run_cfg = dataclasses.replace(SMALL, **{name: changed(getattr(SMALL, name))
                                            for name in chosen})
    shaping = [name for name in weight_fields(SMALL) if name in chosen]
    if not shaping:
        ckpt.check_model_matches(checkpoint, run_cfg)
        return
    with pytest.raises(PipelineError, match="cannot resume from") as refused:
        ckpt.check_model_matches(checkpoint, run_cfg)
    named = re.findall(r"model\.(\w+): checkpoint", str(refused.value))
    assert collections.Counter(named) == collections.Counter(shaping)


def make_legacy_checkpoint(run: Path, step: int) -> Path:
    """What the previous trainer wrote: Accelerate's pickled state, COMPLETE 'step N'."""
    folder = run / "checkpoints" / f"step-{step}"
    (folder / "state").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "scaler.pt",
                 "custom_checkpoint_0.pkl"):
        (folder / "state" / name).write_bytes(b"legacy")
    for name in ("model.safetensors", "config.json", "trainer.json"):
        (folder / name).write_text("{}")
    (folder / "COMPLETE").write_text(f"step {step}\n")
    return folder


def test_previous_format_is_refused_with_a_clear_message(tmp_path):
    legacy = make_legacy_checkpoint(tmp_path, 6)
    with pytest.raises(PipelineError, match=r"earlier version of `pipeline train`.*cannot be "
                                            r"resumed without unpickling.*new --output"):
        ckpt.resolve_resume(str(legacy), tmp_path)
    with pytest.raises(PipelineError, match=r"no checkpoint .* can be resumed \(step-6: "
                                            r"written by an earlier version"):
        ckpt.resolve_resume("auto", tmp_path, note=lambda _line: None)


# ---------------------------------------------------------------- full disk while saving

def fail_fsync_of(monkeypatch, relative: str, code: int = errno.ENOSPC,
                  step: int | None = None) -> list[str]:
    """Make os.fsync fail for the temporary file of `relative` inside the checkpoint being
    written (of `step`, or any), as a full disk (or a read-only mount) would; returns the
    paths it failed."""
    real, failed = os.fsync, []
    depth = relative.count("/") + 1  # folders between the temporary checkpoint and the file
    folder = re.compile(rf"^\.step-{step if step is not None else '[0-9]+'}\.tmp$")

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        top = path.parents[depth - 1]
        inside = folder.match(top.name) is not None
        written = path.parent / path.name.split(".tmp-")[0][1:]  # .NAME.tmp-PID -> NAME
        if inside and written.relative_to(top).as_posix() == relative:
            failed.append(str(path))
            raise OSError(code, os.strerror(code), str(path))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("relative", ["state/model.safetensors", "state/optimizer.safetensors",
                                      "state/optimizer.json", "state/ema.safetensors",
                                      "state/accelerator.json", "state/rng-0.safetensors",
                                      "state/rng-0.json", "model.safetensors", "config.json",
                                      "trainer.json", "COMPLETE"])
def test_full_disk_while_saving_leaves_no_partial_checkpoint(saved, tmp_path, monkeypatch,
                                                             relative):
    run = copy_run(saved, tmp_path)
    before = {p: p.read_bytes() for p in (run / "model").iterdir()}
    failed = fail_fsync_of(monkeypatch, relative)
    with pytest.raises(OSError) as error:
        save_small(run, 6)
    assert error.value.errno == errno.ENOSPC and failed
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    for step in (2, 4):
        ckpt.verify_checkpoint(run / "checkpoints" / f"step-{step}")
    assert {p: p.read_bytes() for p in (run / "model").iterdir()} == before
    assert ckpt.resolve_resume("auto", run) == run / "checkpoints" / "step-4"
