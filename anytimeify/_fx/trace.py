"""torch.fx tracing with a leaf registry, and errors that say where tracing failed and what to do."""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Optional, Sequence, Set, Type, Union

import torch.fx as fx
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["register_leaf_module", "register_autowrap_function", "AnytimeTracer", "trace", "TraceError"]

_LEAF_MODULES: Set[Type[nn.Module]] = set()
_AUTOWRAP_FUNCTIONS: Set[Callable] = set()


def register_leaf_module(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Class decorator: modules of this type are not traced through but called as one graph node.

    Use it for modules whose ``forward`` has data-dependent control flow. Convolutions inside a
    leaf are not masked by confidence adaptivity (a warning says so at conversion).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _LEAF_MODULES.add(cls)
    return cls


def register_autowrap_function(fn: Callable) -> Callable:
    """Decorator: calls to this free function become one graph node instead of being traced into."""
    if not callable(fn):
        raise TypeError(f"register_autowrap_function expects a function, got {fn!r}")
    _AUTOWRAP_FUNCTIONS.add(fn)
    return fn


class TraceError(RuntimeError):
    """The model could not be traced by torch.fx."""


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
        kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        raise TraceError(
            f"torch.fx could not trace module {where or '<root>'!r} ({kind}) at "
            f"{_user_frame(err.__traceback__)}: {type(err).__name__}: {err}\n"
            f"Remedy: keep that module opaque with convert(..., leaf_modules=[{where or kind!r}]) "
            f"or decorate its class with @anytimeify.register_leaf_module; wrap a free function "
            f"with autowrap_functions=[fn]."
        ) from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["leaves_used"] = dict(tracer.leaves_used)
    return gm
