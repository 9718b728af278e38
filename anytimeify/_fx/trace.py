"""torch.fx tracing with a leaf registry, and errors that say where tracing failed and what to do."""
from __future__ import annotations

import bisect
import dis
import functools
import inspect
import logging
import sys
import traceback
import types
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.fx as fx
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["register_leaf_module", "register_autowrap_function", "AnytimeTracer", "ReplayTracer", "trace",
           "TraceError"]

_LEAF_MODULES: Set[Type[nn.Module]] = set()
_AUTOWRAP_FUNCTIONS: Set[Callable] = set()


def register_leaf_module(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Class decorator: modules of this type are not traced through but called as one graph node.

    Use it for modules whose ``forward`` has data-dependent control flow. Convolutions inside a
    leaf are not masked by confidence adaptivity (a warning says so at conversion).

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _LEAF_MODULES.add(cls)
    return cls


def register_autowrap_function(fn: Callable) -> Callable:
    """Decorator: calls to this free function become one graph node instead of being traced into.

    Raises:
        TypeError: ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"register_autowrap_function expects a function, got {fn!r}")
    _AUTOWRAP_FUNCTIONS.add(fn)
    return fn


class TraceError(RuntimeError):
    """The model could not be traced by torch.fx (a RuntimeError).

    The message names the module and the source line where tracing stopped, and the remedy: for a
    submodule, keep it opaque (:func:`register_leaf_module` or ``leaf_modules=``) or keep a free
    function a single node (:func:`register_autowrap_function` or ``autowrap_functions=``); for
    the model's own forward, which must be traced to place exits in it, what to change there.
    """


LeafSpec = Union[str, Type[nn.Module]]


class _RankProxy(fx.Proxy):
    """A proxy that answers its tensor's rank (``x.ndim``, ``x.dim()``) where the tracer can work
    it out, so that code branching on the rank (``if x.ndim == 4``: an input check, a layout
    switch) traces: the input's rank is fixed, so the branch taken is the one every call takes.
    Elsewhere the rank stays symbolic, as torch.fx makes it."""

    @property
    def ndim(self):
        rank = self.tracer.rank_of(self.node)
        return rank if rank is not None else fx.proxy.Attribute(self, "ndim")

    def dim(self):
        rank = self.tracer.rank_of(self.node)
        return rank if rank is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def __iter__(self):
        """A traced shape (``for d in x.shape[2:]``, ``h, w = x.shape[-2:]``) has as many entries
        as the tensor has dimensions, which the rank tells: its entries, each still traced."""
        length = self.tracer.length_of(self.node)
        if length is None:
            length = _unpacked_count(inspect.currentframe().f_back)  # torch.fx's own rule: ``a, b = proxy``
        if length is None:
            return self.tracer.iter(self)  # torch.fx's error
        return iter([self[i] for i in range(length)])

    def __len__(self):
        length = self.tracer.length_of(self.node)
        if length is None:
            raise RuntimeError("'len' is not supported in symbolic tracing by default; a traced shape's "
                               "length is known where the input's shape is")
        return length

    def __bool__(self):
        """A condition computed from the input's size alone (``if padding.any():`` of a mask built
        with ``torch.ones(x.shape[0], ...)``) takes the branch the probe input takes, and the graph
        checks at run time that the condition comes out the same; anything else is torch.fx's
        error (control flow on traced values)."""
        value = self.tracer.size_determined_value(self.node) if self.tracer.by_size else None
        if value is None:
            return super().__bool__()
        return self._specialised(bool(value), "the branch")

    def item(self):
        """A one-element tensor computed from the input's size alone (``int(coords.max().item())``
        of a grid made with ``torch.arange``) is the probe's number, checked at run time as above;
        anything else stays a traced ``item()`` call."""
        value = self.tracer.size_determined_value(self.node) if self.tracer.by_size else None
        if value is None:
            return self.tracer.create_proxy("call_method", "item", (self,), {})
        return self._specialised(value.item() if isinstance(value, torch.Tensor) else value, "the number")

    def _specialised(self, value, what: str):
        """``value``, with a check in the graph that this proxy comes out ``value`` at run time."""
        where = _user_frame_here()
        matches = self.tracer.create_proxy("call_function", _comes_out, (self, value), {})
        self.tracer.create_proxy("call_function", torch._assert, (matches, (
            f"the converted model took {what} at {where} that the input it was converted at gave "
            f"({value!r}), a value decided by the input's size; this input's size gives another: convert "
            f"the model at this size (input_size=...)")), {})
        return value


def _unpacked_count(frame) -> Optional[int]:
    """How many values the instruction running in ``frame`` unpacks (``a, b = ...``), else None:
    as ``torch.fx.Proxy.__iter__`` reads its caller."""
    if frame is None:
        return None
    instructions = list(dis.get_instructions(frame.f_code))
    if sys.version_info >= (3, 11):
        index = bisect.bisect_left(instructions, frame.f_lasti, key=lambda i: i.offset)
    else:
        index = frame.f_lasti // 2
    if index < len(instructions) and instructions[index].opname == "UNPACK_SEQUENCE":
        return int(instructions[index].argval)
    return None


def _comes_out(value: Any, expected: Any) -> bool:
    """Whether ``value`` (a Python number or bool, or a one-element tensor) comes out ``expected``."""
    if isinstance(expected, bool):
        return bool(value) == expected
    return (value.item() if isinstance(value, torch.Tensor) else value) == expected


def _user_frame_here() -> str:
    """``file:line: code`` of the innermost frame of the model's code (not torch's, not ours)."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and "/anytimeify/_fx/" not in frame.filename:
            return f'{frame.filename}:{frame.lineno}: {(frame.line or "").strip()}'
    return "unknown location"


