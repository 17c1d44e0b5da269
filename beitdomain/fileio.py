"""Crash-safe file writing: a file either has its old content or its complete new content.

Every artefact a run depends on (checkpoints, weights, manifests, result tables) is written to a
temporary file in the same folder, flushed and fsynced, then renamed over the target; the rename
is atomic on POSIX file systems, so a kill -9 or a full disk never leaves a half-written file
under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

from beitdomain.user import UserError


def printable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (held as surrogates, PEP 383) shown as
    ``\\xff`` escapes, for titles, tables and messages that must be valid Unicode."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# What a spreadsheet may run as a formula when a cell starts with it (OWASP, CSV injection)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(text: str) -> str:
    """`text` for a CSV cell that a spreadsheet shows as text, never runs: a leading `'` before
    a formula start (`=HYPERLINK(...)`, `+cmd|...`, `-`, `@`, tab, CR), and before a leading
    `'` itself, so `from_spreadsheet_text` gives back exactly `text`."""
    return "'" + text if text.startswith((*_FORMULA_STARTS, "'")) else text


def from_spreadsheet_text(cell: str) -> str:
    """The text `spreadsheet_text` wrote into `cell`."""
    return cell[1:] if cell.startswith("'") else cell


class WriteError(OSError, UserError):
    """A write that failed (disk full, permissions); the previous file is intact.

    Built as `WriteError(errno, message)`: `errno` stays readable, and the message, which
    already says why, is all the user reads (no "[Errno 28]" before it).
    """

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None else super().__str__()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads writing
    files meanwhile would otherwise see a umask of 0)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)  # elsewhere the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Opens a temporary sibling of `path` for writing; renames it over `path` on success.

    Raises:
        WriteError: when writing fails; the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    make_dirs(path.parent, f"write {path}")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only folder or file system, no permission, no inodes
        raise WriteError(
            e.errno,
            f"could not write {path}: {e.strerror or e} in {path.parent} (nothing was written)",
        ) from e
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 minus
        # the umask), so colleagues and services can read a shared run folder's weights.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(
            e.errno, f"could not write {path}: {e.strerror or e} (the previous version is intact)"
        ) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_dirs(folder: str | Path, why: str = "") -> Path:
    """`folder.mkdir(parents=True, exist_ok=True)`, failing with a `WriteError` naming it.

    A read-only output (a mount, a folder without write permission) or a path through a file
    then reads as one sentence ("could not create the folder x to write x/y: Permission
    denied"), not a traceback. `why` says what the folder is for.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        to = f" to {why}" if why else ""
        raise WriteError(
            e.errno, f"could not create the folder {folder}{to}: {e.strerror or e}"
        ) from e
    return folder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Writes a state dict as safetensors, whole or not at all (tensors copied to CPU first).

    safetensors needs contiguous CPU tensors; channels_last weights and CUDA tensors are not.
    """
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` as UTF-8; file names that are not UTF-8 (held as surrogates, PEP 383)
    go back to their original bytes instead of failing with UnicodeEncodeError."""
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# Below this much free space, a writer's failure is taken for a full disk.
FULL_DISK_BYTES = 64 << 20


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged process may still write on `folder`'s file system."""
    return shutil.disk_usage(folder).free


def atomic_save(path: str | Path, save: Callable[[IO[bytes]], None]) -> None:
    """Atomically writes what `save(file)` writes (e.g. `lambda f: torch.save(obj, f)`).

    torch.save's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."), not
    as ENOSPC; with the file system (nearly) full, that becomes the same `WriteError` as any
    other full-disk write, naming the file.
    """
    path = Path(path)
    with atomic_open(path, "wb") as f:
        try:
            save(f)
        except RuntimeError as e:
            free = free_bytes(path.parent)
            if free >= FULL_DISK_BYTES:
                raise
            why = f"No space left on device ({free >> 20} MiB free; the writer said: {e})"
            raise OSError(errno.ENOSPC, why) from e


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- folders beitdomain owns: a marker naming the kind, and one writer at a time -------------

RUN_MARKER = ".beitdomain-run.json"  # written only by beitdomain: this folder is one of ours
LOCK_FILE = ".beitdomain.lock"


class FolderLockedError(OSError, UserError):
    """Another live process writes into this folder (its PID is in the message)."""


class LockFileError(UserError):
    """The folder's lock path is a symbolic link or not a regular file (never opened)."""


def check_lock_file(folder: str | Path) -> None:
    """Refuses a `<folder>/.beitdomain.lock` that is a link or not a regular file: opening it
    would truncate whatever it points at (the user's file), or block on a FIFO.

    Raises:
        LockFileError: naming the lock path.
    """
    path = Path(folder) / LOCK_FILE
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise LockFileError(f"{path}: cannot check the lock file ({e}); nothing was written") from e
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise LockFileError(
            f"{path} is {what}, not beitdomain's lock file; nothing was written. Remove it, or "
            f"choose another folder with --out"
        )


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The run marker of `folder` (kind, files written), or None when it has none."""
    p = Path(folder) / RUN_MARKER
    try:
        marker = json.loads(p.read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("beitdomain") == 1 else None


def write_marker(folder: str | Path, kind: str, files: list[str] | None = None) -> None:
    """Marks `folder` as a beitdomain folder of `kind`; `files` are the ones it wrote."""
    old = read_marker(folder) or {}
    atomic_write_json(
        Path(folder) / RUN_MARKER,
        {
            "beitdomain": 1,
            "kind": kind,
            "created": old.get("created") or _utc_now(),
            "files": sorted(set(files if files is not None else old.get("files", []))),
        },
    )


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class FolderLock:
    """An exclusive OS lock on `<folder>/.beitdomain.lock` (flock on POSIX, msvcrt on Windows).

    The kernel drops the lock when the process ends, however it ends, so a kill -9 never leaves
    a stale lock. Within one process a second `acquire` of the same folder takes the lock over
    (an earlier run object can outlive its failure, e.g. held by a traceback); across processes
    the second writer gets `FolderLockedError` naming the PID that holds the folder.
    """

    _held: ClassVar[
        dict[str, tuple[int, object]]
    ] = {}  # real path -> (fd, owner token), this process

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._key = os.path.realpath(self.folder)
        self._token = object()

    def acquire(self, what: str = "this folder") -> FolderLock:
        held = FolderLock._held.get(self._key)
        if held is not None:
            FolderLock._held[self._key] = (held[0], self._token)
            return self
        path = self.folder / LOCK_FILE
        check_lock_file(self.folder)
        # O_NOFOLLOW: a link swapped in after the check fails (ELOOP) instead of truncating its
        # target; O_NONBLOCK: a FIFO swapped in does not hang the open.
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags, 0o666 & ~_umask())
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EMLINK):
                raise WriteError(
                    e.errno, f"could not create the lock {path}: {e.strerror or e}"
                ) from e
            check_lock_file(self.folder)  # names the link
            raise LockFileError(f"{path} is a symbolic link; nothing was written") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            check_lock_file(self.folder)
            raise LockFileError(f"{path} is not a regular file; nothing was written")
        try:
            _lock_fd(fd)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"PID {holder}" if holder else "another process"
            raise FolderLockedError(
                errno.EBUSY,
                f"{self.folder} is in use: {who} is writing {what} there (lock {path}). Wait "
                f"for it to finish or stop it, or choose another folder; one writer per folder "
                f"keeps two runs from mixing their files",
            ) from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        FolderLock._held[self._key] = (fd, self._token)
        return self

    def release(self) -> None:
        """Drops the lock, unless another object of this process has taken it over."""
        held = FolderLock._held.get(self._key)
        if held is None or held[1] is not self._token:
            return
        del FolderLock._held[self._key]
        with contextlib.suppress(OSError):
            os.close(held[0])  # closing the descriptor releases the lock


def _lock_fd(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip())
    return None


def written_names(folder: Path, record: str, names: Iterable[str]) -> tuple[set[str], list[str]]:
    """For an output folder that records what a command wrote in it (`folder/record`, a JSON
    list of file names): the names recorded, and those of `names` that exist in `folder`
    without being recorded (another program's files, which the command must not replace)."""
    ours: set[str] = set()
    if (folder / record).is_file():
        try:
            ours = {str(n) for n in json.loads((folder / record).read_text())}
        except (ValueError, TypeError):  # damaged or foreign: nothing counts as written
            ours = set()
    return ours, [n for n in names if (folder / n).exists() and n not in ours]
