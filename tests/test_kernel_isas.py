"""The compiled kernels built for other vector ISAs than this CPU's own compute the same results.

The register blocking of the kernels follows the vector width and register count the compiler
targets (``anytimeify/_C/masked_ops.cpp``, ``isa()``). The main suite runs the native build; here
the correctness checks run again on builds for the other targets this CPU can execute:
``x86-64-v3`` (the AVX2 kernels, 8 lanes x 16 registers: on an AVX-512 machine, the path of an
AVX2 one), ``x86-64-v2`` (SSE: the portable 4-lane code with 16 registers) and ``x86-64-v2`` with
ARM NEON's tables (4 lanes x 32 registers). Each variant is built once (about a minute) and swapped
in for the engine while its tests run.
"""
from __future__ import annotations

import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anytimeify._machine import cpu_flags
from anytimeify.masking import _ext
from anytimeify.masking.engine import kernel_isa
from test_masked_conv import (
    SETTINGS, check_implicit_gemm, check_implicit_rows, conv_cases, test_branch_fusion_kernel_matches_pytorch,
    test_exit_step_kernels_match_pytorch, test_extension_kernels_match_pytorch, test_fuse_sum_kernel_matches_pytorch,
    test_sparse_equals_dense,
)

#: name -> (-march, defines, (lanes, registers) the build must report)
VARIANTS = {
    "avx2": ("x86-64-v3", (), (8, 16)),
    "sse2": ("x86-64-v2", (), (4, 16)),
    "neon_tables": ("x86-64-v2", ("ANYTIMEIFY_LANES=4", "ANYTIMEIFY_REGS=32"), (4, 32)),
}


def _runnable() -> list:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []  # -march names are x86's; elsewhere the native build is the one tested
    flags = set(cpu_flags())
    return [name for name in VARIANTS if name != "avx2" or {"avx2", "fma"} <= flags]


@pytest.fixture(scope="module", params=_runnable())
def kernels(request):
    """The engine runs the variant's kernels while the module's tests of it run."""
    march, defines, (lanes, registers) = VARIANTS[request.param]
    module = _ext.build_variant(march, defines)
    assert module is not None, f"the kernels did not build for -march={march} {defines} (see the log)"
    info = kernel_isa(module)
    assert (info["lanes"], info["registers"]) == (lanes, registers)
    saved = dict(_ext._state)
    _ext._state.update(tried=True, module=module)
    try:
        assert kernel_isa() is info
        yield request.param
    finally:
        _ext._state.clear()
        _ext._state.update(saved)


def test_there_is_something_to_test():
    """On x86 at least the SSE and NEON-table builds run (this is not a suite that can pass empty)."""
    if platform.machine() in ("x86_64", "AMD64"):
        assert {"sse2", "neon_tables"} <= set(_runnable())


@pytest.mark.parametrize("case", [
    (16, 16, 3, 1, 1, 1, (20, 33)), (5, 19, 1, 1, 0, 1, (9, 14)), (24, 48, 3, 2, 1, 1, (23, 17)),
    (7, 40, 3, 1, 2, 2, (23, 17)), (6, 33, 3, 1, 0, 3, (23, 17)), (16, 72, 3, 1, 1, 1, (70, 90)),
    (3, 100, 5, 2, 2, 1, (31, 20)),
])
@pytest.mark.parametrize("variant", [1, 2])
def test_implicit_gemm(kernels, case, variant):
    check_implicit_gemm(*case, variant)


@pytest.mark.parametrize("case", [
    (18, 18, 3, 1, (1, 1), (37, 45)), (5, 19, 3, 1, (1, 1), (20, 33)), (18, 36, 5, 1, (2, 2), (17, 50)),
    (4, 1, 3, 2, (0, 0), (9, 70)), (3, 30, 3, 2, (2, 1), (31, 8)), (18, 18, 3, 1, (1, 1), (64, 130)),
])
def test_implicit_rows(kernels, case):
    check_implicit_rows(*case)


@settings(max_examples=120, **SETTINGS)
@given(case=conv_cases(), lam=st.sampled_from([3.0, 0.5, 1.0, 2.0]),
       strategy=st.sampled_from(["auto", "dense", "implicit", "implicit_rows"]), shift=st.booleans(),
       activation=st.sampled_from([None, "relu"]), residual=st.sampled_from([None, "nchw", "channels_last"]),
       reader_radius=st.sampled_from([None, None, 0, 1]), engine_dense=st.booleans())
def test_sparse_equals_dense_on_every_isa(kernels, case, lam, strategy, shift, activation, residual, reader_radius,
                                          engine_dense):
    test_sparse_equals_dense.hypothesis.inner_test(case, lam, strategy, True, shift, activation, residual,
                                                   reader_radius, engine_dense)


def test_passes(kernels):
    """Branch fusion, the exits' resizing and pooling, fuse layers (nearest and bilinear), the halo
    stencil and the output allocation, on the variant's kernels."""
    test_extension_kernels_match_pytorch()
    for align_corners in (False, True):
        test_branch_fusion_kernel_matches_pytorch([(3, 8, 12), (5, 4, 6), (2, 2, 3)], align_corners)
        test_exit_step_kernels_match_pytorch((2, 20, 8, 14), align_corners)
    for relu in (None, "relu"):
        test_fuse_sum_kernel_matches_pytorch(
            [None, {"scale_factor": 2.0, "mode": "bilinear", "align_corners": False},
             {"scale_factor": 4.0, "mode": "nearest"}, {"scale_factor": 8.0, "mode": "bilinear", "align_corners": False}],
            relu)
    assert torch.get_num_threads() >= 1
