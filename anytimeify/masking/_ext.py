"""Builds and loads the compiled CPU kernels of the masked-conv engine (``anytimeify/_C``).

The extension is compiled with ``torch.utils.cpp_extension.load`` on first use into a cache
directory (``$ANYTIMEIFY_EXT_DIR`` if set, else torch's extension cache) and loaded once per
process. When no compiler is available, the build fails or ``ANYTIMEIFY_NO_EXT=1`` is set,
:func:`load` returns None and the engine uses its pure-PyTorch path, which computes the same result.

The kernels are built for the CPU they run on (``-march=native`` on x86; the register blocking
follows the vector width and register count the compiler targets, see ``isa()`` of the module).
``ANYTIMEIFY_MARCH`` builds for another target instead (``x86-64-v3`` gives the AVX2 kernels on an
AVX-512 machine). A build is cached under a name that hashes everything the binary depends on: the
source, the compiler flags, the torch and Python versions and, for native builds, the CPU; so
checkouts and environments never rebuild each other's kernels.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Sequence, Tuple

_logger = logging.getLogger(__name__)

__all__ = ["load", "available", "build_variant", "build_flags", "SOURCE"]

#: the C++ source of the extension
SOURCE = Path(__file__).resolve().parent.parent / "_C" / "masked_ops.cpp"

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None}
_variants: Dict[Tuple[str, Tuple[str, ...]], Optional[ModuleType]] = {}


def _machine_tag() -> str:
    """Short tag of the CPU, so a binary built with -march=native is never loaded on another CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    flags += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        flags = platform.processor()
    return hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:8]


def build_flags(march: Optional[str] = None, defines: Sequence[str] = ()) -> list:
    """The compiler flags of a build for ``march`` (None: ``$ANYTIMEIFY_MARCH``, else the native
    CPU on x86, the compiler's default elsewhere), plus ``-D`` ``defines``."""
    march = march if march is not None else os.environ.get("ANYTIMEIFY_MARCH", "").strip() or None
    flags = ["-O3", "-fopenmp"]
    if march is not None:
        flags.append(f"-march={march}")
    elif platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    elif platform.machine() in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    flags += [f"-D{d}" for d in defines]
    return flags


def _module_name(flags: Sequence[str]) -> str:
    """A name that changes with everything the binary depends on."""
    import torch

    key = hashlib.sha1()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(flags).encode())
    key.update(torch.__version__.encode())
    key.update(sys.version.encode())
    if any(f in ("-march=native", "-mcpu=native") for f in flags):
        key.update(_machine_tag().encode())
    return f"anytimeify_masked_ops_{key.hexdigest()[:12]}"


def _build(march: Optional[str] = None, defines: Sequence[str] = ()) -> Optional[ModuleType]:
    if not SOURCE.is_file():
        _logger.info("masked-conv extension source %s not found; using the PyTorch path", SOURCE)
        return None
    # importing cpp_extension on a machine without CUDA logs "No CUDA runtime is found": not news here
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        quiet.setLevel(level)

    flags = build_flags(march, defines)
    name = _module_name(flags)
    build_dir = os.environ.get("ANYTIMEIFY_EXT_DIR")
    root = Path(build_dir) if build_dir else Path(cpp_extension.get_default_build_root())
    target = root / name
    if not (target / f"{name}.so").is_file() and not any(target.glob(f"{name}*.so")):
        _logger.warning("building anytimeify's compiled kernels (%s; once per CPU, source and torch version, "
                        "about a minute) into %s", " ".join(flags[2:]) or "default flags", target)
    target.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(target),
        verbose=False,
    )


def build_variant(march: str, defines: Sequence[str] = ()) -> Optional[ModuleType]:
    """The kernels built for another target (``-march=march``, plus ``-D`` ``defines``), loaded
    beside the default ones (tests and benchmarks compare ISAs with it); None where it cannot
    build. ``build_variant("x86-64-v3")`` gives the AVX2 kernels on an AVX-512 machine."""
    key = (march, tuple(defines))
    with _lock:
        if key not in _variants:
            try:
                _variants[key] = _build(march, defines)
            except Exception as error:
                _logger.warning("could not build the kernels for -march=%s %s: %s", march, " ".join(defines),
                                str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
                _variants[key] = None
    return _variants[key]


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
    from .._env import getenv

    if getenv("ANYTIMEIFY_NO_EXT", "") not in ("", "0"):
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
