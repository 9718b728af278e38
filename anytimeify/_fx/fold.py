"""Inference folding: batch norms merged into the convolutions before them, channels-last weights.

A BN that directly follows a conv (and is that conv's only reader) is an affine map per channel,
``s * y + b``. For a plain conv both fold into the conv's weight and bias. For a masked conv only
the scale folds into the weight: the interpolation is linear and per channel, so
``s * blend(y) = blend(s * y)``, but the shift cannot move before the blend (near a mask border the
interpolation weights do not sum to 1). It becomes the masked conv's ``shift``, added after the
blend by the engine's output pass; a ReLU that is the masked conv's only reader becomes its
``activation`` the same way, so the masked conv's output needs no further pass over memory.
"""
from __future__ import annotations

import copy
import operator
from typing import Collection, Iterable, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..exits import Exit
from ..masking.conv import EngineConv2d, MaskedConv2d
from ..masking.fuse import FUSE_SUM_MODES, fuse_sum
from ..masking.masks import mask_for_conv

__all__ = ["fold_batch_norms", "fold_sequential", "fuse_residuals", "mark_dead_residuals", "mark_reader_radii", "fuse_sums",
           "use_engine_convs"]


def _scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    return scale.detach(), shift.detach()


def _folded_masked(conv: MaskedConv2d, bn: nn.BatchNorm2d) -> Tuple[MaskedConv2d, nn.Module]:
    scale, shift = _scale_shift(bn)
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        plain.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        plain.bias.copy_(conv.bias * scale if conv.bias is not None else torch.zeros_like(scale))
    folded = MaskedConv2d.from_conv(plain, execution=conv.execution)
    with torch.no_grad():
        folded.interp_lambda.copy_(conv.interp_lambda)
    if conv.shift is not None or conv.activation is not None:
        raise ValueError("a masked conv with an epilogue (shift or activation) cannot have a BN folded into it")
    folded.strategy, folded.cost_model = conv.strategy, conv.cost_model
    folded.set_epilogue(shift=shift)
    return folded, nn.Identity()


def _fold_pair(conv: nn.Module, bn: nn.Module) -> Tuple[nn.Module, nn.Module] | None:
    """The folded replacements of a (conv, BN) pair, or None where folding does not apply."""
    if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats:
        return None
    if isinstance(conv, MaskedConv2d):
        return _folded_masked(conv, bn)
    if type(conv) is nn.Conv2d:
        return fuse_conv_bn_eval(copy.deepcopy(conv), bn), nn.Identity()
    return None


def _fusable_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU


def _fuse_relu(conv: nn.Module) -> bool:
    """Make a masked or engine conv apply the ReLU that follows it; False where it cannot."""
    if not isinstance(conv, (MaskedConv2d, EngineConv2d)) or conv.activation is not None:
        return False
    if isinstance(conv, MaskedConv2d):
        conv.set_epilogue(shift=conv.shift, activation="relu")
    else:
        conv.activation = "relu"
    return True


def _fuse_sequential_relus(seq: nn.Sequential) -> None:
    """A masked or engine conv followed in a Sequential by a ReLU (identities between) applies it."""
    for i in range(len(seq) - 1):
        j = i + 1
        while j < len(seq) - 1 and type(seq[j]) is nn.Identity:
            j += 1
        if _fusable_relu(seq[j]) and _fuse_relu(seq[i]):
            seq[j] = nn.Identity()


def fold_sequential(seq: nn.Sequential) -> int:
    """Fold (conv, BN) neighbours of a Sequential in place (exit heads), and a ReLU after a masked
    conv (with or without a BN between) into it; returns how many BNs were folded."""
    count = 0
    for i in range(len(seq) - 1):
        pair = _fold_pair(seq[i], seq[i + 1])
        if pair is not None:
            seq[i], seq[i + 1] = pair
            count += 1
    _fuse_sequential_relus(seq)
    return count


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = module.get_submodule(parent_path) if parent_path else module
    except AttributeError:
        return  # this graph module never calls that path
    if hasattr(parent, leaf):
        setattr(parent, leaf, new)


