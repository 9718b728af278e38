"""The convolutions of the engine: a masked conv computing ``y`` only where needed
(:func:`sparse_masked_conv2d`), an unmasked one by the fastest dense kernel (:func:`dense_conv2d`),
and the residual epilogue (:func:`add_residual`); the compiled kernels where they can run, else
PyTorch's ops (the reference of the tests).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import _ext_for, _kernel
from .cost import DEFAULT_COST_MODEL, CostModel
from .dispatch import (DENSE_KERNELS, INTO_KERNELS, STRATEGIES, dense_kernel, onednn_post_ops_available,
                       resolve_strategy)
from .geometry import ConvGeometry
from .layout import rows_layout
from .packing import LayerWeights
from .plans import MaskPlan
from .stencil import halo_stencil, stencil_taps

__all__ = ["ACTIVATIONS", "CHUNK_BYTES", "sparse_masked_conv2d", "dense_conv2d", "add_residual"]


#: activations a masked conv can apply to its own output (fused into the engine's output pass)
ACTIVATIONS = (None, "relu")


def _finish(out: Tensor, shift: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """``act(out + shift)`` in place (the PyTorch path's epilogue)."""
    if shift is not None:
        out.add_(shift.reshape(1, -1) if out.dim() == 2 else shift.reshape(1, -1, 1, 1))
    if activation == "relu":
        out.relu_()
    return out


#: bytes of im2col rows gathered per chunk: the GEMM then reads them from cache, not memory
CHUNK_BYTES = 8 << 20


def _gathered_conv_into(out_flat: Tensor, x_flat: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                        plan: MaskPlan, in_height: int, in_width: int, gemm_weight: Tensor) -> None:
    """Write the conv outputs at the kept positions into their rows of ``out_flat``.

    Kept positions are processed in chunks: gather their im2col rows into a reused buffer, run
    one GEMM as a channels-last 1x1 conv (SPARSE-NOTES fact 1: oneDNN beats MKL's ``addmm`` here),
    and copy the result rows into the output.
    """
    taps, channels, groups = geometry.taps, geometry.in_channels, geometry.groups
    width = taps * channels
    chunk = max(1024, CHUNK_BYTES // (width * x_flat.element_size()))
    chunks = plan.gather_chunks(geometry, in_height, in_width, chunk)
    buffer = plan.scratch("cols", (min(chunk, plan.kept) * taps, channels), x_flat.dtype, x_flat.device)
    for start, end, rows, outside in chunks:
        count = end - start
        cols = buffer[:count * taps]
        torch.index_select(x_flat, 0, rows, out=cols)
        if outside is not None:
            cols.index_fill_(0, outside, 0)
        if groups > 1:
            # a grouped 1x1 conv needs each group's (tap, channel) block contiguous
            per_group = channels // groups
            cols = cols.view(count, taps, groups, per_group).permute(0, 2, 1, 3).reshape(count * taps, channels)
        view = cols.view(1, count, 1, width).permute(0, 3, 1, 2)
        y = F.conv2d(view, gemm_weight, bias, groups=groups)
        out_flat.index_copy_(0, plan.kept_index[start:end], y.permute(0, 2, 3, 1).reshape(count, geometry.out_channels))


def sparse_masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                         lam: Tensor, plan: MaskPlan, strategy: str = "auto",
                         cost_model: CostModel = DEFAULT_COST_MODEL, use_extension: bool = True,
                         shift: Optional[Tensor] = None, activation: Optional[str] = None,
                         weights: Optional[LayerWeights] = None, residual: Optional[Tensor] = None,
                         reader_radius: Optional[int] = None, engine_dense: bool = False) -> Tensor:
    """Masked conv ``act(y*m + I(y*m)*(1-m) + shift [+ residual])`` computing ``y`` only where needed.

    Args:
        x: ``(B, C_in, H, W)`` input (any memory format).
        weight: conv weight ``(C_out, C_in/groups, kh, kw)``.
        bias: conv bias or None.
        geometry: the conv's hyper-parameters (explicit symmetric zero padding).
        lam: interpolation ``lambda`` (scalar tensor).
        plan: the mask's plan (its mask is ``(B, 1, H_out, W_out)``).
        strategy: ``"auto"`` (measured on this machine, else the cost model), ``"dense"``,
            ``"gather"``, ``"implicit"`` (the compiled implicit GEMM; where it cannot run,
            ``"gather"``), ``"implicit_rows"`` (its row-vectorised form for thin outputs; where it
            cannot run, ``"implicit"``) or ``"pytorch"`` (PyTorch's conv and blend).
        cost_model: estimates used by ``"auto"``.
        use_extension: allow the compiled kernels.
        shift: optional ``(C_out,)`` constant added after the blend (a folded BN's shift).
        activation: None or ``"relu"``, applied last.
        weights: optional :class:`LayerWeights` of ``(weight, bias, shift)``, cached by the caller.
        residual: optional ``(B, C_out, H_out, W_out)`` tensor added before the activation (a
            residual connection folded into the conv). The compiled implicit GEMM adds it in its
            output pass; elsewhere one more pass adds it (:func:`add_residual`).
        reader_radius: set when the output's only reader is a conv governed by the same mask that
            reads it only within this many positions of the kept ones (0: the kept positions only;
            1: a 3x3 conv). The compiled path then leaves the rows nobody reads unwritten (0: every
            skipped row; otherwise the rows beyond the interpolation's halo, where the halo is at
            least that wide). None: every row is written.
        engine_dense: where every position is kept, run the engine's fastest dense kernel
            (:func:`dense_conv2d`) instead of PyTorch's conv (frozen models; the result then
            differs from the plain conv by float rounding).

    Returns:
        ``(B, C_out, H_out, W_out)`` output in channels-last memory format.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weights is None:
        weights = LayerWeights(weight, bias, shift, geometry.groups)
    batch, _, in_height, in_width = x.shape
    out_height, out_width = plan.height, plan.width
    positions = plan.positions
    out_channels = geometry.out_channels
    if residual is not None:
        if tuple(residual.shape) != (batch, out_channels, out_height, out_width):
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match the conv output "
                             f"{(batch, out_channels, out_height, out_width)}")
    if plan.kept == positions:  # all kept: the plain conv (same memory format as given)
        if engine_dense and _ext_for(x, use_extension) is not None:  # the engine's fastest dense kernel
            y = dense_conv2d(x, weight, weights.full_bias, geometry, weights,
                             weights.dense_kernel(geometry, x.shape, cost_model),
                             activation=activation if residual is None else None)
            return y if residual is None else add_residual(y, residual, activation, use_extension)
        y = F.conv2d(x, weight, weights.full_bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        if residual is not None:
            return add_residual(y, residual, activation, use_extension)
        return y.relu_() if activation == "relu" else y
    if plan.kept == 0:  # all skipped: y*m = 0, so its interpolation is 0 too
        out = x.new_zeros(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)
        if residual is not None:
            return add_residual(_finish(out, shift, None), residual, activation, use_extension)
        return _finish(out, shift, activation)
    ext = _ext_for(x, use_extension)
    strategy = resolve_strategy(strategy, geometry, plan, ext is not None and geometry.groups == 1, cost_model,
                                x.device.type, batch * in_height * in_width, (in_height, in_width))
    if strategy == "pytorch":  # PyTorch's conv and blend, no compiled kernel
        ext, strategy = None, "dense"
    in_pass = strategy in ("implicit", "implicit_rows")  # an implicit GEMM writes the final kept rows

    radius, tap_weights = stencil_taps(lam)
    halo, neighbours = plan.halo_index(radius)

    if ext is not None:
        # fused output pass: kept rows hold y + shift, skipped rows act(shift) (0 without a shift),
        # then the halo rows get I(y*m) + shift in one stencil pass, and the kept rows the activation
        relu = activation == "relu"
        none_i32, none_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0)
        # a residual the implicit GEMM's output pass can read in place: (B*H*W, C) rows
        res_rows = _rows_of(residual, positions, out_channels) if in_pass else None
        unfused = residual is not None and res_rows is None
        post_act = relu and unfused  # the activation then follows the separate residual pass
        relu = relu and not unfused
        # rows nobody reads: the only reader reads kept rows (0) or rows within its kernel radius,
        # which the halo covers where the interpolation's support is at least that wide
        write_skipped = reader_radius is None or (reader_radius > 0 and reader_radius > radius)
        write_halo = reader_radius is None or reader_radius > 0
        res_arg = res_rows if res_rows is not None else none_f32
        if strategy == "dense":  # the fastest dense kernel, then the blend
            x_cl = x.contiguous(memory_format=torch.channels_last)
            y = dense_conv2d(x_cl, weight, weights.full_bias, geometry, weights,
                             weights.dense_kernel(geometry, x.shape, cost_model)).contiguous(memory_format=torch.channels_last)
            out_flat = y.permute(0, 2, 3, 1).view(positions, out_channels)
            if write_skipped:
                with _kernel("fill_skipped"):
                    ext.fill_skipped(out_flat, plan.kept_index, weights.fill(relu))
        else:
            # with a residual in the pass, skipped rows become act(shift + residual)
            fill = weights.fill(False) if res_rows is not None else weights.fill(relu)
            with _kernel("masked_output"):
                out_flat = ext.masked_output(positions, out_channels, plan.kept_index, fill, res_arg, relu,
                                             write_skipped)
            if in_pass:
                # with an activation or a residual the rows are written final; the kept rows the
                # stencil reads keep y + shift in side rows
                needs_side = (relu or res_rows is not None) and write_halo and halo.numel()
                slots, count = plan.boundary_slots(radius) if needs_side else (none_i32, 0)
                side = plan.scratch("side", (count, out_channels), torch.float32, x.device)
                x_nhwc = x.permute(0, 2, 3, 1).contiguous()
                if strategy == "implicit_rows":
                    packed, padded_bias, chunk = weights.rows(*rows_layout(geometry))
                    with _kernel("implicit_rows"):
                        ext.implicit_rows(x_nhwc, packed, padded_bias, plan.kept_index, out_flat, out_height, out_width,
                                          geometry.stride[0], *geometry.padding, chunk, relu, slots, side, res_arg)
                else:
                    packed, padded_bias = weights.implicit
                    with _kernel("implicit_conv"):
                        ext.implicit_conv(x_nhwc, packed, padded_bias, plan.kept_index, out_flat, out_height, out_width,
                                          *geometry.kernel_size, *geometry.stride, *geometry.padding, *geometry.dilation,
                                          relu, slots, side, res_arg, weights.implicit_variant(geometry, in_height, in_width))
            else:
                x_flat = x.permute(0, 2, 3, 1).contiguous().view(batch * in_height * in_width, geometry.in_channels)
                _gathered_conv_into(out_flat, x_flat, weights.full_bias, geometry, plan, in_height, in_width,
                                    weights.gemm)
        finalized = in_pass and (relu or res_rows is not None)  # kept rows already final
        if halo.numel() and write_halo:
            with _kernel("halo_stencil"):
                ext.halo_stencil(out_flat, halo, neighbours, tap_weights, plan.keep.reshape(-1), weights.fill(False), relu,
                                 slots if finalized else none_i32, side if finalized else none_f32, res_arg)
        if relu and not finalized:  # every row but the kept ones has it already: one vectorised pass
            out_flat.relu_()
        out = out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)
        if unfused:
            return add_residual(out, residual, "relu" if post_act else None, use_extension)
        return out

    if strategy == "dense":
        x_cl = x.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x_cl, weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        y = y.contiguous(memory_format=torch.channels_last)
        out_flat = y.permute(0, 2, 3, 1).view(positions, out_channels)
        out_flat.mul_(plan.keep_column(out_flat.dtype))  # y*m, as the dense execution computes it
    else:
        x_flat = x.permute(0, 2, 3, 1).contiguous().view(batch * in_height * in_width, geometry.in_channels)
        out_flat = x.new_zeros(positions, out_channels)
        _gathered_conv_into(out_flat, x_flat, bias, geometry, plan, in_height, in_width, weights.gemm)
    if reader_radius != 0:  # 0: the only reader reads kept rows only
        halo_stencil(out_flat, halo, neighbours, tap_weights.to(out_flat.dtype), plan=plan, use_extension=False)
    if residual is not None:
        _finish(out_flat, shift, None)
        out = out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)
        return add_residual(out, residual, activation, use_extension=False)
    _finish(out_flat, shift, activation)
    return out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=8)
def _every_row(positions: int) -> Tensor:
    """``arange(positions)``: the kept index of an unmasked conv (a few sizes cached: 8 MiB each
    at 1M positions)."""
    return torch.arange(positions, dtype=torch.int64)


def _onednn_fusable(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN's convolution with post-ops can run ``x`` (float32 CPU, 4-D, no autograd)."""
    return (onednn_post_ops_available() and x.device.type == "cpu" and x.dim() == 4
            and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _onednn_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry, residual: Tensor,
                 relu: bool) -> Optional[Tensor]:
    """``act(conv(x) + residual)`` written into ``residual`` by oneDNN (the addition and the ReLU
    as post-ops of its convolution: one pass, no fresh output), or None where it cannot run
    (no such op, autograd, other dtypes, layouts or devices, ``residual`` sharing ``x``'s memory)."""
    if not (_onednn_fusable(x, weight) and residual.dtype == torch.float32
            and residual.is_contiguous(memory_format=torch.channels_last)
            and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()):
        return None
    if torch.is_grad_enabled() and residual.requires_grad:
        return None
    with _kernel("onednn_into"):
        torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, list(geometry.padding), list(geometry.stride), list(geometry.dilation),
            geometry.groups, "add", 1.0, "relu" if relu else None, [], "" if relu else None)
    return residual