#: tensor factories whose sizes a model may take from its input's shape (``torch.ones(x.shape[0], n)``):
#: torch.fx cannot record them with proxy arguments, so tracing records them as calls
_FACTORIES = ("ones", "zeros", "empty", "full", "arange", "eye", "linspace")

#: reading these of a tensor reads its size, not its values
_SIZE_READS = {"shape", "size", "dim", "ndim", "device", "dtype"}

#: a value the tracer cannot work out
_UNKNOWN = object()


def _reads_size(n: fx.Node) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``, ... of a traced tensor ``x``."""
    if n.op == "call_function":
        return (getattr(n.target, "__name__", "") == "getattr" and len(n.args) > 1
                and isinstance(n.args[0], fx.Node) and n.args[1] in _SIZE_READS)
    return n.op == "call_method" and n.target in _SIZE_READS and bool(n.args) and isinstance(n.args[0], fx.Node)


def _plain_function(fn: Callable) -> bool:
    """A function of torch or of Python's operators, which calls no module (a call of a module
    while tracing would be recorded in the graph)."""
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator", "math", "builtins")


class AnytimeTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn built-ins, registered classes and user-named modules.

    Args:
        leaf_modules: module classes or qualified module names to keep as leaves.
        autowrap_functions: free functions to keep as single nodes.
        input_shape: the shape of a probe input, where known: a proxy's rank (``x.ndim``,
            ``x.dim()``) is then worked out from it (the graph so far run on the meta device), so
            branches on the rank trace.
        by_size: with ``input_shape``, also record tensor factories whose sizes are traced
            (``torch.ones(x.shape[0], n)``) as calls, and take a condition or number that the
            input's size alone decides as the probe gives it, with a check in the graph that
            refuses an input whose size gives another (:func:`trace` asks for it only where
            tracing fails without).
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = (), autowrap_functions: Sequence[Callable] = (),
                 input_shape: Optional[Sequence[int]] = None, by_size: bool = False):
        fns = tuple(_AUTOWRAP_FUNCTIONS) + tuple(autowrap_functions)
        super().__init__(autowrap_functions=fns)
        self._autowrap_functions = fns
        self._leaf_types = tuple(_LEAF_MODULES) + tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaves_used: dict = {}
        self.failed_module: Optional[str] = None
        self._input_shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
        self._meta_values: Dict[fx.Node, Any] = {}
        self._concrete_values: Dict[fx.Node, Any] = {}
        #: record tensor factories with traced sizes as calls, and take conditions and numbers
        #: decided by the input's size as at the probe, with a check in the graph
        self.by_size = by_size and self._input_shape is not None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _RankProxy(node, self)

    def rank_of(self, node: fx.Node) -> Optional[int]:
        """The rank of ``node``'s tensor, from the graph traced so far run on meta tensors (the
        probe input's shape, the parameters' shapes); None where that cannot tell."""
        if self._input_shape is None:
            return None
        value = self._value(node, self._meta_values, "meta")
        return value.dim() if isinstance(value, torch.Tensor) else None

    def length_of(self, node: fx.Node) -> Optional[int]:
        """The number of entries of a traced shape (``x.shape[2:]``), from the meta run; None for
        anything else."""
        if self._input_shape is None:
            return None
        value = self._value(node, self._meta_values, "meta")
        return len(value) if isinstance(value, (torch.Size, tuple)) else None

    def size_determined_value(self, node: fx.Node) -> Any:
        """``node``'s value where it depends on the input through its size only (shapes, sizes,
        tensors made from them; no parameter, buffer or input value), computed for the probe's
        size; None elsewhere."""
        if self._input_shape is None:
            return None
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if _reads_size(n):
                continue  # the size of whatever tensor: known from the meta run
            if n.op in ("placeholder", "get_attr", "call_module"):
                return None  # the input's values, a parameter's, a module's output
            stack.extend(n.all_input_nodes)
        value = self._value(node, self._concrete_values, "cpu")
        if isinstance(value, torch.Tensor):
            return value if value.numel() == 1 else None
        return value if isinstance(value, (bool, int, float)) else None

    def _value(self, node: fx.Node, values: Dict[fx.Node, Any], device: str) -> Any:
        """``node``'s value for an input of the probe's shape, on ``device`` (``"meta"``: no data;
        ``"cpu"``: for values that depend on the input's size only, whose size reads come from
        the meta run); None where it cannot be known so."""
        if node not in values:
            placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
            for n in node.graph.nodes:
                if n not in values:
                    try:
                        values[n] = self._evaluate(n, values, device, n is placeholders[0])
                    except Exception:  # an operation that cannot run so: nothing that reads it is known
                        values[n] = _UNKNOWN
                if n is node:
                    break
        value = values.get(node, _UNKNOWN)
        return None if value is _UNKNOWN else value

    def _evaluate(self, n: fx.Node, values: Dict[fx.Node, Any], device: str, is_input: bool) -> Any:
        import torch.nn.utils.stateless as stateless

        if device != "meta" and _reads_size(n):  # the size of any tensor, from the meta run
            tensor = self._value(n.args[0], self._meta_values, "meta")
            if not isinstance(tensor, torch.Tensor):
                return _UNKNOWN
            if n.op == "call_function":
                return torch.device(device) if n.args[1] == "device" else getattr(tensor, n.args[1])
            rest = fx.node.map_arg(n.args[1:], values.__getitem__)
            return getattr(tensor, n.target)(*rest)
        if any(values.get(i, _UNKNOWN) is _UNKNOWN for i in n.all_input_nodes):
            return _UNKNOWN
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
        leaked = []  # a proxy among the values would record the evaluation in the graph
        fx.node.map_aggregate((args, kwargs), lambda a: leaked.append(a) if isinstance(a, fx.Proxy) else None)
        if leaked:
            return _UNKNOWN
        if n.op == "placeholder":
            return torch.zeros(self._input_shape, device=device) if is_input and device == "meta" else _UNKNOWN
        if n.op == "get_attr" and device == "meta":  # (not getattr: tracing has patched it to give proxies)
            prefix, _, name = str(n.target).rpartition(".")
            owner = self.root.get_submodule(prefix)
            attr = owner._parameters.get(name, owner._buffers.get(name, vars(owner).get(name)))
            return torch.empty_like(attr, device="meta") if isinstance(attr, torch.Tensor) else _UNKNOWN
        if n.op == "call_function" and _plain_function(n.target):
            return n.target(*args, **kwargs)
        if n.op == "call_method" and isinstance(args[0], torch.Tensor):
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module" and device == "meta" \
                and next(self.root.get_submodule(str(n.target)).children(), None) is None:
            # a module without children only: while tracing, a submodule's call would be recorded
            module = self.root.get_submodule(str(n.target))
            tensors = dict(module.named_parameters(remove_duplicate=False))
            tensors.update(module.named_buffers(remove_duplicate=False))
            meta = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
            with torch.no_grad(), stateless._reparametrize_module(module, meta):
                return module.forward(*args, **kwargs)  # (tracing has patched Module.__call__)
        return _UNKNOWN

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            self.leaves_used[module_qualified_name] = m
            return True
        # anytimeify's own modules (exits, masked convs) are always leaves
        if type(m).__module__.startswith("anytimeify.") and not type(m).__module__.startswith("anytimeify.models"):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        """torch.fx's trace, with the autowrap functions kept single calls wherever the model's code
        calls them: torch.fx patches them only in the modules whose ``forward`` it calls, so a
        method called directly (``self.model.forward_intermediates(x)``) would trace into them."""
        wanted = {id(fn): fn for fn in self._autowrap_functions}
        patched = [(vars(torch), name, getattr(torch, name)) for name in (_FACTORIES if self.by_size else ())]
        for space, name, value in patched:
            space[name] = _as_node(self, value)
        if wanted and isinstance(root, nn.Module):
            spaces = {id(vars(mod)): vars(mod) for mod in
                      (sys.modules.get(type(m).__module__) for m in root.modules()) if mod is not None}
            for space in spaces.values():
                for name, value in list(space.items()):
                    if id(value) in wanted:
                        patched.append((space, name, value))
                        space[name] = _as_node(self, value)
        try:
            return super().trace(root, concrete_args)
        finally:
            for space, name, value in reversed(patched):
                space[name] = value

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args, kwargs):
        path = self.path_of_module(m) if m is not self.root else ""
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module is the one to name
                self.failed_module = path
            raise


class ReplayTracer(fx.Tracer):
    """The tracer that rebuilds a converted graph from its generated code, as unpickling does.

    ``torch.load`` of a whole model does not store a GraphModule's graph: it traces the module's
    generated ``forward`` again, with the tracer class recorded on the graph (every module a
    leaf). The free functions that code calls were single nodes of the graph (confidence
    adaptivity's ``mask_for_conv``, ``plan_for_mask`` and ``copy_aggregate``, the user's
    ``autowrap_functions``, the inference rewrites' fused ops), so this tracer keeps each of them
    one node again instead of running its Python control flow on proxies, which fails. Every graph
    anytimeify builds records it (:func:`trace`, :func:`~anytimeify._fx.split.split_graph`).
    """

    def trace(self, root, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        forward = type(root).forward if isinstance(root, nn.Module) else root
        code_globals = getattr(forward, "__globals__", {})
        originals = {name: value for name, value in code_globals.items()
                     if isinstance(value, (types.FunctionType, types.BuiltinFunctionType))
                     and not getattr(value, "__module__", "").startswith("torch")}
        for name, fn in originals.items():
            code_globals[name] = _as_node(self, fn)
        try:
            return super().trace(root, concrete_args)
        finally:
            code_globals.update(originals)


def _as_node(tracer: fx.Tracer, fn: Callable) -> Callable:
    """``fn`` recorded as one call_function node of ``tracer`` when an argument is a proxy, else called."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        proxies = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if proxies:
            return tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return call


def _user_frame(tb) -> str:
    frames = traceback.extract_tb(tb)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/anytimeify/_fx/" not in frame.filename:
            return f'{frame.filename}:{frame.lineno}: {(frame.line or "").strip()}'
    return "unknown location"


def _timm_notrace() -> tuple:
    """timm's own registry of modules and functions torch.fx cannot trace (its feature extraction
    keeps them opaque): ``(module classes, functions)``, empty without timm."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    try:
        return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())
    except AttributeError:  # an older timm without the getters
        return tuple(getattr(timm_fx, "_leaf_modules", ())), tuple(getattr(timm_fx, "_autowrap_functions", ()))


#: how many failing classes one trace collects before it reports them
MAX_FAILURES = 16


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def trace(model: nn.Module, leaf_modules: Sequence[LeafSpec] = (),
          autowrap_functions: Sequence[Callable] = (), concrete_args: Optional[dict] = None,
          input_shape: Optional[Sequence[int]] = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose modules keep the model's qualified names.

    Besides anytimeify's registry and ``leaf_modules``, the free functions timm registers as
    untraceable (``timm.layers.get_notrace_functions``: padding helpers, position-embedding
    resampling, ...) are kept as single calls, and a module that fails whose class timm registers
    (``get_notrace_modules``: ``Conv2dSame``, attention with masks, ...) is kept opaque and tracing
    goes on; modules that trace (timm's norm + activation layers, which timm lists too) are traced
    through, so that their batch norms fold into the convs at ``freeze()``. With ``input_shape``
    (the probe input's), code that branches on a tensor's rank traces, and where the model does
    not trace otherwise, it is traced again taking what its input's size decides (tensor factories,
    conditions, numbers) as at the probe, checked at run time (see :class:`AnytimeTracer`).

    Raises:
        TraceError: naming every module class that fails (tracing goes on with each failing
            class as a leaf to find the next one), where, and the remedy; whether the model traces
            with all of them as leaves is checked, and said.
    """
    for name in (m for m in leaf_modules if isinstance(m, str)):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"leaf_modules names {name!r}, which is not a submodule of "
                             f"{type(model).__name__}") from None
    if concrete_args is None:
        concrete_args = _default_args(model)
    timm_modules, timm_functions = _timm_notrace()
    autowrap = tuple(timm_functions) + tuple(autowrap_functions)

    def attempt(by_size: bool) -> Tuple[AnytimeTracer, fx.Graph]:
        failures: list = []  # (qualified name, class, failure), one per failing class
        extra: list = []  # classes kept opaque to get further: timm's known ones silently, others reported
        while True:
            tracer = AnytimeTracer(tuple(leaf_modules) + tuple(extra), autowrap, input_shape, by_size)
            try:
                graph = tracer.trace(model, concrete_args=concrete_args)
            except Exception as err:  # torch.fx raises TraceError, TypeError, RuntimeError, ... here
                where = tracer.failed_module or ""
                failure = f"{_user_frame(err.__traceback__)}: {type(err).__name__}: {err}"
                if not where:  # the root's own forward: it is what gets exits, so it cannot be a leaf
                    raise _root_error(model, failure, failures) from err
                cls = type(model.get_submodule(where))
                if cls in timm_modules and cls not in extra:  # timm says it cannot be traced: opaque, silently
                    extra.append(cls)
                    continue
                failures.append((where, cls, failure))
                if cls in extra or len(failures) >= MAX_FAILURES:
                    raise _module_error(model, failures, traces=False) from err
                extra.append(cls)
                continue
            if failures:
                raise _module_error(model, failures, traces=True)
            return tracer, graph

    try:
        tracer, graph = attempt(by_size=False)
    except TraceError:
        if input_shape is None:
            raise
        # decided by the input's size: the probe's branches and numbers, checked in the graph (only
        # where tracing fails without: a model that traces keeps every input size it takes)
        tracer, graph = attempt(by_size=True)
        _logger.info("%s traced with the branches its input's size decides taken as at %s, checked at run time",
                     type(model).__name__, tuple(input_shape))
    _bind_defaults(graph, type(model).__name__)
    graph._tracer_cls = ReplayTracer  # what unpickling re-traces the converted graph with
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["leaves_used"] = dict(tracer.leaves_used)
    return gm


