"""The compiled kernels' buffer pool: its statistics, its limit, and releasing its unused buffers.

The pool itself lives in the compiled kernels; these functions only talk to it.
"""
from __future__ import annotations

from typing import Dict

from .compiled import _extension

__all__ = ["buffer_pool_stats", "set_buffer_pool_limit", "release_buffers"]


def buffer_pool_stats() -> Dict[str, int]:
    """State of the compiled kernels' buffer pool (all zero without the compiled kernels).

    The kernels allocate their outputs of 4 MiB and more (masked conv outputs, branch fusion, fuse
    layers) from a pool: the memory of a dead output serves the next one of about its size with its
    pages still mapped, instead of a fresh allocation that the kernel must fault in and zero again
    (glibc maps every allocation above 32 MB anew). The pool keeps at most ``limit_bytes`` of
    unused buffers, 2 GiB unless ``ANYTIMEIFY_POOL_MB`` or :func:`set_buffer_pool_limit` says
    otherwise.

    Returns:
        ``unused_bytes`` and ``unused_buffers`` held for reuse, ``hits`` and ``misses`` (pooled
        allocations served from the pool / newly allocated) and ``limit_bytes``.
    """
    ext = _extension()
    values = ext.pool_stats() if ext is not None else [0, 0, 0, 0, 0]
    return dict(zip(("unused_bytes", "unused_buffers", "hits", "misses", "limit_bytes"), values))


def set_buffer_pool_limit(limit_bytes: int) -> int:
    """Keep at most ``limit_bytes`` of unused buffers for reuse (0 turns pooling off); returns the
    previous limit (0 without the compiled kernels). Buffers above the new limit are released."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    ext = _extension()
    return int(ext.set_pool_limit(limit_bytes)) if ext is not None else 0


def release_buffers() -> None:
    """Return every unused pooled buffer to the system (outputs still alive are not affected)."""
    ext = _extension()
    if ext is not None:
        ext.release_pool()
