"""MaskedConv2d: a convolution computed only where a confidence mask says so (ADP-C, REFERENCE.md §3).

The output of a masked conv is ``y' = y*m + I(y*m)*(1 - m)``: ``y`` the conv output (bias
included, before any BN), ``m`` the mask at the conv's output size (1 = computed), ``I`` the RBF
interpolation of :mod:`anytimeify.masking.interp`. Two executions give the same result:

* ``"dense"``: the full conv, then the blend; differentiable (weight, bias, ``interp_lambda``,
  input; never the mask). Training, export, and the oracle of the tests. Where a mask keeps every
  position the blend is the identity (``y*1 + I(y)*0 = y``), so on the CPU the plain conv's output
  is returned without it (while tracing, compiling or exporting, and on other devices, where asking
  the mask would be a data-dependent branch or wait for the device, the blend runs).
* ``"sparse"``: inference only; the engine (:mod:`anytimeify.masking.engine`) computes the conv
  where ``m = 1`` (or densely, where its cost model says that is faster) and the interpolation
  only on the halo of the kept set.
* ``"auto"``: ``"dense"`` where autograd records the call (gradients enabled and the input or a
  parameter requiring them), ``"sparse"`` otherwise.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .compiled import _traced, implicit_available, inference_kernels
from .cost import DEFAULT_COST_MODEL, CostModel
from .dispatch import resolve_strategy
from .geometry import ConvGeometry
from .kernels import ACTIVATIONS, dense_conv2d, sparse_masked_conv2d
from .packing import LayerWeights
from .plans import MaskPlan, _version_of
from .stencil import executed_interp_macs
from .criteria import EXECUTIONS
from .interp import INTERP_RADIUS, interpolate

_logger = logging.getLogger(__name__)

__all__ = ["MaskedConv2d", "EngineConv2d", "conv_output_size", "conv_geometry", "EXECUTIONS", "INIT_LAMBDA"]

#: initial value of the learnable interpolation parameter (the paper's)
INIT_LAMBDA = 3.0


def _explicit_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """Symmetric per-side zero padding of ``conv`` (resolving ``"valid"`` / ``"same"``)."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(
                    f"padding='same' with kernel_size={conv.kernel_size}, dilation={conv.dilation} pads asymmetrically, "
                    "which masked convs do not support; give an explicit symmetric padding")
            pads.append(total // 2)
        return pads[0], pads[1]
    return int(padding[0]), int(padding[1])


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """The hyper-parameters of ``conv`` that the masked engine needs."""
    return ConvGeometry(
        in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=(int(conv.kernel_size[0]), int(conv.kernel_size[1])),
        stride=(int(conv.stride[0]), int(conv.stride[1])), padding=_explicit_padding(conv),
        dilation=(int(conv.dilation[0]), int(conv.dilation[1])), groups=int(conv.groups),
    )


def conv_output_size(conv: nn.Conv2d, height: int, width: int) -> Tuple[int, int]:
    """Output ``(H_out, W_out)`` of ``conv`` for an input of ``height x width``.

    This is the size a mask governing ``conv`` must have (REFERENCE.md §3).
    """
    return conv_geometry(conv).output_size(int(height), int(width))


def _cached_layer_weights(conv: nn.Conv2d, shift: Optional[Tensor]) -> LayerWeights:
    """``conv``'s :class:`LayerWeights` (with ``shift``), cached on it in ``_weights_cache`` and
    rebuilt when the weight, the bias or the shift changes (storage, in-place version, shape, dtype)."""
    key = tuple((t.data_ptr(), _version_of(t), tuple(t.shape), t.dtype) if t is not None else None
                for t in (conv.weight, conv.bias, shift)) + (conv.groups,)
    cache = conv._weights_cache
    if cache is None or cache[0] != key:
        cache = conv._weights_cache = (key, LayerWeights(conv.weight, conv.bias, shift, conv.groups))
    return cache[1]


def _state_without_weights_cache(state: dict) -> dict:
    """A module's pickled state without ``_weights_cache``: the packed weights are a copy of the
    parameters as large as them, rebuilt at the first call, so pickling them (``torch.save`` of a
    model, ``copy.deepcopy``) would double a saved model's size once it has run."""
    state["_weights_cache"] = None
    return state


class MaskedConv2d(nn.Conv2d):
    """A ``Conv2d`` whose output is computed where a mask is 1 and interpolated elsewhere.

    Build it from an existing conv with :meth:`from_conv`: it shares the conv's ``weight`` and
    ``bias`` parameters (so state-dict names do not change) and adds one learnable scalar,
    ``interp_lambda``, initialised to 3.0.

    For inference, :meth:`~anytimeify.AnytimeModel.freeze` folds what follows the conv into it: a
    BN's scale goes into the weight, its shift into ``shift`` (added after the blend, where it is
    exact) and a following ReLU into ``activation``. The output is then
    ``act(y*m + I(y*m)*(1 - m) + shift)``, and the sparse engine computes all of it in one pass.

    Attributes:
        execution: ``"dense"`` (differentiable oracle), ``"sparse"`` (inference engine) or
            ``"auto"`` (dense under autograd, sparse otherwise). The sparse execution raises
            ``RuntimeError`` when gradients are required.
        strategy: the sparse engine's per-layer choice: ``"auto"`` (measured on this machine,
            see :mod:`anytimeify.masking.tune`, else the cost model), ``"pytorch"`` (PyTorch's
            conv and blend), ``"dense"`` (the engine's fastest dense conv, then the blend),
            ``"implicit"`` (compiled implicit GEMM over the kept positions), ``"implicit_rows"``
            (its row-vectorised form for thin outputs: horizontal stride and dilation 1; elsewhere
            ``"implicit"``) or ``"gather"`` (PyTorch im2col over the kept positions; the path
            without the compiled kernels and for grouped convs); a test and benchmarking knob,
            ``"auto"`` is right for real use.
        interp_lambda: the learnable RBF parameter of the interpolation (starts at 3.0).
        cost_model: the estimates ``"auto"`` decides with.
        shift: ``(C_out,)`` buffer added after the blend, or None.
        activation: None or ``"relu"``, applied last.
        reader_radius: set by :meth:`~anytimeify.AnytimeModel.freeze` where the output's only
            reader is a conv governed by the same mask that reads it only within this many
            positions of the kept ones (0 for a 1x1 conv): the sparse execution then leaves the
            rows that nobody reads unwritten (their content is undefined). None: every row is
            written.
        engine_dense: set by :meth:`~anytimeify.AnytimeModel.freeze`: where a mask keeps every
            position, the sparse execution runs the engine's fastest dense kernel (as the frozen
            model's unmasked convs do) instead of PyTorch's conv.
    """

    def __init__(self, *args, execution: str = "dense", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"MaskedConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        _explicit_padding(self)
        self.interp_lambda = nn.Parameter(torch.tensor(INIT_LAMBDA, dtype=self.weight.dtype, device=self.weight.device))
        self.execution = execution
        self.strategy = "auto"
        self.cost_model: CostModel = DEFAULT_COST_MODEL
        self.register_buffer("shift", None)
        self.activation: Optional[str] = None
        self.reader_radius: Optional[int] = None
        self.engine_dense = False
        self._weights_cache: Optional[Tuple[Tuple, LayerWeights]] = None

    def __getstate__(self) -> dict:
        return _state_without_weights_cache(super().__getstate__())

    # -------------------------------------------------------------------------------- building
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, execution: str = "dense") -> "MaskedConv2d":
        """A masked conv that shares ``conv``'s weight and bias parameter objects.

        Args:
            conv: a ``nn.Conv2d`` with ``padding_mode="zeros"``.
            execution: ``"dense"``, ``"sparse"`` or ``"auto"``.

        Returns:
            The new module, in ``conv``'s training mode, on its device and dtype.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"MaskedConv2d supports padding_mode='zeros' only; {conv} has {conv.padding_mode!r}")
        masked = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
                     execution=execution)
        masked.weight = conv.weight
        if conv.bias is not None:
            masked.bias = conv.bias
        masked.interp_lambda = nn.Parameter(
            torch.tensor(INIT_LAMBDA, dtype=conv.weight.dtype, device=conv.weight.device))
        masked.train(conv.training)
        return masked

    @property
    def execution(self) -> str:
        """``"auto"``, ``"dense"`` or ``"sparse"``."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {value!r}")
        self._execution = value

    def resolved_execution(self, x: Optional[Tensor] = None) -> str:
        """``"dense"`` or ``"sparse"``: how a call on ``x`` runs now (``"auto"`` resolved by the
        grad mode and by whether ``x`` or a parameter requires gradients)."""
        if self._execution != "auto":
            return self._execution
        return "dense" if self._requires_grad(x) else "sparse"

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", execution={self.execution!r}"
        if self.shift is not None:
            text += ", shift=True"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text

    def set_epilogue(self, shift: Optional[Tensor] = None, activation: Optional[str] = None) -> None:
        """Set what the conv applies after the blend: ``act(blend + shift)`` (inference folding).

        Args:
            shift: ``(C_out,)`` per-channel constant, or None.
            activation: None or ``"relu"``.
        """
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if shift is not None:
            shift = shift.detach().reshape(-1).to(self.weight.dtype).clone()
            if shift.numel() != self.out_channels:
                raise ValueError(f"shift must have {self.out_channels} values (one per output channel), "
                                 f"got {shift.numel()}")
        self.shift = shift
        self.activation = activation

    @property
    def geometry(self) -> ConvGeometry:
        """The conv's hyper-parameters as the engine sees them."""
        key = (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
               self.groups)
        cached = self.__dict__.get("_geometry_cache")
        if cached is None or cached[0] != key:
            cached = (key, conv_geometry(self))
            self.__dict__["_geometry_cache"] = cached
        return cached[1]

    # -------------------------------------------------------------------------------- forward
    def check_mask(self, x_shape: Sequence[int], mask: Tensor) -> None:
        """Raise ``ValueError`` unless ``mask`` is ``(B, 1, H_out, W_out)`` for an input of ``x_shape``."""
        if len(x_shape) != 4:
            raise ValueError(f"MaskedConv2d expects a (B, C, H, W) input, got shape {tuple(x_shape)}")
        out_height, out_width = self.geometry.output_size(int(x_shape[2]), int(x_shape[3]))
        expected = (x_shape[0], 1, out_height, out_width)  # the batch size stays symbolic under torch.export
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the conv output: expected {expected} "
                f"(batch, 1, H_out, W_out) for input shape {tuple(x_shape)}; build masks with conv_output_size()")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, plan: Optional[MaskPlan] = None,
                residual: Optional[Tensor] = None) -> Tensor:
        """Masked convolution.

        Args:
            x: ``(B, C_in, H, W)`` input.
            mask: ``(B, 1, H_out, W_out)`` bool or 0/1 float mask at the output size, 1 = computed;
                None means every position is computed (the plain conv). Never differentiated.
            plan: optional :class:`~anytimeify.masking.engine.MaskPlan` of ``mask``, shared by every
                conv governed by the same mask (sparse execution only; built here when None).
            residual: optional tensor added after the shift and before the activation (a residual
                connection that inference folding moved into the conv); the output is then
                ``act(blend + shift + residual)``.

        Returns:
            ``(B, C_out, H_out, W_out)``; channels-last memory format from the sparse execution.
        """
        if mask is None:
            return self._epilogue(self._conv_forward(x, self.weight, self.bias), residual)
        self.check_mask(x.shape, mask)
        if self.resolved_execution(x) == "dense":
            return self._dense_forward(x, mask, residual)
        return self._sparse_forward(x, mask, plan, residual)

    def _epilogue(self, y: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.shift is not None:
            y = y + self.shift.reshape(1, -1, 1, 1)
        if residual is not None:
            y = y + residual
        if self.activation == "relu":
            y = torch.relu(y)
        return y

    @staticmethod
    def _keeps_everything(mask: Tensor) -> bool:
        """Whether ``mask`` keeps every position, asked only where that is cheap and allowed: a
        CPU mask with data (never while tracing, compiling or exporting, where it would be a
        data-dependent branch, nor on another device, where it would wait for the device)."""
        if mask.device.type != "cpu" or _traced((mask,)):
            return False
        return bool(mask.all())

    def _dense_forward(self, x: Tensor, mask: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        if self._keeps_everything(mask):
            # m = 1: y*m + I(y*m)*(1 - m) = y exactly, so the blend is skipped; under autograd
            # lambda stays in the graph with the zero gradient the blend would give it (an
            # optimiser's weight decay and momentum, and DDP, see the same parameter either way)
            if torch.is_grad_enabled() and self.interp_lambda.requires_grad:
                y = y + self.interp_lambda.to(y.dtype) * 0
            return self._epilogue(y, residual)
        m = mask.detach().to(dtype=y.dtype)
        y_masked = y * m
        blended = y_masked + interpolate(y_masked, self.interp_lambda, radius=INTERP_RADIUS) * (1 - m)
        return self._epilogue(blended, residual)

    def _requires_grad(self, x: Optional[Tensor]) -> bool:
        if not torch.is_grad_enabled():
            return False
        return (x is not None and x.requires_grad) or any(p.requires_grad for p in (self.weight, self.bias, self.interp_lambda)
                                      if p is not None)

    def _layer_weights(self) -> LayerWeights:
        """The engine's layouts of the weights, rebuilt when a parameter or the shift changes."""
        return _cached_layer_weights(self, self.shift)

    def _sparse_forward(self, x: Tensor, mask: Tensor, plan: Optional[MaskPlan],
                        residual: Optional[Tensor] = None) -> Tensor:
        if self._requires_grad(x):
            raise RuntimeError(
                "MaskedConv2d with execution='sparse' is inference only: run it under torch.no_grad() or "
                "torch.inference_mode(), or set execution='auto' or 'dense' to train")
        if plan is None:
            plan = MaskPlan(mask)
        else:
            plan.check(mask)
        return sparse_masked_conv2d(
            x, self.weight, self.bias, self.geometry, self.interp_lambda, plan, strategy=self.strategy,
            cost_model=self.cost_model, shift=self.shift, activation=self.activation, weights=self._layer_weights(),
            residual=residual, reader_radius=self.reader_radius, engine_dense=self.engine_dense)

    # ------------------------------------------------------------------------------ counting
    def dense_macs(self, x_shape: Sequence[int]) -> int:
        """Multiply-adds of the plain conv on an input of ``x_shape`` (bias excluded)."""
        out_height, out_width = self.geometry.output_size(int(x_shape[2]), int(x_shape[3]))
        return int(x_shape[0]) * out_height * out_width * self.geometry.macs_per_output()

    def chosen_strategy(self, x_shape: Sequence[int], mask: Tensor, plan: Optional[MaskPlan] = None) -> str:
        """The strategy the sparse execution takes for this input and mask.

        Returns:
            ``"plain"`` (all kept), ``"zeros"`` (all skipped), ``"dense"`` (a dense conv then the
                blend, the engine's or PyTorch's), ``"gather"``, ``"implicit"`` or ``"implicit_rows"``.
        """
        self.check_mask(x_shape, mask)
        plan = plan if plan is not None else MaskPlan(mask)
        if plan.kept == plan.positions:
            return "plain"
        if plan.kept == 0:
            return "zeros"
        strategy = resolve_strategy(self.strategy, self.geometry, plan, implicit_available(self.geometry, self.weight),
                                    self.cost_model, self.weight.device.type,
                                    int(x_shape[0]) * int(x_shape[2]) * int(x_shape[3]), (int(x_shape[2]), int(x_shape[3])))
        return "dense" if strategy == "pytorch" else strategy

    def executed_macs(self, x_shape: Sequence[int], mask: Tensor, plan: Optional[MaskPlan] = None,
                      execution: Optional[str] = None) -> int:
        """Multiply-adds this module's current execution really performs (bias excluded).

        * ``execution="sparse"``: conv MACs at the positions computed (the kept ones, or all of
          them where the cost model chose the dense kernel), plus the halo stencil's MACs
          (halo positions x non-centre taps of the support in use x ``C_out``).
        * ``execution="dense"``: the full conv plus the full 7x7 depthwise interpolation
          (``B * C_out * 49 * H_out * W_out``), or the plain conv when ``mask`` is None or (on
          the CPU, not traced) keeps every position, where the dense execution skips the blend.

        Args:
            x_shape: input shape ``(B, C_in, H, W)``.
            mask: the mask (or None: nothing masked).
            plan: optional plan of ``mask``.
            execution: ``"dense"`` or ``"sparse"``, how the call ran (default:
                :meth:`resolved_execution` without an input).

        Returns:
            An exact integer count.
        """
        dense = self.dense_macs(x_shape)
        if mask is None:
            return dense
        self.check_mask(x_shape, mask)
        if (execution or self.resolved_execution()) == "dense":
            if self._keeps_everything(mask):  # the blend is skipped (see _dense_forward)
                return dense
            size = 2 * INTERP_RADIUS + 1
            out_height, out_width = self.geometry.output_size(int(x_shape[2]), int(x_shape[3]))
            return dense + int(x_shape[0]) * self.out_channels * size * size * out_height * out_width
        plan = plan if plan is not None else MaskPlan(mask)
        strategy = self.chosen_strategy(x_shape, mask, plan)
        if strategy == "plain":
            return dense
        if strategy == "zeros":
            return 0
        conv = dense if strategy == "dense" else plan.kept * self.geometry.macs_per_output()
        if self.reader_radius == 0:  # nobody reads the interpolated rows: no stencil runs
            return conv
        return conv + executed_interp_macs(plan, self.interp_lambda, self.out_channels)

    def paper_macs(self, x_shape: Sequence[int], mask: Optional[Tensor], plan: Optional[MaskPlan] = None) -> float:
        """Multiply-adds by the paper's convention (REFERENCE.md §4), summed over the batch.

        Per sample with kept fraction ``p``: ``dense_MACs * p + (1 - p) * p * C_out * 49 * H_out * W_out``
        (``dense_MACs`` of one sample, bias excluded). Returned as an unrounded float, since ``p``
        makes the terms fractional; the paper sums such terms and divides by 2**30 without
        rounding anywhere, so round only the final total if at all.

        Args:
            x_shape: input shape ``(B, C_in, H, W)``.
            mask: the mask, or None (nothing masked: the dense MACs).
            plan: optional plan of ``mask`` (its per-sample counts are reused).

        Returns:
            The paper's count as a float.
        """
        batch = int(x_shape[0])
        if batch == 0:  # an empty batch computes nothing
            return 0.0
        dense_per_sample = self.dense_macs(x_shape) // batch
        if mask is None:
            return float(dense_per_sample * batch)
        self.check_mask(x_shape, mask)
        out_height, out_width = self.geometry.output_size(int(x_shape[2]), int(x_shape[3]))
        plane = out_height * out_width
        if plan is not None and plan.matches(mask):
            per_sample = plan.kept_per_sample
        else:
            keep = mask.detach().reshape(batch, plane)
            keep = keep if keep.dtype == torch.bool else keep != 0
            per_sample = keep.sum(dim=1).tolist()
        total = 0.0
        for kept in per_sample:
            p = kept / plane
            total += dense_per_sample * p + (1 - p) * p * self.out_channels * 49 * plane
        return total


class EngineConv2d(nn.Conv2d):
    """An unmasked inference conv run by the engine's fastest dense kernel for its shape.

    :meth:`~anytimeify.AnytimeModel.freeze` swaps the unmasked convs of an anytime model for it,
    and the benchmarks' dense baseline (:func:`anytimeify.bench.fold_for_inference`) swaps every
    conv of the base model, so both run the same kernels: where the cost model expects the
    compiled implicit GEMM over every position to beat PyTorch's conv (outputs above 32 MB, which
    PyTorch allocates afresh on every call; 18 or 36 output channels, where oneDNN wastes padded
    lanes) it runs that (:func:`~anytimeify.masking.engine.dense_conv2d`), else ``F.conv2d``.
    With autograd, while tracing, without the compiled kernels or off float32 CPU it is the plain
    ``nn.Conv2d``. It shares the parameters of the conv it replaces, so state-dict names do not change.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "EngineConv2d":
        """The engine conv sharing ``conv``'s weight and bias (zero padding, explicit or "valid"/"same").

        Args:
            conv: a plain ``nn.Conv2d`` with ``padding_mode="zeros"``; state-dict names stay
                unchanged.

        Raises:
            TypeError: ``conv`` is not a plain ``nn.Conv2d``.
            ValueError: another padding mode.
        """
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"EngineConv2d.from_conv expects a plain torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"EngineConv2d supports padding_mode='zeros' only; {conv} has {conv.padding_mode!r}")
        engine_conv = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=_explicit_padding(conv), dilation=conv.dilation, groups=conv.groups,
                          bias=conv.bias is not None, device="meta")
        engine_conv.weight = conv.weight
        if conv.bias is not None:
            engine_conv.bias = conv.bias
        engine_conv.train(conv.training)
        return engine_conv

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"EngineConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        self._geometry = conv_geometry(self)
        self._weights_cache: Optional[tuple] = None
        #: None or ``"relu"``: applied as the output is written (set by the inference rewrites
        #: where a ReLU is the conv's only reader)
        self.activation: Optional[str] = None
        #: nothing reads the residual passed to this conv after it, so the output may be written
        #: into the residual's memory (set by the inference rewrites, which check it on the graph)
        self.residual_dead: bool = False

    def __getstate__(self) -> dict:
        return _state_without_weights_cache(super().__getstate__())

    @property
    def geometry(self) -> ConvGeometry:
        """The conv's hyper-parameters (explicit symmetric zero padding)."""
        return self._geometry

    def _layer_weights(self) -> LayerWeights:
        """The engine's layouts of the weights, rebuilt when a parameter changes."""
        return _cached_layer_weights(self, None)

    def kernel(self, x_shape: Sequence[int]) -> str:
        """The kernel an input of ``x_shape`` runs with the compiled kernels (see
        :func:`~anytimeify.masking.engine.dense_kernel`).

        Returns:
            ``"onednn"`` (PyTorch's conv), ``"implicit"`` or ``"implicit_rows"``: the cost
                model's choice.
        """
        return self._layer_weights().dense_kernel(self._geometry, x_shape, DEFAULT_COST_MODEL)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """The conv by :meth:`kernel`'s choice for float32 CPU inference with the compiled kernels;
        the plain conv in training, with autograd, while tracing and elsewhere.

        ``residual``: a tensor of the output's shape added before the activation (a residual
        connection the inference rewrites moved into the conv: ``act(conv(x) + residual)``); the
        implicit GEMMs add it as they write their output, else one pass adds it.
        """
        if self.training or inference_kernels([x, self.weight]) is None:
            y = super().forward(x)
            if residual is not None:
                y = y + residual
            return torch.relu(y) if self.activation == "relu" else y
        weights = self._layer_weights()  # one cache lookup for the layouts and the kernel choice
        if residual is not None and getattr(self, "residual_dead", False):
            return dense_conv2d(x, self.weight, self.bias, self._geometry, weights=weights,
                                kernel=weights.residual_kernel(self._geometry, x.shape, DEFAULT_COST_MODEL),
                                activation=self.activation, residual=residual, into_residual=True)
        return dense_conv2d(x, self.weight, self.bias, self._geometry, weights=weights,
                            kernel=weights.dense_kernel(self._geometry, x.shape, DEFAULT_COST_MODEL),
                            activation=self.activation, residual=residual)

    def extra_repr(self) -> str:
        return (super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")
                + (", residual_dead=True" if getattr(self, "residual_dead", False) else ""))
