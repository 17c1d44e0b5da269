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
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from beitdomain.user import UserError


class WriteError(OSError, UserError):
    """A write that failed (disk full, permissions); the previous file is intact."""


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
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temporary sibling of `path` for writing; renames it over `path` on success.

    Raises:
        WriteError: when writing fails; the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 minus
        # the umask), so colleagues and services can read a shared run folder's weights.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
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
    with atomic_open(path, "w") as f:
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
