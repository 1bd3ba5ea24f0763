"""The lean tar reader in pipeline.shards yields exactly what webdataset/tarfile yield."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from pipeline.shards import (TarFormatError, iter_samples, iter_tar_members, split_member_name,
                             write_shard)
from shardgen import encode, synthetic_image

LONG_KEY = "k" * 150  # over the 100-byte ustar name field


def sample_members(i: int, fmt: str = "png") -> dict[str, bytes]:
    meta = {"wnid": f"n{i % 3:08d}", "src": f"x/{i}.JPEG"}
    return {fmt: encode(synthetic_image(i, i % 3), fmt), "cls": str(i % 3).encode(),
            "json": json.dumps(meta).encode()}


def webdataset_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """What webdataset's generic pipeline yields, in our (key, {ext: bytes}) form."""
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in wds.WebDataset(str(path), shardshuffle=False)]


def lean_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    with open(path, "rb") as f:
        return list(iter_samples(f))


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT,
              pax_headers: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_write_shard_reads_like_webdataset(tmp_path, fmt):
    shard = tmp_path / "s.tar"
    write_shard(shard, [(f"s_{i:04d}", sample_members(i, fmt)) for i in range(12)])
    expected = webdataset_samples(shard)
    assert [key for key, _ in expected] == [f"s_{i:04d}" for i in range(12)]
    assert lean_samples(shard) == expected


def test_tarwriter_shard_with_long_names_reads_like_webdataset(tmp_path):
    shard = tmp_path / "w.tar"
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for i, key in enumerate(["a", "dir/b", LONG_KEY, f"deep/{'d' * 120}/c", "e"]):
            members = {"png": sample_members(i)["png"], "cls": b"1", "seg.PNG": b"mask"}
            writer.write({"__key__": key, **members})
    expected = webdataset_samples(shard)
    assert [key for key, _ in expected][2] == LONG_KEY
    assert "seg.png" in expected[0][1]  # webdataset lowercases extensions
    assert lean_samples(shard) == expected


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_and_special_members_match_tarfile(tmp_path, fmt):
    """GNU 'L' long names, pax path records and ustar prefixes; links/dirs skipped."""
    long_name = f"{'p' * 60}/{'q' * 70}/x.png" if fmt == tarfile.USTAR_FORMAT else f"{LONG_KEY}.png"
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in [("a.cls", b"1"), (long_name, b"long"), ("noext", b"z")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.cls"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        assert list(iter_tar_members(f)) == expected
    assert expected[1] == (long_name, b"long")
    assert lean_samples(path) == webdataset_samples(path)


def test_pax_global_header_and_meta_members_match_webdataset(tmp_path):
    path = write_tar(tmp_path / "g.tar", [("__index__", b"meta"), ("a.png", b"1"), ("a.cls", b"2"),
                                          ("b.png", b"3")], pax_headers={"comment": "global"})
    assert lean_samples(path) == webdataset_samples(path)
    assert [key for key, _ in lean_samples(path)] == ["a", "b"]


@pytest.mark.parametrize("name", ["a.png", "a.b.c", "dir/a.png", "d.x/a.seg.PNG", "noext",
                                  ".hidden", "dir/.hidden", "a.b/c", "dir/", "x.", "a..b", ".",
                                  "K.PNG"])
def test_split_member_name_is_webdataset_rule(name):
    key, ext = base_plus_ext(name)
    expected = None if key is None else (key, ext.lower())
    assert split_member_name(name) == expected


class TrickleStream(io.RawIOBase):
    """Returns at most 100 bytes per read, like a slow pipe."""

    def __init__(self, data: bytes):
        self.f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.f.read(min(size, 100) if size >= 0 else 100)


def test_short_reads_yield_the_same_samples(tmp_path):
    shard = tmp_path / "s.tar"
    write_shard(shard, [(f"s_{i}", sample_members(i)) for i in range(4)])
    assert list(iter_samples(TrickleStream(shard.read_bytes()))) == lean_samples(shard)


@pytest.fixture
def shard_bytes(tmp_path) -> bytes:
    shard = tmp_path / "s.tar"
    write_shard(shard, [(f"s_{i}", sample_members(i)) for i in range(4)])
    return shard.read_bytes()


def member_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar]


