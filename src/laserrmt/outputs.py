"""Atomic output folders: a run writes into a temporary sibling and renames it into place.

A run that fails or is killed leaves the existing output (and the user's input) untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from laserrmt.errors import OutputExistsError


def check_output_dir(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an existing output folder early, before any expensive work."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output folder {path} exists already; choose another --out or pass --overwrite"
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} is a file; choose a folder for --out")
    return path


@contextmanager
def atomic_output_dir(out: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only when the block completes."""
    final = check_output_dir(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        os.rename(tmp, final)
        return
    # POSIX cannot rename a folder over a non-empty one: move the old one aside first and put it
    # back if the second rename fails, so the output is never left missing or half-written.
    backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a file through a temporary sibling and a rename, so readers never see half of it.

    The one atomic file writer: plans, checkpoint states and ``--json`` outputs all use it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            # On disk before the rename: a crash must not leave an empty file under the name.
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
