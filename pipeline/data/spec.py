"""Shard specs: what `make_loader` is pointed at, resolved to shard URLs, and how one is opened.

A spec is a split directory or its manifest (the manifest's entries are data: plain names
in that directory, never URLs or commands), a brace pattern, a list of URLs, or `pipe:`
commands given by the caller. Local paths, `file:`, `pipe:` and http(s) open with
webdataset's semantics; other schemes (s3://, az://, memory://) through fsspec.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence
from urllib.parse import urlparse

from braceexpand import braceexpand
from webdataset.gopen import gopen, gopen_schemes

from ..shards import MANIFEST_NAME, URL_SCHEME, manifest_path, read_manifest
from ..utils import PipelineError

READ_BUFFER = 1 << 20  # bytes buffered per open shard
Spec = str | os.PathLike | Sequence[str | os.PathLike]


class ShardWarning(RuntimeWarning):
    """A corrupt shard or sample was skipped (and counted in `num_skipped`)."""


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs, with per-shard sample counts when a manifest gives them."""
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    manifest: dict[str, Any] | None

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


_COMMA_OUTSIDE_BRACES = re.compile(r",(?![^{]*})")


def _scheme(url: str) -> str:
    return urlparse(url).scheme if URL_SCHEME.match(url) else ""


def _split_spec_string(text: str) -> list[str]:
    """`a.tar,b-{0..3}.tar c.tar::pipe:cat d.tar` -> patterns; `pipe:` commands keep spaces."""
    items = []
    for chunk in text.split("::"):
        for part in (p.strip() for p in _COMMA_OUTSIDE_BRACES.split(chunk)):
            items += [part] if part.startswith("pipe:") else part.split()
    return items


def _spec_items(spec: Spec) -> list[str]:
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        # An existing path is taken whole, even if it contains spaces or commas.
        items = [text] if os.path.exists(text) else _split_spec_string(text)
    else:  # a list: each element is one URL or brace pattern, taken verbatim
        items = [os.fspath(item) for item in spec]
    if not items:
        raise PipelineError("empty shard spec: give a split directory, a brace pattern "
                            "like dir/train-{000000..000009}.tar, or a list of shard URLs")
    return items


def _is_local_split(item: str) -> bool:
    if _scheme(item):
        return False
    path = Path(item)
    return path.is_dir() or (path.name == MANIFEST_NAME and path.is_file())


def _from_manifest(location: str) -> ShardSet:
    # read_manifest validates the entries: each a plain relative name (never a URL or a
    # command) with an integer count >= 0, the counts adding up to num_samples.
    manifest = read_manifest(location)
    manifest_file = manifest_path(location).resolve()
    urls, counts = [], []
    for entry in manifest["shards"]:
        shard = manifest_file.parent / entry["name"]
        if not shard.is_file():
            raise PipelineError(f"shard {shard} listed in {manifest_file} is missing: "
                                f"re-run `pipeline prepare` or restore the file")
        # Absolute paths: an entry can never be mistaken for a URL when opened.
        urls.append(str(shard))
        counts.append(entry["num_samples"])
    if not urls:
        raise PipelineError(f"shard manifest {manifest_file} lists no shards")
    return ShardSet(tuple(urls), tuple(counts), manifest)


def _neighbour_manifest(urls: list[str]) -> ShardSet:
    """Local shards that all sit beside one manifest.json take their counts from it."""
    parents = {Path(url).resolve().parent for url in urls if not _scheme(url)}
    if len(parents) != 1 or any(_scheme(url) for url in urls):
        return ShardSet(tuple(urls), None, None)
    manifest_file = parents.pop() / MANIFEST_NAME
    if not manifest_file.is_file():
        return ShardSet(tuple(urls), None, None)
    manifest = read_manifest(manifest_file)  # validated: names and counts are sound
    listed = {entry["name"]: entry["num_samples"] for entry in manifest["shards"]}
    names = [Path(url).name for url in urls]
    unlisted = [name for name in names if name not in listed]
    if unlisted:
        warnings.warn(f"{manifest_file} does not list {', '.join(unlisted[:3])}: ignoring it, so "
                      f"sample counts (and eval totals) are unknown", ShardWarning, stacklevel=3)
        return ShardSet(tuple(urls), None, None)
    return ShardSet(tuple(urls), tuple(listed[name] for name in names), manifest)


def _check_url(url: str, spec: Spec, allow_pipe: bool) -> None:
    scheme = _scheme(url)
    if scheme == "pipe" and not allow_pipe:
        raise PipelineError(f"shard spec {spec!r} contains the command {url!r}, but pipe: URLs "
                            f"are not allowed here (allow_pipe=False)")
    if not scheme and not Path(url).is_file():
        raise PipelineError(f"shard file {url} does not exist (from shard spec {spec!r})")
    if not _opened_by_webdataset(scheme):
        try:
            import fsspec  # noqa: F401
        except ImportError:
            raise PipelineError(f"reading {url} needs fsspec: "
                                f"pip install 'ae-pipeline[s3]'") from None


def resolve_spec(spec: Spec, allow_pipe: bool = True) -> ShardSet:
    """Turn a shard spec (split directory, manifest, brace pattern, URL list) into a ShardSet."""
    items = _spec_items(spec)
    if len(items) == 1 and _is_local_split(items[0]):
        return _from_manifest(items[0])
    urls = [url for item in items for url in braceexpand(item)]
    for url in urls:
        _check_url(url, spec, allow_pipe)
    return _neighbour_manifest(urls)


def _opened_by_webdataset(scheme: str) -> bool:
    return scheme in ("", "file") or scheme in gopen_schemes


def open_shard(url: str) -> BinaryIO:
    """Open a shard URL with webdataset's semantics (local path, file:, pipe:, http...);
    schemes webdataset does not know (s3://, az://, memory://) go through fsspec."""
    scheme = _scheme(url)
    if scheme in ("", "file"):
        # webdataset's gopen opens local files with the default 8 KB buffer; a shard is
        # read front to back, and a large buffer reads it faster (fewer syscalls).
        return open(re.sub(r"^file://?", "", url), "rb", buffering=READ_BUFFER)
    if _opened_by_webdataset(scheme):
        return gopen(url, "rb", bufsize=READ_BUFFER)
    import fsspec
    return fsspec.open(url, "rb").open()