@pytest.mark.parametrize("where", ["mid-data", "mid-header", "at-member-boundary", "no-end-block",
                                   "empty"])
def test_truncated_tar_raises(shard_bytes, where):
    offsets = member_offsets(shard_bytes)
    cut = {"mid-data": offsets[4] + 700, "mid-header": offsets[5] + 200,
           "at-member-boundary": offsets[6], "no-end-block": offsets[-1] + 1024, "empty": 0}[where]
    with pytest.raises(TarFormatError, match="truncated tar"):
        list(iter_samples(io.BytesIO(shard_bytes[:cut])))


def test_tarfile_stream_mode_misses_a_truncation_the_lean_reader_reports(shard_bytes):
    """Why the reader insists on the end-of-archive block: tarfile stops silently."""
    cut = shard_bytes[:member_offsets(shard_bytes)[6]]
    with tarfile.open(fileobj=io.BytesIO(cut), mode="r|") as tar:
        assert len([m for m in tar]) == 6  # no error: a shorter "valid" shard
    with pytest.raises(TarFormatError):
        list(iter_samples(io.BytesIO(cut)))


def test_overwritten_header_raises(shard_bytes):
    offset = member_offsets(shard_bytes)[3]
    broken = shard_bytes[:offset] + b"\x17" * 512 + shard_bytes[offset + 512:]
    with pytest.raises(TarFormatError, match="corrupt tar header"):
        list(iter_samples(io.BytesIO(broken)))


@pytest.mark.parametrize("size_field", [b"-0000000017\0", b"00000000zz7\0"])
def test_bad_size_field_raises(shard_bytes, size_field):
    offset = member_offsets(shard_bytes)[3]
    header = bytearray(shard_bytes[offset:offset + 512])
    header[124:136] = size_field
    broken = shard_bytes[:offset] + bytes(header) + shard_bytes[offset + 512:]
    with pytest.raises(TarFormatError, match="corrupt tar header"):
        list(iter_samples(io.BytesIO(broken)))


@pytest.mark.parametrize("name", ["a.png", "n01440764_10026.cls", "x" * 96 + ".png",
                                  "dir/sub/key.json", "ünïcode_key.png", "k" * 150 + ".png"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 12_345, 8 ** 11 - 1, 8 ** 11])
def test_tar_headers_are_byte_identical_to_tarfiles(name, size):
    from pipeline.shards import _tar_header, _tarfile_header
    assert _tar_header(name, size) == _tarfile_header(name, size)


def test_shard_from_encoded_chunks_is_byte_identical_to_write_shard(tmp_path):
    from pipeline.shards import ShardWriter, encode_members
    samples = [(f"s_{i:04d}", sample_members(i)) for i in range(10)]
    info = write_shard(tmp_path / "whole.tar", samples)
    with ShardWriter(tmp_path / "chunks.tar") as writer:
        for start in (0, 3, 4, 9):  # uneven chunks, one of them empty
            writer.add_encoded(*encode_members(samples[start:{0: 3, 3: 4, 4: 9, 9: 10}[start]]))
        writer.add_encoded(*encode_members([]))
        chunked = writer.close()
    assert (tmp_path / "chunks.tar").read_bytes() == (tmp_path / "whole.tar").read_bytes()
    assert (chunked.num_samples, chunked.first_key, chunked.last_key) == (10, "s_0000", "s_0009")
    assert chunked.sha256 == info.sha256 and not list(tmp_path.glob(".*tmp*"))


def test_duplicate_member_in_a_sample_raises(tmp_path):
    path = write_tar(tmp_path / "d.tar", [("a.png", b"1"), ("a.png", b"2")])
    with open(path, "rb") as f, pytest.raises(TarFormatError, match="duplicate"):
        list(iter_samples(f))