def use_engine_convs(root: nn.Module, holders: Iterable[nn.Module] = (), graph: fx.Graph | None = None) -> int:
    """Swap every plain ``nn.Conv2d`` (zero padding, symmetric) of ``root`` and ``holders`` for an
    :class:`~anytimeify.masking.conv.EngineConv2d` sharing its parameters; returns how many.

    A ReLU module that is an engine conv's only reader (through folded BNs: in ``graph``, the graph
    calling them, or next to it in a Sequential) becomes its activation, as for masked convs; the
    graph keeps its nodes (the ReLU module becomes an identity). Run it last: the other rewrites
    recognise convs by type. A conv reachable from several holders becomes one engine conv in all
    of them.
    """
    swapped = {}
    for holder in [root] + list(holders):
        for path, module in list(holder.named_modules()):
            if type(module) is not nn.Conv2d or module.padding_mode != "zeros":
                continue
            new = swapped.get(id(module))
            if new is None:
                try:
                    new = EngineConv2d.from_conv(module)
                except ValueError:  # asymmetric "same" padding: leave it to PyTorch
                    continue
                swapped[id(module)] = new
            _set(holder, path, new)
    holders = list(holders)
    for holder in [root] + holders:  # inside leaves (exit heads): Sequential neighbours
        for module in holder.modules():
            if isinstance(module, nn.Sequential):
                _fuse_sequential_relus(module)
    if graph is not None:
        _fuse_relus(root, graph, holders, _call_counts(graph))
    return len(swapped)


def fold_batch_norms(root: nn.Module, graph: fx.Graph, holders: Iterable[nn.Module]) -> List[str]:
    """Fold every conv -> BN pair of ``graph`` (eval statistics); returns the folded conv paths.

    The new modules replace the old ones under the same paths in ``root`` and in every module of
    ``holders`` (the graph modules that call them).
    """
    holders = list(holders)
    calls = _call_counts(graph)
    folded = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = root.get_submodule(str(node.target))
        if isinstance(bn, Exit):
            fold_sequential(bn)
            continue
        if type(bn) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[node.target] != 1 or calls[src.target] != 1:
            continue  # a module called in several places cannot be folded for one of them
        pair = _fold_pair(root.get_submodule(str(src.target)), bn)
        if pair is None:
            continue
        new_conv, new_bn = pair
        for holder in [root] + holders:
            _set(holder, str(src.target), new_conv)
            _set(holder, str(node.target), new_bn)
        folded.append(str(src.target))
    _fuse_relus(root, graph, holders, calls)
    return folded


def _call_counts(graph: fx.Graph) -> dict:
    """How many nodes of ``graph`` call each module path."""
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _through_identities(root: nn.Module, node: fx.Node,
                        sole_reader=_sole_user) -> Tuple[List[fx.Node], fx.Node | None]:
    """The identity-module nodes that alone carry ``node``'s value on (folded BNs), and their sole
    reader (``sole_reader`` says which node, if any, is a node's only reader)."""
    chain: List[fx.Node] = []
    user = sole_reader(node)
    while user is not None and user.op == "call_module" and type(root.get_submodule(str(user.target))) is nn.Identity:
        chain.append(user)
        user = sole_reader(user)
    return chain, user


