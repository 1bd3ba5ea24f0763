"""Read an offline W&B run back, for tests: what was logged, without a server.

`wandb.Api()` cannot see offline runs, and wandb 0.31 no longer ships a reader, so this
parses the run file itself. `run-<id>.wandb` is a LevelDB-style log: a 7-byte file header
(`:W&B`, a 2-byte magic, a version byte), then 32 KiB blocks of records. Each record has a
7-byte header (crc32, little-endian uint16 length, type FULL=1 / FIRST=2 / MIDDLE=3 /
LAST=4) and a payload; FIRST..LAST fragments join into one serialised
`wandb_internal_pb2.Record`. A block tail shorter than a record header is zero padding.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

FILE_HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
RECORD_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> {key: value}
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    directory: Path | None = None

    def images(self) -> list[Path]:
        """Image files W&B wrote for logged wandb.Image values."""
        return sorted((self.directory / "files" / "media" / "images").glob("**/*.png"))


def payloads(path: Path) -> Iterator[bytes]:
    """The reassembled record payloads of a run file, in order."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    pos, pending = FILE_HEADER_LEN, b""
    while pos + RECORD_HEADER_LEN <= len(data):
        if BLOCK_LEN - pos % BLOCK_LEN < RECORD_HEADER_LEN:
            pos += BLOCK_LEN - pos % BLOCK_LEN  # zero padding at a block's end
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER_LEN])
        if kind == 0 and length == 0:
            break  # preallocated, never written
        start = pos + RECORD_HEADER_LEN
        chunk, pos = data[start:start + length], start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def item_value(item) -> Any:
    """An item's value: JSON in `value_json`, or (history items) one typed field of the
    `value` oneof."""
    if item.value_json:
        return json.loads(item.value_json)
    typed = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    if typed in (None, "none"):
        return None
    value = getattr(item, typed)
    return json.loads(value) if typed == "json" else value


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run_file(path: Path) -> OfflineRun:
    run = OfflineRun(run_id=path.stem.removeprefix("run-"), directory=path.parent)
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item_key(i): item_value(i) for i in record.history.item}
            step = row.get("_step", record.history.step.num)
            run.history.setdefault(int(step), {}).update(row)
        elif kind == "config":
            run.config.update(_config_items(record.config.update))
        elif kind == "run":
            run.config.update(_config_items(record.run.config.update))
            run.name, run.group = record.run.display_name, record.run.run_group
            run.tags = list(record.run.tags)
    return run


def _config_items(items) -> dict[str, Any]:
    # W&B stores each config value as {"value": ..., "desc": ...}; unwrap it.
    out = {}
    for item in items:
        value = item_value(item)
        out[item_key(item)] = value["value"] if isinstance(value, dict) and "value" in value \
            else value
    return out


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline run under RUN_DIR/wandb, oldest first (a resumed job adds one)."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    return [read_run_file(f) for f in files]
