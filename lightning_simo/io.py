"""Atomic file output: a crash never leaves a file that looks complete.

Everything the suite writes for users (checkpoints exported by merging, result tables, figures,
metrics files) goes through :func:`atomic_write`: the content is written to a temporary file in
the destination folder and renamed over the destination only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_folder", "atomic_write", "atomic_write_text", "ensure_writable_dir"]


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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide results from a team
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


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
