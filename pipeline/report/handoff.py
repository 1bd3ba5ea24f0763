"""The report's "Hand-off" section: where the latents of `pipeline encode` and the exports
of `pipeline export` are, what they hold, and how the next stage loads them.

`pipeline report ... --latents SPLIT_DIR --export DIR` (each repeatable) reads their
`manifest.json` / `export.json`. Those files are data (maybe from another machine, maybe
crafted): every value shown is checked for its type here, and a file that is missing or
not what its stage writes raises a PipelineError naming it and the option.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layout import EXPORT_RECORD_NAME, LATENT_FORMAT
from ..shards import MANIFEST_NAME
from ..utils import PipelineError, read_json
from .document import MISSING, Block, Code, Section, Table, Text


# What a latent diffusion trainer runs on the hand-off (VAE moments + an AutoencoderKL);
# the README shows the same lines, and the demo's test runs them on the demo's outputs.
LOADING_EXAMPLE = '''\
import torch
from diffusers import AutoencoderKL
from pipeline.data import make_train_loader, sample_moments

vae = AutoencoderKL.from_pretrained("{export}").eval()     # decodes the samples
loader = make_train_loader("{latents}", batch_size=64, num_workers=2, seed=0)
shift, scale = loader.manifest["shift_factor"], loader.manifest["scaling_factor"]
moments, labels, keys = next(iter(loader))                 # float16 B x 2C x h x w
z = (sample_moments(moments) - shift) * scale              # what the diffusion model learns
with torch.no_grad():
    images = vae.decode(z / scale + shift).sample          # B x 3 x 64 x 64, about [-1, 1]
'''


@dataclass(frozen=True)
class LatentSet:
    path: Path
    kind: str
    shape: tuple[int, ...]
    dtype: str
    num_samples: int
    scaling_factor: float | None
    shift_factor: float | None
    checkpoint: str
    step: int | None


@dataclass(frozen=True)
class Export:
    path: Path
    class_name: str
    scaling_factor: float
    shift_factor: float | None
    checkpoint: str
    step: int | None
    largest_difference: float | None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _checkpoint_of(record: dict[str, Any]) -> tuple[str, int | None]:
    checkpoint = record.get("checkpoint")
    if not isinstance(checkpoint, dict):
        return MISSING, None
    path = checkpoint.get("path")
    return (path if isinstance(path, str) else MISSING), _integer(checkpoint.get("step"))


def read_latent_set(path: str) -> LatentSet:
    """The summary of a split directory written by `pipeline encode` (--latents)."""
    split = Path(path)
    manifest_path = split / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PipelineError(f"--latents {path}: no {MANIFEST_NAME} in it; pass the split "
                            f"directory `pipeline encode` wrote (OUTPUT/<split>)")
    manifest = read_json(manifest_path, "latent shard manifest", "re-run `pipeline encode`")
    if not isinstance(manifest, dict) or manifest.get("format") != LATENT_FORMAT:
        raise PipelineError(f"--latents {path}: {manifest_path} is not a manifest of "
                            f"`pipeline encode` (format {LATENT_FORMAT})")
    section = manifest.get("latent")
    section = section if isinstance(section, dict) else {}
    kind, shape, dtype = section.get("kind"), section.get("shape"), section.get("dtype")
    if not (isinstance(kind, str) and isinstance(dtype, str) and isinstance(shape, list)
            and shape and all(_integer(d) is not None and d > 0 for d in shape)):
        raise PipelineError(f"--latents {path}: {manifest_path} has no sound 'latent' section "
                            f"(kind, shape, dtype): re-run `pipeline encode`")
    checkpoint, step = _checkpoint_of(manifest)
    return LatentSet(split, kind, tuple(shape), dtype,
                     _integer(manifest.get("num_samples")) or 0,
                     _number(manifest.get("scaling_factor")),
                     _number(manifest.get("shift_factor")), checkpoint, step)


def read_export(path: str) -> Export:
    """The summary of a directory written by `pipeline export` (--export)."""
    directory = Path(path)
    record_path = directory / EXPORT_RECORD_NAME
    if not record_path.is_file():
        raise PipelineError(f"--export {path}: no {EXPORT_RECORD_NAME} in it; pass a directory "
                            f"`pipeline export` wrote")
    record = read_json(record_path, "export record", "re-run `pipeline export`")
    if not isinstance(record, dict) or not isinstance(record.get("class"), str) \
            or _number(record.get("scaling_factor")) is None:
        raise PipelineError(f"--export {path}: {record_path} has no 'class' and "
                            f"'scaling_factor': re-run `pipeline export`")
    checkpoint, step = _checkpoint_of(record)
    check = record.get("check")
    differences = check.get("differences") if isinstance(check, dict) else None
    values = [_number(v) for v in differences.values()] if isinstance(differences, dict) else []
    largest = max((v for v in values if v is not None), default=None)
    return Export(directory, record["class"], _number(record["scaling_factor"]),
                  _number(record.get("shift_factor")), checkpoint, step, largest)


def _fmt(value: float | int | None, form: str = "{:.6g}") -> str:
    return MISSING if value is None else form.format(value)


def handoff_section(latents: list[LatentSet], exports: list[Export]) -> Section:
    blocks: list[Block] = [Text(
        "What the next stage (a latent diffusion or autoregressive model) reads: the latent "
        "shards of pipeline encode (streamed by pipeline.data.make_loader), and the "
        "autoencoders of pipeline export (loaded by diffusers' from_pretrained).")]
    if latents:
        blocks.append(Table(
            ["latent shards", "kind", "shape per sample", "stored as", "samples",
             "scaling_factor", "shift_factor", "checkpoint", "step"],
            [[str(s.path), s.kind, "×".join(map(str, s.shape)), s.dtype, str(s.num_samples),
              _fmt(s.scaling_factor), _fmt(s.shift_factor), s.checkpoint, _fmt(s.step, "{}")]
             for s in latents]))
    if exports:
        blocks.append(Table(
            ["export", "diffusers class", "scaling_factor", "shift_factor", "checkpoint",
             "step", "largest check difference"],
            [[str(e.path), e.class_name, _fmt(e.scaling_factor), _fmt(e.shift_factor),
              e.checkpoint, _fmt(e.step, "{}"), _fmt(e.largest_difference, "{:.2g}")]
             for e in exports]))
    moments = [s for s in latents if s.kind == "moments"]
    kl_exports = [e for e in exports if e.class_name == "AutoencoderKL"]
    if moments and kl_exports:
        blocks += [Text("Loading both, as a latent diffusion trainer would:"),
                   Code(LOADING_EXAMPLE.format(export=kl_exports[0].path,
                                               latents=moments[0].path))]
    return Section("Hand-off", "handoff", blocks)
