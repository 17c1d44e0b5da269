"""Scanning a folder into a manifest: what images there are, how they read, and their labels.

A manifest lists one entry per file (path relative to the data root, reader, raw shape
``[S, C, H, W]``, stored dtype, frames, label, split, size, mtime) plus the files that could not
be read and why. It is the single list every later step (cache, dataset, splits) works from, and
its fingerprint (sizes + mtimes) goes into a run's record so a changed dataset is noticed.

Labels come from ImageFolder-style first-level subfolders (``root/<label>/...``) or from a CSV
``path,label[,split]`` whose paths resolve inside the root unless explicitly allowed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from beitdomain.data.parallel import parallel_map
from beitdomain.fileio import atomic_write_text
from beitdomain.io import IntensitySpec, ReaderError, normalize, read_raw, select_frames
from beitdomain.user import MissingPathError, UserError

# Side files that commonly live next to images; skipped rather than reported as unreadable.
IGNORED_SUFFIXES = frozenset(
    {".csv", ".tsv", ".txt", ".json", ".jsonl", ".md", ".yaml", ".yml", ".py", ".log", ".html"}
)
VALID_SPLITS = ("train", "val", "test")
ON_ERROR = ("fail", "skip")
MANIFEST_VERSION = 1


class DataError(UserError):
    """A problem with the user's data or data settings; the message says what and where."""


class ScanError(DataError):
    """Files that could not be read or labels that do not fit; lists every problem at once.

    Attributes:
        errors: ``(path, reason)`` pairs.
    """

    def __init__(self, summary: str, errors: Sequence[tuple[str, str]], hint: str = "") -> None:
        self.errors = list(errors)
        lines = [summary, *(f"  {p}: {r}" for p, r in self.errors)]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class ManifestEntry:
    """One image file. ``shape`` is the raw ``[S, C, H, W]`` before normalization."""

    path: str
    reader: str
    shape: list[int]
    dtype: str
    frames: int
    label: str | None = None
    split: str | None = None
    size: int = 0
    mtime_ns: int = 0