def dense_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                 weights: Optional[LayerWeights] = None, kernel: Optional[str] = None,
                 cost_model: CostModel = DEFAULT_COST_MODEL, activation: Optional[str] = None,
                 residual: Optional[Tensor] = None, into_residual: bool = False) -> Tensor:
    """An unmasked conv (plus ``residual`` where given, then ``activation``: None or ``"relu"``)
    by the kernel :func:`dense_kernel` picks (or ``kernel``), for inference.

    A channels-last float32 ``residual`` of the output's shape is added by the implicit GEMMs as
    they write each output row; otherwise one more pass adds it (:func:`add_residual`).
    ``into_residual``: nothing reads ``residual`` after this conv, so the result may be written
    into its memory (and returned in its place); ``kernel`` may then be one of
    :data:`~anytimeify.masking.dispatch.INTO_KERNELS` (``"onednn_into"``: oneDNN's convolution
    with the addition and ReLU as post-ops, in place; ``"implicit_into"``,
    ``"implicit_rows_into"``: the implicit GEMMs writing into it). Where such a kernel cannot run
    it falls back to the implicit GEMM into a fresh output (or PyTorch's conv and one more pass).
    A ReLU after PyTorch's conv is oneDNN's post-op where this PyTorch has it.

    Without the compiled kernels, for other dtypes or devices and for grouped convs it is
    ``F.conv2d`` (the ReLU then in place on its output). The implicit GEMMs compute every output
    position into a pooled channels-last output, the ReLU as they write it; they agree with
    ``F.conv2d`` up to float rounding (a different summation order).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    ext = _ext_for(x)
    batch, _, in_height, in_width = x.shape
    if kernel is None:
        kernel = dense_kernel(geometry, batch, in_height, in_width, cost_model) if ext is not None else "onednn"
    elif kernel not in DENSE_KERNELS + INTO_KERNELS:
        raise ValueError(f"kernel must be one of {DENSE_KERNELS + INTO_KERNELS}, got {kernel!r}")
    into = kernel in INTO_KERNELS
    if into and (residual is None or not into_residual):
        raise ValueError(f"kernel {kernel!r} writes into the residual: it needs a residual and into_residual=True")
    if kernel == "onednn_into":
        if tuple(residual.shape) == (batch, geometry.out_channels, *geometry.output_size(in_height, in_width)):
            out = _onednn_into(x, weight, bias, geometry, residual, activation == "relu")
            if out is not None:
                return out
        kernel = "implicit" if ext is not None and geometry.groups == 1 else "onednn"
    elif into:
        kernel = kernel[:-len("_into")]
    if kernel == "implicit_rows" and rows_layout(geometry) is None:
        kernel = "implicit"
    relu = activation == "relu"
    out_height, out_width = geometry.output_size(in_height, in_width)
    positions = batch * out_height * out_width
    out_channels = geometry.out_channels
    if residual is not None and tuple(residual.shape) != (batch, out_channels, out_height, out_width):
        raise ValueError(f"residual shape {tuple(residual.shape)} does not match the conv output "
                         f"{(batch, out_channels, out_height, out_width)}")
    res_rows = _rows_of(residual, positions, out_channels) if ext is not None else None
    if ext is None or geometry.groups != 1 or kernel == "onednn" or (residual is not None and res_rows is None):
        if ext is not None and geometry.groups == 1 and kernel != "onednn":  # a residual the pass cannot read
            y = dense_conv2d(x, weight, bias, geometry, weights, kernel, cost_model)
        elif relu and residual is None and _onednn_fusable(x, weight):
            with _kernel("onednn_relu"):  # the ReLU as oneDNN's post-op: no second pass over the output
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(geometry.padding),
                                                               list(geometry.stride), list(geometry.dilation),
                                                               geometry.groups, "relu", [], "")
        else:
            y = F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        if residual is not None:
            return add_residual(y, residual, activation)
        return y.relu_() if relu else y
    if weights is None:
        weights = LayerWeights(weight, bias, None, geometry.groups)
    rows = _every_row(positions)
    none_i32, none_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0)
    res_arg = res_rows if res_rows is not None else none_f32
    if into and res_rows is not None and res_rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        out_flat = res_rows  # each output row is read (the residual) before it is written
    else:
        out_flat = ext.masked_output(positions, out_channels, rows, none_f32, none_f32, False, False)  # no fill
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    if kernel == "implicit_rows":
        packed, padded_bias, chunk = weights.rows(*rows_layout(geometry))
        with _kernel("implicit_rows"):
            ext.implicit_rows(x_nhwc, packed, padded_bias, rows, out_flat, out_height, out_width, geometry.stride[0],
                              *geometry.padding, chunk, relu, none_i32, none_f32, res_arg)
    else:
        packed, padded_bias = weights.implicit
        with _kernel("implicit_conv"):
            ext.implicit_conv(x_nhwc, packed, padded_bias, rows, out_flat, out_height, out_width, *geometry.kernel_size,
                              *geometry.stride, *geometry.padding, *geometry.dilation, relu, none_i32, none_f32,
                              res_arg, weights.implicit_variant(geometry, in_height, in_width))
    return out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)


def _rows_of(t: Optional[Tensor], rows: int, channels: int) -> Optional[Tensor]:
    """``t`` (``(B, C, H, W)``, channels-last contiguous float32 CPU) as a ``(rows, C)`` view, else None."""
    if t is None or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 or t.shape[1] != channels:
        return None
    nhwc = t.permute(0, 2, 3, 1)
    return nhwc.view(rows, channels) if nhwc.is_contiguous() else None


def add_residual(out: Tensor, residual: Tensor, activation: Optional[str] = None,
                 use_extension: bool = True) -> Tensor:
    """``act(out + residual)``, in place on ``out`` (a fresh output of the engine) where possible.

    Both channels-last float32 CPU tensors of one shape take the compiled single pass; anything
    else (broadcasting, other layouts) PyTorch's ops.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    ext = _ext_for(out, use_extension)
    if (ext is not None and residual.shape == out.shape and residual.dtype == out.dtype
            and residual.device == out.device and out.dim() == 4
            and out.is_contiguous(memory_format=torch.channels_last)
            and residual.is_contiguous(memory_format=torch.channels_last)):
        channels = out.shape[1]
        with _kernel("add_residual"):
            ext.add_residual(out.permute(0, 2, 3, 1).view(-1, channels), residual.permute(0, 2, 3, 1).reshape(-1, channels),
                             activation == "relu")
        return out
    out = out + residual
    return out.relu_() if activation == "relu" else out
