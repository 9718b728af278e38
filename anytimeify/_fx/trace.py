"""torch.fx tracing with a leaf registry, and errors that say where tracing failed and what to do."""
from __future__ import annotations

import logging
import traceback
import types
from typing import Any, Callable, Dict, Optional, Sequence, Set, Type, Union

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


class AnytimeTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn built-ins, registered classes and user-named modules.

    Args:
        leaf_modules: module classes or qualified module names to keep as leaves.
        autowrap_functions: free functions to keep as single nodes.
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = (), autowrap_functions: Sequence[Callable] = ()):
        fns = tuple(_AUTOWRAP_FUNCTIONS) + tuple(autowrap_functions)
        super().__init__(autowrap_functions=fns)
        self._leaf_types = tuple(_LEAF_MODULES) + tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaves_used: dict = {}
        self.failed_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            self.leaves_used[module_qualified_name] = m
            return True
        # anytimeify's own modules (exits, masked convs) are always leaves
        if type(m).__module__.startswith("anytimeify.") and not type(m).__module__.startswith("anytimeify.models"):
            return True
        return super().is_leaf_module(m, module_qualified_name)

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
            code_globals[name] = self._as_node(fn)
        try:
            return super().trace(root, concrete_args)
        finally:
            code_globals.update(originals)

    def _as_node(self, fn: Callable) -> Callable:
        """``fn`` recorded as one call_function node when an argument is a proxy, else called."""
        def call(*args, **kwargs):
            proxies = []
            fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
            if proxies:
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return call


def _user_frame(tb) -> str:
    frames = traceback.extract_tb(tb)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/anytimeify/_fx/" not in frame.filename:
            return f'{frame.filename}:{frame.lineno}: {(frame.line or "").strip()}'
    return "unknown location"


def trace(model: nn.Module, leaf_modules: Sequence[LeafSpec] = (),
          autowrap_functions: Sequence[Callable] = (), concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose modules keep the model's qualified names.

    Raises:
        TraceError: naming the module being traced and the source line that failed, with the remedy.
    """
    for name in (m for m in leaf_modules if isinstance(m, str)):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"leaf_modules names {name!r}, which is not a submodule of "
                             f"{type(model).__name__}") from None
    tracer = AnytimeTracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:  # torch.fx raises TraceError, TypeError, RuntimeError, ... here
        where = tracer.failed_module or ""
        failure = f"{_user_frame(err.__traceback__)}: {type(err).__name__}: {err}"
        if not where:  # the root's own forward: it is what gets exits, so it cannot be a leaf
            name = type(model).__name__
            raise TraceError(
                f"torch.fx could not trace the forward of the model itself ({name}) at {failure}\n"
                f"Remedy: leaf_modules and @anytimeify.register_leaf_module cannot help here: they keep "
                f"submodules opaque, and {name}'s own forward must be traced to place exits in it. Make its "
                f"control flow static (decided by constructor arguments or input shapes, not by tensor "
                f"values), or wrap the traceable part (the network from image to logits) in a module of "
                f"its own, convert that, and keep the data-dependent logic outside the converted model; a "
                f"free function that fails can be kept as one call with autowrap_functions=[fn]."
            ) from err
        kind = type(model.get_submodule(where)).__name__
        raise TraceError(
            f"torch.fx could not trace module {where!r} ({kind}) at {failure}\n"
            f"Remedy: keep that module opaque with convert(..., leaf_modules=[{where!r}]) "
            f"or decorate its class with @anytimeify.register_leaf_module; wrap a free function "
            f"with autowrap_functions=[fn]."
        ) from err
    graph._tracer_cls = ReplayTracer  # what unpickling re-traces the converted graph with
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["leaves_used"] = dict(tracer.leaves_used)
    return gm
