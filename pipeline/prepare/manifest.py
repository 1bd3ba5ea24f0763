"""A split's manifest and failures list, assembled from its shard records; `--merge`.

The manifest (or, for a part, `manifest.part-K-of-N.json`) holds the fields every part of
a job shares (`manifest_base`) plus the shard records; `failures.jsonl` lists every input
that could not be used. `merge` joins the part manifests of a split into exactly the
manifest and failures list a one-machine run writes (shards/README.md has the schema).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .. import __version__
from ..inputs import ClassMap, SplitListing
from ..shards import FAILURES_NAME, MANIFEST_FORMAT, MANIFEST_NAME, write_manifest
from ..utils import PipelineError, atomic_write_json, atomic_write_text, dumps_json, provenance
from .image import PNG_COMPRESS_LEVEL
from .job import failures_name, manifest_name, refuse_running_parts, split_mutex
from .options import Options
from .write import ShardRecord, plausible_record


# ---------------------------------------------------------------- building one

def resize_description(options: Options) -> dict[str, Any]:
    return {
        "policy": options.resize,
        "filter": "bicubic" if options.resize == "center-crop" else "box (area average)",
        "antialias": True,
        "crop": ("centred square of side min(w, h), float box, no rounding"
                 if options.resize == "center-crop" else "none: whole image squashed"),
        "reduced_decode": f"JPEG DCT scaling by 1/2, 1/4 or 1/8 while the crop keeps "
                          f">= {options.decode_oversampling}x image_size decoded pixels",
        "exif_orientation": "ignored", "icc_profile": "dropped", "alpha": "over white",
    }


def manifest_base(split: str, options: Options, classes: ClassMap, job: dict[str, Any],
                  root: Path, listing: SplitListing, num_shards: int) -> dict[str, Any]:
    """The manifest fields that every part of a job shares. `input_failures` are the
    entries of the tree that are not inputs (FIFOs, broken links, directory loops...):
    they belong to no shard, so every part lists all of them."""
    return {
        "format": MANIFEST_FORMAT, "split": split, "version": __version__,
        "image_size": options.image_size, "image_format": options.image_format,
        "quality": options.quality, "png_compress_level": PNG_COMPRESS_LEVEL,
        "png_zlib_strategy": "Z_RLE", "png_filter": "average",
        "resize": resize_description(options),
        "order": ({"kind": "seeded-shuffle", "seed": options.seed} if split == "train"
                  else {"kind": "sorted-by-path"}),
        "shard_size": options.shard_size, "num_shards": num_shards,
        "classes": classes.wnids,
        "class_names": classes.names if any(classes.names) else None,
        "class_map_source": classes.source, "labels": listing.labelled_by,
        "input": {"root": str(root), **job["input"]},
        "num_inputs": job["input"]["num_files"] + len(listing.failures),
        "input_failures": listing.failures,
        "job": job, "provenance": provenance(),
    }


def assemble_manifest(base: dict[str, Any], records: list[ShardRecord],
                      failures_file: str) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r.index)
    return {**base,
            "num_samples": sum(r.info["num_samples"] for r in records),
            "num_failures": (len(base.get("input_failures", []))
                             + sum(len(r.failures) for r in records)),
            "failures_file": failures_file,
            "shards": [r.info for r in records],
            "shard_failures": {r.info["name"]: r.failures for r in records if r.failures}}


def failures_jsonl(manifest: dict[str, Any]) -> str:
    """One line per failed input: first the listing's (`"shard": null`), then the shards'
    in shard order, so a merged job lists them exactly as a one-machine run does. Names
    that are not UTF-8 are JSON-escaped (`\\udcff`), so they read back as os.listdir gave
    them."""
    lines = [dumps_json({**failure, "shard": None}, indent=None) + "\n"
             for failure in manifest.get("input_failures", [])]
    for shard in manifest["shards"]:
        for failure in manifest["shard_failures"].get(shard["name"], []):
            lines.append(dumps_json({**failure, "shard": shard["name"]}, indent=None) + "\n")
    return "".join(lines)


def write_outputs(split_dir: Path, manifest: dict[str, Any], part: tuple[int, int]) -> None:
    # Failures first: a manifest on disk always has its failures file beside it. If the
    # manifest cannot be written (a full disk), a first run leaves neither.
    failures, manifest_file = split_dir / failures_name(part), split_dir / manifest_name(part)
    had_manifest = manifest_file.exists()
    atomic_write_text(failures, failures_jsonl(manifest))
    try:
        if part[1] == 1:
            write_manifest(split_dir, manifest)
        else:
            atomic_write_json(manifest_file, manifest)
    except BaseException:
        if not had_manifest:
            failures.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- merge

def merge(output: str | Path, splits: list[str] | None = None) -> list[Path]:
    """Join the part manifests of each split into manifest.json + failures.jsonl."""
    output = Path(output)
    split_dirs = ([output / s for s in splits] if splits
                  else sorted(p.parent for p in output.glob("*/manifest.part-*.json")))
    split_dirs = sorted(set(split_dirs))
    if not split_dirs:
        raise PipelineError(f"--merge {output}: no part manifests (manifest.part-K-of-N.json) "
                            "found; run `pipeline prepare --part K/N` first")
    written = []
    for split_dir in split_dirs:
        if not split_dir.is_dir():
            raise PipelineError(f"--merge: {split_dir} does not exist; run `pipeline prepare "
                                "--part K/N` for that split first")
        with split_mutex(split_dir):  # no part starts meanwhile
            refuse_running_parts(split_dir)
            manifest = merged_manifest(split_dir)
            write_outputs(split_dir, manifest, (0, 1))
        written.append(split_dir / MANIFEST_NAME)
    return written


def read_part_manifests(split_dir: Path) -> list[dict[str, Any]]:
    pattern = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json$")
    found = {}
    for path in split_dir.glob("manifest.part-*.json"):
        if m := pattern.match(path.name):
            try:
                found[int(m[1]), int(m[2])] = manifest = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise PipelineError(f"cannot read {path}: {e}; re-run that part") from e
            if not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), list)
                    and type(manifest.get("num_shards")) is int and "job" in manifest):
                raise PipelineError(f"{path} is not a part manifest of `pipeline prepare`; "
                                    "re-run that part")
    counts = sorted({n for _, n in found})
    if not counts:
        raise PipelineError(f"{split_dir}: no part manifests to merge")
    if len(counts) > 1:
        raise PipelineError(f"{split_dir} holds part manifests of different --part counts "
                            f"({', '.join(map(str, counts))}); delete the stale ones")
    n = counts[0]
    missing = [k for k in range(n) if (k, n) not in found]
    if missing:
        raise PipelineError(f"{split_dir}: parts {', '.join(f'{k}/{n}' for k in missing)} "
                            f"are missing; run `pipeline prepare --part K/{n}` for them first")
    return [found[k, n] for k in range(n)]


def shard_index(name: str) -> int:
    """`train-000012.tar` -> 12."""
    return int(name.rsplit("-", 1)[1].split(".")[0])


def part_record(split_dir: Path, part: dict[str, Any], shard: Any) -> ShardRecord:
    """A shard entry of a part manifest, which is data: its name must be one of this
    split's shard names (never a path elsewhere) and its counts plausible."""
    name = shard.get("name") if isinstance(shard, dict) else None
    m = re.fullmatch(rf"{re.escape(split_dir.name)}-(\d{{6,}})\.tar", name or "")
    failures = part.get("shard_failures", {})
    record = ShardRecord(int(m[1]) if m else -1, shard,
                         failures.get(name, []) if isinstance(failures, dict) else None)
    if not m or not plausible_record(record, record.index, name):
        raise PipelineError(f"{split_dir}: a part manifest lists shard {name!r}, which is not "
                            "a shard of this split with its counts; re-run that part")
    return record


