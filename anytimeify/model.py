"""The converted model: ``forward`` returns every exit, ``anytime`` yields them one by one."""
from __future__ import annotations

import contextvars
import copy
import math
import numbers
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ._fx.split import Segment, split_graph
from .masking.compiled import _traced
from .masking.conv import MaskedConv2d

__all__ = ["AnytimeModel", "ExitOutput", "Prediction", "Program", "confidence_scores", "SPARSE_NOT_TRACEABLE"]


@dataclass
class ExitOutput:
    """One prediction of the anytime progression.

    Attributes:
        index: exit number, 1-based (the last exit is the model's own head).
        logits: the exit's prediction (after copy aggregation when confidence adaptivity is on).
        elapsed: seconds the model has computed so far, up to this exit's logits (the time the
            consumer spends between exits is not counted).
        macs: cumulative conv and linear multiply-accumulates executed up to this exit (bias
            excluded, the paper's convention), for the whole batch.
        paper_macs: cumulative MACs in the paper's convention (a masked conv counts
            ``dense * p + (1 - p) * p * C_out * 49 * H * W``, REFERENCE.md §4); equals ``macs``
            without confidence adaptivity.
        mask: the "computed" mask this exit produced for the next segment (confidence
            adaptivity only), ``(B, 1, h, w)`` bool at the logits' resolution, True = computed.
        skipped: fraction of positions this exit marks confident (0.0 without confidence adaptivity).
    """

    index: int
    logits: torch.Tensor
    elapsed: float
    macs: int
    paper_macs: float = 0.0
    mask: Optional[torch.Tensor] = None
    skipped: float = 0.0

    @property
    def gmacs(self) -> float:
        """Executed MACs in units of 1e9."""
        return self.macs / 1e9

    @property
    def paper_gflops(self) -> float:
        """The paper's count (``paper_macs / 2**30``)."""
        return self.paper_macs / 2 ** 30


@dataclass
class Prediction:
    """What :meth:`AnytimeModel.predict` returns: each sample's prediction from the exit it left at.

    Attributes:
        logits: ``(B, ...)`` each sample's logits, from its exit.
        exits: ``(B,)`` int64, the exit (1-based) each sample left at.
        macs: ``(B,)`` int64, the conv and linear multiply-accumulates executed for each sample
            (cumulative up to its exit; only the samples still running are computed).
        seconds: wall-clock seconds of the whole call.
    """

    logits: torch.Tensor
    exits: torch.Tensor
    macs: torch.Tensor
    seconds: float

    @property
    def labels(self) -> torch.Tensor:
        """Predicted classes: ``logits.argmax(1)``."""
        return self.logits.argmax(1)

    @property
    def total_macs(self) -> int:
        """MACs executed for the whole batch."""
        return int(self.macs.sum())


def _shape_key(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


#: why ``torch.compile`` does not trace the sparse execution of confidence adaptivity
SPARSE_NOT_TRACEABLE = (
    "confidence adaptivity's sparse execution (the engine that computes only the positions a mask keeps) is not "
    "traceable, so torch.compile runs this model eagerly; to compile it, compile it in dense execution "
    "(model.set_execution('dense'): every position computed, the same outputs up to float rounding) or without "
    "confidence adaptivity (model.set_confidence(False)); under autograd (training) it compiles as it is")


def _eager_graph_call(graph_module: fx.GraphModule, x: torch.Tensor, compiling: bool) -> Tuple[torch.Tensor, ...]:
    if compiling:
        import warnings

        warnings.warn(SPARSE_NOT_TRACEABLE, stacklevel=3)
    return graph_module(x)


try:  # torch.compile skips this function and everything it calls: they run eagerly
    _eager_graph_call = torch.compiler.disable(_eager_graph_call, reason=SPARSE_NOT_TRACEABLE)
except TypeError:  # torch < 2.7: no reason
    _eager_graph_call = torch.compiler.disable(_eager_graph_call)


def _is_compiling() -> bool:
    """Whether TorchDynamo (``torch.compile``, strict ``torch.export``) is tracing the caller."""
    check = getattr(torch.compiler, "is_dynamo_compiling", None)
    return bool(check()) if check is not None else bool(torch._dynamo.is_compiling())


def _check_limit(name: str, value: object) -> Optional[float]:
    """``value`` as a float when it is a finite number >= 0, None when None; else a one-line error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0 or None (no limit), got {value!r} "
                        f"({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None (no limit), got {value!r}")
    return number


def _check_thresholds(thresholds: object) -> List[float]:
    """``predict``'s thresholds as floats: numbers, ``inf`` (none leaves) and ``-inf`` (all leave), no NaN."""
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__iter__"):
        raise TypeError(f"thresholds must be a sequence of numbers (one per exit), got {thresholds!r}")
    limits = []
    for k, value in enumerate(thresholds):
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"thresholds[{k}] must be a number (a confidence; inf: no sample leaves there), got "
                            f"{value!r}") from None
        if math.isnan(number):
            raise ValueError(f"thresholds[{k}] is NaN; give a number (a confidence; inf: no sample leaves there)")
        limits.append(number)
    return limits


