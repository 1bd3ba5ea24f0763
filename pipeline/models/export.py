"""Model exports: `model.safetensors` + `config.json`, loadable without the trainer.

The same two files sit in `RUN_DIR/model/` (the export) and in every
`RUN_DIR/checkpoints/step-<N>/`, so `from_pretrained` takes either.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .. import __version__
from ..config import Config, ModelConfig, from_dict
from ..utils import PipelineError, atomic_write_bytes, atomic_write_json
from .autoencoder import AutoEncoder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Wrappers that prefix parameter names: DDP (`module.`) and torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 5


def unwrap(model: nn.Module) -> nn.Module:
    """The AutoEncoder inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """CPU, contiguous, wrapper prefixes stripped: what safetensors can store and reload."""
    state = {}
    for name, tensor in model.state_dict().items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        state[name] = tensor.detach().cpu().contiguous()
    return state


def save_pretrained(model: nn.Module, directory: str | os.PathLike, config: Config | dict,
                    step: int, weights: str = "raw", run_dir: str | os.PathLike | None = None
                    ) -> Path:
    """Write `model.safetensors`, then `config.json` (last, so its presence means the
    weights are complete). `weights` says whether these are the raw or the EMA weights."""
    if weights not in ("raw", "ema"):
        raise PipelineError(f"weights must be 'raw' or 'ema', got {weights!r}")
    directory = Path(directory)
    inner = unwrap(model)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(clean_state_dict(inner)))
    config_dict = config.to_dict() if isinstance(config, Config) else dict(config)
    atomic_write_json(directory / CONFIG_NAME, {
        "model": dataclasses.asdict(inner.config),
        "config": config_dict,
        "step": int(step),
        "weights": weights,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "run_name": Path(run_dir).name if run_dir is not None else None,
        "version": __version__,
    })
    return directory


def read_export_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of an export or `step-<N>/` directory."""
    path = _export_file(Path(directory), CONFIG_NAME)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise PipelineError(f"{path} has no 'model' section: not a model export config")
    return data


def from_pretrained(directory: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> AutoEncoder:
    """Rebuild the model of an export (or `step-<N>/`) directory, in eval mode."""
    from . import build_model  # the registry lives in the package __init__

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    model_cfg = from_dict(ModelConfig, read_export_config(directory)["model"],
                          where=f"{config_path}:model")
    weights_path = _export_file(directory, WEIGHTS_NAME)
    try:
        state = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"{weights_path} is not a readable safetensors file ({e}); "
                            f"re-export the model") from None
    model = build_model(model_cfg)
    _check_matches(model, state, config_path, weights_path)
    model.load_state_dict(state)
    return model.to(map_location).eval()


def _export_file(directory: Path, name: str) -> Path:
    if not directory.is_dir():
        raise PipelineError(f"model directory {directory} does not exist; pass an export "
                            f"(RUN_DIR/model) or a checkpoint (RUN_DIR/checkpoints/step-<N>)")
    path = directory / name
    if not path.is_file():
        raise PipelineError(f"{path} is missing: {directory} is not a complete model export "
                            f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    return path


def _check_matches(model: nn.Module, state: dict[str, Tensor], config_path: Path,
                   weights_path: Path) -> None:
    """A clear error instead of load_state_dict's when config and weights disagree."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{name}: config {expected[name]} vs weights {found[name]}"
                  for name in expected if name in found and expected[name] != found[name]]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_listed(mismatched)}")
    raise PipelineError(f"the config in {config_path} does not match the weights in "
                        f"{weights_path}: {'; '.join(problems)}")


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more
