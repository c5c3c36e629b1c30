"""Run-folder output: atomic files, and one live run per folder.

Everything the suite writes for users (Lightning checkpoints, checkpoints exported by merging,
result tables, figures, metrics files) goes through :func:`atomic_write`: the content is written
to a temporary file in the destination folder and renamed over the destination only once it is
complete, so a crash, a full disk or a folder made read-only mid-run leaves the previous file
intact; the failure itself is one :class:`OutputWriteError` naming the file.

:class:`RunLock` keeps two processes from writing into one run folder: a lock file holding the
owner's PID, taken over (with a warning) when that process no longer exists.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCK_FILE",
    "OutputWriteError",
    "RunFolderError",
    "RunLock",
    "atomic_folder",
    "atomic_write",
    "atomic_write_text",
    "ensure_writable_dir",
]

LOCK_FILE = ".lightning_simo.lock"


class OutputWriteError(OSError):
    """Writing an output failed (disk full, file-size limit, read-only folder); the message names
    the file and says that the previous version of it is untouched."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno N]" prefix


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (held by a live run, or holding an earlier run)."""


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and fail early, with the fix, when it cannot be written."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"Cannot create output folder {str(p)!r} ({err.strerror}); choose a writable "
            "folder (e.g. --trainer.default_root_dir)."
        ) from err
    if not os.access(p, os.W_OK):
        raise PermissionError(
            f"Output folder {str(p)!r} is not writable; choose a writable folder "
            "(e.g. --trainer.default_root_dir)."
        )
    return p


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the finished file to ``path``.

    The temporary file lives in the destination folder, so the final ``os.replace`` is atomic on
    POSIX file systems; on any error the temporary file is removed and ``path`` is untouched.
    """
    dest = Path(path)
    folder = ensure_writable_dir(dest.parent)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide results from a team
        os.replace(tmp, dest)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OutputWriteError) or err.errno not in _WRITE_ERRNOS:
            raise
        raise OutputWriteError(
            err.errno,
            f"{dest}: could not be written ({os.strerror(err.errno)}); its previous version, if "
            "any, is untouched (free disk space or choose a writable --trainer.default_root_dir, "
            "then rerun)",
        ) from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return dest


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
"""Write failures caused by the output's place (full, too large, read-only), not by a bug."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Hold ``folder`` for this process: a second run into it is refused while this one lives.

    The lock file holds the owner's PID and host. A lock of a process that no longer exists (a
    run killed with SIGKILL, a crashed node) is taken over with a warning; so is one left by an
    earlier incarnation of the same SLURM job (a requeue). Taking a lock this process already
    holds is a no-op, so the study can hold its folder while its stages run in-process.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._owned = False

    def _record(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }

    def _holder(self) -> dict[str, object] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # vanished, or half-written by a process killed while taking it
        return holder if isinstance(holder, dict) else None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self._record(), handle)
        return True

    def acquire(self) -> RunLock:
        ensure_writable_dir(self.folder)
        for _ in range(3):
            if self._create():
                self._owned = True
                return self
            holder = self._holder()
            if holder is None:
                warnings.warn(f"{self.path}: unreadable run lock, taken over", stacklevel=2)
            elif self._is_own(holder):
                return self
            elif self._is_live(holder):
                raise RunFolderError(
                    f"{self.folder}: in use by another run (PID {holder.get('pid')} on "
                    f"{holder.get('host')}) (wait for it to finish, or write to another folder "
                    "with --trainer.default_root_dir / --out)"
                )
            else:
                warnings.warn(
                    f"{self.folder}: taking over the lock of PID {holder.get('pid')}, which no "
                    "longer runs",
                    stacklevel=2,
                )
            self.path.unlink(missing_ok=True)
        raise RunFolderError(
            f"{self.folder}: could not take the run lock {self.path} (another run keeps taking "
            "it; wait for it to finish)"
        )

    def _is_own(self, holder: dict[str, object]) -> bool:
        return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()

    def _is_live(self, holder: dict[str, object]) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job is not None and holder.get("slurm_job_id") == job:
            return False  # the previous incarnation of this requeued job
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here: assume it lives
        pid = holder.get("pid")
        return isinstance(pid, int) and _alive(pid)

    def release(self) -> None:
        if self._owned:
            self._owned = False
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder next to ``path``; once the block completes it replaces
    ``path``. On any error it is removed and ``path`` is untouched.

    An existing non-empty ``path`` is refused unless ``force`` (then replaced at the end).
    """
    dest = Path(path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise ValueError(
            f"Output folder {str(dest)!r} already exists and is not empty; choose another "
            "--out or pass --force to replace it."
        )
    parent = ensure_writable_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial.", dir=parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.chmod(tmp, 0o777 & ~_current_umask())
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
