"""The compiled kernels as the engine uses them: loading them, what they are built for, and
whether they may run on given tensors.

The kernels are C++/OpenMP (:mod:`anytimeify.masking._ext`, built at first use). They run on
float32 CPU tensors with real data: never while tracing, compiling or exporting (:func:`_traced`),
where PyTorch's ops take their place.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._env import getenv
from . import _ext
from .geometry import ConvGeometry

__all__ = ["DEFAULT_ISA", "kernel_isa", "inference_kernels", "implicit_available"]


#: what the kernels are built for when none are loaded (the AVX-512 build's tables): block widths
#: of the implicit GEMM, output channels per chunk and positions per block of the row kernel
DEFAULT_ISA = {"isa": "none", "lanes": 16, "registers": 32, "blocks": [16, 32, 48, 64],
               "block_positions": [14, 12, 8, 6], "row_chunks": [4, 6, 8, 10, 12], "row_block": 32}


def kernel_isa(ext=None) -> dict:
    """What the compiled kernels (``ext``, default: the loaded ones) are built for: ``isa``
    (``"avx512"``, ``"avx2"``, ``"neon"``, ...), vector ``lanes`` and ``registers``, the implicit
    GEMM's block widths (``blocks``) and the row kernel's chunks (``row_chunks``) and positions per
    block (``row_block``); :data:`DEFAULT_ISA` without compiled kernels."""
    ext = ext if ext is not None else _extension()
    if ext is None:
        return DEFAULT_ISA
    info = getattr(ext, "_anytimeify_isa", None)
    if info is None:
        info = dict(ext.isa())
        ext._anytimeify_isa = info
    return info


def _extension():
    """The compiled kernels, or None (not built, disabled with ``ANYTIMEIFY_NO_EXT=1``)."""
    if getenv("ANYTIMEIFY_NO_EXT", "") not in ("", "0"):
        return None
    return _ext.load()


_UNLABELLED = contextlib.nullcontext()


def _kernel(name: str):
    """A profiler label for a compiled kernel call (``anytimeify::<name>`` in torch.profiler tables);
    nothing while no profiler runs (a label costs about as much as a small kernel call)."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return _UNLABELLED
    return torch.profiler.record_function("anytimeify::" + name)


def _traced(tensors: Sequence[Tensor]) -> bool:
    """Whether ops on ``tensors`` are being traced or compiled rather than run on their data.

    The compiled kernels are opaque to every tracer and read the tensors' memory, so they must
    not run on proxies or on tensors without data: under ``torch.jit.trace``, torch.fx symbolic
    tracing, ``torch.compile`` and ``torch.export`` (both set ``torch.compiler.is_compiling()``),
    under a dispatch mode (``make_fx``, ``FakeTensorMode``, functionalization: the mode would not
    see the kernel's work) and on tensors that are not plain (FakeTensor, functional tensors,
    other subclasses). PyTorch's ops take their place there, with the same result up to float
    rounding.
    """
    if (torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None):
        return True
    for t in tensors:  # (a loop: this runs for every engine call, a generator costs as much as the checks)
        if type(t) not in _PLAIN_TENSORS or torch._is_functional_tensor(t):
            return True
    return False


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _ext_for(x: Tensor, use_extension: bool = True):
    """The compiled kernels if they can run on ``x`` (float32 on the CPU, not traced), else None."""
    if not use_extension or x.dtype != torch.float32 or x.device.type != "cpu" or _traced((x,)):
        return None
    return _extension()


def inference_kernels(tensors: Sequence[Tensor]):
    """The compiled kernels for a dense inference op on ``tensors`` (HRNet's branch fusion, fuse
    layers): 4-d float32 CPU tensors, no autograd, not while tracing, compiling or exporting
    (see :func:`_traced`); else None (use PyTorch)."""
    if _traced(tensors):
        return None
    if any(t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return _extension()


def implicit_available(geometry: ConvGeometry, x: Tensor, use_extension: bool = True) -> bool:
    """Whether the compiled implicit GEMM can run a conv of ``geometry`` on tensors like ``x``.

    It needs the compiled kernels, float32 CPU tensors and an ungrouped conv.
    """
    return geometry.groups == 1 and _ext_for(x, use_extension) is not None
