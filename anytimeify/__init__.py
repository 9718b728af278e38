"""anytimeify: turn a dense-prediction network into an anytime model (ADP-C).

    model = anytimeify.convert(net, exits="stages", head="redesigned")
    for out in model.anytime(image):
        ...

The public names are imported on first use (PEP 562), so ``import anytimeify`` and the command
line's ``--help`` do not import torch.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module (relative to this package) that defines it, imported on first use
_EXPORTS = {
    "register_stage_adapter": "._fx.stages",  # imports the built-in adapters first: they are tried after a user's
    "TraceError": "._fx.trace",
    "register_autowrap_function": "._fx.trace",
    "register_leaf_module": "._fx.trace",
    "Candidate": ".convert",
    "convert": ".convert",
    "from_exits": ".convert",
    "inspect": ".convert",
    "Confidence": ".masking",
    "MaskedConv2d": ".masking",
    "ExitFlops": ".flops",
    "FlopReport": ".flops",
    "flops": ".flops",
    "AnytimeModel": ".model",
    "ExitOutput": ".model",
    "Prediction": ".model",
    "BudgetResult": ".budget",
    "Calibration": ".budget",
    "calibrate": ".budget",
    "evaluate_budgets": ".budget",
    "load": ".saving",
    "save": ".saving",
    "AnytimeExport": ".exporting",
    "export": ".exporting",
    "load_export": ".exporting",
}

#: subpackages imported on first use (``anytimeify.train`` pulls in torchmetrics and the data pipeline)
_LAZY = ("train", "data", "metrics", "models", "visualize")

__all__ = [
    "convert", "from_exits", "inspect", "save", "load", "export", "load_export", "AnytimeExport", "calibrate",
    "evaluate_budgets", "Calibration", "BudgetResult", "Prediction", "Confidence", "MaskedConv2d", "flops",
    "AnytimeModel", "ExitOutput", "Candidate", "FlopReport", "ExitFlops",
    "register_leaf_module", "register_autowrap_function", "register_stage_adapter", "TraceError",
    "train", "data", "metrics", "models", "visualize",
]

if TYPE_CHECKING:  # what the names are, for type checkers and the API docs (which read this file)
    from ._fx.stages import register_stage_adapter
    from ._fx.trace import TraceError, register_autowrap_function, register_leaf_module
    from .budget import BudgetResult, Calibration, calibrate, evaluate_budgets
    from .convert import Candidate, convert, from_exits, inspect
    from .exporting import AnytimeExport, export, load_export
    from .flops import ExitFlops, FlopReport, flops
    from .masking import Confidence, MaskedConv2d
    from .model import AnytimeModel, ExitOutput, Prediction
    from .saving import load, save


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'anytimeify' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: ``anytimeify.convert`` and ``anytimeify.flops`` stay the functions.

    Importing a submodule binds it as an attribute of its package; the submodules ``convert`` and
    ``flops`` share their names with the functions they define, so once one of them is imported
    (``from anytimeify.convert import inspect``) the package keeps the function under that name.
    """

    def __setattr__(self, name: str, value) -> None:
        if (isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"
                and _EXPORTS.get(name) == f".{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
