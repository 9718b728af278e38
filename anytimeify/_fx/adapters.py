"""Built-in stage adapters (HRNet, timm, segmentation-models-pytorch) and their tracing fixes.

``exits="stages"`` asks the first adapter that recognises a model where its stages end. The
order they are tried in, first to last:

1. **HRNet** (anywhere in the model: :class:`anytimeify.models.HRNetSeg`, a timm HRNet backbone):
   after ``layer1``, ``stage2`` and ``stage3``. timm's ``feature_info`` names for HRNet are
   placeholders (``incre.0``, ``stage1``, ...), hence this rule of its own.
2. **segmentation-models-pytorch**: the encoder's stage outputs, i.e. the tensors its
   ``forward`` returns, matched to the modules (or graph nodes) that make them.
3. **timm**: the first module carrying a ``feature_info`` (a timm classifier or a
   ``features_only`` backbone inside the model); each reduction level's module is resolved to
   the model's real module names (``features_only`` wrappers rename ``stages.0`` to ``stages_0``).
4. **timm, by value**: where no ``feature_info`` level names a module (MViTv2, Twins), the maps
   the timm model's ``forward_intermediates`` returns, found in the traced graph by value.
5. **tokens**: a transformer's ``blocks`` at a quarter, a half and three quarters of its depth.

Every adapter keeps the levels at stride 4 or more and leaves out the deepest one, whose output
feeds the model's own head (the last exit): a four-stage trunk gets three early exits, as HRNet.

:func:`trace_for_conversion` is the tracing step of :func:`anytimeify.convert` and
:func:`anytimeify.inspect`: it switches off smp's input-shape check while tracing (the converted
model checks input sizes itself), keeps an smp decoder that torch.fx cannot trace as one leaf
module (with a warning), and warns when a leaf hides convolutions that confidence adaptivity
therefore cannot mask.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .boundary import Boundary, _per_image, hoist, module_boundary, node_boundary
from .registry import register_stage_adapter
from .trace import LeafSpec, TraceError, register_leaf_module, trace

_logger = logging.getLogger(__name__)

__all__ = ["trace_for_conversion", "timm_feature_modules", "timm_feature_levels", "select_stage_levels",
           "MIN_STAGE_STRIDE", "MAX_EARLY_EXITS"]

#: Levels finer than this (the stride-2 stem) are not stages worth an exit.
MIN_STAGE_STRIDE = 4


#: most early exits ``exits="stages"`` places (the paper's networks have three); a network with
#: more stage levels (a transformer's blocks, ConvMixer's 32 equal blocks) gets them at a quarter,
#: a half and three quarters of its levels
MAX_EARLY_EXITS = 3


def select_stage_levels(boundaries: Sequence[Boundary]) -> List[str]:
    """Names of the boundaries that get an exit: stride >= 4, deepest level left out, one per node,
    at most :data:`MAX_EARLY_EXITS` (evenly spread over the levels where there are more).

    Args:
        boundaries: one boundary per reduction level, in execution order.
    """
    kept: List[Boundary] = []
    for b in boundaries:
        if b.stride < MIN_STAGE_STRIDE - 1e-6:
            continue
        if kept and kept[-1].last is b.last:
            continue  # two levels that end at the same tensor are one stage
        kept.append(b)
    if len(kept) - 1 > MAX_EARLY_EXITS:
        n = len(kept)
        picks = sorted({n * k // (MAX_EARLY_EXITS + 1) - 1 for k in range(1, MAX_EARLY_EXITS + 1)})
        return [kept[i].name for i in picks]
    return [b.name for b in kept[:-1]]


# -- HRNet -----------------------------------------------------------------------------------------

_HRNET_CHILDREN = ("layer1", "transition1", "stage2", "transition2", "stage3", "transition3", "stage4")


def _hrnet_stages(model: nn.Module, gm: fx.GraphModule) -> Optional[List[str]]:
    """HRNet: after ``layer1``, ``stage2`` and ``stage3`` of the first module that has HRNet's stages."""
    for path, module in model.named_modules():
        children = dict(module.named_children())
        if all(name in children for name in _HRNET_CHILDREN):
            prefix = f"{path}." if path else ""
            return [prefix + name for name in ("layer1", "stage2", "stage3")]
    return None


