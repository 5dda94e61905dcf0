"""Handing freed memory back to the operating system.

glibc's allocator keeps freed heap pages for reuse; after a burst of small allocations (the
tokenizer's working structures for a long text, hundreds of MB) they stay resident and every
later peak stacks on top of them. ``malloc_trim`` returns them. Elsewhere (other C libraries,
other systems) there is nothing to do, and memory is only reported, never wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def return_freed_memory() -> bool:
    """Give the allocator's free heap pages back to the system; True where that was done."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