@dataclasses.dataclass
class Manifest:
    """The files of a dataset, their labels, and the files that failed to read."""

    root: str
    entries: list[ManifestEntry]
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels (the class index is the position in this list)."""
        return sorted({e.label for e in self.entries if e.label is not None})

    def abspath(self, entry: ManifestEntry) -> Path:
        """The absolute path of an entry (entries outside the root are stored absolute)."""
        p = Path(entry.path)
        return p if p.is_absolute() else Path(self.root) / p

    def fingerprint(self) -> str:
        """sha256 over (path, size, mtime) of all entries: changes when any file changes."""
        h = hashlib.sha256()
        for e in sorted(self.entries, key=lambda e: e.path):
            h.update(f"{e.path}\0{e.size}\0{e.mtime_ns}\n".encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSONL (header line + one entry per line) or CSV, chosen by the suffix.

        Files that failed are written next to it as ``<name>.errors.csv`` (path, reason).
        """
        path = Path(path)
        if path.suffix.lower() == ".csv":
            buf = io.StringIO()
            fields = [f.name for f in dataclasses.fields(ManifestEntry)]
            writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            for e in self.entries:
                row = dataclasses.asdict(e)
                row["shape"] = "x".join(str(s) for s in e.shape)
                writer.writerow(row)
            atomic_write_text(path, buf.getvalue())
        else:
            header = {
                "manifest_version": MANIFEST_VERSION,
                "root": str(self.root),
                "count": len(self.entries),
                "fingerprint": self.fingerprint(),
            }
            lines = [json.dumps(header)]
            lines += [json.dumps(dataclasses.asdict(e)) for e in self.entries]
            atomic_write_text(path, "\n".join(lines) + "\n")
        if self.errors:
            self.save_errors(errors_path(path))

    def save_errors(self, path: str | os.PathLike) -> None:
        """Writes the quarantined files and reasons as CSV ``path,reason``."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(self.errors)
        atomic_write_text(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Manifest:
        """Reads a manifest written by ``save``. ``root`` overrides the stored/implied root."""
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(
                f"{path}: manifest not found (write one with beitdomain data scan)"
            )
        errors: list[tuple[str, str]] = []
        err_file = errors_path(path)
        if err_file.is_file():
            with open(err_file, newline="") as f:
                errors = [(r["path"], r["reason"]) for r in csv.DictReader(f)]
        entries = []
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    entries.append(_entry_from_row(row, path))
            return cls(str(root or path.parent), entries, errors)
        stored_root = None
        with open(path) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if n == 0 and "manifest_version" in obj:
                    stored_root = obj.get("root")
                    continue
                entries.append(ManifestEntry(**obj))
        return cls(str(root or stored_root or path.parent), entries, errors)


def errors_path(manifest_path: str | os.PathLike) -> Path:
    """``manifest.jsonl`` -> ``manifest.errors.csv`` (the quarantine report)."""
    p = Path(manifest_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".errors.csv")


def _entry_from_row(row: dict[str, str], path: Path) -> ManifestEntry:
    try:
        return ManifestEntry(
            path=row["path"],
            reader=row["reader"],
            shape=[int(s) for s in row["shape"].split("x")],
            dtype=row["dtype"],
            frames=int(row["frames"]),
            label=row.get("label") or None,
            split=row.get("split") or None,
            size=int(row.get("size") or 0),
            mtime_ns=int(row.get("mtime_ns") or 0),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: malformed manifest row {row}: {e}") from None


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.suffix.lower() not in IGNORED_SUFFIXES:
                yield p


def _probe(
    path: str, spec: IntensitySpec | None = None
) -> tuple[str, dict[str, Any] | None, str | None]:
    """Decodes one file; returns (path, info, None) or (path, None, reason). Runs in workers.

    With `spec`, the pixels also go through the normalization training will apply, so what
    only fails there (NaN/Inf under nonfinite='error', a missing channel) fails here, before
    any training starts.
    """
    try:
        raw, meta = read_raw(path)
        if spec is not None:
            normalize(select_frames(raw, spec.frames), dict(meta), spec, path)
    except ReaderError as e:
        return path, None, e.reason
    st = os.stat(path)
    info = {
        "reader": str(meta.get("reader", "?")),
        "shape": [int(s) for s in raw.shape],
        "dtype": str(meta.get("dtype", raw.dtype)),
        "frames": int(raw.shape[0]),
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
    }
    return path, info, None


def read_labels_csv(
    csv_path: str | os.PathLike, root: Path, allow_outside_root: bool = False
) -> tuple[list[tuple[Path, str, str | None]], list[tuple[str, str]]]:
    """Parses ``path,label[,split]`` rows (header optional).

    Returns:
        ``(rows, missing)``: resolved (path, label, split) rows, and ``(path, reason)`` for
        files that do not exist (handled like unreadable files).

    Raises:
        ScanError: for malformed rows, duplicate paths, paths outside the root, bad splits.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MissingPathError(f"labels CSV {csv_path} not found (data.labels / --labels-csv)")
    root_resolved = root.resolve()
    rows: list[tuple[Path, str, str | None]] = []
    problems: list[tuple[str, str]] = []
    missing: list[tuple[str, str]] = []
    seen: dict[Path, int] = {}
    with open(csv_path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() == "path":
                continue  # header
            where = f"{csv_path.name} line {lineno}"
            if len(row) not in (2, 3) or not row[0].strip() or not row[1].strip():
                problems.append((where, f"expected 'path,label[,split]', got {row}"))
                continue
            rel, label = row[0].strip(), row[1].strip()
            split = row[2].strip() or None if len(row) == 3 else None
            if split is not None and split not in VALID_SPLITS:
                problems.append((where, f"split {split!r} is not one of {', '.join(VALID_SPLITS)}"))
                continue
            resolved = (root / rel).resolve()
            if not allow_outside_root and not resolved.is_relative_to(root_resolved):
                problems.append(
                    (
                        where,
                        f"{rel!r} resolves outside the data root {root} "
                        "(use paths relative to the root, or --allow-outside-root)",
                    )
                )
                continue
            if resolved in seen:
                problems.append((where, f"{rel!r} duplicates line {seen[resolved]}"))
                continue
            seen[resolved] = lineno
            if not resolved.is_file():
                missing.append((rel, f"listed in {where} but the file does not exist"))
                continue
            rows.append((resolved, label, split))
    if problems:
        raise ScanError(f"{csv_path}: {len(problems)} problem(s) in the labels CSV:", problems)
    return rows, missing


def scan(
    root: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    on_error: str = "fail",
    allow_outside_root: bool = False,
    workers: int = 0,
    progress: bool = False,
    spec: IntensitySpec | None = None,
) -> Manifest:
    """Builds a manifest for a folder tree by reading every image once.

    Args:
        root: Data root, scanned recursively (hidden files and text side files are skipped).
        labels_csv: ``path,label[,split]`` CSV; when given only the listed files are used.
            Without it, files in ``root/<label>/...`` get the first folder name as label.
        on_error: 'fail' raises one ScanError listing every bad file; 'skip' records them in
            ``manifest.errors`` (saved as a quarantine report) and goes on.
        allow_outside_root: Let CSV paths point outside ``root``.
        workers: Decoding processes (0 = in this process).
        progress: Show a rich progress bar.
        spec: Also normalize each image as training will (NaN/Inf, channels), so files that
            would fail mid-training are reported now.

    Raises:
        ScanError: no images, bad labels CSV, or (with on_error='fail') unreadable files.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; valid: fail, skip")
    root = Path(root)
    if not root.is_dir():
        raise ScanError(f"{root}: data root is not a folder", [])
    missing: list[tuple[str, str]] = []
    labels: dict[str, tuple[str | None, str | None]] = {}
    if labels_csv is not None:
        rows, missing = read_labels_csv(labels_csv, root, allow_outside_root)
        paths = [str(p) for p, _, _ in rows]
        labels = {str(p): (lab, split) for p, lab, split in rows}
    else:
        paths = [str(p) for p in _walk(root)]
    if not paths and not missing:
        raise ScanError(
            f"{root}: no image files found (searched recursively; hidden files and "
            f"{', '.join(sorted(IGNORED_SUFFIXES))} are skipped)",
            [],
        )
    root_resolved = root.resolve()
    entries: list[ManifestEntry] = []
    errors = [(p, r) for p, r in missing]
    probed = parallel_map(
        functools.partial(_probe, spec=spec),
        paths,
        workers=workers,
        progress=progress,
        description="Reading headers and pixels",
        chunksize=max(1, len(paths) // 256),
    )
    for path, info, reason in probed:
        rel = _relative(Path(path), root, root_resolved)
        if info is None:
            errors.append((rel, reason or "unreadable"))
            continue
        if labels_csv is not None:
            label, split = labels[path]
        else:
            parts = Path(rel).parts
            label, split = (parts[0] if len(parts) > 1 else None), None
        entries.append(ManifestEntry(path=rel, label=label, split=split, **info))
    if errors and on_error == "fail":
        raise ScanError(
            f"{root}: {len(errors)} of {len(paths) + len(missing)} files could not be used:",
            errors,
            "Fix or remove them, or pass --on-error skip to quarantine them into an errors "
            "report and continue.",
        )
    if not entries:
        raise ScanError(f"{root}: none of the files could be read", errors)
    return Manifest(root=str(root), entries=entries, errors=errors)


def _relative(path: Path, root: Path, root_resolved: Path) -> str:
    for base in (root, root_resolved):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    try:
        return path.resolve().relative_to(root_resolved).as_posix()
    except ValueError:
        return str(path.resolve())  # outside the root (allowed explicitly): keep absolute