def merged_manifest(split_dir: Path) -> dict[str, Any]:
    parts = read_part_manifests(split_dir)
    jobs = {json.dumps(p["job"], sort_keys=True) for p in parts}
    if len(jobs) > 1:
        raise PipelineError(f"{split_dir}: the parts were made with different options or "
                            "inputs; re-run the odd ones into a fresh --output")
    listings = {json.dumps(p.get("input_failures", []), sort_keys=True) for p in parts}
    if len(listings) > 1:
        raise PipelineError(f"{split_dir}: the parts found different entries that are not "
                            "inputs (input_failures: the tree changed between them); re-run "
                            "the parts once the input tree is settled")
    records = [part_record(split_dir, p, s) for p in parts for s in p["shards"]]
    expected = parts[0]["num_shards"]
    if sorted(r.index for r in records) != list(range(expected)):
        raise PipelineError(f"{split_dir}: the parts list {len(records)} shards, the job has "
                            f"{expected}; re-run the parts")
    for r in records:
        shard = split_dir / r.info["name"]
        if not shard.is_file() or shard.stat().st_size != r.info["bytes"]:
            raise PipelineError(f"{shard} is missing or differs from its part manifest; "
                                "re-run that part")
    base = {k: v for k, v in parts[0].items() if k != "part"}
    return assemble_manifest(base, records, FAILURES_NAME)
