"""The inputs of `pipeline prepare`: which files a split has, their labels and keys.

- Class order: the sorted wnids of `train/` (torchvision's ImageNet/ImageFolder order), a
  `--classes FILE`, or the class map of an existing train manifest (val-only runs); names
  from Kaggle's `LOC_synset_mapping.txt` where present.
- Val labels for a flat `val/`: Kaggle's `LOC_val_solution.csv`, the ILSVRC
  `ILSVRC2012_validation_ground_truth.txt` with the devkit's synset order (`meta.mat` or
  `map_clsloc.txt`), or a plain `filename,wnid` CSV; found in ROOT or given explicitly.
- Listing: regular files only (file links followed), each directory once (tracked by
  device and inode: link loops end); FIFOs, sockets, devices, broken links, directory
  loops and unreadable directories are returned as failures with a reason.
- Keys: the bytes of the file name without its extension, every byte outside
  [A-Za-z0-9_-] replaced by `_` (dot-free: webdataset splits a member name at its first
  dot), with a path hash appended where names collide, so keys are unique and stable.
  Names that are not UTF-8 are inputs like any other (`src` keeps os.listdir's
  surrogate escapes; `os.fsencode(src)` gives the bytes back).
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .shards import MANIFEST_NAME
from .utils import PipelineError

# Where the labels of a flat val/ directory are looked for in ROOT, in this order.
KAGGLE_LABELS = "LOC_val_solution.csv"
GROUND_TRUTH_LABELS = "ILSVRC2012_validation_ground_truth.txt"
PLAIN_LABELS = "val_labels.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_DATA_DIRS = (".", "ILSVRC2012_devkit_t12/data", "devkit/data")  # relative to ROOT
DEVKIT_SYNSET_FILES = ("meta.mat", "map_clsloc.txt")


# ---------------------------------------------------------------- classes and labels

@dataclass(frozen=True)
class ClassMap:
    wnids: list[str]
    names: list[str | None]
    source: str  # where the order came from, for the manifest and messages

    def index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}


@dataclass(frozen=True)
class Item:
    """One input file: `src` is its path relative to ROOT; `wnid` None = no label found."""

    src: str
    wnid: str | None
    label: int | None
    key: str


def read_synset_lines(path: Path) -> tuple[list[str], dict[str, str]]:
    """`wnid [name...]` lines (LOC_synset_mapping.txt, a --classes file) -> order, names."""
    wnids, names = [], {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read class list {path}: {e}") from e
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        wnid, _, name = line.partition(" ")
        wnids.append(wnid.strip(","))
        if name.strip():
            names[wnids[-1]] = name.strip()
    duplicates = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if not wnids or duplicates:
        problem = f"repeats {', '.join(duplicates[:5])}" if duplicates else "lists no classes"
        raise PipelineError(f"class list {path} {problem}: one wnid per line, each once")
    return wnids, names


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def existing_train_classes(output: Path) -> list[str] | None:
    """The class map of a train split already prepared into OUT (manifest or part manifest)."""
    train_dir = output / "train"
    candidates = [train_dir / MANIFEST_NAME, *sorted(train_dir.glob("manifest.part-*.json"))]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())["classes"]
            except (OSError, ValueError, KeyError) as e:
                raise PipelineError(f"cannot read the class map of {path}: {e}") from e
    return None


def resolve_classes(root: Path, output: Path, splits: list[str],
                    classes_file: Path | None) -> ClassMap:
    """Class indices shared by every split: --classes, else ROOT/train's sorted folders
    (torchvision's ImageNet/ImageFolder order), else OUT/train's manifest, else the
    split's own folders (a plain ImageFolder tree)."""
    names: dict[str, str] = {}
    if (root / SYNSET_MAPPING).is_file():
        names = read_synset_lines(root / SYNSET_MAPPING)[1]
    prepared = existing_train_classes(output)
    if classes_file is not None:
        wnids, own_names = read_synset_lines(classes_file)
        names = {**names, **own_names}
        source = str(classes_file)
    elif (root / "train").is_dir() and class_folders(root / "train"):
        wnids, source = class_folders(root / "train"), "sorted folders of ROOT/train"
    elif prepared is not None:
        wnids, source = prepared, f"{output / 'train' / MANIFEST_NAME}"
    else:
        with_folders = [s for s in splits if (root / s).is_dir() and class_folders(root / s)]
        if not with_folders:
            raise PipelineError(
                f"no class map for {', '.join(splits)}: {root} has no train/ class folders and "
                f"{output}/train holds no prepared manifest; prepare train first into the same "
                "--output, or pass --classes FILE (one wnid per line, in index order)")
        wnids = class_folders(root / with_folders[0])
        source = f"sorted folders of ROOT/{with_folders[0]}"
    if prepared is not None and prepared != wnids and "train" not in splits:
        raise PipelineError(
            f"the class map from {source} differs from the one of {output}/train "
            f"({len(wnids)} vs {len(prepared)} classes): splits of one output must share "
            "class indices; use the same --classes, or a new --output")
    return ClassMap(wnids, [names.get(w) for w in wnids], source)


def stem_of(name: str) -> str:
    """`dir/ILSVRC2012_val_00000001.JPEG` -> `ILSVRC2012_val_00000001`."""
    return Path(name.strip()).name.split(".")[0]


def read_kaggle_labels(path: Path, rows: list[list[str]]) -> dict[str, str]:
    # PredictionString: space-separated groups `wnid xmin ymin xmax ymax`; the label is the
    # first wnid. Rows are not sorted and strings end with a space.
    return {stem_of(r[0]): r[1].split()[0] for r in rows[1:] if len(r) > 1 and r[1].strip()}


def read_plain_labels(path: Path, rows: list[list[str]], classes: ClassMap) -> dict[str, str]:
    known = set(classes.wnids)
    # An optional header row is recognised by its second field not being a class.
    body = rows[1:] if rows and len(rows[0]) > 1 and rows[0][1].strip() not in known else rows
    labels = {}
    for line_no, row in enumerate(body, start=len(rows) - len(body) + 1):
        if len(row) < 2:
            raise PipelineError(f"{path}:{line_no}: expected `filename,wnid`, got {row}")
        labels[stem_of(row[0])] = row[1].strip()
    return labels


def read_devkit_synsets(path: Path) -> list[str]:
    """ILSVRC2012_ID order (1-based IDs -> wnids) from the devkit's meta.mat or from a
    `map_clsloc.txt`-style text file (`wnid id name` or one wnid per line)."""
    if path.suffix == ".mat":
        try:
            from scipy.io import loadmat  # only this rare input needs scipy
        except ImportError:
            raise PipelineError(f"reading {path} needs scipy: pip install 'ae-pipeline[devkit]',"
                                f" or give the synset order as a map_clsloc.txt") from None

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        return [str(s["WNID"]) for s in sorted(leaves, key=lambda s: int(s["ILSVRC2012_ID"]))]
    entries = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if all(len(e) >= 2 and e[1].isdigit() for e in entries):
        entries.sort(key=lambda e: int(e[1]))
    return [e[0] for e in entries]


def find_devkit_synsets(label_file: Path, root: Path) -> Path:
    places = [label_file.parent, *(root / d for d in DEVKIT_DATA_DIRS)]
    for place in places:
        for name in DEVKIT_SYNSET_FILES:
            if (place / name).is_file():
                return place / name
    raise PipelineError(
        f"{label_file} gives class numbers in the devkit's synset order, but no "
        f"{' or '.join(DEVKIT_SYNSET_FILES)} was found beside it or in {root}: put the "
        "devkit's data/ files there, or give labels as a `filename,wnid` CSV")


def read_ground_truth_labels(path: Path, lines: list[str], root: Path) -> dict[str, str]:
    synsets = read_devkit_synsets(find_devkit_synsets(path, root))
    labels = {}
    for i, line in enumerate(lines, start=1):
        class_id = int(line)
        if not 1 <= class_id <= len(synsets):
            raise PipelineError(f"{path}:{i}: class number {class_id} is outside the "
                                f"devkit's 1..{len(synsets)}")
        labels[f"ILSVRC2012_val_{i:08d}"] = synsets[class_id - 1]
    return labels


def read_val_labels(path: Path, root: Path, classes: ClassMap) -> dict[str, str]:
    """File stem -> wnid from any of the supported label files (sniffed by content)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read val labels {path}: {e}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all(line.isdigit() for line in lines):
        return read_ground_truth_labels(path, lines, root)
    rows = list(csv.reader(lines))
    if rows and [c.strip() for c in rows[0][:2]] == ["ImageId", "PredictionString"]:
        return read_kaggle_labels(path, rows)
    return read_plain_labels(path, rows, classes)


def find_val_labels(root: Path) -> Path | None:
    for name in (KAGGLE_LABELS, GROUND_TRUTH_LABELS, PLAIN_LABELS):
        for place in (root / d for d in DEVKIT_DATA_DIRS):
            if (place / name).is_file():
                return place / name
    return None


# ---------------------------------------------------------------- listing and keys

@dataclass(frozen=True)
class Listing:
    """What a directory walk found: `files` (POSIX paths relative to ROOT, sorted) and
    `failures` ({"src", "reason"}, sorted): entries that cannot be inputs (FIFOs, sockets,
    devices, broken links, directory loops, unreadable directories)."""

    files: list[str]
    failures: list[dict[str, str]]


def printable(path: str) -> str:
    """A path for messages: bytes that are not UTF-8 (os.listdir's surrogate escapes,
    which `print` cannot encode) shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_order(src: str) -> list[str]:
    return src.split("/")  # the order of sorted Path objects: component by component


def scan_files(root: Path, directory: Path) -> Listing:
    """Every regular file under `directory` (file links followed) as a POSIX path relative
    to `root`, in the order of sorted Path objects; hidden files and folders are skipped.

    Directories are tracked by (st_dev, st_ino): a link back up the tree (`loop -> .`,
    `up -> ..`) or a second way to a listed directory is recorded as a failure, never
    walked again. Real folders are walked before linked ones, each kind in path order, so
    the files of a directory reached both ways keep the path (and the class) of the real
    folder, on every machine. Only regular files are inputs: a FIFO would block the job
    at its first read. Plain strings, not Path objects: on ImageNet's 1.33 M files
    pathlib's per-file cost delayed the first decode by many seconds (README,
    Performance); `os.scandir`'s d_type tells plain files and folders apart without a stat."""
    start = len(os.path.join(str(root), ""))
    files: list[str] = []
    failures: list[dict[str, str]] = []
    seen: dict[tuple[int, int], str] = {}
    real, linked = [str(directory)], []  # directories still to walk
    while real or linked:
        if not real:  # linked folders last, in path order
            linked.sort(key=lambda p: p.split(os.sep), reverse=True)
        dirpath = real.pop() if real else linked.pop()
        relative = dirpath[start:].replace(os.sep, "/")
        try:
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                failures.append({"src": relative, "reason": (
                    f"directory loop: the directory {printable(seen[st.st_dev, st.st_ino])} "
                    "again (a link back up the tree, or a second link to it); its files are "
                    "listed once, from there")})
                continue
            seen[st.st_dev, st.st_ino] = relative
            with os.scandir(dirpath) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as e:
            failures.append({"src": relative, "reason": f"unreadable directory: {e.strerror}"})
            continue
        folders, prefix = [], relative + "/"
        for entry in entries:
            try:  # d_type answers both for plain files and folders: no stat
                if entry.is_file():  # a regular file, or a link to one
                    files.append(prefix + entry.name)
                    continue
                if entry.is_dir():
                    folders.append(entry)
                    continue
            except OSError:
                pass  # a link that cannot be followed: not_an_input says why
            failures.append({"src": prefix + entry.name, "reason": not_an_input(entry)})
        for entry in sorted(folders, key=lambda e: e.name, reverse=True):  # popped in order
            (linked if entry.is_symlink() else real).append(entry.path)
    return Listing(sorted(files, key=path_order),
                   sorted(failures, key=lambda f: path_order(f["src"])))


def not_an_input(entry: os.DirEntry) -> str:
    """Why an entry that is neither a regular file nor a directory cannot be an input."""
    try:
        mode = entry.stat().st_mode
    except OSError as e:
        return link_problem(entry, e)
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"not a regular file: {what}"
    return "not a regular file"


def link_problem(entry: os.DirEntry, error: OSError) -> str:
    if not entry.is_symlink():
        return f"unreadable: {error.strerror}"
    if error.errno == errno.ELOOP:
        return "symbolic link loop: the link never resolves to a file"
    try:
        target = printable(os.readlink(entry.path))
    except OSError:
        target = "?"
    return f"broken symbolic link (-> {target}): {error.strerror}"


def list_files(root: Path, directory: Path) -> list[str]:
    """The regular files of `scan_files` (what cannot be an input left out)."""
    return scan_files(root, directory).files


NOT_KEY_BYTES = re.compile(rb"[^A-Za-z0-9_-]")


def key_base(src: str) -> str:
    """The file name without its extension (the last `.suffix`), every BYTE outside
    [A-Za-z0-9_-] replaced by `_`: `a.b.JPEG` -> `a_b`. Bytes, not characters, so that a
    name that is not UTF-8 gets a key too, and the same one whatever the locale."""
    name = os.fsencode(src).rsplit(b"/", 1)[-1]
    return sanitise_key(os.fsdecode(os.path.splitext(name)[0]))


def sanitise_key(stem: str) -> str:
    """`stem` with every byte outside [A-Za-z0-9_-] replaced by `_` ("_" if empty)."""
    return NOT_KEY_BYTES.sub(b"_", os.fsencode(stem)).decode("ascii") or "_"


def assign_keys(srcs: list[str]) -> list[str]:
    """Keys from file names (`n01440764_10026`); names that collide (the same name in two
    folders, or names differing only in characters outside [A-Za-z0-9_-]) get a hash of
    their path's bytes appended, so keys stay unique and stable across runs and machines."""
    bases = [key_base(src) for src in srcs]
    counts = Counter(bases)
    keys = [b if counts[b] == 1 else f"{b}_{hashlib.sha1(os.fsencode(s)).hexdigest()[:10]}"
            for b, s in zip(bases, srcs)]
    if len(set(keys)) != len(keys):  # pragma: no cover - needs a 40-bit hash collision
        raise PipelineError("could not derive unique sample keys from the file names")
    return keys


@dataclass(frozen=True)
class SplitListing:
    items: list[Item]
    labelled_by: str  # how the items were labelled, for the manifest
    failures: list[dict[str, str]]  # entries that are not inputs (Listing.failures)


def scan_split(root: Path, split: str, classes: ClassMap,
               val_labels: Path | None) -> SplitListing:
    """Every input of a split with its label, and the entries that cannot be inputs."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise PipelineError(f"{split_dir} does not exist: --splits names subdirectories of "
                            f"--input ({root})")
    listing = scan_files(root, split_dir)
    srcs = listing.files
    if class_folders(split_dir):
        # ImageFolder layout: the first folder below the split names the class; files
        # directly in the split directory get no label (listed as failures).
        parts = [src.split("/") for src in srcs]
        wnids = [p[1] if len(p) > 2 else None for p in parts]
        labelled_by = "class folders"
    else:
        labels_path = val_labels or find_val_labels(root)
        if labels_path is None:
            raise PipelineError(
                f"{split_dir} is flat (no class folders) and no labels were found in {root} "
                f"({KAGGLE_LABELS}, {GROUND_TRUTH_LABELS} + devkit, or {PLAIN_LABELS}); "
                "pass --val-labels FILE")
        labels = read_val_labels(labels_path, root, classes)
        wnids = [labels.get(stem_of(s)) for s in srcs]
        labelled_by = str(labels_path)
    index = classes.index()
    check_known_classes(split, wnids, index, classes.source)
    keys = assign_keys(srcs)
    items = [Item(s, w, index.get(w) if w else None, k) for s, w, k in zip(srcs, wnids, keys)]
    return SplitListing(items, labelled_by, listing.failures)


def list_split(root: Path, split: str, classes: ClassMap,
               val_labels: Path | None) -> tuple[list[Item], str]:
    """The items of `scan_split` and how they were labelled (entries that cannot be
    inputs left out)."""
    listing = scan_split(root, split, classes, val_labels)
    return listing.items, listing.labelled_by


def check_known_classes(split: str, wnids: list[str | None], index: dict[str, int],
                        source: str) -> None:
    unknown = sorted({w for w in wnids if w is not None and w not in index})
    if unknown:
        raise PipelineError(
            f"{split}: {len(unknown)} classes are not in the class map from {source} "
            f"(e.g. {', '.join(printable(w) for w in unknown[:3])}): remove those inputs or "
            "pass --classes with every class")


def input_fingerprint(items: list[Item]) -> dict[str, Any]:
    # surrogateescape: the bytes of names that are not UTF-8 (UTF-8 ones hash as before)
    text = "".join(f"{i.src}\t{i.wnid}\n" for i in items)
    listing = hashlib.sha256(text.encode("utf-8", "surrogateescape"))
    return {"num_files": len(items), "listing_sha256": listing.hexdigest()}