#: input shapes whose per-segment FLOPs ``anytime(budget_gflops=...)`` keeps (least recently used dropped)
FLOP_CACHE_SHAPES = 8


def confidence_scores(logits: torch.Tensor) -> torch.Tensor:
    """A sample's confidence: the largest softmax probability over classes (dim 1), averaged over
    positions for dense predictions (``(B, C, h, w)``); ``(B,)`` float32. MSDNet's and RANet's
    criterion for classifiers, its image-level mean for dense models."""
    prob = torch.softmax(logits.float(), dim=1).amax(dim=1)
    return prob.reshape(prob.shape[0], -1).mean(dim=1)


class Ledger:
    """MACs of the segment running now: executed, and in the paper's convention for masked convs."""

    __slots__ = ("executed", "paper")

    def __init__(self) -> None:
        self.executed = 0
        self.paper = 0.0


# a context variable keeps interleaved generators apart
_LEDGER: contextvars.ContextVar[Optional[Ledger]] = contextvars.ContextVar("anytimeify_ledger", default=None)


def _conv_linear_hook(module: nn.Module, args, output) -> None:
    ledger = _LEDGER.get()
    if ledger is None or not isinstance(output, torch.Tensor):
        return
    if isinstance(module, nn.Conv2d):
        w = module.weight
        macs = output.numel() * w.shape[1] * w.shape[2] * w.shape[3]
    else:
        macs = output.numel() * module.in_features
    ledger.executed += macs
    ledger.paper += macs


def _masked_conv_hook(module: MaskedConv2d, args, output) -> None:
    ledger = _LEDGER.get()
    if ledger is None:
        return
    x = args[0]
    mask = args[1] if len(args) > 1 else None
    plan = args[2] if len(args) > 2 else None
    if mask is None:
        macs = module.dense_macs(x.shape)
        ledger.executed += macs
        ledger.paper += macs
    else:
        execution = module.resolved_execution(x)
        if plan is not None and plan.matches(mask) and not _traced((x,)):
            # the counts of the convs under one plan that share everything they depend on are
            # computed once (counting cost as much as a small conv's kernel)
            weight = module.weight
            key = ("macs", module.geometry, tuple(x.shape), execution, module.strategy, module.reader_radius,
                   float(module.interp_lambda), id(module.cost_model), weight.dtype, weight.device)
            counts = plan.decisions.get(key)
            if counts is None:
                counts = plan.decisions[key] = (module.executed_macs(x.shape, mask, plan, execution=execution),
                                                module.paper_macs(x.shape, mask, plan))
        else:
            counts = (module.executed_macs(x.shape, mask, plan, execution=execution),
                      module.paper_macs(x.shape, mask, plan))
        ledger.executed += counts[0]
        ledger.paper += counts[1]


