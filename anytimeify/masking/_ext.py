"""Builds and loads the compiled CPU kernels of the masked-conv engine (``anytimeify/_C``).

The extension is compiled with ``torch.utils.cpp_extension.load`` on first use into a cache
directory (``$ANYTIMEIFY_EXT_DIR`` if set, else torch's extension cache) and loaded once per
process. When no compiler is available, the build fails or ``ANYTIMEIFY_NO_EXT=1`` is set,
:func:`load` returns None and the engine uses its pure-PyTorch path, which computes the same result.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

_logger = logging.getLogger(__name__)

__all__ = ["load", "available", "SOURCE"]

#: the C++ source of the extension
SOURCE = Path(__file__).resolve().parent.parent / "_C" / "masked_ops.cpp"

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None}


def _machine_tag() -> str:
    """Short tag of the CPU, so a binary built with -march=native is never loaded on another CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        flags = platform.processor()
    return hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:8]


def _build() -> Optional[ModuleType]:
    if not SOURCE.is_file():
        _logger.info("masked-conv extension source %s not found; using the PyTorch path", SOURCE)
        return None
    from torch.utils.cpp_extension import load as load_extension

    build_dir = os.environ.get("ANYTIMEIFY_EXT_DIR")
    kwargs = {}
    if build_dir:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = build_dir
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return load_extension(
        name=f"anytimeify_masked_ops_{_machine_tag()}",
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
        **kwargs,
    )


def _pool_limit_from_env() -> Optional[int]:
    """Bytes from ``ANYTIMEIFY_POOL_MB`` (MiB of unused output buffers kept for reuse; 0: no
    pooling), or None when unset."""
    text = os.environ.get("ANYTIMEIFY_POOL_MB", "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"ANYTIMEIFY_POOL_MB must be a whole number of MiB >= 0, got {text!r}; "
                         "unset it for the default (2048)")
    return int(text) << 20


def load() -> Optional[ModuleType]:
    """The compiled kernels, or None when disabled or unavailable (logged once)."""
    if os.environ.get("ANYTIMEIFY_NO_EXT", "") not in ("", "0"):
        return None
    if _state["tried"]:
        return _state["module"]
    pool_limit = _pool_limit_from_env()  # a bad value is the user's error, not a build failure
    with _lock:
        if not _state["tried"]:
            try:
                module = _build()
                if module is not None and pool_limit is not None:
                    module.set_pool_limit(pool_limit)
                _state["module"] = module
            except Exception as error:  # any build or load failure means: use the PyTorch path
                _logger.warning("could not build the masked-conv C++ extension (%s); using the PyTorch path",
                                str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
                _state["module"] = None
            _state["tried"] = True
    return _state["module"]


def available() -> bool:
    """True when the compiled kernels are loaded (or can be built now)."""
    return load() is not None
