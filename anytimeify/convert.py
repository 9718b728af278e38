"""``convert()``: trace a dense-prediction model, attach early exits at its stage boundaries, split it.

The pass, in order: deep-copy the model, trace it with torch.fx (train and eval graphs), run a
probe input through the graph to learn shapes, resolve the exit boundaries, insert one exit
module right after each boundary's last node, make the graph return every exit, then split the
graph at the exits into segments for :meth:`AnytimeModel.anytime`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ._fx.adapters import trace_for_conversion
from ._fx.stages import (Boundary, candidate_boundaries, node_boundary, resolve_exits, spatial_divisor,
                         stage_adapter_for)
from ._fx.trace import LeafSpec
from .exits import HEAD_KINDS, ClassifierExit, Exit, original_head, redesigned_head
from ._fx.confidence import apply_confidence
from .masking.criteria import Confidence
from .model import AnytimeModel, Program, _build_program
from .saving import describe_source

_logger = logging.getLogger(__name__)

__all__ = ["convert", "from_exits", "inspect", "Candidate", "TASKS"]

DEFAULT_PROBE = (1, 3, 256, 256)
#: what ``convert(task=...)`` accepts: dense prediction (segmentation, pose) or image classification
TASKS = ("dense", "classification")


def native_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The input size the model (or the first timm model inside it) was made for: timm's
    ``pretrained_cfg["input_size"]``; None where no module declares one."""
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
            return int(size[1]), int(size[2])
    return None


def _probe_shape(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if input_size is None:
        native = native_size(model)  # a fixed-size transformer takes only that
        return DEFAULT_PROBE if native is None else DEFAULT_PROBE[:2] + native
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (1, 3) + size
    if len(size) != 4 or min(size) <= 0:
        raise ValueError(f"input_size must be (H, W) or (B, C, H, W) with positive sizes, got {input_size!r}")
    return size


def _module_tree(base: nn.Module) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """A module holding the base model's children and its own parameters and buffers (under the
    same names), and those own tensors."""
    root = nn.Module()
    for name, child in base.named_children():
        root.add_module(name, child)
    tensors: Dict[str, torch.Tensor] = {}
    for name, param in base.named_parameters(recurse=False):
        root.register_parameter(name, param)
        tensors[name] = param
    for name, buffer in base.named_buffers(recurse=False):
        root.register_buffer(name, buffer)
        tensors[name] = buffer
    return root, tensors


def _keep_traced_constants(base: nn.Module, root: nn.Module, tensors: Dict[str, torch.Tensor],
                           graphs: Dict[bool, fx.GraphModule]) -> None:
    """Tensors that ``forward`` makes from constants (``torch.tensor([...])``) become attributes
    ``_tensor_constant<k>`` of the traced model; they go into the converted model's tree too, as
    buffers outside the state dict (the graphs read them by those names)."""
    for gm in graphs.values():
        for node in gm.graph.nodes:
            target = node.target
            if node.op != "get_attr" or "." in target or target in tensors or hasattr(root, target):
                continue
            value = getattr(base, target, None)
            if isinstance(value, torch.Tensor):
                root.register_buffer(target, value, persistent=False)
                tensors[target] = value


def _traced(model: nn.Module, leaf_modules, autowrap_functions, training: bool,
            probe: Optional[Tuple[int, ...]] = None) -> fx.GraphModule:
    was = model.training
    model.train(training)
    try:
        return trace_for_conversion(model, leaf_modules, autowrap_functions, input_shape=probe)
    finally:
        model.train(was)


def _mode_graphs(base: nn.Module, leaf_modules, autowrap_functions,
                 probe: Optional[Tuple[int, ...]] = None) -> Dict[bool, fx.GraphModule]:
    """The eval-mode graph, and the train-mode one where it differs: ``{training: graph}``."""
    graphs = {False: _traced(base, leaf_modules, autowrap_functions, False, probe)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eval trace has said whatever tracing had to say
        graphs[True] = _traced(base, leaf_modules, autowrap_functions, True, probe)
    if graphs[True].code == graphs[False].code:
        del graphs[True]
    else:
        _logger.info("%s traces differently in train and eval mode; keeping both graphs", type(base).__name__)
    return graphs


def _propagate_on_meta(gm: fx.GraphModule, probe: Tuple[int, ...], dtype: torch.dtype) -> bool:
    """Shape propagation with every tensor on the meta device (shapes without arithmetic: several
    times faster than the real probe at HRNet's size); False where some operation cannot run there
    (data-dependent shapes, tensors made on another device inside ``forward``)."""
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    try:
        from torch.nn.utils.stateless import _reparametrize_module  # torch's own functional_call uses it

        # (ShapeProp prints the traceback of an operation that fails before raising: this try's
        # failure is not the user's, the real probe below tells what fails for real)
        with torch.no_grad(), warnings.catch_warnings(), _reparametrize_module(gm, meta, tie_weights=True), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            ShapeProp(gm).propagate(torch.empty(probe, device="meta", dtype=dtype))
        return True
    except Exception:  # the real probe below decides, and says what failed
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        return False


def _propagate_shapes(model: nn.Module, gm: fx.GraphModule, probe: Tuple[int, ...]) -> None:
    """Record every node's shape at the probe input (``node.meta["tensor_meta"]``): on the meta
    device where every operation runs there, else with a real random input."""
    gm.meta["input_shape"] = probe
    was = gm.training
    gm.eval()  # probe without touching BN statistics
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    # drawn whichever way the shapes are found: the global random stream (and so the exits' initial
    # weights after a torch.manual_seed) stays what it was when the probe always ran for real
    x = torch.randn(probe, device=device, dtype=dtype)
    if _propagate_on_meta(gm, probe, dtype):
        gm.train(was)
        return
    # a train-mode graph has training=True baked into traced-through norms (timm's BatchNormAct2d),
    # so gm.eval() does not stop the probe from moving running statistics: put them back
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as err:
        # torch.fx appends the graph node and a traceback to the message: the first line says what failed
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{type(model).__name__} failed on a probe input of shape {probe}: {type(err).__name__}: {reason}. "
            f"Pass input_size=(H, W) with a size the model accepts."
        ) from err
    finally:
        gm.train(was)
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])


