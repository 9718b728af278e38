"""anytimeify: turn a dense-prediction network into an anytime model (ADP-C).

    model = anytimeify.convert(net, exits="stages", head="redesigned")
    for out in model.anytime(image):
        ...
"""
from ._fx.stages import register_stage_adapter
from ._fx.trace import TraceError, register_autowrap_function, register_leaf_module
from .convert import Candidate, convert, from_exits, inspect
from .masking import Confidence, MaskedConv2d
from .flops import ExitFlops, FlopReport, flops
from .model import AnytimeModel, ExitOutput, Prediction
from .budget import BudgetResult, Calibration, calibrate, evaluate_budgets
from .saving import load, save
from .exporting import AnytimeExport, export, load_export

__version__ = "0.1.0"

#: subpackages imported on first use (``anytimeify.train`` pulls in torchmetrics and the data pipeline)
_LAZY = ("train", "data", "metrics", "models", "visualize")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'anytimeify' has no attribute {name!r}")

__all__ = [
    "convert", "from_exits", "inspect", "save", "load", "export", "load_export", "AnytimeExport", "calibrate", "evaluate_budgets", "Calibration", "BudgetResult", "Prediction", "Confidence", "MaskedConv2d", "flops", "AnytimeModel", "ExitOutput", "Candidate", "FlopReport", "ExitFlops",
    "register_leaf_module", "register_autowrap_function", "register_stage_adapter", "TraceError",
    "train", "data", "metrics", "models", "visualize",
]
