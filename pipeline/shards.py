"""The shard format, shared by `prepare` (writes) and `data` (reads).

A shard is a POSIX tar of samples; a sample is the group of members sharing a key:
``<key>.png`` (or ``.npy``/``.webp``/``.jpg``), ``<key>.cls`` (decimal class index) and
``<key>.json`` (wnid, src, orig_size). Keys never contain a dot, because webdataset
splits a member name at its first dot. Every split directory holds ``manifest.json``
(see shards/README.md for the schema).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from .utils import PipelineError, atomic_write_json

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
MANIFEST_FORMAT = "ae-pipeline-shards/1"
IMAGE_EXTS = ("png", "npy", "webp", "jpg")


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    first_key: str | None = None
    last_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(split: str, index: int, part: str | None = None) -> str:
    """`train-000012.tar`, or `train-p0003-000012.tar` for part 3 of a multi-machine job."""
    middle = f"-p{part}" if part is not None else ""
    return f"{split}{middle}-{index:06d}.tar"


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty, without '.' or '/'")
    return key


BLOCK = 512  # a tar block: headers, member padding and the end of the archive (both sides)
RECORD = 20 * BLOCK  # tarfile's record size: archives end padded to a multiple of it


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    # Fixed metadata makes a shard a pure function of its samples: a re-run writes
    # byte-identical files, which is what lets resume compare sha256 values.
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    try:
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    except ValueError:  # a name over 100 bytes: GNU long-name header, which readers follow
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_USTAR_TEMPLATE = _tarfile_header("", 0)
_MAX_OCTAL_SIZE = 8 ** 11  # what the 12-byte size field holds as octal digits


def _tar_header(name: str, size: int) -> bytes:
    """The ustar header tarfile would write (tested byte for byte), filled into a template:
    tarfile's `tobuf` is a large share of `prepare`'s tar writing (README, Performance)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or size >= _MAX_OCTAL_SIZE:
        return _tarfile_header(name, size)
    header = bytearray(_USTAR_TEMPLATE)
    header[:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def encode_members(samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[bytes, list[str]]:
    """Samples as consecutive tar members (each padded to 512 bytes, no end-of-archive
    blocks) and their keys: what `ShardWriter.add_encoded` appends.

    `prepare`'s workers encode their chunks with this, so the process that writes the
    shard only appends and hashes: on 2 cores its share of the CPU is taken from the
    workers."""
    parts, keys = [], []
    for key, members in samples:
        check_key(key)
        for ext, data in members.items():
            parts += [_tar_header(f"{key}.{ext}", len(data)), data]
            if len(data) % BLOCK:
                parts.append(bytes(BLOCK - len(data) % BLOCK))
        keys.append(key)
    return b"".join(parts), keys


class DuplicateKeyError(ValueError):
    """A sample key given twice to one ShardWriter: readers would merge the two samples."""


class ShardWriter:
    """A shard written sample by sample under a temporary name, renamed once complete.

    `close()` fsyncs and renames, so an interrupted job never leaves a truncated shard
    under a final name; `abort()` (or leaving a `with` block by an exception) removes
    the temporary file. Writing as samples arrive lets `prepare` overlap its shard
    writing with the workers' decoding instead of writing each shard at its end. A key
    is accepted once per shard (`prepare` checks that a chunk holds exactly its planned
    inputs, so a key can be in one shard only).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp, "wb")
        self._hash, self.size = hashlib.sha256(), 0
        self.count, self.first, self.last = 0, None, None
        self._keys: set[str] = set()  # one shard's keys: O(shard), not O(job)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self.add_encoded(*encode_members([(key, members)]))

    def add_encoded(self, members: bytes, keys: list[str]) -> None:
        """Append samples encoded by `encode_members`; a key already in this shard is
        refused (DuplicateKeyError) before anything of the call is written."""
        self._check_new_keys(keys)
        self._write(members)
        if keys:
            self.count += len(keys)
            self.first = self.first or keys[0]
            self.last = keys[-1]

    def _check_new_keys(self, keys: list[str]) -> None:
        new = set(keys)
        if len(new) != len(keys) or not self._keys.isdisjoint(new):
            repeated = sorted(k for k in new if k in self._keys or keys.count(k) > 1)
            raise DuplicateKeyError(f"{self.path.name}: sample key {repeated[0]!r} is already "
                                    "in this shard; a sample is written once")
        self._keys |= new

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        self._file.write(data)

    def close(self) -> ShardInfo:
        try:
            # Two zero blocks end the archive; tar pads the file to whole 10 KiB records.
            end = self.size + 2 * BLOCK
            self._write(bytes(2 * BLOCK + (-end) % RECORD))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return ShardInfo(self.path.name, self.count, self.size, self._hash.hexdigest(),
                         self.first, self.last)

    def abort(self) -> None:
        try:
            self._file.close()  # flushes what is buffered: may itself fail on a full disk
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def write_shard(path: str | os.PathLike,
                samples: Iterable[tuple[str, dict[str, bytes]]]) -> ShardInfo:
    """Write samples ``(key, {ext: bytes})`` as one tar, atomically (see ShardWriter)."""
    with ShardWriter(path) as writer:
        for key, members in samples:
            writer.add(key, members)
        return writer.close()


# ---------------------------------------------------------------- manifest

def manifest_path(split_dir: str | os.PathLike) -> Path:
    p = Path(split_dir)
    return p if p.name == MANIFEST_NAME else p / MANIFEST_NAME


def read_manifest(split_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a split's manifest; errors name the file (and the shard).

    A manifest is data: readers rely on every shard entry having a plain relative `name`
    and an integer `num_samples >= 0` that add up to `num_samples`, so anything else is
    refused here instead of failing (or silently miscounting) deep inside a reader."""
    path = manifest_path(split_dir)
    if not path.is_file():
        raise PipelineError(f"no shard manifest at {path}: run `pipeline prepare` first, "
                            f"or point at the split directory that holds {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read shard manifest {path}: {e}") from e
    if not isinstance(manifest, dict):
        raise PipelineError(f"shard manifest {path} is not a JSON object: "
                            f"it was not written by `pipeline prepare`")
    missing = [k for k in ("num_samples", "shards", "classes", "image_size", "image_format")
               if k not in manifest]
    if missing:
        raise PipelineError(f"shard manifest {path} lacks {', '.join(missing)}: "
                            f"it was not written by `pipeline prepare`")
    _check_manifest_fields(manifest, path)
    return manifest


_REGENERATE = "regenerate it with `pipeline prepare` (or repair the file)"
# `scheme:` at the start of a string: a URL (or a `pipe:` command), never a plain file name.
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _is_count(value: Any) -> bool:
    """A JSON integer >= 0; bool is an int subclass in Python but never a count here."""
    return type(value) is int and value >= 0


def _check_shard_name(name: Any, path: Path) -> None:
    if (not isinstance(name, str) or not name or URL_SCHEME.match(name) or "\0" in name
            or Path(name).is_absolute() or ".." in Path(name).parts):
        raise PipelineError(f"shard manifest {path} lists shard {name!r}, which is not a "
                            f"plain file name in its directory; manifest entries are never opened "
                            f"as URLs or run as commands: regenerate the manifest with "
                            f"`pipeline prepare`")


def _check_shard_entry(entry: Any, index: int, path: Path) -> None:
    if not isinstance(entry, dict):
        raise PipelineError(f"shard manifest {path}: shards[{index}] is a {type(entry).__name__}, "
                            f"not an object with a name and num_samples: {_REGENERATE}")
    _check_shard_name(entry.get("name"), path)
    count = entry.get("num_samples")
    if not _is_count(count):
        raise PipelineError(f"shard manifest {path}: shard {entry['name']!r} has num_samples "
                            f"{count!r}, not an integer >= 0: {_REGENERATE}")


def _check_manifest_fields(manifest: dict[str, Any], path: Path) -> None:
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise PipelineError(f"shard manifest {path}: shards is {type(shards).__name__}, not a "
                            f"list of shard entries: {_REGENERATE}")
    names = set()
    for index, entry in enumerate(shards):
        _check_shard_entry(entry, index, path)
        if entry["name"] in names:  # read twice, its samples would count twice
            raise PipelineError(f"shard manifest {path} lists shard {entry['name']!r} twice: "
                                f"{_REGENERATE}")
        names.add(entry["name"])
    total = sum(entry["num_samples"] for entry in shards)
    if not _is_count(manifest["num_samples"]) or manifest["num_samples"] != total:
        raise PipelineError(f"shard manifest {path}: num_samples is "
                            f"{manifest['num_samples']!r}, but its shards hold {total} samples: "
                            f"{_REGENERATE}")
    size = manifest["image_size"]
    if type(size) is not int or size < 1:
        raise PipelineError(f"shard manifest {path}: image_size {size!r} is not a positive "
                            f"integer: {_REGENERATE}")
    if not isinstance(manifest["classes"], list):
        raise PipelineError(f"shard manifest {path}: classes is a "
                            f"{type(manifest['classes']).__name__}, not a list of class ids: "
                            f"{_REGENERATE}")


def write_manifest(split_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = manifest_path(split_dir)
    atomic_write_json(path, manifest)
    return path


def manifest_hash(split_dir: str | os.PathLike) -> str:
    """A short identity of a shard set: sha256 over its shards' names and hashes."""
    manifest = read_manifest(split_dir)
    h = hashlib.sha256()
    for shard in manifest["shards"]:
        digest = shard.get("sha256")
        if not isinstance(digest, str) or not digest:
            raise PipelineError(f"shard manifest {manifest_path(split_dir)}: shard "
                                f"{shard['name']!r} has no sha256 to identify it by: "
                                f"{_REGENERATE}")
        h.update(f"{shard['name']}:{digest}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- lean reading
#
# Python's tarfile costs more per member than decoding a 64x64 image does, so the
# loader reads shards with this reader instead: it parses the 512-byte headers itself
# and yields exactly the members and samples that webdataset would (same names, same
# grouping rule), which tests/test_tario.py checks against webdataset.WebDataset.

class TarFormatError(ValueError):
    """A shard is not a complete, readable tar (truncated, bad header, duplicate member)."""


_END_OF_ARCHIVE = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos
_GNU_TYPES = (b"L", b"K", b"S")  # these never take the ustar name prefix
_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONGNAME = (b"x", b"X"), b"g", b"L"
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset skips these (e.g. __index__)


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    while len(data) < size:  # raw streams (pipes) may return short reads
        more = stream.read(size - len(data))
        if not more:
            raise TarFormatError(f"truncated tar: {what} ends after {len(data)} of {size} bytes")
        data += more
    return data


def _header_number(field: bytes, what: str) -> int:
    if field[0] == 0o200:  # GNU base-256, for values too large for octal digits
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarFormatError(f"corrupt tar header: bad {what} field {field!r}") from None


def _check_header(header: bytes) -> None:
    """Reject a block that is not a tar header (misaligned, overwritten, truncated).

    The ustar magic is a cheap identity check; summing every header's 512 bytes would
    be a large share of the reader's time (three headers a sample), so the checksum is
    verified only for headers without the magic (old v7 tars).
    """
    if header[257:262] == b"ustar":
        return
    stored = _header_number(header[148:156], "checksum")
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the field counts as 8 spaces
    signed = unsigned - 256 * sum(b >= 128 for b in header)  # some old tars sum signed bytes
    if stored not in (unsigned, signed):
        raise TarFormatError("corrupt tar header: neither ustar magic nor a valid checksum")


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse pax records ``"<len> <key>=<value>\\n"``."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length_text = data[pos:pos + 20].partition(b" ")[0]
        if not length_text.isdigit() or int(length_text) <= len(length_text):
            raise TarFormatError(f"corrupt pax header record at byte {pos}")
        length = int(length_text)
        key, _, value = data[pos + len(length_text) + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _pax_size(value: str) -> int:
    if not value.isdigit():  # pax sizes are decimal, unlike the octal header fields
        raise TarFormatError(f"corrupt pax header: size {value!r}")
    return int(value)


def _name_field(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for every regular file of a tar stream, in order.

    Applies GNU long names and pax ``path``/``size`` records to the member they
    precede, as tarfile does; directories, links and devices are skipped. A stream that
    ends before the end-of-archive block, or a block that is not a header, raises
    TarFormatError: unlike tarfile in stream mode, a truncated shard is never read as
    a shorter valid one.
    """
    global_pax: dict[str, str] = {}
    long_name: str | None = None
    pax: dict[str, str] | None = None
    padding = 0  # the previous member's padding, read together with the next header
    while True:
        block = stream.read(padding + BLOCK)
        if len(block) != padding + BLOCK:
            block += _read_exact(stream, padding + BLOCK - len(block), "tar stream "
                                 "(no end-of-archive block)" if not block else "member header")
        header = block[padding:] if padding else block
        if header == _END_OF_ARCHIVE:
            return
        _check_header(header)
        kind = header[156:157]
        try:  # the common case: octal digits, NUL- or space-terminated
            size = int(header[124:136].rstrip(b"\0"), 8)
        except ValueError:
            size = _header_number(header[124:136], "size")
        if pax is not None and "size" in pax:
            size = _pax_size(pax["size"])
        if size < 0:  # int() takes a sign; a tar size never has one
            raise TarFormatError(f"corrupt tar header: size {size}")
        if kind in _NO_DATA_TYPES:
            long_name = pax = None
            padding = 0
            continue
        data = stream.read(size)
        if len(data) != size:
            data += _read_exact(stream, size - len(data), f"member data ({size} bytes)")
        padding = -size % BLOCK
        if kind in _FILE_TYPES and pax is None and long_name is None and not header[345]:
            # A plain ustar member (every member of our shards): the name field alone.
            name = _name_field(header[:100])
            if kind != b"\0" or not name.endswith("/"):
                yield name, data
        elif kind == _GNU_LONGNAME:
            long_name = _name_field(data)
        elif kind in _PAX_LOCAL:
            pax = {**global_pax, **_pax_records(data)}
        elif kind == _PAX_GLOBAL:
            global_pax.update(_pax_records(data))
        elif kind == b"S":
            raise TarFormatError("GNU sparse members are not supported in shards")
        elif kind != b"K":  # K: a GNU long link target; links carry no sample data
            name = _member_name(header, kind, long_name, pax)
            long_name = pax = None
            if kind in _FILE_TYPES and not (kind == b"\0" and name.endswith("/")):
                yield name, data


def _member_name(header: bytes, kind: bytes, long_name: str | None,
                 pax: dict[str, str] | None) -> str:
    if pax is not None and "path" in pax:
        return pax["path"].rstrip("/")
    if long_name is not None:
        return long_name
    name = _name_field(header[0:100])
    if header[345] and kind not in _GNU_TYPES:  # ustar splits long paths into prefix/name
        return f"{_name_field(header[345:500])}/{name}"
    return name


# webdataset's `base_plus_ext` pattern, kept verbatim so edge cases split the same way
# (e.g. `dir/.hidden` -> key `dir/`, extension `hidden`).
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the FIRST dot of the basename.

    ``dir/abc.seg.PNG`` -> (``dir/abc``, ``seg.png``): the extension is lowercased; a
    name without a dot belongs to no sample (None).
    """
    if "/" not in name:  # the shards' own layout: same result as the pattern, without a regex
        key, dot, ext = name.partition(".")
        return (key, ext.lower()) if key and dot else None
    match = _KEY_AND_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def iter_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members into samples ``(key, {ext: bytes})``.

    Same grouping as webdataset's `group_by_keys`: a sample ends where the key changes;
    `__meta__` members and names without an extension are skipped. A member that
    repeats an extension within one sample raises TarFormatError, as webdataset does.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    for name, data in iter_tar_members(stream):
        split = None if name[:2] == "__" and _META_NAME.match(name) else split_member_name(name)
        if split is None:
            continue
        member_key, ext = split
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        if ext in members:
            raise TarFormatError(f"duplicate member {name!r} in one sample")
        members[ext] = data
    if key is not None:
        yield key, members
