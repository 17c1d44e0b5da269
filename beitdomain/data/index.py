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
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from beitdomain.data.parallel import parallel_map
from beitdomain.fileio import (
    atomic_write_text,
    from_spreadsheet_text,
    printable,
    spreadsheet_text,
)
from beitdomain.io import IntensitySpec, ReaderError, read_raw
from beitdomain.io.load import prepare
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
    # Images of one group (patient, wafer, slide) stay on one side of every split. From the
    # labels CSV's group column, or 'patient-<n>' for DICOMs (numbered per scan, never the ID).
    group: str | None = None


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
            # surrogateescape: a file name that is not UTF-8 hashes as its own bytes
            h.update(f"{e.path}\0{e.size}\0{e.mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSONL (header line + one entry per line) or CSV, chosen by the suffix.

        Files that failed are written next to it as ``<name>.errors.csv`` (path, reason).
        """
        path = Path(path)
        here = _root_from(path, self.root)
        if path.suffix.lower() == ".csv":
            buf = io.StringIO()
            fields = [f.name for f in dataclasses.fields(ManifestEntry)]
            # the csv module's own line end (\r\n): it quotes a field holding \r or \n, which
            # \n alone did not (a \r in a file name ended the row); `root` on every row, so
            # the manifest opens from any folder
            writer = csv.DictWriter(buf, fieldnames=[*fields, "root"])
            writer.writeheader()
            for e in self.entries:
                row = dataclasses.asdict(e)
                row["shape"] = "x".join(str(s) for s in e.shape)
                for k in _TEXT_COLUMNS:  # a file or label named '=HYPERLINK(..)' stays text
                    row[k] = spreadsheet_text(row[k]) if row[k] is not None else None
                writer.writerow({**row, "root": here})
            atomic_write_text(path, buf.getvalue())
        else:
            header = {
                "manifest_version": MANIFEST_VERSION,
                "root": str(self.root),
                "root_from_manifest": here,
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
        writer = csv.writer(buf)  # \r\n: a \r in a path is quoted (see `save`)
        writer.writerow(["path", "reason"])
        writer.writerows((spreadsheet_text(p), spreadsheet_text(r)) for p, r in self.errors)
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
            with open(err_file, newline="", encoding="utf-8", errors="surrogateescape") as f:
                errors = [
                    (from_spreadsheet_text(r["path"]), from_spreadsheet_text(r["reason"]))
                    for r in csv.DictReader(f)
                ]
        entries = []
        if path.suffix.lower() == ".csv":
            stored = None
            with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
                for row in csv.DictReader(f):
                    stored = stored or row.get("root")
                    entries.append(_entry_from_row(row, path))
            # an older CSV has no root: its own folder, as before
            return cls(str(root or _root_at(path, stored) or path.parent), entries, errors)
        stored_root = None
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if n == 0 and "manifest_version" in obj:
                    stored_root = _root_at(path, obj.get("root_from_manifest")) or obj.get("root")
                    continue
                entries.append(ManifestEntry(**obj))
        return cls(str(root or stored_root or path.parent), entries, errors)


def _root_from(manifest_path: Path, root: str | os.PathLike) -> str:
    """The data root as a manifest at `manifest_path` records it: relative to the manifest's
    own folder (the two can move together, and it opens from any working folder), absolute
    where no relative path leads there (another drive)."""
    where = Path(manifest_path).absolute().parent
    try:
        return Path(os.path.relpath(Path(root).absolute(), where)).as_posix()
    except ValueError:
        return str(Path(root).absolute())


def _root_at(manifest_path: Path, recorded: str | None) -> str | None:
    """The root a manifest recorded with `_root_from`, as a path from the working folder;
    None when it records none, or the folder is not there (the manifest moved without it)."""
    if not recorded:
        return None
    at = os.path.normpath(Path(manifest_path).parent / recorded)
    return at if os.path.isdir(at) else None


def errors_path(manifest_path: str | os.PathLike) -> Path:
    """``manifest.jsonl`` -> ``manifest.errors.csv`` (the quarantine report)."""
    p = Path(manifest_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".errors.csv")


_TEXT_COLUMNS = ("path", "label", "split", "group")  # a CSV manifest's cells of free text


def _entry_from_row(row: dict[str, str], path: Path) -> ManifestEntry:
    row = {k: from_spreadsheet_text(v) if k in _TEXT_COLUMNS and v else v for k, v in row.items()}
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
            group=row.get("group") or None,
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


_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be an image without opening it, or None for a regular file.

    Opening a named pipe blocks until something writes into it (a scan would hang forever),
    and a device or socket is no image either; `os.stat` (links followed) tells without
    opening. A folder (a DICOM series) and a missing file are left to the caller.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not an image file (it was not opened); remove it from the folder"


def dicom_series_folders(paths: Sequence[str]) -> list[str]:
    """Collapses folders whose files are all DICOM into the folder (one series, one volume).

    A folder with any other file keeps its files as separate images. Slices are ordered by
    position when the folder is read (``beitdomain.io.dicom.read_dicom_series``).
    """
    from beitdomain.io.base import is_dicom, read_head

    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(p), []).append(p)
    out: list[str] = []
    for folder, files in by_folder.items():
        try:
            all_dicom = all(
                not_a_regular_file(f) is None and is_dicom(read_head(f, 256)) for f in files
            )
        except ReaderError:
            all_dicom = False
        out += [folder] if all_dicom and len(files) > 1 else files
    return sorted(out)


def path_stat(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime_ns); a series folder sums its files' sizes and takes the newest mtime."""
    if os.path.isdir(path):
        stats = [e.stat() for e in os.scandir(path) if e.is_file() and not e.name.startswith(".")]
        return sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _probe(
    path: str, spec: IntensitySpec | None = None, salt: bytes | None = None
) -> tuple[str, dict[str, Any] | None, str | None]:
    """Decodes one file; returns (path, info, None) or (path, None, reason). Runs in workers.

    With `spec`, the pixels also go through the normalization training will apply, so what
    only fails there (NaN/Inf under nonfinite='error', a missing channel) fails here, before
    any training starts. With `salt`, a DICOM's info carries 'patient': an HMAC of its
    PatientID under the scan's salt (see `beitdomain.io.dicom.patient_digest`).
    """
    special = not_a_regular_file(path)
    if special is not None:
        return path, None, special
    try:
        raw, meta = read_raw(path)
        if spec is not None:
            prepare(raw, dict(meta), spec, path)
    except ReaderError as e:
        return path, None, e.reason
    size, mtime_ns = path_stat(path)
    info = {
        "reader": str(meta.get("reader", "?")),
        "shape": [int(s) for s in raw.shape],
        "dtype": str(meta.get("dtype", raw.dtype)),
        "frames": int(raw.shape[0]),
        "size": size,
        "mtime_ns": mtime_ns,
    }
    if salt is not None and info["reader"] in ("dicom", "dicom-series"):
        from beitdomain.io.dicom import patient_digest

        info["patient"] = patient_digest(path, salt)
    return path, info, None


def read_labels_csv(
    csv_path: str | os.PathLike,
    root: Path,
    allow_outside_root: bool = False,
    group_column: str = "group",
    dicom_series: bool = False,
) -> tuple[list[tuple[Path, str, str | None, str | None]], list[tuple[str, str]]]:
    """Parses ``path,label[,split[,group]]`` rows (header optional).

    With a header, columns are found by name (``path``, ``label``, ``split`` and
    ``group_column``), so ``path,label,patient`` with ``group_column='patient'`` works too;
    split and group, when the header does not name them, keep their places (3rd, 4th).

    Returns:
        ``(rows, missing)``: resolved (path, label, split, group) rows, and ``(path, reason)``
        for files that do not exist (handled like unreadable files).

    Raises:
        ScanError: for malformed rows, duplicate paths, paths outside the root, bad splits.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MissingPathError(
            f"labels CSV {csv_path} not found (it comes from data.labels, `beitdomain finetune "
            f"--labels-csv` or `beitdomain data scan --labels`)"
        )
    root_resolved = root.resolve()
    rows: list[tuple[Path, str, str | None, str | None]] = []
    problems: list[tuple[str, str]] = []
    missing: list[tuple[str, str]] = []
    seen: dict[Path, int] = {}
    columns = {"path": 0, "label": 1, "split": 2, "group": 3}  # without a header
    ncols: tuple[int, ...] = (2, 3, 4)
    # utf-8-sig: Excel starts its CSVs with a byte-order mark. surrogateescape: a path that is
    # not UTF-8 keeps its bytes, so it still names a file of the same (legacy) name on disk.
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() == "path":
                names = [c.strip().lower() for c in row]
                columns = {
                    key: names.index(name)
                    for key, name in (
                        ("path", "path"),
                        ("label", "label"),
                        ("split", "split"),
                        ("group", group_column.strip().lower()),
                    )
                    if name in names
                }
                if "label" not in columns:
                    raise ScanError(f"{csv_path}: the header {row} has no 'label' column", [])
                for key, pos in (("split", 2), ("group", 3)):  # unnamed: by position
                    if key not in columns and pos not in columns.values():
                        columns[key] = pos
                ncols = tuple(range(2, max(len(row), 4) + 1))
                continue  # header
            where = f"{csv_path.name} line {lineno}"
            if len(row) not in ncols:
                problems.append((where, f"expected {_ROW_FORMS}, got {printable(str(row))}"))
                continue
            cell = {k: row[i].strip() if i < len(row) else "" for k, i in columns.items()}
            rel, label = cell.get("path", ""), cell.get("label", "")
            if not rel or not label:
                problems.append((where, f"expected {_ROW_FORMS}, got {printable(str(row))}"))
                continue
            split = cell.get("split") or None
            group = cell.get("group") or None
            if not all(_is_utf8(v) for v in (label, split or "", group or "")):
                problems.append((where, f"label '{printable(label)}' {_NOT_UTF8}"))
                continue
            if split is not None and split not in VALID_SPLITS:
                problems.append((where, f"split {split!r} is not one of {', '.join(VALID_SPLITS)}"))
                continue
            if "\0" in rel:  # no file name can hold one; resolve() would raise ValueError
                shown = printable(rel).replace("\0", "\\0")
                problems.append((where, f"the path '{shown}' holds a NUL character (\\0)"))
                continue
            resolved = (root / rel).resolve()
            if not allow_outside_root and not resolved.is_relative_to(root_resolved):
                problems.append(
                    (
                        where,
                        f"{rel!r} resolves outside the data root {root} "
                        "(use paths relative to the root, or allow them: "
                        "data.allow_outside_root=true in the recipe, or "
                        "`beitdomain data scan --allow-outside-root`)",
                    )
                )
                continue
            if resolved in seen:
                problems.append((where, f"{rel!r} duplicates line {seen[resolved]}"))
                continue
            seen[resolved] = lineno
            special = not_a_regular_file(resolved)
            if special is not None:
                missing.append((rel, f"listed in {where} but {special}"))
                continue
            if not (resolved.is_file() or (dicom_series and resolved.is_dir())):
                why = f"listed in {where} but the file does not exist"
                if not _is_utf8(rel):
                    why += f"; the path {_NOT_UTF8}"
                missing.append((rel, why))
                continue
            rows.append((resolved, label, split, group))
    if problems:
        raise ScanError(f"{csv_path}: {len(problems)} problem(s) in the labels CSV:", problems)
    _check_paths_do_not_repeat_the_root(csv_path, root, rows, missing)
    return rows, missing


def _check_paths_do_not_repeat_the_root(
    csv_path: Path, root: Path, rows: list[Any], missing: list[tuple[str, str]]
) -> None:
    """One hint instead of a line per file when no listed file exists and every path starts
    with the data folder's own name ('cells/a.png' under --data cells): paths written relative
    to the folder above.

    Raises:
        ScanError: such a CSV, naming the prefix and one corrected path that exists.
    """
    if rows or not missing:
        return
    name = root.name
    parts = [PurePosixPath(rel.replace("\\", "/")).parts for rel, _ in missing]
    if not name or not all(len(p) > 1 and p[0] == name for p in parts):
        return
    tails = (PurePosixPath(*p[1:]) for p in parts)
    fixed = next((t for t in tails if (root / t).exists()), None)
    if fixed is None:
        return
    raise ScanError(
        f"{csv_path}: none of its {len(missing)} paths exists under the data folder {root}, "
        f"and every one starts with that folder's own name '{name}/': paths are relative to "
        f"the data folder, so '{name}/{fixed}' should read '{fixed}' (remove the leading "
        f"'{name}/' from the CSV, or give the folder above as the data folder)",
        [],
    )


_ROW_FORMS = "'path,label[,split]' (or path,label,split,group)"
_NOT_UTF8 = (
    "is not UTF-8 text (the CSV was saved in another encoding, e.g. Latin-1 / Windows-1252): "
    "save it as UTF-8 (in Excel: Save As > 'CSV UTF-8')"
)


def _is_utf8(text: str) -> bool:
    """False when `text` holds bytes that did not decode as UTF-8 (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan(
    root: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    on_error: str = "fail",
    allow_outside_root: bool = False,
    workers: int = 0,
    progress: bool = False,
    spec: IntensitySpec | None = None,
    group_column: str = "group",
    patient_groups: bool = True,
    dicom_series: bool = False,
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
        group_column: Column of the labels CSV naming each image's group (patient, wafer,
            slide); images of a group stay on one side of every split.
        patient_groups: DICOMs without a CSV group are grouped by PatientID: an HMAC under a
            salt that lives only during this scan, written as 'patient-1', 'patient-2', ...
            (numbered by first path), never the ID or its hash.
        dicom_series: A folder whose files are all DICOM is one image: a series read as one
            volume, slices ordered by position (not file name). A labels CSV then lists the
            folder.

    Raises:
        ScanError: no images, bad labels CSV, or (with on_error='fail') unreadable files.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; valid: fail, skip")
    root = Path(root)
    if not root.is_dir():
        raise ScanError(f"{root}: data root is not a folder", [])
    missing: list[tuple[str, str]] = []
    labels: dict[str, tuple[str | None, str | None, str | None]] = {}
    if labels_csv is not None:
        rows, missing = read_labels_csv(
            labels_csv, root, allow_outside_root, group_column, dicom_series
        )
        paths = [str(p) for p, _, _, _ in rows]
        labels = {str(p): (lab, split, group) for p, lab, split, group in rows}
    else:
        paths = [str(p) for p in _walk(root)]
        if dicom_series:
            paths = dicom_series_folders(paths)
    if not paths and not missing:
        raise ScanError(
            f"{root}: no image files found (searched recursively; hidden files and "
            f"{', '.join(sorted(IGNORED_SUFFIXES))} are skipped)",
            [],
        )
    root_resolved = root.resolve()
    entries: list[ManifestEntry] = []
    errors = [(p, r) for p, r in missing]
    import secrets

    salt = secrets.token_bytes(32) if patient_groups else None  # this scan only, never written
    patients: dict[int, str] = {}  # entry index -> digest (in memory only)
    probed = parallel_map(
        functools.partial(_probe, spec=spec, salt=salt),
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
        digest = info.pop("patient", None)
        if labels_csv is not None:
            label, split, group = labels[path]
        else:
            parts = Path(rel).parts
            label, split, group = (parts[0] if len(parts) > 1 else None), None, None
        if group is None and digest is not None:
            patients[len(entries)] = digest
        entries.append(ManifestEntry(path=rel, label=label, split=split, group=group, **info))
    number: dict[str, int] = {}
    if len(set(patients.values())) < 2:
        patients = {}  # one PatientID for all (a phantom, an anonymizer's constant): no grouping
    for k in sorted(patients, key=lambda k: entries[k].path):
        entries[k].group = f"patient-{number.setdefault(patients[k], len(number) + 1)}"
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
