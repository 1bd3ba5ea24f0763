"""The checkpoint `pipeline encode` (and `pipeline decode`) reads: its model and what the
manifest records of it. Loaded without the evaluation stage's metric libraries."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layout import WEIGHTS_NAME
from ..utils import PipelineError, sha256_file


@dataclass
class Checkpoint:
    path: Path
    model: Any                # the AutoEncoder, in eval mode
    export: dict[str, Any]    # its config.json

    @property
    def step(self) -> int | None:
        """config.json's step: data, recorded only when it is an integer >= 0."""
        step = self.export.get("step")
        return step if type(step) is int and step >= 0 else None

    @property
    def run(self) -> str | None:
        run = self.export.get("run_name")
        return run if isinstance(run, str) else None

    def weights_sha256(self) -> str:
        return sha256_file(self.path / WEIGHTS_NAME)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """An export (RUN_DIR/model) or checkpoint directory (RUN_DIR/checkpoints/step-<N>)."""
    from ..models import from_pretrained, read_export_config

    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"checkpoint {path}: no such directory (pass an export directory "
                            f"RUN_DIR/model or RUN_DIR/checkpoints/step-<N>)")
    try:
        return Checkpoint(path, from_pretrained(path).eval(), read_export_config(path))
    except PipelineError as e:
        raise PipelineError(f"checkpoint {path}: {e}") from e