# -- timm ------------------------------------------------------------------------------------------


def _feature_levels(module: nn.Module) -> Optional[List[Tuple[str, int, int]]]:
    """``(module name, reduction, channels)`` per level of a timm ``feature_info``, or None if it has none."""
    info = getattr(module, "feature_info", None)
    if info is None:
        return None
    try:
        if hasattr(info, "module_name") and hasattr(info, "reduction"):  # timm.models.FeatureInfo
            return list(zip(info.module_name(), info.reduction(), info.channels()))
        if isinstance(info, (list, tuple)) and all(isinstance(d, dict) for d in info):
            return [(d["module"], int(d["reduction"]), int(d.get("num_chs", 0))) for d in info]
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _name_variants(name: str) -> Iterator[str]:
    """``stages.0.blocks`` as a timm ``features_only`` wrapper may have renamed it: ``stages_0.blocks``, ..."""
    parts = name.split(".")
    for joined in range(1, len(parts) + 1):
        yield "_".join(parts[:joined]) + ("." + ".".join(parts[joined:]) if joined < len(parts) else "")


def timm_feature_levels(model: nn.Module) -> Optional[List[Tuple[str, int, int]]]:
    """``(qualified module name, reduction, channels)`` of each ``feature_info`` level of the first
    timm model in ``model`` whose levels resolve to modules of ``model`` (at least two and half of
    them; the others are left out, and a module listed twice counts once).

    A ``features_only`` wrapper's levels are the selected ones; their names resolve under the
    wrapper itself (``FeatureListNet`` renames ``stages.0`` to ``stages_0``) or under the model it
    wraps (``FeatureGetterNet.model``, a transformer's ``blocks.3``; ``FeatureGraphNet.graph_module``).
    """
    names = {name for name, _ in model.named_modules()}
    for path, module in model.named_modules():
        levels = _feature_levels(module)
        if not levels:
            continue
        prefixes = [f"{path}." if path else ""]
        for inner in ("model", "graph_module"):  # FeatureGetterNet.model, FeatureGraphNet.graph_module
            if isinstance(getattr(module, inner, None), nn.Module):
                prefixes.append(f"{path}.{inner}." if path else f"{inner}.")
        resolved, seen = [], set()
        for name, reduction, channels in levels:
            real = next((p + v for p in prefixes for v in _name_variants(name) if p + v in names), None)
            if real is None:
                _logger.debug("feature_info level %r of %s resolves to no module", name, path or "<root>")
                continue
            if real not in seen:  # a level listed once per branch (CrossViT) is one stage
                seen.add(real)
                resolved.append((real, reduction, channels))
        # a level that names no module (a placeholder such as MobileNetV5's 'bn1') is left out, as
        # long as most levels are real modules
        if resolved and len(resolved) >= max(2, (len(levels) + 1) // 2):
            return resolved
    return None


def timm_feature_modules(model: nn.Module) -> Optional[List[Tuple[str, int]]]:
    """The real module name and reduction of each ``feature_info`` level of the first timm model in ``model``.

    Returns:
        ``(qualified module name, reduction)`` per level, or None when no module of ``model``
        carries a ``feature_info`` whose levels resolve (see :func:`timm_feature_levels`).
    """
    levels = timm_feature_levels(model)
    return None if levels is None else [(name, reduction) for name, reduction, _ in levels]


def _level_maps(gm: fx.GraphModule, outputs: List[Optional[fx.Node]],
                levels: Sequence[Tuple[str, int, int]]) -> List[Optional[fx.Node]]:
    """Per level, the first ``(B, channels, H/reduction, W/reduction)`` map computed from that
    level's output and from no later level's (a transformer's tokens reshaped to a map, an NHWC
    stage output permuted), or None; one pass over the graph."""
    level_of: Dict[fx.Node, int] = {}
    mark = {node: i for i, node in enumerate(outputs) if node is not None}
    in_h, in_w = gm.meta["input_shape"][-2:]
    found: List[Optional[fx.Node]] = [None] * len(levels)
    for node in gm.graph.nodes:
        level = max((level_of.get(a, -1) for a in node.all_input_nodes), default=-1)
        level_of[node] = mark.get(node, level)
        if level < 0 or node in mark or found[level] is not None:
            continue
        _, reduction, channels = levels[level]
        if _is_map(node, channels):
            h, w = node.meta["tensor_meta"].shape[-2:]
            area = in_h * in_w / float(reduction * reduction)
            if 0.5 * area <= h * w <= 2.0 * area:
                found[level] = node
    return found


def _is_map(node: fx.Node, channels: int) -> bool:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return shape is not None and len(shape) == 4 and shape[1] == channels


def _timm_stages(model: nn.Module, gm: fx.GraphModule) -> Optional[List[str]]:
    """timm: the module of each ``feature_info`` reduction level, as a boundary of the traced graph.

    Where a level's module does not output a ``(B, C, H, W)`` map (a transformer's blocks output
    tokens, Swin's and MambaOut's stages NHWC maps), the boundary is the map the model makes of
    it (``forward_intermediates``' reshaped tokens, a permute), moved up in the graph to right
    after the level (:func:`~anytimeify._fx.boundary.hoist`), so that its exit runs before the
    later blocks.
    """
    levels = timm_feature_levels(model)
    if levels is None:
        return None
    plain = [module_boundary(gm, name) for name, _, _ in levels]
    if all(b is not None and b.shapes[0][1] == ch for b, (_, _, ch) in zip(plain, levels) if ch):
        boundaries = [b for b in plain if b is not None]
        return select_stage_levels(boundaries) if boundaries else None
    tokens = [module_boundary(gm, name, ranks=(3, 4)) for name, _, _ in levels]  # what each level outputs
    outputs = [b.last if b is not None else None for b in tokens]
    maps = _level_maps(gm, outputs, levels)
    boundaries = []
    for i, ((name, _, channels), b) in enumerate(zip(levels, plain)):
        if b is not None and b.shapes[0][1] == channels:
            boundaries.append(b)
            continue
        if outputs[i] is None:
            continue
        node, b = maps[i], tokens[i]
        if node is None and gm.meta.get("accept_tokens"):  # a classifier pools tokens and NHWC maps as they are
            if len(b.shapes[0]) == 4 and b.shapes[0][-1] == channels != b.shapes[0][1]:
                gm.meta.setdefault("channels_last", set()).add(name)
            if len(b.shapes[0]) == 3 or name in gm.meta.get("channels_last", ()):
                boundaries.append(b)
            continue
        if node is None:
            _logger.debug("no (B, %d, H, W) map is made of level %s", channels, name)
            continue
        try:
            hoist(gm.graph, node, outputs[i])
        except ValueError as err:
            _logger.debug("level %s: %s", name, err)
            continue
        boundaries.append(node_boundary(gm, node.name))
    if not boundaries:
        return None
    gm.recompile()
    return select_stage_levels(boundaries)


def _token_stages(model: nn.Module, gm: fx.GraphModule) -> Optional[List[str]]:
    """Vision transformers (timm's ``blocks`` of equal width, tokens in and out): exits after the
    blocks at a quarter, a half and three quarters of the depth (their outputs are token sequences,
    which only classification exits take)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) < 4:
        return None
    if module_boundary(gm, "blocks.0") is not None:  # 4-D outputs: a convolutional network's blocks
        return None
    if module_boundary(gm, f"blocks.{len(blocks) - 1}", ranks=(3,)) is None:
        return None
    depth = len(blocks)
    return [f"blocks.{i}" for i in sorted({depth * k // 4 - 1 for k in (1, 2, 3)})]


def _intermediates_owner(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """The first timm model in ``model`` with a ``forward_intermediates`` (and a ``feature_info``)."""
    for path, module in model.named_modules():
        if callable(getattr(module, "forward_intermediates", None)) and hasattr(module, "feature_info"):
            return path, module
    return None


def _intermediate_stages(model: nn.Module, gm: fx.GraphModule) -> Optional[List[str]]:
    """timm models whose ``feature_info`` names no module of theirs (MViTv2's and Twins' levels are
    ``block.0``, ...): the stage maps their ``forward_intermediates`` returns, found in the traced
    graph by value.

    One probe batch runs the model eagerly (recording the timm model's input), then
    ``forward_intermediates`` on that input, then the graph; a level's boundary is the first node
    whose value equals the level's ``(B, C, H, W)`` map (a ``features_only`` backbone returns these
    very maps), or, for a classifier (whose exits take tokens), the ``(B, H*W, C)`` tokens the map
    was made of. Levels that no node equals are left out.
    """
    found = _intermediates_owner(model)
    if found is None:
        return None
    path, owner = found
    x = _probe_images(model, gm)
    seen: List[object] = []  # the timm model's input: its forward's, or forward_intermediates' (features_only)
    method = owner.forward_intermediates

    def recording(inputs, *args, **kwargs):
        seen.append(inputs)
        return method(inputs, *args, **kwargs)

    handle = owner.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if args else None)
    owner.forward_intermediates = recording  # an instance attribute over the method, removed below
    try:
        # eval mode: dropout and drop-path draw nothing, so the runs below compute the same values
        with _probe_run(model, False):
            model(x)
            if not seen or not isinstance(seen[0], torch.Tensor):
                return None
            features = method(seen[0], intermediates_only=True)
    except Exception as err:  # a model forward_intermediates does not serve: not this adapter's
        _logger.debug("forward_intermediates of %s failed: %s", path or "<root>", err)
        return None
    finally:
        handle.remove()
        del owner.forward_intermediates
    levels = [f for f in features if isinstance(f, torch.Tensor) and f.dim() == 4] \
        if isinstance(features, (list, tuple)) else []
    if not levels:
        return None
    forms = [[f] + ([f.flatten(2).transpose(1, 2)] if gm.meta.get("accept_tokens") else []) for f in levels]
    boundaries = []
    for nodes in _nodes_by_value(gm, x, forms, training=False, keep=lambda n: n.op != "placeholder"):
        b = node_boundary(gm, nodes[0].name, ranks=(3, 4)) if nodes else None  # the first node of that value
        if b is not None and _per_image(gm, nodes[0]) and (not boundaries or b.nodes[0] is not boundaries[-1].nodes[0]):
            boundaries.append(b)
    return select_stage_levels(boundaries) if len(boundaries) > 1 else None


# -- segmentation-models-pytorch -------------------------------------------------------------------


def _smp_base():
    try:
        from segmentation_models_pytorch.base import SegmentationModel
    except ImportError:
        return None
    return SegmentationModel


def _is_smp(model: nn.Module) -> bool:
    base = _smp_base()
    return base is not None and isinstance(model, base) and hasattr(model, "encoder")


@contextlib.contextmanager
def _probe_run(module: nn.Module, training: bool) -> Iterator[None]:
    """Run ``module`` in mode ``training`` without a trace: buffers (BN statistics), mode and the
    random generator's state are as before afterwards, and dropout draws the same masks each time."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    was = module.training
    module.train(training)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    finally:
        module.train(was)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])