def run_segment(segment: Segment, args) -> Tuple[tuple, Ledger]:
    """Run one segment, counting its MACs."""
    ledger = Ledger()
    token = _LEDGER.set(ledger)
    try:
        return segment.module(*args), ledger
    finally:
        _LEDGER.reset(token)


@dataclass
class Program:
    """A traced graph and its sequential split, for one of train / eval mode."""

    graph_module: fx.GraphModule
    segments: List[Segment]
    input_name: str
    exit_names: List[str]
    mask_names: List[Optional[str]]  # per exit: the MaskSet it decides (None without confidence)
    read_later: List[frozenset] = field(init=False)  # per segment: names later segments still read

    def __post_init__(self) -> None:
        self.read_later = [frozenset(name for s in self.segments[i + 1:] for name in s.inputs)
                           for i in range(len(self.segments))]


def _build_program(root: nn.Module, graph: fx.Graph, results: List[fx.Node],
                   mask_nodes: List[fx.Node]) -> Program:
    """Make ``graph`` return ``results`` and split it after each exit (after its mask decision)."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = (tuple(results),)
    graph.lint()
    gm = fx.GraphModule(root, graph, "AnytimeGraph")
    # a segment ends with its exit's result, or with the mask decision that follows it
    ends = mask_nodes if mask_nodes else results[:-1]
    segment_of: Dict[fx.Node, int] = {}
    seg = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        segment_of[node] = seg
        if seg < len(ends) and node is ends[seg]:
            seg += 1
    keep = list(results) + list(mask_nodes)
    segments = split_graph(gm, gm.graph, segment_of, keep)
    input_name = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    masks = [m.name for m in mask_nodes] + [None] * (len(results) - len(mask_nodes))
    return Program(gm, segments, input_name, [n.name for n in results], masks)


def _rebuild_program(program: Program) -> Program:
    """Split a program's (rewritten) graph into segments again, at the same exits and masks."""
    gm = program.graph_module
    by_name = {node.name: node for node in gm.graph.nodes}
    results = [by_name[name] for name in program.exit_names]
    masks = [by_name[name] for name in program.mask_names if name is not None]
    return _build_program(gm, gm.graph, results, masks)