def _fuse_relus(root: nn.Module, graph: fx.Graph, holders: List[nn.Module], calls: dict) -> None:
    """A ReLU module that is the only reader of a masked or engine conv (through folded BNs)
    becomes its activation."""
    for node in list(graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1:
            continue
        conv = root.get_submodule(str(node.target))
        if not isinstance(conv, (MaskedConv2d, EngineConv2d)):
            continue
        _, user = _through_identities(root, node)
        if user is None or user.op != "call_module" or calls.get(user.target) != 1:
            continue
        if _fusable_relu(root.get_submodule(str(user.target))) and _fuse_relu(conv):
            for holder in [root] + holders:
                _set(holder, str(user.target), nn.Identity())


_ADDS = (operator.add, operator.iadd, torch.add)


def fuse_residuals(root: nn.Module, graph: fx.Graph, barriers: Collection[str] = ()) -> int:
    """Move residual connections into the masked and engine convs that feed them; returns how many.

    Pattern (after BN folding): a masked conv or an engine conv
    (:class:`~anytimeify.masking.conv.EngineConv2d`, so after :func:`use_engine_convs`), called once, whose output (through identity
    modules only) is the sole input of an addition ``conv_out + other`` (``+``, ``+=`` or
    ``torch.add`` without ``alpha``), optionally followed by a ReLU module that is the addition's
    only reader. The conv node then takes ``other`` as its ``residual`` keyword,
    applies the ReLU as its activation, and replaces both nodes, so the sum costs no pass of its
    own. The conv node moves down to the addition (its inputs are all earlier); no node named in
    ``barriers`` (segment ends) may lie between them. The caller recompiles and re-splits the graph.
    """
    calls = _call_counts(graph)
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1 or "residual" in node.kwargs:
            continue
        conv = root.get_submodule(str(node.target))
        if not isinstance(conv, (MaskedConv2d, EngineConv2d)) or conv.activation is not None:
            continue
        chain, user = _through_identities(root, node)
        end = chain[-1] if chain else node
        if user is None or user.op != "call_function" or user.target not in _ADDS or user.kwargs or len(user.args) != 2:
            continue
        add = user
        others = [a for a in add.args if a is not end]
        if len(others) != 1 or not isinstance(others[0], fx.Node):
            continue
        other = others[0]
        between = []
        cursor = node.next
        while cursor is not add:
            between.append(cursor)
            cursor = cursor.next
        if any(n.name in barriers for n in between):
            continue
        # the conv will run later: nothing in between may read (and so possibly modify in place)
        # the tensor it reads
        if any(node.args[0] in n.all_input_nodes for n in between if n not in chain):
            continue
        # the ReLU node goes, its module stays (a stateless module others may still call)
        relu = _sole_user(add)
        if not (relu is not None and relu.op == "call_module"
                and _fusable_relu(root.get_submodule(str(relu.target)))):
            relu = None
        # the conv and its identity chain move down to the addition, where ``other`` exists
        for moved in [node] + chain:
            add.prepend(moved)
        node.kwargs = {**node.kwargs, "residual": other}
        last = add
        if relu is not None:
            _fuse_relu(conv)
            last = relu
        last.replace_all_uses_with(end)
        for dead in ([relu] if relu is not None else []) + [add]:
            graph.erase_node(dead)
        fused += 1
    graph.lint()
    return fused


def _aliases(root: nn.Module, node: fx.Node) -> Tuple[fx.Node, List[fx.Node]]:
    """The node that made ``node``'s tensor (back through identity modules, which return their
    input) and every node whose value is that same tensor (it and the identity modules reading it)."""
    def identity(n: fx.Node) -> bool:
        return n.op == "call_module" and type(root.get_submodule(str(n.target))) is nn.Identity
    source = node
    while identity(source) and len(source.args) == 1 and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    group, todo = [], [source]
    while todo:
        current = todo.pop()
        group.append(current)
        todo.extend(u for u in current.users if identity(u))
    return source, group


def mark_dead_residuals(root: nn.Module, graph: fx.Graph) -> int:
    """Let engine convs write into residuals that nothing reads after them; returns how many.

    An engine conv (:class:`~anytimeify.masking.conv.EngineConv2d`) called once with a
    ``residual`` (:func:`fuse_residuals`) gets ``residual_dead = True`` where the residual's tensor
    is the output of a masked or engine conv (a tensor of the engine's own, not a view of an input
    or of a value the caller sees), every node reading that tensor (or an identity alias of it) runs
    before this conv in the graph, and the conv's input is another tensor. The conv may then add
    its result into the residual's memory in place (oneDNN's convolution with a sum post-op), which
    saves the output allocation and one pass over memory. Run it after the rewrites that move
    nodes (:func:`fuse_residuals`, :func:`fuse_sums`): it judges the graph's final order.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    calls = _call_counts(graph)
    marked = 0
    for node in graph.nodes:
        if node.op != "call_module" or calls.get(node.target) != 1 or not isinstance(node.kwargs.get("residual"), fx.Node):
            continue
        conv = root.get_submodule(str(node.target))
        if not isinstance(conv, EngineConv2d):
            continue
        source, group = _aliases(root, node.kwargs["residual"])
        if source.op != "call_module" or not isinstance(root.get_submodule(str(source.target)), (EngineConv2d, MaskedConv2d)):
            continue
        if any(isinstance(a, fx.Node) and a in group for a in node.args):
            continue
        readers = [u for member in group for u in member.users if u is not node and u not in group]
        if any(order[u] > order[node] for u in readers):
            continue
        conv.residual_dead = True
        marked += 1
    return marked


def _sole_value_reader(node: fx.Node) -> fx.Node | None:
    """The one node that reads ``node``'s values; mask lookups, which read only its size, aside."""
    readers = [u for u in node.users if not (u.op == "call_function" and u.target is mask_for_conv)]
    return readers[0] if len(readers) == 1 else None


def _mask_source(node: fx.Node) -> fx.Node | None:
    """The mask decider node of a masked conv call ``conv(x, mask_for_conv(decider, ...), plan)``."""
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return None
    mask = node.args[1]
    if (mask.op != "call_function" or mask.target is not mask_for_conv or not mask.args
            or not isinstance(mask.args[0], fx.Node)):
        return None
    return mask.args[0]


def _same_size_radius(conv: MaskedConv2d) -> int | None:
    """How far from an output position ``conv`` reads its input, where its output has its input's
    size (stride 1, odd kernel, "same" padding); None otherwise."""
    if tuple(conv.stride) != (1, 1) or not isinstance(conv.padding, tuple):
        return None
    radii = []
    for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding):
        if k % 2 == 0 or p != d * (k - 1) // 2:
            return None
        radii.append(p)
    return max(radii)