def _probe_images(model: nn.Module, gm: fx.GraphModule) -> torch.Tensor:
    """A batch of two random probe images of ``gm``'s input size, on ``model``'s device and dtype
    (train-mode batch norm needs more than one value per channel)."""
    param = next(model.parameters(), None)
    x = torch.randn((2,) + tuple(gm.meta["input_shape"])[1:], generator=torch.Generator().manual_seed(0))
    return x if param is None else x.to(device=param.device, dtype=param.dtype)


def _nodes_by_value(gm: fx.GraphModule, x: torch.Tensor, forms: List[List[torch.Tensor]], training: bool,
                    keep: Callable[[fx.Node], bool]) -> List[List[fx.Node]]:
    """Per entry of ``forms``, the nodes (in graph order, among those ``keep`` accepts) whose value
    on ``x`` equals one of its tensors: one run of ``gm`` in mode ``training``."""
    matches: List[List[fx.Node]] = [[] for _ in forms]

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and keep(n):
                for i, candidates in enumerate(forms):
                    if any(result.shape == c.shape and torch.equal(result, c) for c in candidates):
                        matches[i].append(n)
            return result

    with _probe_run(gm, training):
        Recorder(gm).run(x)
    return matches


def _encoder_features(model: nn.Module, gm: fx.GraphModule) -> Tuple[torch.Tensor, List[torch.Tensor], Dict[int, str]]:
    """Run the smp encoder eagerly; return its input, its feature list, and which module made each tensor.

    The encoder runs in the mode ``gm`` was traced in, on a batch of two probe images (train-mode
    batch norm needs more than one value per channel). The map goes from ``id(tensor)`` to the
    outermost encoder module, called exactly once, that returned that very tensor object.
    """
    encoder = model.encoder
    made_by: Dict[int, str] = {}
    calls: Dict[str, int] = {}
    keep: List[torch.Tensor] = []  # keep outputs alive so that ids stay unique

    def hook(name: str) -> Callable:
        def record(module, args, output) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                keep.append(output)
                known = made_by.get(id(output))
                if known is None or known.count(".") > name.count("."):
                    made_by[id(output)] = name
        return record

    handles = [m.register_forward_hook(hook(f"encoder.{name}"))
               for name, m in encoder.named_modules() if name]
    x = _probe_images(model, gm)
    try:
        with _probe_run(model, gm.training):
            features = list(encoder(x))
    finally:
        for h in handles:
            h.remove()
    once = {key: name for key, name in made_by.items() if calls.get(name) == 1}
    return x, features, once