class AnytimeModel(nn.Module):
    """A dense-prediction network with early exits, made by :func:`anytimeify.convert`.

    Its parameters and buffers keep the base model's names; exits add ``exits.<i>.*``.
    ``forward(x)`` returns the logits of every exit as a tuple (for training and export);
    ``anytime(x)`` yields one :class:`ExitOutput` per exit and computes nothing beyond the exit
    the consumer last asked for.

    Attributes:
        exits: the early exits' heads (``nn.ModuleList``; the last exit is the base model's head).
        exit_info: per exit, its boundary name and shapes, as conversion found them.
        input_divisor: height and width of an input must be multiples of this.
        in_channels: channels of an input image.
        confidence: the model's :class:`~anytimeify.Confidence` (its own copy), or None.
        frozen: whether this is an inference copy made by :meth:`freeze`.
        latency_profile: per input shape (``"BxCxHxW"``), each segment's measured seconds and
            paper GFLOPs (:meth:`profile_latency`), for ``anytime(deadline=...)``; saved by
            :func:`anytimeify.save`. None until measured.
        source: how the base network is built again (its factory and arguments), for
            :func:`anytimeify.save`; set by :func:`~anytimeify.convert`.
        conversion: the conversion's arguments, for :func:`anytimeify.save`.
    """

    def __init__(self, programs: Dict[bool, Program], modules: Dict[str, nn.Module], *,
                 input_divisor: int, in_channels: int, exit_info: Sequence[dict],
                 base_class: str, confidence=None, tensors: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        # parameters and buffers the base model holds itself (a transformer's class token and
        # position embedding); the graphs read these very tensors
        for name, tensor in (tensors or {}).items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:  # constants the trace made (``_tensor_constant<k>``) are rebuilt, not saved
                self.register_buffer(name, tensor, persistent=not name.startswith("_tensor_constant"))
        # the programs share this model's modules but must not register them a second time
        object.__setattr__(self, "_programs", programs)
        self.input_divisor = input_divisor
        self.in_channels = in_channels
        self.exit_info = list(exit_info)
        self.base_class = base_class
        self.confidence = confidence
        self.frozen = False
        #: per input shape ("BxCxHxW"): each segment's measured seconds and paper GFLOPs
        #: (:meth:`profile_latency`), for ``anytime(deadline=...)``
        self.latency_profile: Optional[Dict[str, Dict[str, object]]] = None
        #: per input shape, each segment's paper GFLOPs (``anytime(budget_gflops=...)``); the
        #: FLOP_CACHE_SHAPES most recently used shapes are kept
        self._segment_gflops: "OrderedDict[str, List[float]]" = OrderedDict()
        #: how the base network and the conversion are made again (anytimeify.save); set by convert
        self.source: Optional[Dict[str, object]] = None
        self.conversion: Optional[Dict[str, object]] = None
        self._register_counters()

    def _register_counters(self) -> None:
        """Hook every conv and linear layer (once) so that ``anytime()`` can report MACs."""
        for module in self.modules():
            if getattr(module, "_anytimeify_counted", False):
                continue
            if isinstance(module, MaskedConv2d):
                module.register_forward_hook(_masked_conv_hook)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                module.register_forward_hook(_conv_linear_hook)
            else:
                continue
            module._anytimeify_counted = True

    # -- introspection -------------------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        """Number of exits, the base model's own head included."""
        return len(self.exit_info)

    @property
    def program(self) -> Program:
        """The traced graph and its split for the current mode (train or eval)."""
        return self._programs[self.training]

    @property
    def graph_module(self) -> fx.GraphModule:
        """The single graph whose forward returns every exit (for export and inspection)."""
        return self.program.graph_module

    @property
    def segments(self) -> List[Segment]:
        """The pieces ``anytime()`` runs one after another; segment k ends at exit k + 1."""
        return self.program.segments

    def extra_repr(self) -> str:
        names = ", ".join(e["name"] for e in self.exit_info)
        return f"base={self.base_class}, exits=[{names}]"

    # -- execution -----------------------------------------------------------------------------

    def freeze(self) -> "AnytimeModel":
        """An inference copy: batch norms folded into the convs before them, channels-last weights,
        the unmasked convs run by the engine's fastest dense kernel (:class:`~anytimeify.masking.conv.EngineConv2d`).

        The copy computes what this model computes in eval mode (up to float rounding), faster; it
        cannot be trained, and later changes to this model's weights do not reach it.

        What changes in the copy: a masked conv's batch norm becomes a per-channel ``shift`` added
        after the blend (so a skipped position still gets it, as before folding); residual additions
        and HRNet's fuse layers (upsampling, the sum of the branches, ReLU) run inside the convs that
        feed them; a masked conv whose only reader is the next masked conv of the same mask leaves
        the rows nobody reads unwritten. Its ``anytime()`` may report fewer executed ``macs`` for
        that reason; ``paper_macs`` do not change. ``train()`` on it raises RuntimeError.
        """
        from ._fx.fold import (fold_batch_norms, fuse_residuals, fuse_sums, mark_dead_residuals, mark_reader_radii,
                               use_engine_convs)

        frozen = copy.deepcopy(self).eval()
        # anytimeify.save writes a frozen model as the model it was frozen from (and the flag)
        frozen._unfrozen_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        program = frozen._programs[False]
        holders = [program.graph_module] + [seg.module for seg in program.segments]
        graph = program.graph_module.graph
        fold_batch_norms(frozen, graph, holders)
        # the unmasked convs run the engine's fastest dense kernel (a ReLU that only reads one is
        # applied as it writes), as the dense baseline's do
        use_engine_convs(frozen, holders, graph=graph)
        # residual additions (and the ReLU after them) move into the masked and engine convs that
        # feed them; that rewrites the graph, so it is split into segments again
        ends = [name for name in program.mask_names if name is not None] + list(program.exit_names)
        rewritten = fuse_residuals(program.graph_module, graph, barriers=ends)
        # HRNet's fuse layers (upsampling, the sum of the branches, ReLU): one pass each
        rewritten += fuse_sums(program.graph_module, graph)
        if rewritten:
            program = _rebuild_program(program)
        # an engine conv whose residual nothing reads afterwards writes into the residual's memory
        mark_dead_residuals(frozen, program.graph_module.graph)
        # a masked conv read only by the next masked conv of the same mask leaves unread rows unwritten
        mark_reader_radii(frozen, program.graph_module.graph)
        for module in program.graph_module.modules():  # all kept: the same dense kernels as the rest
            if isinstance(module, MaskedConv2d):
                module.engine_dense = True
        object.__setattr__(frozen, "_programs", {False: program, True: program})
        frozen.frozen = True
        frozen._register_counters()
        return frozen.to(memory_format=torch.channels_last)

    def __getstate__(self):
        # a frozen model's copy of its source weights (for anytimeify.save) does not travel with
        # torch.save: a pickled model would be twice its size
        state = self.__dict__.copy()
        state.pop("_unfrozen_state", None)
        return state

    def train(self, mode: bool = True) -> "AnytimeModel":
        if mode and getattr(self, "frozen", False):
            raise RuntimeError("a frozen model (batch norms folded) is for inference only; train the model "
                               "it was frozen from and call freeze() again")
        return super().train(mode)

    def set_confidence(self, enabled: bool) -> "AnytimeModel":
        """Turn confidence adaptivity on or off (off: every position computed, nothing copied).

        Raises:
            ValueError: the model was converted without confidence adaptivity.
        """
        if self.confidence is None:
            raise ValueError("this model has no confidence adaptivity; convert it with confidence=Confidence(...)")
        self.confidence.enabled = bool(enabled)
        return self

    def set_execution(self, execution: str) -> "AnytimeModel":
        """Set how every masked conv runs: ``"auto"`` (dense under autograd, sparse under
        ``torch.no_grad()``; the default), ``"dense"`` (training, export) or ``"sparse"`` (inference).

        Raises:
            ValueError: an unknown ``execution``, or a model without confidence adaptivity.
        """
        from .masking.criteria import EXECUTIONS

        if self.confidence is None:
            raise ValueError("this model has no confidence adaptivity; convert it with confidence=Confidence(...)")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        self.confidence.execution = execution
        for module in self.modules():
            if isinstance(module, MaskedConv2d):
                module.execution = execution
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error that says what to do when ``x`` is not an input this model takes.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: a wrong number of dimensions or channels, an integer dtype or one that
                differs from the weights' (outside autocast), another device than the weights', or
                a height or width the model cannot take (the message gives the nearest that works).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image tensor of shape (B, {self.in_channels}, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected an input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point input, got dtype {x.dtype}; convert it with x.float()")
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"the input's dtype {x.dtype} differs from the model's weights ({weight.dtype}): convert "
                             f"the input with x.to({weight.dtype}) or the model with model.to({x.dtype})")
        if weight is not None and x.device != weight.device:
            raise ValueError(f"the input is on {x.device} but the model's weights are on {weight.device}: move one, "
                             f"e.g. x.to({str(weight.device)!r})")
        h, w = x.shape[-2:]
        fixed = getattr(self, "fixed_input_size", None)
        if fixed is not None and (h, w) != tuple(fixed):
            raise ValueError(f"this model takes {fixed[0]}x{fixed[1]} inputs only (its classifiers are built for that "
                             f"size), got {h}x{w}; resize the input")
        d = self.input_divisor
        if h % d or w % d or h == 0 or w == 0:
            fix_h, fix_w = max(d, -(-h // d) * d), max(d, -(-w // d) * d)
            raise ValueError(
                f"input size {h}x{w} is not supported: height and width must be positive multiples of "
                f"{d} for this model (its stages and exits halve the resolution down to 1/{d}). "
                f"Pad or resize the input, e.g. to {fix_h}x{fix_w}."
            )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Logits of every exit, in order (the last is the base model's own output).

        Under ``torch.compile`` a model whose confidence adaptivity runs the sparse execution
        (``"auto"`` without autograd, or ``"sparse"``) is not traced: it runs eagerly, with a
        warning that says what compiles (:data:`SPARSE_NOT_TRACEABLE`); the dense execution
        (``set_execution("dense")``, or ``"auto"`` under autograd) and a model without confidence
        adaptivity compile as one graph. ``torch.compile(..., fullgraph=True)`` raises instead.
        """
        self.check_input(x)
        if _is_compiling() and self._runs_sparse(x):
            return _eager_graph_call(self.program.graph_module, x, True)
        return self.program.graph_module(x)

    def _runs_sparse(self, x: torch.Tensor) -> bool:
        """Whether a masked conv may run the sparse engine on a call on ``x`` (confidence adaptivity
        on, and a masked conv in ``"sparse"`` execution, or in ``"auto"`` without autograd)."""
        if self.confidence is None or not self.confidence.enabled:
            return False
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return any(m.execution == "sparse" or (m.execution == "auto" and not grad)
                   for m in self.modules() if isinstance(m, MaskedConv2d))

    def anytime(self, x: torch.Tensor, *, deadline: Optional[float] = None, budget_gflops: Optional[float] = None,
                clock: Callable[[], float] = time.perf_counter) -> Iterator[ExitOutput]:
        """Yield one :class:`ExitOutput` per exit; stop iterating to skip the rest of the network.

        The work of exit k+1 starts only when the consumer asks for it, so a consumer that breaks
        after exit k never runs the later segments. Wrap the loop in ``torch.no_grad()`` for
        inference.

        Args:
            x: the image batch.
            deadline: seconds of wall-clock time from the first ``next()``, the consumer's time
                between exits included. A segment whose expected time (the latency profile
                :meth:`profile_latency` measured for this input shape) exceeds what is left is
                not started, and the generator ends. Without a profile for the shape, raises
                ``ValueError``.
            budget_gflops: the paper's GFLOPs (MACs / 2**30, whole batch) the progression may
                spend; a segment whose cost (its dense count, or the profile's) would exceed
                what is left is not started.
            clock: the time source of ``deadline`` (injectable for tests).

        A segment's expected cost with confidence adaptivity is the profile's (measured with the
        model's confidence setting at profiling time); the first exit is not special: when it
        does not fit, nothing runs.

        Raises:
            TypeError: ``deadline`` or ``budget_gflops`` is not a number (or None).
            ValueError: ``deadline`` or ``budget_gflops`` is NaN, infinite or negative; an input the
                model does not take (:meth:`check_input`); a deadline without a latency profile.

        The arguments are checked when ``anytime`` is called, before the first ``next()``.
        """
        deadline = _check_limit("deadline", deadline)
        budget_gflops = _check_limit("budget_gflops", budget_gflops)
        self.check_input(x)
        if deadline is None and budget_gflops is None:
            return self._anytime(x, self.program)
        costs = self._expected_costs(x, deadline is not None)
        return self._bounded(self._anytime(x, self.program), costs, deadline, budget_gflops, clock)

    def _expected_costs(self, x: torch.Tensor, need_time: bool) -> Dict[str, List[float]]:
        key = _shape_key(x.shape)
        profile = (self.latency_profile or {}).get(key)
        if need_time and profile is None:
            known = ", ".join(sorted(self.latency_profile or {})) or "none"
            raise ValueError(f"anytime(deadline=...) needs the per-segment latency of input {key} on this machine: call "
                             f"model.profile_latency({tuple(x.shape)}) once (profiled shapes: {known})")
        if profile is not None:
            return profile
        cache = self._segment_gflops
        if not isinstance(cache, OrderedDict):  # a model pickled by an earlier version holds a dict
            cache = self._segment_gflops = OrderedDict(cache)
        if key in cache:
            cache.move_to_end(key)
        else:
            from .flops import PAPER_UNIT, flops

            cumulative = [e.paper_gflops * PAPER_UNIT for e in flops(self, x).exits]
            cache[key] = [(b - a) / PAPER_UNIT for a, b in zip([0.0] + cumulative, cumulative)]
            while len(cache) > FLOP_CACHE_SHAPES:
                cache.popitem(last=False)
        return {"seconds": [], "paper_gflops": cache[key]}

    def _bounded(self, outputs: Iterator[ExitOutput], costs: Dict[str, List[float]], deadline: Optional[float],
                 budget_gflops: Optional[float], clock: Callable[[], float]) -> Iterator[ExitOutput]:
        start = clock()
        spent = 0.0
        for k in range(self.num_exits):
            if deadline is not None and costs["seconds"][k] > deadline - (clock() - start):
                return
            if budget_gflops is not None and spent + costs["paper_gflops"][k] > budget_gflops:
                return
            out = next(outputs)
            spent = out.paper_gflops
            yield out

    @torch.no_grad()
    def profile_latency(self, input_size: Sequence[int], *, reps: int = 5, warmup: int = 1) -> Dict[str, object]:
        """Measure each segment's time on this machine for one input shape, for ``anytime(deadline=...)``.

        Runs ``anytime`` on random inputs ``warmup + reps`` times and keeps each segment's median
        time and paper GFLOPs; the result is stored in ``model.latency_profile`` under the shape
        (``"BxCxHxW"``) and saved with :func:`anytimeify.save`. Profile the model as it will
        run (frozen or not, confidence adaptivity on or off, the same threads).

        Args:
            input_size: ``(H, W)`` (batch 1) or ``(B, C, H, W)``.
            reps: timed runs (the median is kept).
            warmup: untimed runs first (kernel builds, allocator pools).
        """
        import statistics

        size = tuple(int(v) for v in input_size)
        if len(size) == 2:
            size = (1, self.in_channels) + size
        if len(size) != 4 or size[0] < 1 or reps < 1 or warmup < 0:
            raise ValueError(f"input_size must be (H, W) or (B, C, H, W) with B >= 1, reps >= 1 and warmup >= 0, got "
                             f"{input_size!r}, reps={reps!r}, warmup={warmup!r}")
        p = next(self.parameters())
        # an input the model does not take fails here, in one line, not deep inside a layer
        self.check_input(torch.empty(size, device=p.device, dtype=p.dtype))
        was = self.training
        self.eval()
        times: List[List[float]] = [[] for _ in range(self.num_exits)]
        gflops: List[float] = []
        try:
            for rep in range(warmup + reps):
                x = torch.randn(size, device=p.device, dtype=p.dtype)
                last, before = 0.0, 0.0
                gflops = []
                for k, out in enumerate(self._anytime(x, self.program)):
                    if rep >= warmup:
                        times[k].append(out.elapsed - last)
                    last = out.elapsed
                    gflops.append(out.paper_gflops - before)
                    before = out.paper_gflops
        finally:
            self.train(was)
        from ._machine import cpu_model

        profile = {"seconds": [statistics.median(t) for t in times], "paper_gflops": gflops,
                   "cpu": cpu_model(), "threads": torch.get_num_threads(), "device": str(p.device)}
        if self.latency_profile is None:
            self.latency_profile = {}
        self.latency_profile[_shape_key(size)] = profile
        return profile

    def _anytime(self, x: torch.Tensor, program: Program) -> Iterator[ExitOutput]:
        env: Dict[str, object] = {program.input_name: x}
        macs, paper = 0, 0.0
        elapsed = 0.0
        for seg in program.segments:
            start = time.perf_counter()
            values, ledger = run_segment(seg, [env[name] for name in seg.inputs])
            elapsed += time.perf_counter() - start
            env.update(zip(seg.outputs, values))
            macs += ledger.executed
            paper += ledger.paper
            mask_name = program.mask_names[seg.index]
            masks = env[mask_name] if mask_name else None
            yield ExitOutput(seg.index + 1, env[program.exit_names[seg.index]], elapsed, macs, paper,
                             masks.computed if masks is not None else None,
                             masks.skipped if masks is not None else 0.0)
            # drop what no later segment reads, so memory does not grow with the exits
            later = program.read_later[seg.index]
            for name in [k for k in env if k not in later]:
                del env[name]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, thresholds: Sequence[float]) -> Prediction:
        """Per-sample early exit: each sample leaves at the first exit whose confidence reaches that
        exit's threshold, and later segments run only for the samples still in (the batch shrinks
        as samples leave), so what is not needed is really not computed.

        Args:
            x: a batch of images.
            thresholds: one per exit; ``thresholds[k]`` is the confidence
                (:func:`confidence_scores`) at which a sample leaves at exit ``k + 1``. The last
                exit takes every sample still in, so ``num_exits - 1`` values suffice (a last
                value is ignored). :func:`anytimeify.calibrate` picks them for a cost budget.

        Returns:
            A :class:`Prediction`: logits, exit and executed MACs per sample, and the time taken.

        Every sample's prediction equals what the full network's exit would give it (each
        sample's computation does not depend on the others in eval mode), up to float rounding
        of kernels that depend on the batch size.

        Raises:
            TypeError: a threshold that is not a number.
            ValueError: a NaN threshold, the wrong number of thresholds, an empty batch, an input
                the model does not take (:meth:`check_input`), or confidence adaptivity on.
            RuntimeError: the model is in training mode.
        """
        self.check_input(x)
        if x.shape[0] == 0:
            raise ValueError(f"the batch is empty (input of shape {tuple(x.shape)}); predict() needs at least one "
                             "image")
        if self.training:
            raise RuntimeError("predict() runs the model in eval mode; call model.eval() first (batch norms in "
                               "training mode mix the samples of a batch)")
        if self.confidence is not None and self.confidence.enabled:
            raise ValueError("predict() lets whole samples leave early; confidence adaptivity skips positions within "
                             "them and is not combined with it: model.set_confidence(False) first")
        limits = _check_thresholds(thresholds)
        if len(limits) not in (self.num_exits - 1, self.num_exits):
            raise ValueError(f"thresholds: give {self.num_exits - 1} values (one per exit before the last), "
                             f"got {len(limits)}")
        start = time.perf_counter()
        program = self.program
        batch = x.shape[0]
        env: Dict[str, object] = {program.input_name: x}
        alive = torch.arange(batch, device=x.device)
        exits = torch.full((batch,), self.num_exits, dtype=torch.int64)
        macs = torch.zeros(batch, dtype=torch.int64)
        logits: Optional[torch.Tensor] = None
        for seg in program.segments:
            values, ledger = run_segment(seg, [env[name] for name in seg.inputs])
            env.update(zip(seg.outputs, values))
            here = alive.cpu()
            macs[here] += ledger.executed // max(1, len(here))
            out = env[program.exit_names[seg.index]]
            if logits is None:
                logits = out.new_empty((batch,) + tuple(out.shape[1:]))
            last = seg.index == self.num_exits - 1
            leave = torch.ones(len(alive), dtype=torch.bool, device=out.device) if last else \
                confidence_scores(out) >= limits[seg.index]
            logits[alive[leave]] = out[leave]
            exits[here[leave.cpu()]] = seg.index + 1
            if last or bool(leave.all()):
                break
            stay = ~leave
            later = program.read_later[seg.index]
            size = len(alive)
            for name in list(env):
                if name not in later:
                    del env[name]
                elif isinstance(env[name], torch.Tensor) and env[name].dim() > 0 and env[name].shape[0] == size:
                    env[name] = env[name][stay]
            alive = alive[stay]
        assert logits is not None
        return Prediction(logits, exits, macs, time.perf_counter() - start)

    def exits_until(self, x: torch.Tensor, deadline: float) -> Optional[ExitOutput]:
        """The last prediction ``anytime(x, deadline=deadline)`` reaches (None when not even the
        first exit fits the deadline); needs :meth:`profile_latency` for this input shape."""
        last = None
        for out in self.anytime(x, deadline=deadline):
            last = out
        return last
