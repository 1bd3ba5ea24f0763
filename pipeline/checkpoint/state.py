"""The trainer's state as safetensors + JSON, and back: module weights, optimizer state,
the accelerator's micro-step counter and fp16 loss scaler, each rank's RNG, trainer.json.

Nothing here unpickles: tensors go to safetensors, everything else to exact JSON. Every
reader raises `CheckpointError` naming the file that does not fit this run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..layout import STATE_SUBDIR, TRAINER_STATE_NAME
from ..utils import PipelineError, atomic_write_bytes, atomic_write_text

ACCELERATOR_STATE_NAME = "accelerator.json"
_PART_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_WANDB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# What a checkpoint stores of a trainer object: a module's weights, or an optimizer's state.
Part = nn.Module | torch.optim.Optimizer


class CheckpointError(PipelineError):
    """A checkpoint that must not be trusted; `reason` says why in one line."""

    def __init__(self, checkpoint: Path, reason: str):
        super().__init__(f"checkpoint {checkpoint}: {reason}")
        self.checkpoint, self.reason = checkpoint, reason


@dataclass
class TrainerState:
    """What the loop needs besides weights, optimizer and RNG to continue exactly."""
    step: int = 0                   # optimizer steps done (skipped non-finite steps count)
    batches_consumed: int = 0       # batches each rank has drawn from the train stream
    wandb_run_id: str | None = None
    nonfinite_skipped: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainerState":
        """The checkpoint's trainer.json, every value checked (it names a W&B run folder)."""
        data = read_json_object(checkpoint, TRAINER_STATE_NAME)
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        counts = {"step": state.step, "batches_consumed": state.batches_consumed,
                  "nonfinite_skipped": state.nonfinite_skipped}
        for name, value in counts.items():
            if not is_count(value):
                raise CheckpointError(checkpoint, f"{TRAINER_STATE_NAME}: {name} must be an "
                                                  f"integer >= 0, got {value!r}")
        run_id = state.wandb_run_id
        if run_id is not None and not (isinstance(run_id, str) and _WANDB_ID.match(run_id)):
            raise CheckpointError(checkpoint, f"{TRAINER_STATE_NAME}: wandb_run_id {run_id!r} "
                                              f"is not a W&B run id (letters, digits, - and _)")
        return state


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json_object(checkpoint: Path, name: str) -> dict[str, Any]:
    """`checkpoint/name` as a JSON object, or a CheckpointError naming the file."""
    path = checkpoint / name
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(checkpoint, f"cannot read {name}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(checkpoint, f"{name} is not a JSON object")
    return data


def write_exact_json(path: Path, obj: Any) -> None:
    # Exact, not strict: state must come back bit for bit, so a non-finite float stays
    # what it is (Python's json reads its NaN/Infinity back) instead of becoming null.
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def note_on_main(message: str) -> None:
    """One line on stderr from the main process only: preflight runs in every rank, before
    Accelerate exists, so the rank comes from the launcher's environment."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- writing

def write_state(accelerator, folder: Path, parts: dict[str, Part]) -> None:
    """This rank's share of `state/`: its RNG; the main process also every part of the
    table and the accelerator state."""
    if accelerator.is_main_process:
        for name, part in parts.items():
            write_part(folder, name, part)
        scaler = accelerator.scaler
        write_exact_json(folder / ACCELERATOR_STATE_NAME,
                         {"step": accelerator.step,
                          "scaler": scaler.state_dict() if scaler is not None else None})
    write_rng(folder, accelerator.process_index)


def write_part(folder: Path, name: str, part: Part) -> None:
    if not _PART_NAME.match(name) or name == "accelerator":
        raise ValueError(f"checkpoint part name {name!r}: lowercase letters, digits and _")
    if isinstance(part, torch.optim.Optimizer):
        tensors, layout = optimizer_state(part)
        write_tensors(folder / f"{name}.safetensors", tensors)
        write_exact_json(folder / f"{name}.json", layout)
    elif isinstance(part, nn.Module):
        write_tensors(folder / f"{name}.safetensors", part.state_dict())
    else:
        raise TypeError(f"checkpoint part {name!r} is a {type(part).__name__}, neither a "
                        f"module nor an optimizer")


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # A fresh contiguous CPU copy of each: safetensors refuses tensors that share memory.
    atomic_write_bytes(path, save({k: v.detach().to("cpu", memory_format=torch.contiguous_format,
                                                    copy=True) for k, v in tensors.items()}))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state_dict as (tensors, JSON layout): per-parameter tensors go to
    safetensors, everything else (param_groups, scalar state values) to JSON."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {"param_groups": _json_only(state_dict["param_groups"],
                                                         "param_groups"),
                              "tensors": {}, "values": {}}
    for param_id, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensor_name = f"{param_id}.{len(tensors)}"
                tensors[tensor_name] = value
                layout["tensors"].setdefault(str(param_id), {})[key] = tensor_name
            else:
                layout["values"].setdefault(str(param_id), {})[key] = _json_only(value, key)
    return tensors, layout


def _json_only(value: Any, where: str) -> Any:
    """`value` if JSON holds it exactly (tuples become lists); else a clear error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_only(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_only(v, where) for k, v in value.items()}
    raise TypeError(f"optimizer state {where!r} holds a {type(value).__name__}: only tensors "
                    f"and JSON values are saved (without pickle)")


def write_rng(folder: Path, rank: int) -> None:
    """This rank's generators: torch CPU and CUDA as uint8 tensors, numpy and `random` as
    JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    write_tensors(folder / f"rng-{rank}.safetensors", tensors)
    write_exact_json(folder / f"rng-{rank}.json", {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}})


# ---------------------------------------------------------------- reading

def load_checkpoint(accelerator, checkpoint: Path, parts: dict[str, Part]) -> None:
    """Restore every part of the table, the accelerator state and this rank's RNG from a
    checkpoint `verify_checkpoint` accepted. Raises CheckpointError naming the file that
    does not fit (wrong keys or shapes, a part this run has and the checkpoint lacks)."""
    checkpoint = Path(checkpoint)
    for name, part in parts.items():
        if isinstance(part, torch.optim.Optimizer):
            load_optimizer(checkpoint, name, part)
        else:
            load_module(checkpoint, name, part)
    load_accelerator_state(checkpoint, accelerator)
    load_rng(checkpoint, accelerator.process_index)


def _load_tensors(checkpoint: Path, name: str, what: str) -> dict[str, Tensor]:
    path = checkpoint / STATE_SUBDIR / name
    if not path.is_file():
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name} is missing: this run has "
                                          f"{what} but the checkpoint does not (resume with the "
                                          f"options it was trained with, e.g. --ema)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name} is not a safetensors file "
                                          f"({e})") from None


def load_module(checkpoint: Path, name: str, module: nn.Module) -> None:
    tensors = _load_tensors(checkpoint, f"{name}.safetensors", f"a {name!r} module")
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        first = str(e).strip().splitlines()[:2]
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name}.safetensors does not fit this "
                                          f"run's {name}: {' '.join(first)}") from None


def load_optimizer(checkpoint: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
    tensors = _load_tensors(checkpoint, f"{name}.safetensors", f"an optimizer {name!r}")
    layout = read_json_object(checkpoint, f"{STATE_SUBDIR}/{name}.json")
    try:
        state_dict = optimizer_state_dict(layout, tensors, optimizer)
        optimizer.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name}.json / .safetensors do not "
                                          f"fit this run's optimizer: {e!r}") from None


def optimizer_state_dict(layout: dict, tensors: dict[str, Tensor],
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of `optimizer_state`: a state_dict for `optimizer.load_state_dict`.
    Lists in param_groups become tuples where the live optimizer holds tuples (betas)."""
    state: dict[int, dict[str, Any]] = {}
    for param_id, names in layout["tensors"].items():
        state.setdefault(int(param_id), {}).update(
            {key: tensors[tensor_name] for key, tensor_name in names.items()})
    for param_id, values in layout["values"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = layout["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(optimizer.param_groups)} parameter groups expected")
    restored = []
    for saved, live in zip(groups, optimizer.param_groups):
        restored.append({key: tuple(value) if isinstance(live.get(key), tuple)
                         and isinstance(value, list) else value
                         for key, value in dict(saved).items()})
    return {"state": state, "param_groups": restored}


def load_accelerator_state(checkpoint: Path, accelerator) -> None:
    data = read_json_object(checkpoint, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}")
    step, scaler_state = data.get("step"), data.get("scaler")
    if not is_count(step):
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}: step must "
                                          f"be an integer >= 0, got {step!r}")
    accelerator.step = step  # the micro-step counter that decides when gradients sync
    scaler = accelerator.scaler
    if scaler is None or scaler_state is None:
        if scaler is not None:
            note_on_main(f"{checkpoint} has no fp16 loss-scaler state (it was not trained "
                         f"with fp16): the scaler starts afresh")
        return
    expected = set(scaler.state_dict())
    if (not isinstance(scaler_state, dict) or set(scaler_state) != expected
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in scaler_state.values())):
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}: the scaler "
                                          f"state needs numbers for {', '.join(sorted(expected))}")
    scaler.load_state_dict(scaler_state)


def load_rng(checkpoint: Path, rank: int) -> bool:
    """Restore this rank's generators; False when the checkpoint has none for this rank
    (it was written by fewer processes: the caller says resume is then not exact)."""
    if not (checkpoint / STATE_SUBDIR / f"rng-{rank}.json").is_file():
        return False
    tensors = _load_tensors(checkpoint, f"rng-{rank}.safetensors", "a random state")
    data = read_json_object(checkpoint, f"{STATE_SUBDIR}/rng-{rank}.json")
    try:
        python, numpy_state = data["python"], data["numpy"]
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"cuda.{i}" in tensors:
                    torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], np.uint32),
                             numpy_state["pos"], numpy_state["has_gauss"],
                             numpy_state["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/rng-{rank}.json / .safetensors: not a "
                                          f"random state ({e!r})") from None
    return True