def _makers_by_value(gm: fx.GraphModule, x: torch.Tensor, features: List[torch.Tensor]) -> List[Optional[str]]:
    """Per feature, the boundary name of an ``encoder`` node whose value equals it (one graph run).

    Used where no module returns the feature tensor itself (``norm(x).contiguous()``): a module
    whose only output node carries the same values is preferred, else the last such node.
    """
    matches = _nodes_by_value(gm, x, [[f] for f in features], training=gm.training,
                              keep=lambda n: "encoder" in (n.meta.get("nn_module_stack") or {}))
    names: List[Optional[str]] = []
    for nodes in matches:
        name = nodes[-1].name if nodes else None
        for n in nodes:
            b = module_boundary(gm, str(n.target)) if n.op == "call_module" else None
            if b is not None and b.nodes == [n]:
                name = str(n.target)
                break
        names.append(name)
    return names


def _smp_stages(model: nn.Module, gm: fx.GraphModule) -> Optional[List[str]]:
    """smp: the encoder's stage outputs, named by the module that returns each (else by graph node)."""
    if not _is_smp(model):
        return None
    x, features, made_by = _encoder_features(model, gm)
    # features[0] is the input image; a level without channels is smp's placeholder (Mix Transformer, stride 2)
    levels = [f for f in features[1:] if isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[1] > 0]
    found: List[Optional[Boundary]] = []
    for feature in levels:
        name = made_by.get(id(feature))
        b = module_boundary(gm, name) if name is not None else None
        if b is not None and (len(b.nodes) != 1 or tuple(b.shapes[0][1:]) != tuple(feature.shape[1:])):
            b = None
        found.append(b)
    missing = [i for i, b in enumerate(found) if b is None]
    if missing:
        modules = {name for name, _ in gm.named_modules()}
        for i, name in zip(missing, _makers_by_value(gm, x, [levels[i] for i in missing])):
            if name is None:
                _logger.debug("no graph node of %s makes its encoder feature of shape %s",
                              type(model).__name__, tuple(levels[i].shape))
                continue
            found[i] = module_boundary(gm, name) if name in modules else node_boundary(gm, name)
    boundaries = [b for b in found if b is not None]
    return select_stage_levels(boundaries) if boundaries else None