def mark_reader_radii(root: nn.Module, graph: fx.Graph) -> int:
    """Tell masked convs whose output has a single masked reader how far that reader looks.

    Pattern: a masked conv, called once, whose output (through identity modules only) is the
    sole input ``x`` of another masked conv (besides the mask lookups that read its size), called
    once, governed by the same mask decider and of the same output size (stride 1, "same"
    padding), so by the same mask. That reader computes
    its kept positions from input rows within its kernel radius ``r`` of them (its skipped
    positions read nothing), so the first conv gets ``reader_radius = r`` and leaves the rows
    beyond unwritten. Returns how many convs were marked.
    """
    calls = _call_counts(graph)
    marked = 0
    for node in graph.nodes:
        if node.op != "call_module" or calls.get(node.target) != 1:
            continue
        conv = root.get_submodule(str(node.target))
        if not isinstance(conv, MaskedConv2d):
            continue
        chain, user = _through_identities(root, node, _sole_value_reader)
        end = chain[-1] if chain else node
        if user is None or user.op != "call_module" or calls.get(user.target) != 1:
            continue
        reader = root.get_submodule(str(user.target))
        if not isinstance(reader, MaskedConv2d) or not user.args or user.args[0] is not end:
            continue
        if any(value is end for value in list(user.args[1:]) + list(user.kwargs.values())):
            continue  # also read as the mask, plan or residual
        source = _mask_source(node)
        radius = _same_size_radius(reader)
        if source is None or source is not _mask_source(user) or radius is None:
            continue
        conv.reader_radius = radius
        marked += 1
    return marked


_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def _fusable_resize(root: nn.Module, node: fx.Node, calls: dict) -> dict | None:
    """``F.interpolate`` keywords of a nearest or bilinear ``nn.Upsample`` module node called once,
    else None."""
    if node.op != "call_module" or calls.get(node.target) != 1:
        return None
    module = root.get_submodule(str(node.target))
    if type(module) is not nn.Upsample or module.mode not in FUSE_SUM_MODES:
        return None

    def frozen(value):  # lists become tuples: the resize keys a cache
        return tuple(value) if isinstance(value, list) else value

    resize = {"size": frozen(module.size), "scale_factor": frozen(module.scale_factor), "mode": module.mode}
    if module.mode == "bilinear":
        resize["align_corners"] = bool(module.align_corners)
    if getattr(module, "recompute_scale_factor", None) is not None:
        resize["recompute_scale_factor"] = module.recompute_scale_factor
    return resize


def _is_relu(root: nn.Module, node: fx.Node) -> bool:
    """A ReLU node (module, function or method); a module may be called elsewhere too (HRNet's
    ``fuse_act``): only this node goes, the stateless module stays."""
    if node.op == "call_module":
        return _fusable_relu(root.get_submodule(str(node.target)))
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1 and not node.kwargs


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def fuse_sums(root: nn.Module, graph: fx.Graph) -> int:
    """Rewrite sums of upsampled tensors (HRNet's fuse layers) into one :func:`fuse_sum` call.

    Pattern: a left-nested chain of additions ``((t0 + t1) + t2) + ...`` (``+`` or ``torch.add``
    without ``alpha``; every inner addition read only by the next), where each term is a tensor or
    the output of an ``nn.Upsample`` module in a nearest or bilinear mode (called once, read only by the
    chain), optionally followed by a ReLU that is the last addition's only reader. A single
    addition of two tensors is rewritten only with its ReLU (two passes become one). The fused
    call replaces the last node and reads the upsamples' inputs; the upsample and addition nodes go. Returns how many
    chains were rewritten; the caller recompiles (and re-splits) the graph.
    """
    calls = _call_counts(graph)
    fused = 0
    for node in list(graph.nodes):
        if not _is_add(node):
            continue
        user = _sole_user(node)
        if user is not None and _is_add(user) and user.args[0] is node:
            continue  # not the end of its chain
        adds = [node]
        while _is_add(adds[-1].args[0]) and len(adds[-1].args[0].users) == 1:
            adds.append(adds[-1].args[0])
        adds.reverse()
        operands = [adds[0].args[0]] + [a.args[1] for a in adds]
        terms, resizes, upsamples = [], [], []
        for operand in operands:
            resize = _fusable_resize(root, operand, calls) if len(operand.users) == 1 else None
            if resize is not None and isinstance(operand.args[0], fx.Node) and not operand.kwargs:
                terms.append(operand.args[0])
                resizes.append(resize)
                upsamples.append(operand)
            else:
                terms.append(operand)
                resizes.append(None)
        last = node
        relu = _sole_user(node)
        if relu is not None and _is_relu(root, relu):
            last = relu
        else:
            relu = None
        if len(adds) < 2 and not upsamples and relu is None:
            continue  # a single addition: nothing to save
        with graph.inserting_before(last):
            call = graph.call_function(fuse_sum, (tuple(terms), tuple(resizes), "relu" if relu is not None else None))
        last.replace_all_uses_with(call)
        for dead in ([relu] if relu is not None else []) + list(reversed(adds)) + upsamples:
            graph.erase_node(dead)
        fused += 1
    graph.lint()
    return fused
