"""What machine a figure was measured on: CPU model, vector ISA, threads, library versions.

Every benchmark prints :func:`machine_info` with its JSON, and the kernel tuner keys its cache by
:func:`machine_key`, so a timing is never read as if it belonged to another CPU.
"""
from __future__ import annotations

import functools
import hashlib
import platform
from typing import Dict, List

__all__ = ["cpu_model", "cpu_flags", "machine_info", "machine_key"]

#: CPU feature flags that decide which kernels are fast (x86 ``/proc/cpuinfo`` names, ARM ``Features``)
VECTOR_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16", "avx2", "fma", "avx",
                "sse4_2", "asimd", "sve", "sve2", "bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> Dict[str, str]:
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("Model") or info.get("Hardware") or platform.processor()
    if not name and info.get("CPU implementer"):
        name = f"ARM implementer {info['CPU implementer']} part {info.get('CPU part', '?')}"
    return name or platform.machine() or "unknown CPU"


def cpu_flags() -> List[str]:
    """The vector-ISA flags of :data:`VECTOR_FLAGS` this CPU has, in that order."""
    info = _cpuinfo()
    present = set((info.get("flags") or info.get("Features") or "").split())
    return [flag for flag in VECTOR_FLAGS if flag in present]


def machine_info() -> Dict[str, object]:
    """CPU model, family/model numbers, vector flags, the compiled kernels' ISA, torch threads and
    versions: what a benchmark's JSON carries next to its figures."""
    import torch

    from .masking.compiled import kernel_isa

    info = _cpuinfo()
    isa = kernel_isa()
    return {
        "cpu": cpu_model(),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "machine": platform.machine(),
        "vector_flags": cpu_flags(),
        "kernel_isa": isa["isa"],
        "kernel_lanes": isa["lanes"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_count": _logical_cpus(),
    }


def _logical_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_key(threads: int) -> str:
    """A short key of everything a timing depends on besides the code: CPU model and family,
    vector flags, thread count, torch version, the kernels' ISA."""
    import torch

    from .masking.compiled import kernel_isa

    info = _cpuinfo()
    parts = [cpu_model(), info.get("cpu family", ""), info.get("model", ""), ",".join(cpu_flags()),
             f"threads={threads}", torch.__version__, kernel_isa()["isa"], platform.machine()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