def _output_node(gm: fx.GraphModule) -> Tuple[fx.Node, fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        raise TypeError(
            "convert() needs a model whose forward returns one tensor of logits; this one returns "
            f"{type(value).__name__}. Wrap it in a module that returns the logits tensor (a network "
            "that already returns one tensor per exit is made anytime by anytimeify.from_exits)."
        )
    return out, value


def _input_divisor(model: nn.Module, gm: fx.GraphModule, boundaries: List[Boundary], depths: List[int]) -> int:
    declared = getattr(model, "input_divisor", None)
    if isinstance(declared, int) and declared > 0:
        divisor = declared
    else:
        divisor = spatial_divisor(gm)  # fixed-size tensors (global pooling) do not count
    for b, depth in zip(boundaries, depths):
        if depth:  # a redesigned head halves its input depth times; an original head takes any size
            divisor = max(divisor, int(round(b.stride)) * 2 ** depth)
    return divisor


def _halvings(n: int) -> int:
    """How many times ``n`` halves exactly (its power of two)."""
    count = 0
    while n > 0 and n % 2 == 0:
        n //= 2
        count += 1
    return count


def _depth_cap(b: Boundary, sizes: Sequence[Tuple[int, int]]) -> int:
    """The most 2x pool steps a redesigned head at ``b`` can take so that its maps halve exactly at
    the probe size (``b``'s own map) and at each input size of ``sizes`` (where ``b``'s stride is a
    whole number); 0 where the stride is not (valid-padding networks such as Inception, whose maps
    are odd at some sizes)."""
    stride = b.stride
    if abs(stride - round(stride)) > 1e-6:
        return 0
    stride = int(round(stride))
    h, w = b.shapes[0][-2:]
    cap = min(_halvings(h), _halvings(w))
    for height, width in sizes:
        if height % stride == 0 and width % stride == 0:
            cap = min(cap, _halvings(height // stride), _halvings(width // stride))
    return cap


def _default_width(model: nn.Module) -> int:
    return int(getattr(model, "default_exit_width", 64))


def _make_exits(boundaries: List[Boundary], num_classes: int, head: str, width: int,
                out_hw: Tuple[int, int], align_corners: bool,
                sizes: Sequence[Tuple[int, int]] = ()) -> Tuple[nn.ModuleList, List[dict]]:
    """The exits; a redesigned head takes D = N - i down steps, fewer where its map would not halve
    exactly at the probe size or at ``sizes`` (a transformer's 14x14 tokens at 224x224 halve once),
    and is an original head where it cannot halve at all."""
    n_exits = len(boundaries) + 1
    exits = nn.ModuleList()
    info = []
    for i, b in enumerate(boundaries):
        channels = sum(b.channels)
        depth = min(n_exits - (i + 1), _depth_cap(b, sizes)) if head == "redesigned" else 0
        kind = head if depth > 0 else "original"
        layers = (redesigned_head(channels, num_classes, width, depth, align_corners)
                  if kind == "redesigned" else original_head(channels, num_classes))
        fused_hw = b.shapes[0][-2:]
        scale = None
        if tuple(fused_hw) != tuple(out_hw):
            scale = (out_hw[0] / fused_hw[0], out_hw[1] / fused_hw[1])
        exits.append(Exit(layers, kind, depth, align_corners, scale))
        info.append({"name": b.name, "channels": b.channels, "stride": b.stride, "depth": depth})
    return exits, info


def _make_classifier_exits(boundaries: List[Boundary], num_classes: int,
                           channels_last: Sequence[str] = ()) -> Tuple[nn.ModuleList, List[dict]]:
    """One pooling exit per boundary; ``channels_last``: names of boundaries whose 4-D tensors are
    ``(B, H, W, C)`` (Swin's stages), pooled like tokens."""
    exits = nn.ModuleList()
    info = []
    for b in boundaries:
        tokens = [len(shape) == 3 or b.name in channels_last for shape in b.shapes]
        channels = [shape[-1] if token else shape[1] for shape, token in zip(b.shapes, tokens)]
        exits.append(ClassifierExit(channels, num_classes, tokens))
        info.append({"name": b.name, "channels": channels, "stride": b.stride, "depth": 0})
    return exits, info


def _insert_exit_nodes(graph: fx.Graph, boundaries: List[Boundary]) -> List[fx.Node]:
    nodes = []
    for i, b in enumerate(boundaries):
        with graph.inserting_after(b.last):
            nodes.append(graph.call_module(f"exits.{i}", args=(list(b.nodes),)))
    return nodes


def convert(model: nn.Module, exits: Union[str, Sequence[str]] = "stages", head: str = "redesigned",
            width: Optional[int] = None, *, confidence: Optional[Confidence] = None,
            input_size: Optional[Sequence[int]] = None,
            leaf_modules: Sequence[LeafSpec] = (), autowrap_functions: Sequence[Callable] = (),
            align_corners: Optional[bool] = None, inplace: bool = False, task: str = "dense") -> AnytimeModel:
    """Turn a dense-prediction network (or an image classifier) into an anytime model with early exits.

    Args:
        model: a module whose forward takes an image batch ``(B, C, H, W)`` and returns logits
            ``(B, classes, h, w)`` (``task="dense"``) or ``(B, classes)`` (``task="classification"``).
        exits: ``"stages"`` (the stage boundaries found by the model family's adapter) or a list
            of boundary names: module qualified names or graph node names, as
            :func:`anytimeify.inspect` lists them.
        head: ``"redesigned"`` (encoder-decoder exits with D = N - i pool-conv steps) or
            ``"original"`` (1x1 conv, BN, ReLU, 1x1 classifier).
        width: channel width of redesigned heads; default: the model's ``default_exit_width``
            (128 for HRNet-W48, 64 otherwise).
        confidence: confidence adaptivity settings (:class:`anytimeify.Confidence`); None: off.
            With it, every convolution after early exit k (its next exit's head included) is
            masked by exit k's confidence, and predictions are copy-aggregated.
        input_size: ``(H, W)`` or ``(B, C, H, W)`` of a probe input the model accepts
            (default 256x256); it only serves to learn shapes.
        leaf_modules: module classes or qualified names not to trace through.
        autowrap_functions: free functions to keep as single graph nodes.
        align_corners: for the exits' bilinear resizing; default: the model's ``align_corners``
            attribute, else False (the ADP-C reference implementation's, and PyTorch's default).
        inplace: reuse ``model``'s modules instead of a deep copy.
        task: ``"dense"`` (segmentation, pose: the exits of ``head``) or ``"classification"``: each
            exit pools the stage's features globally (feature maps over positions, a vision
            transformer's tokens over tokens) into one linear layer, and ``head``, ``width`` and
            ``confidence`` do not apply (a classifier's samples leave early as a whole:
            :meth:`AnytimeModel.predict`).

    Returns:
        An :class:`AnytimeModel` with ``len(exits) + 1`` exits, the last being the model's own head.

    Raises:
        TypeError: ``model`` is not a module, is already an anytime model, or does not return
            one tensor.
        ValueError: an unknown ``head`` or ``task``, a bad ``width``, an exit name that is not a
            stage boundary, or a probe input the model rejects (the messages list what is valid).
        TraceError: torch.fx cannot trace a module (the message names it and how to keep it a leaf).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "classification" and confidence is not None:
        raise ValueError("confidence adaptivity skips positions of a dense prediction; a classifier's samples "
                         "leave early as a whole: convert without confidence and use model.predict(x, thresholds)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, AnytimeModel):
        raise TypeError(
            f"the model is already converted (an AnytimeModel of {model.base_class} with {model.num_exits} exits); "
            f"convert() takes the base network: convert that with the exits, head and confidence wanted (switch "
            f"confidence adaptivity of this model with model.set_confidence(...) and model.set_execution(...))")
    if head not in HEAD_KINDS:
        raise ValueError(f"head must be one of {HEAD_KINDS}, got {head!r}")
    if width is not None and (not isinstance(width, int) or width <= 0):
        raise ValueError(f"width must be a positive int, got {width!r}")
    if confidence is not None and not isinstance(confidence, Confidence):
        raise TypeError(f"confidence must be an anytimeify.Confidence, got {type(confidence).__name__}")
    if confidence is not None:
        confidence = copy.copy(confidence)  # set_execution / set_confidence change this model's only
    base = model if inplace else copy.deepcopy(model)
    probe = _probe_shape(base, input_size)
    if align_corners is None:
        align_corners = bool(getattr(base, "align_corners", False))
    width = width or _default_width(base)

    graphs = _mode_graphs(base, leaf_modules, autowrap_functions, probe)
    root, tensors = _module_tree(base)  # the converted model's module tree: the base model's + exits
    _keep_traced_constants(base, root, tensors, graphs)
    programs: Dict[bool, Program] = {}
    info: List[dict] = []
    divisor = 1
    replaced: Dict[str, nn.Module] = {}
    for training, gm in graphs.items():
        _propagate_shapes(base, gm, probe)
        _, final = _output_node(gm)
        out_shape = final.meta["tensor_meta"].shape
        if task == "dense" and len(out_shape) != 4:
            hint = " (a classifier: convert(model, task='classification'))" if len(out_shape) == 2 else ""
            raise TypeError(f"the model's output must be (B, classes, h, w) logits, got shape "
                            f"{tuple(out_shape)}{hint}")
        if task == "classification" and len(out_shape) != 2:
            raise TypeError(f"a classifier's output must be (B, classes) logits, got shape {tuple(out_shape)}")
        boundaries = resolve_exits(base, gm, exits, tokens=task == "classification")
        if not boundaries and exits == "stages" and not training:
            segmenter = type(base).__name__ == "TimmSegmenter"
            hint = (" (a stage's map computed before the later stages: a TimmSegmenter's head reads only "
                    "the levels in its out_indices, so for a backbone that makes maps only of its last "
                    "blocks, such as CrossViT, build it with out_indices naming earlier ones)") if segmenter else ""
            warnings.warn(f"found no stage boundary before the output of {type(base).__name__}: the anytime model "
                          f"has no early exit. Name the exits: convert(model, exits=[...]) with feature maps "
                          f"from anytimeify.inspect(model, nodes=True){hint}", UserWarning, stacklevel=2)
        if not hasattr(root, "exits"):
            if task == "classification":
                exit_modules, info = _make_classifier_exits(boundaries, out_shape[1],
                                                            sorted(gm.meta.get("channels_last", ())))
            else:
                native = native_size(base)
                exit_modules, info = _make_exits(boundaries, out_shape[1], head, width, tuple(out_shape[-2:]),
                                                 align_corners, [native] if native else [])
            param = next((p for p in base.parameters() if p.is_floating_point()), None)
            if param is not None:  # the exits live where the base model does, in its dtype
                exit_modules.to(device=param.device, dtype=param.dtype)
            root.add_module("exits", exit_modules)
            # a classifier's exits pool globally: only the base model limits its input sizes
            divisor = (_input_divisor(base, gm, boundaries, [e["depth"] for e in info]) if task == "dense"
                       else max(1, int(getattr(base, "input_divisor", 1) or 1)))
        graph = gm.graph
        graph.owning_module = root  # from here on the graph calls into the converted module tree
        exit_nodes = _insert_exit_nodes(graph, boundaries)
        if confidence is None:
            results, mask_nodes = exit_nodes + [final], []
        else:
            results, mask_nodes = apply_confidence(root, graph, exit_nodes, final, confidence, replaced)
        programs[training] = _build_program(root, graph, results, mask_nodes)
    programs.setdefault(True, programs[False])

    modules = dict(root.named_children())
    converted = AnytimeModel(programs, modules, input_divisor=divisor, in_channels=probe[1],
                             exit_info=info + [{"name": "output", "channels": [], "stride": None, "depth": 0}],
                             base_class=type(base).__name__, confidence=confidence, tensors=tensors)
    # what anytimeify.save records to build this model again
    converted.source = describe_source(model)
    converted.conversion = {"method": "convert", "exits": exits if isinstance(exits, str) else list(exits),
                            "head": head, "width": width, "task": task, "input_size": list(probe),
                            "align_corners": align_corners, **_named_hooks(leaf_modules, autowrap_functions)}
    converted.train(base.training)
    return converted


def _named_hooks(leaf_modules, autowrap_functions) -> Dict[str, list]:
    """Leaf modules and autowrap functions by name (None where one has no importable name)."""
    from .saving import _qualified

    return {"leaf_modules": [m if isinstance(m, str) else _qualified(m) for m in leaf_modules],
            "autowrap_functions": [_qualified(f) for f in autowrap_functions]}


def from_exits(model: nn.Module, *, input_size: Optional[Sequence[int]] = None,
               leaf_modules: Sequence[LeafSpec] = (), autowrap_functions: Sequence[Callable] = (),
               inplace: bool = False) -> AnytimeModel:
    """Make an anytime model of a network that already has its exits (RANet, MSDNet, your own).

    The network's forward must return one tensor of logits per exit, as a tuple or list in exit
    order, and compute them in that order. Its traced graph is split after each exit's logits,
    so ``anytime()`` computes nothing that only later exits need once the consumer stops, MACs
    are counted per exit, and ``predict()`` lets each sample leave at its first confident exit.

    Args:
        model: the multi-exit network.
        input_size: ``(H, W)`` or ``(B, C, H, W)`` of a probe input the model accepts (default: the
            model's ``input_size`` attribute, else 256x256).
        leaf_modules: module classes or qualified names not to trace through, as for :func:`convert`.
        autowrap_functions: free functions to keep as single graph nodes, as for :func:`convert`.
        inplace: reuse ``model``'s modules instead of a deep copy.

    Returns:
        An :class:`AnytimeModel` with one exit per output of the network.

    Raises:
        TypeError: ``model`` is not a module, is already an anytime model, or returns a single
            tensor instead of one per exit.
        ValueError: the exits are not computed in the order they are returned.

    The result accepts inputs of the model's ``input_size`` only when the model declares one (a
    network whose classifiers are built for one size), else sizes divisible by its
    ``input_divisor`` attribute (default 1).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_exits() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, AnytimeModel):
        raise TypeError(f"the model is already an anytime model ({model.base_class} with {model.num_exits} exits); "
                        "from_exits() takes the multi-exit network itself")
    base = model if inplace else copy.deepcopy(model)
    fixed = None
    if getattr(base, "input_size", None) is not None:
        declared = base.input_size
        fixed = (declared, declared) if isinstance(declared, int) else tuple(declared)
        input_size = input_size or fixed
    probe = _probe_shape(base, input_size)
    graphs = _mode_graphs(base, leaf_modules, autowrap_functions, probe)
    root, tensors = _module_tree(base)
    programs: Dict[bool, Program] = {}
    count = 0
    for training, gm in graphs.items():
        _propagate_shapes(base, gm, probe)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0]
        if not isinstance(value, (tuple, list)) or len(value) < 2 or not all(isinstance(v, fx.Node) for v in value):
            raise TypeError(f"from_exits() needs a model whose forward returns a tuple or list of exit logits (two or "
                            f"more); {type(base).__name__} returns {type(value).__name__}. For a network with one "
                            "output, anytimeify.convert attaches exits")
        results = list(value)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        if [order[n] for n in results] != sorted(order[n] for n in results) or len(set(results)) != len(results):
            raise ValueError(f"{type(base).__name__} returns its exits out of the order it computes them; return them "
                             "in the order they are computed, so that exit k needs nothing computed after it")
        count = len(results)
        gm.graph.owning_module = root
        programs[training] = _build_program(root, gm.graph, results, [])
    programs.setdefault(True, programs[False])
    divisor = getattr(base, "input_divisor", 1)
    converted = AnytimeModel(programs, dict(root.named_children()), input_divisor=int(divisor) if divisor else 1,
                             in_channels=probe[1],
                             exit_info=[{"name": f"exit{k + 1}", "channels": [], "stride": None, "depth": 0}
                                        for k in range(count)],
                             base_class=type(base).__name__, tensors=tensors)
    converted.fixed_input_size = fixed
    converted.source = describe_source(model)
    converted.conversion = {"method": "from_exits", "input_size": list(probe),
                            **_named_hooks(leaf_modules, autowrap_functions)}
    converted.train(base.training)
    return converted


@dataclass
class Candidate:
    """A place where an exit can go, as :func:`inspect` reports it.

    Attributes:
        name: the boundary's name, as :func:`convert`'s ``exits`` takes it (a module's qualified
            name or a graph node's name).
        kind: ``"module"`` or ``"node"``.
        shapes: the shape of each tensor the boundary carries (several for multi-branch stages).
        channels: the channels of each of those tensors.
        stride: the input size over the boundary's resolution.
        picked: whether ``exits="stages"`` puts an exit here.
    """

    name: str
    kind: str  # "module" or "node"
    shapes: List[Tuple[int, ...]]
    channels: List[int]
    stride: float
    picked: bool

    def __str__(self) -> str:
        mark = "*" if self.picked else " "
        shapes = ", ".join("x".join(map(str, s[1:])) for s in self.shapes)
        return f"{mark} {self.name:<40} {self.kind:<6} stride {self.stride:g}  [{shapes}]"


def _map_like(b: Boundary, probe: Sequence[int]) -> bool:
    """Whether a boundary's first tensor covers the image as a feature map does (its positions times
    its stride squared about the input's area), not an attention map ``(B, heads, N, N)``."""
    h, w = b.shapes[0][-2:]
    area = h * w * b.stride * b.stride
    return 0.5 * probe[-2] * probe[-1] <= area <= 2.0 * probe[-2] * probe[-1]


def inspect(model: nn.Module, input_size: Optional[Sequence[int]] = None, *, nodes: bool = False,
            leaf_modules: Sequence[LeafSpec] = (), autowrap_functions: Sequence[Callable] = ()) -> List[Candidate]:
    """List the stage boundaries of ``model`` in the names :func:`convert` accepts.

    Args:
        model: the base model.
        input_size: probe input size, as for :func:`convert`.
        nodes: also list every graph node whose tensor is a feature map of the image (4-D, its
            positions times its stride squared about the input's area; long for big models).
        leaf_modules: module classes or qualified names not to trace through.
        autowrap_functions: free functions to keep as single graph nodes.

    Returns:
        Candidates in execution order (a module after its children, whose outputs it ends with);
        ``picked`` marks what ``exits="stages"`` chooses.
    """
    probe = _probe_shape(model, input_size)
    gm = _traced(model, leaf_modules, autowrap_functions, model.training, probe)
    _propagate_shapes(model, gm, probe)
    try:
        _, picked = stage_adapter_for(model, gm)
    except ValueError:
        picked = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # execution order; modules that end at the same node (a stage and its last block) innermost first,
    # since the outer one's output is complete only when its last child's is
    boundaries = [b for b in candidate_boundaries(gm, include=picked) if b.name in picked or _map_like(b, probe)]
    # the adapters may pick graph nodes (a transformer's tokens reshaped to a map): listed as nodes
    modules = {name for name, _ in gm.named_modules()}
    picked_nodes = [node_boundary(gm, name) for name in picked if name not in modules]
    boundaries += [b for b in picked_nodes if b is not None]
    boundaries.sort(key=lambda b: (order[b.last], -b.name.count(".")))
    found = [Candidate(b.name, "module" if b.name in modules else "node", b.shapes, b.channels, b.stride,
                       b.name in picked) for b in boundaries]
    if nodes:
        listed = {c.name for c in found}
        for node in gm.graph.nodes:
            b = node_boundary(gm, node.name) if node.op not in ("placeholder", "output") else None
            # feature maps only: not the (B, heads, N, d) tensors inside attention, which are 4-D too
            if b is not None and b.name not in listed and (b.name in picked or _map_like(b, probe)):
                found.append(Candidate(b.name, "node", b.shapes, b.channels, b.stride, b.name in picked))
    return found