# registered last = tried first: HRNet, smp, timm, timm by value, tokens
register_stage_adapter("tokens")(_token_stages)  # tried last: timm's finds no 4-D stage outputs in a transformer
register_stage_adapter("timm_intermediates")(_intermediate_stages)  # timm's feature_info names no module
register_stage_adapter("timm")(_timm_stages)
register_stage_adapter("smp")(_smp_stages)
register_stage_adapter("hrnet")(_hrnet_stages)


def _register_smp_leaves() -> None:
    """Mix Transformer's LayerNorm (it branches on ``x.ndim``, which traces, but as a leaf its
    module is the stage boundary, ``encoder.norm1``, ...); it holds no convolution, so a leaf costs nothing."""
    try:
        from segmentation_models_pytorch.encoders.mix_transformer import LayerNorm
    except ImportError:
        return
    register_leaf_module(LayerNorm)


_register_smp_leaves()


def _register_timm_leaves() -> None:
    """Modules of timm that torch.fx cannot trace and timm's own registry does not list: Hiera's
    ``Reroll`` (``len(x.shape)``), Gemma 4's rotary embedding (a buffer's ``expand`` to the batch
    size). They hold no convolution, so a leaf costs nothing."""
    import importlib

    for module, name in (("timm.models.hiera", "Reroll"), ("timm.models.gemma4_vit", "Gemma4RotaryEmbedding2D")):
        try:
            register_leaf_module(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a timm without that model
            continue


_register_timm_leaves()


# -- tracing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _smp_shape_check_off(model: nn.Module) -> Iterator[None]:
    """smp models check ``H % output_stride`` in Python, which fx cannot trace; the converted model
    checks input sizes itself (``AnytimeModel.check_input``), so the check is off while tracing."""
    if not _is_smp(model) or "requires_divisible_input_shape" in vars(model):
        yield
        return
    model.requires_divisible_input_shape = False
    try:
        yield
    finally:
        del model.requires_divisible_input_shape


@contextlib.contextmanager
def _buffers_restored(model: nn.Module, buffers: Dict[str, torch.Tensor]) -> Iterator[None]:
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _hidden_convs(leaves: Dict[str, nn.Module]) -> Dict[str, int]:
    counts = {}
    for name, module in leaves.items():
        n = sum(isinstance(m, nn.Conv2d) for m in module.modules())
        if n:
            counts[name or type(module).__name__] = n
    return counts


def trace_for_conversion(model: nn.Module, leaf_modules: Sequence[LeafSpec] = (),
                         autowrap_functions: Sequence[Callable] = (),
                         input_shape: Optional[Sequence[int]] = None) -> fx.GraphModule:
    """Trace ``model`` as :func:`anytimeify.convert` needs it, with the model families' tracing fixes.

    An smp model is traced whole where it can be; where its decoder cannot be traced, the
    encoder is traced and the decoder kept as one leaf module, with a warning saying so. Any
    leaf that contains ``nn.Conv2d`` modules triggers a warning that those convolutions run
    unmasked under confidence adaptivity. ``input_shape``: the probe input's shape (code that
    branches on a tensor's rank then traces).

    Raises:
        TraceError: the model (or, for smp, its encoder) cannot be traced; the message names the
            module and source line and suggests ``leaf_modules``.
    """
    # tracing runs Python code on real buffers: timm's BatchNormAct2d bumps num_batches_tracked
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with _smp_shape_check_off(model), _buffers_restored(model, buffers):
        try:
            gm = trace(model, leaf_modules, autowrap_functions, input_shape=input_shape)
        except TraceError as err:
            failed = re.match(r"torch.fx could not trace module '([^']*)'", str(err))
            in_decoder = failed is not None and (failed.group(1) + ".").startswith("decoder.")
            if not _is_smp(model) or not in_decoder or "decoder" in leaf_modules:
                raise
            warnings.warn(
                f"the decoder of {type(model).__name__} cannot be traced by torch.fx "
                f"({str(err).splitlines()[0]}); it is kept as one leaf module named 'decoder': exits "
                f"go in the encoder and the decoder runs as one call",
                UserWarning, stacklevel=4)
            gm = trace(model, list(leaf_modules) + ["decoder"], autowrap_functions, input_shape=input_shape)
    hidden = _hidden_convs(gm.meta.get("leaves_used", {}))
    if hidden:
        listed = ", ".join(f"{name!r} ({n} Conv2d)" for name, n in hidden.items())
        warnings.warn(
            f"leaf modules of {type(model).__name__} hide convolutions: {listed}. They run as "
            f"opaque calls, so confidence adaptivity will not mask them; make them traceable "
            f"to have them masked.",
            UserWarning, stacklevel=4)
    return gm
