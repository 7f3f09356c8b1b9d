"""Files the toolkit writes and checks: atomic JSON, atomic directories, hashes and stamps.

Everything written is readable by others (0644 files), appears all at once (temporary name,
then rename) and never replaces what it did not write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ipcv_deploy.errors import ArtifactError

__all__ = [
    "FILE_MODE",
    "check_replaceable",
    "interrupts_recorded",
    "sha256_of",
    "staged_directory",
    "stamp_of",
    "write_json",
]

#: Mode of every file written: owner read/write, everyone read (``mkstemp`` gives 0600).
FILE_MODE = 0o644
_CHUNK = 1 << 24
_STAMP_EDGE = 1 << 20  # bytes hashed at each end
_STAMP_SAMPLES = 16  # evenly spaced 64 KiB samples in between
_STAMP_SAMPLE = 1 << 16
_INTERRUPTED = threading.Event()


def _record_interrupt(signum: int, frame: FrameType | None) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_recorded() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` as usual and is also recorded.

    A library that catches the exception (the ONNX exporter retries failed captures) cannot
    hide it: ``staged_directory`` refuses to commit after a recorded Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _record_interrupt)
    _INTERRUPTED.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, then rename), mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_of(path: Path) -> str:
    """A cheap fingerprint: SHA-256 of the size, both 1 MiB ends and 16 samples in between.

    Reads about 3 MiB whatever the file size, so checking it at every start costs nothing; it
    catches truncated, swapped and re-exported files, not every single flipped byte (the full
    ``sha256_of`` does, in ``verify`` and ``inspect``).
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= 2 * _STAMP_EDGE + _STAMP_SAMPLES * _STAMP_SAMPLE:
            digest.update(f.read())
            return digest.hexdigest()
        digest.update(f.read(_STAMP_EDGE))
        span = size - 2 * _STAMP_EDGE - _STAMP_SAMPLE
        for i in range(_STAMP_SAMPLES):
            f.seek(_STAMP_EDGE + span * i // (_STAMP_SAMPLES - 1))
            digest.update(f.read(_STAMP_SAMPLE))
        f.seek(size - _STAMP_EDGE)
        digest.update(f.read(_STAMP_EDGE))
    return digest.hexdigest()


def check_replaceable(out: Path, force: bool, marker: str) -> None:
    """Raise unless ``out`` is free, or ``force`` is given and ``out`` is ours (holds ``marker``).

    Raises:
        ArtifactError: naming why ``out`` cannot be written.
    """
    if out.exists() or out.is_symlink():
        if not force:
            raise ArtifactError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise ArtifactError(
                f"{out} is a file, not a directory written by ipcv-export; refusing to replace "
                "it: pass another --out"
            )
        if not (out / marker).is_file():
            raise ArtifactError(
                f"{out} is not a directory written by ipcv-export (it has no {marker}); "
                "refusing to replace it with --force: pass another --out or remove it yourself"
            )


@contextlib.contextmanager
def staged_directory(out: Path, force: bool, marker: str) -> Iterator[Path]:
    """Write a directory atomically: yield a hidden sibling, rename it to ``out`` on success.

    ``force`` replaces an existing ``out`` only if it is a directory this toolkit wrote (it
    holds ``marker``, e.g. ``manifest.json``); a user's other directory or a file is never
    deleted. On any error the staging directory is removed and ``out`` is untouched.

    Raises:
        ArtifactError: ``out`` exists and ``force`` is false, or it is not ours to replace.
    """
    check_replaceable(out, force, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