def _default_args(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``forward``'s parameters after the image whose defaults are plain constants (``mask=None``,
    ``return_all=False``), traced at those values: code that branches on them (``if mask is not
    None``) then takes the branch the model takes when called as ``model(x)``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    constants = {p.name: p.default for p in params[1:]
                 if p.kind in kinds and p.default is not inspect.Parameter.empty
                 and (p.default is None or isinstance(p.default, (bool, int, float, str)))}
    return constants or None


def _bind_defaults(graph: fx.Graph, name: str) -> None:
    """The image is the converted model's one input: every further parameter of ``forward`` (a
    vision transformer's ``attn_mask=None``) is bound to its default in the graph.

    Raises:
        ValueError: a further parameter without a default.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        if str(node.target).startswith("*") and not node.users:  # an unused *args / **kwargs
            graph.erase_node(node)
            continue
        if not node.args:
            raise ValueError(f"{name}.forward takes {str(node.target)!r} besides the image, without a default; "
                             f"anytimeify converts models called as model(x): wrap it in a module whose forward "
                             f"passes that argument")
        default = node.args[0]
        for user in list(node.users):
            user.args = fx.node.map_aggregate(user.args, lambda a: default if a is node else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a: default if a is node else a)
        graph.erase_node(node)


def _root_error(model: nn.Module, failure: str, failures: list) -> TraceError:
    name = type(model).__name__
    if failures:  # a submodule failed first; with it opaque, the model's own forward cannot use its output
        where, cls, first = failures[0]
        lines = [f"torch.fx could not trace module {where!r} ({cls.__name__}) at {first}"]
        lines += [f"  and {w!r} ({c.__name__}) at {f.splitlines()[0]}" for w, c, f in failures[1:]]
        lines.append(
            f"Keeping {'it' if len(failures) == 1 else 'them'} opaque does not help: {name}'s own forward then "
            f"fails at {failure.splitlines()[0]}, since it iterates or inspects what the opaque module returns.\n"
            f"Remedy: make {cls.__name__} traceable (static control flow: decided by constructor arguments or "
            f"input shapes, not by tensor values), or convert a part of the model that does not depend on it; "
            f"exits can only go where torch.fx sees the network's stages.")
        return TraceError("\n".join(lines))
    return TraceError(
        f"torch.fx could not trace the forward of the model itself ({name}) at {failure}\n"
        f"Remedy: leaf_modules and @anytimeify.register_leaf_module cannot help here: they keep "
        f"submodules opaque, and {name}'s own forward must be traced to place exits in it. Make its "
        f"control flow static (decided by constructor arguments or input shapes, not by tensor "
        f"values), or wrap the traceable part (the network from image to logits) in a module of "
        f"its own, convert that, and keep the data-dependent logic outside the converted model; a "
        f"free function that fails can be kept as one call with autowrap_functions=[fn].")


def _module_error(model: nn.Module, failures: list, traces: bool) -> TraceError:
    """The error for submodules that fail: the first one's place and reason in the first line (as
    before), every failing class after it, and the ``leaf_modules`` that make the model trace."""
    where, cls, failure = failures[0]
    lines = [f"torch.fx could not trace module {where!r} ({cls.__name__}) at {failure}"]
    if len(failures) > 1:
        lines.append(f"With {cls.__name__} kept opaque, more modules fail the same way:")
        lines += [f"  {w!r} ({c.__name__}) at {f.splitlines()[0]}" for w, c, f in failures[1:]]
    classes = list(dict.fromkeys(c for _, c, _ in failures))
    instances = {c: sum(isinstance(m, c) for m in model.modules()) for c in classes}
    by_name = [w for w, _, _ in failures]
    if all(instances[c] == 1 for c in classes):
        fix = f"convert(..., leaf_modules={by_name!r})"
    else:
        fix = f"convert(..., leaf_modules=[{', '.join(_class_name(c) for c in classes)}]) (every module of those classes)"
    checked = (f" With {'it' if len(classes) == 1 else 'all of them'} opaque the model traces." if traces else
               " Tracing stopped there; more modules may fail after them.")
    lines.append(f"Remedy: keep {'it' if len(classes) == 1 else 'them'} opaque with {fix}, or decorate "
                 f"{'its class' if len(classes) == 1 else 'their classes'} with @anytimeify.register_leaf_module; "
                 f"wrap a free function with autowrap_functions=[fn].{checked} Convolutions inside an opaque "
                 f"module are not masked by confidence adaptivity.")
    return TraceError("\n".join(lines))
