"""The sparse execution engine of masked convolutions: index plans, a cost model, CPU kernels.

A masked conv's output is ``y*m + I(y*m)*(1-m)`` (REFERENCE.md §3). The engine computes it
without the dense conv where that pays, following what was measured on CPU (SPARSE-NOTES.md):

* :class:`MaskPlan` holds the index lists of one mask (kept positions, skipped positions, the
  interpolation halo and its neighbour lists, and per conv geometry the im2col gather lists).
  They are built lazily, once, and reused by every conv governed by the same mask. A plan belongs
  to one forward call: the caller creates it (directly or through an :class:`IndexCache`) and
  passes it to every :class:`~anytimeify.masking.conv.MaskedConv2d` that shares the mask. Nothing
  is stored on modules, so interleaved calls cannot corrupt each other.
* Per layer, :func:`choose_strategy` compares the cost of the dense conv followed by the blend
  with the cost of computing the kept positions only: with the compiled kernels, an implicit GEMM
  (no im2col matrix, accumulators in registers, writing straight into the output rows); without
  them (or for grouped convs), the gathered conv (im2col rows of the kept positions, gathered in
  cache-sized chunks, each chunk one GEMM run as a channels-last 1x1 convolution, which oneDNN
  executes faster than MKL's ``addmm``).
* Every strategy finishes in the same way: a channels-last output holding ``y`` at the kept
  positions, then the interpolation computed only on the halo (skipped positions within the
  support radius of a kept one); everywhere else the exact result is 0. A masked conv can carry
  an inference epilogue (a folded BN's shift, a ReLU, a residual addition): the compiled output
  pass then writes ``act(shift)`` to the skipped rows, ``I(y*m) + shift`` to the halo and
  ``act(y + shift)`` to the kept rows, keeping the few pre-activation rows the stencil still reads.
* The compiled kernels are C++/OpenMP (:mod:`anytimeify.masking._ext`, built at first use); the
  pure-PyTorch code here is the fallback and the reference of the tests.

The engine's parts, one module each (this module re-exports their names; pickles and FX graphs
saved before the split name them here):

* :mod:`~anytimeify.masking.geometry`: :class:`ConvGeometry`, a conv's hyper-parameters;
* :mod:`~anytimeify.masking.plans`: the index plans of a mask (:class:`MaskPlan`, :class:`IndexCache`);
* :mod:`~anytimeify.masking.compiled`: loading the compiled kernels, their ISA (:func:`kernel_isa`),
  and whether they may run on given tensors;
* :mod:`~anytimeify.masking.pool`: the compiled kernels' buffer pool;
* :mod:`~anytimeify.masking.layout`: the implicit GEMMs' channel blocks (:func:`implicit_block`,
  :func:`rows_layout`);
* :mod:`~anytimeify.masking.cost`: the cost model (:class:`CostModel`);
* :mod:`~anytimeify.masking.dispatch`: which strategy or kernel runs a layer (:func:`choose_strategy`,
  :func:`resolve_strategy`, :func:`dense_kernel`);
* :mod:`~anytimeify.masking.packing`: the weights in the kernels' layouts (:class:`LayerWeights`);
* :mod:`~anytimeify.masking.stencil`: the interpolation on the halo (:func:`halo_stencil`);
* :mod:`~anytimeify.masking.kernels`: the masked and unmasked convs (:func:`sparse_masked_conv2d`,
  :func:`dense_conv2d`, :func:`add_residual`);
* :mod:`~anytimeify.masking.fuse`: HRNet's fuse layers as one op (:func:`fuse_sum`).
"""
from __future__ import annotations

from . import kernels as _kernels
from .compiled import DEFAULT_ISA, _extension, _traced, implicit_available, inference_kernels, kernel_isa
from .cost import DEFAULT_COST_MODEL, CostModel
from .dispatch import DENSE_KERNELS, STRATEGIES, choose_strategy, dense_kernel, resolve_strategy
from .fuse import FUSE_SUM_MODES, _resize_tables, fuse_sum
from .geometry import ConvGeometry, conv_output_hw
from .kernels import ACTIVATIONS, add_residual, dense_conv2d, sparse_masked_conv2d
from .layout import implicit_block, rows_layout
from .packing import LayerWeights, _pack_implicit, _pack_rows
from .plans import IndexCache, MaskPlan, _version_of
from .pool import buffer_pool_stats, release_buffers, set_buffer_pool_limit
from .stencil import executed_interp_macs, halo_stencil, stencil_taps

__all__ = [
    "MaskPlan", "IndexCache", "ConvGeometry", "CostModel", "DEFAULT_COST_MODEL", "choose_strategy",
    "sparse_masked_conv2d", "halo_stencil", "STRATEGIES", "ACTIVATIONS", "LayerWeights", "implicit_available", "add_residual",
    "implicit_block", "rows_layout", "kernel_isa", "DEFAULT_ISA", "resolve_strategy", "dense_conv2d", "dense_kernel", "fuse_sum", "buffer_pool_stats", "set_buffer_pool_limit", "release_buffers",
]


def __getattr__(name: str):
    """``CHUNK_BYTES``, read from :mod:`~anytimeify.masking.kernels`, the one place it is looked up
    (set it there: setting it here changes nothing)."""
    if name == "CHUNK_BYTES":
        return _kernels.CHUNK_BYTES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
