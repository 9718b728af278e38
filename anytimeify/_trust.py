"""What a file may make anytimeify import: the rule behind ``trust_code``.

A saved model (``anytimeify.json``), a checkpoint's stored config and an export folder are data:
whoever sent the folder wrote them. Reading one must not run code its author chose. So a name
of the form ``"package.module:attribute"`` read from such a file is imported only when it is

* one of anytimeify's own network factories, or timm's ``create_model``, or an architecture class
  of segmentation-models-pytorch (the factories :func:`anytimeify.save` records for the networks
  it knows), called with arguments that load nothing (no pretrained weights, no checkpoint
  paths, only model names that timm's registry knows);
* for names that the model's code already uses (leaf modules, autowrap functions): an attribute
  of anytimeify, torch, torchvision, timm or segmentation-models-pytorch of the right kind (a
  module class, a plain function);
* a confidence criterion of anytimeify's own;

or when the user opts in with ``trust_code=True`` (any name) or ``trust_code=["pkg.mod:fn", ...]``
(exactly those names), as ``trust_remote_code`` does in the Hugging Face libraries. Nothing is
ever imported from the loaded folder: an untrusted name is refused before any import.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Collection, Iterable, Mapping, Union

__all__ = ["TrustCode", "UntrustedCodeError", "normalise_trust", "is_trusted", "import_trusted", "check_factory_call"]

#: ``False`` (the default: only what anytimeify knows is safe), ``True`` (import any name the file
#: gives) or the exact ``"module:attribute"`` names the user trusts
TrustCode = Union[bool, Iterable[str]]

#: the base-network factories a saved model may name without an opt-in
SAFE_FACTORIES = frozenset({
    "anytimeify.models.hrnet:HRNetSeg",
    "anytimeify.models.hrnet:HRNetPose",
    "anytimeify.models.timm_seg:TimmSegmenter",
    "anytimeify.models.ranet:ranet_from_config",
    "timm:create_model",
})
#: packages whose classes and functions a conversion may name (leaf modules, autowrap functions)
SAFE_PACKAGES = ("anytimeify", "torch", "torchvision", "timm", "segmentation_models_pytorch")
#: keyword arguments of timm and smp constructors that read files or the network
_LOADING_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "pretrained_strict")
_HOW = ("pass trust_code=[{name!r}] (anytimeify export/visualize: --trust-code {name}) if you trust the folder's "
        "author and the code it names")


class UntrustedCodeError(ValueError):
    """A file names code to import or call that anytimeify does not build without an opt-in."""


def normalise_trust(trust_code: TrustCode) -> Union[bool, frozenset]:
    """``True``, or the frozenset of trusted names (empty for ``False``)."""
    if trust_code is True:
        return True
    if trust_code is False or trust_code is None:
        return frozenset()
    if isinstance(trust_code, str):
        return frozenset({trust_code})
    try:
        names = frozenset(trust_code)
    except TypeError:
        raise TypeError(f"trust_code must be True, False or a list of 'module:attribute' names, got "
                        f"{trust_code!r}") from None
    bad = [n for n in names if not isinstance(n, str) or ":" not in n]
    if bad:
        raise ValueError(f"trust_code names must be 'package.module:attribute', got {bad[0]!r}")
    return names


def is_trusted(name: str, trust: Union[bool, Collection[str]]) -> bool:
    return trust is True or name in trust  # type: ignore[operator]


def _package(name: str) -> str:
    return name.partition(":")[0].split(".")[0]


def _smp_architectures() -> frozenset:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return frozenset()
    found = set()
    for attr in dir(smp):
        obj = getattr(smp, attr)
        if inspect.isclass(obj) and issubclass(obj, getattr(smp.base, "SegmentationModel", ())):
            found.add(f"segmentation_models_pytorch:{attr}")
    return frozenset(found)


def _import(name: str, what: str) -> Any:
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise UntrustedCodeError(f"{what} {name!r} must be 'package.module:attribute'")
    try:
        found = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as err:
        raise UntrustedCodeError(f"cannot import {what} {name!r}: {err}") from None
    return found


def import_trusted(name: str, what: str, trust: Union[bool, Collection[str]], *, kind: str,
                   where: str = "the file") -> Any:
    """Import ``name`` (``"module:attribute"``) read from a file, if the rule allows it.

    Args:
        kind: ``"factory"`` (a base-network factory), ``"class"`` (an ``nn.Module`` class, e.g.
            a leaf module), ``"function"`` (an autowrap function) or ``"criterion"`` (a
            confidence criterion).
        where: the file, for the message.
    """
    if not isinstance(name, str):
        raise UntrustedCodeError(f"{where}: {what} must be a 'module:attribute' string, got {name!r}")
    if is_trusted(name, trust):
        return _import(name, what)
    allowed = False
    if kind == "factory":
        allowed = name in SAFE_FACTORIES or name in _smp_architectures()
    elif kind in ("class", "function"):
        allowed = _package(name) in SAFE_PACKAGES
    elif kind == "criterion":
        allowed = _package(name) == "anytimeify"
    if not allowed:
        raise UntrustedCodeError(f"{where} names {what} {name!r}, which anytimeify does not import from a file "
                                 f"unless told to: {_HOW.format(name=name)}")
    found = _import(name, what)
    import torch.nn as nn

    if kind == "class" and not (inspect.isclass(found) and issubclass(found, nn.Module)):
        raise UntrustedCodeError(f"{where}: {what} {name!r} is not an nn.Module class")
    if kind in ("function", "criterion") and not inspect.isfunction(found):
        raise UntrustedCodeError(f"{where}: {what} {name!r} is not a plain Python function")
    return found


def _check_timm_name(model_name: Any, where: str, what: str) -> None:
    import timm

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise UntrustedCodeError(f"{where}: {what} {model_name!r} is not a model name in timm's registry (names "
                                 "with a source prefix such as 'hf-hub:' or 'local-dir:' load files and are not "
                                 f"built from a file without an opt-in: {_HOW.format(name='timm:create_model')})")


def _check_no_loading(kwargs: Mapping[str, Any], where: str, factory: str) -> None:
    for key in _LOADING_KWARGS:
        if key in kwargs:
            raise UntrustedCodeError(f"{where}: argument {key!r} of {factory} reads files or the network; "
                                     f"{_HOW.format(name=factory)}")
    if kwargs.get("pretrained") not in (None, False):
        raise UntrustedCodeError(f"{where}: {factory} with pretrained={kwargs['pretrained']!r} loads weights "
                                 "from elsewhere; the saved weights are in the folder (set it to false)")


def check_factory_call(factory: str, args: Any, kwargs: Any, trust: Union[bool, Collection[str]],
                       where: str) -> None:
    """Refuse arguments of a safe factory that would load files or fetch models (trusted names pass)."""
    if not isinstance(args, list):
        raise UntrustedCodeError(f"{where}: source.args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise UntrustedCodeError(f"{where}: source.kwargs must be an object, got {type(kwargs).__name__}")
    if is_trusted(factory, trust):
        return
    _check_no_loading(kwargs, where, factory)
    if factory == "timm:create_model":
        _check_timm_name(args[0] if args else kwargs.get("model_name"), where, "timm model")
    elif factory == "anytimeify.models.timm_seg:TimmSegmenter":
        _check_timm_name(args[0] if args else kwargs.get("backbone"), where, "timm backbone")
    elif factory.startswith("segmentation_models_pytorch:"):
        if kwargs.get("encoder_weights") is not None:
            raise UntrustedCodeError(f"{where}: {factory} with encoder_weights={kwargs['encoder_weights']!r} "
                                     "downloads weights; the saved weights are in the folder (set it to null)")
        encoder = kwargs.get("encoder_name", "resnet34")
        if isinstance(encoder, str) and encoder.startswith("tu-"):
            _check_timm_name(encoder[3:], where, "timm encoder")
        else:
            import segmentation_models_pytorch as smp

            if encoder not in smp.encoders.get_encoder_names():
                raise UntrustedCodeError(f"{where}: {factory} names encoder {encoder!r}, which "
                                         "segmentation-models-pytorch does not know")
