"""Saving and loading anytime models without pickles: safetensors weights and a JSON recipe.

``anytimeify.save(model, "dir")`` writes two files:

* ``model.safetensors``: the model's tensors (of the unfrozen model, for a frozen one);
* ``anytimeify.json``: how to rebuild it: the base network's factory (``"module:callable"``,
  positional and keyword arguments), the conversion's arguments (exits, head, width, task,
  confidence settings) or ``from_exits``, whether it was frozen, its latency profiles, and the
  SHA-256 of the weights file.

``anytimeify.load("dir")`` imports the factory, builds the base network, converts it with the
same arguments, loads the tensors (``safetensors``: no code runs while reading them), checks that
they fit exactly, and freezes the result if the saved model was frozen. The round trip is exact.

The base network's factory is known for anytimeify's own networks (they record it when built),
timm models (``timm.create_model`` with their architecture and ``num_classes``) and
segmentation-models-pytorch models (their recorded constructor arguments); for any other network
pass ``source=`` to :func:`save`. :func:`save` rebuilds the base network once to check that the
recipe gives the same tensor names and shapes, so a saved directory always loads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = ["save", "load", "describe_source", "SaveError", "RECIPE_FILE", "WEIGHTS_FILE", "FORMAT"]

RECIPE_FILE = "anytimeify.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1

PathLike = Union[str, os.PathLike]


class SaveError(ValueError):
    """A model that cannot be saved as a recipe (the message says what to pass), or a saved
    directory that cannot be loaded (the message names the file)."""


def _qualified(obj: Any) -> Optional[str]:
    """``"module:qualname"`` of an importable class or function, else None."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{name}" if found is obj else None


def _import(path: str, what: str) -> Any:
    from .train.builders import import_object
    from .train.config import ConfigError

    try:
        return import_object(path, what)
    except ConfigError as err:
        raise SaveError(str(err)) from err


def describe_source(model: nn.Module) -> Optional[Dict[str, Any]]:
    """How to build ``model`` again: ``{"factory": "module:callable", "args": [...], "kwargs": {...}}``,
    or None when it is not known (anytimeify's networks, timm and segmentation-models-pytorch
    models are known)."""
    recorded = getattr(model, "_anytimeify_source", None)
    if recorded is not None:
        return dict(recorded)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture") and type(model).__module__.startswith("timm."):
        kwargs: Dict[str, Any] = {"pretrained": False, "num_classes": int(getattr(model, "num_classes", 1000))}
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size is not None and tuple(size) != tuple(cfg.get("input_size", (3, 0, 0))[1:]):
            kwargs["img_size"] = list(size)
        return {"factory": "timm:create_model", "args": [cfg["architecture"]], "kwargs": kwargs}
    config = getattr(model, "_hub_mixin_config", None)
    if isinstance(config, Mapping) and type(model).__module__.startswith("segmentation_models_pytorch"):
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        kwargs["encoder_weights"] = None  # the weights come from the saved file
        return {"factory": f"segmentation_models_pytorch:{type(model).__name__}", "args": [], "kwargs": kwargs}
    return None


def _build_source(source: Mapping[str, Any]) -> nn.Module:
    factory = _import(str(source.get("factory", "")), "model factory")
    net = factory(*source.get("args", []), **source.get("kwargs", {}))
    if not isinstance(net, nn.Module):
        raise SaveError(f"model factory {source.get('factory')!r} returned {type(net).__name__}, not an nn.Module")
    return net


def _rebuild(recipe: Mapping[str, Any]):
    from .convert import convert, from_exits
    from .masking.criteria import Confidence

    net = _build_source(recipe["source"])
    conversion = dict(recipe["conversion"])
    method = conversion.pop("method", "convert")
    if method == "native":  # the factory returns the anytime model itself (anytimeify's RANets)
        return net
    leaves = [_import(v, "leaf module") if ":" in v else v for v in conversion.pop("leaf_modules", [])]
    wrapped = [_import(v, "autowrap function") for v in conversion.pop("autowrap_functions", [])]
    if method == "from_exits":
        return from_exits(net, input_size=conversion.get("input_size"), leaf_modules=leaves,
                          autowrap_functions=wrapped, inplace=True)
    confidence = conversion.pop("confidence", None)
    if confidence is not None:
        confidence = dict(confidence)
        if isinstance(confidence.get("criterion"), str) and ":" in confidence["criterion"]:
            confidence["criterion"] = _import(confidence["criterion"], "confidence criterion")
        confidence = Confidence(**confidence)
    return convert(net, confidence=confidence, leaf_modules=leaves, autowrap_functions=wrapped, inplace=True,
                   **conversion)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _confidence_dict(confidence) -> Optional[Dict[str, Any]]:
    if confidence is None:
        return None
    fields = {f.name: getattr(confidence, f.name) for f in dataclasses.fields(confidence) if f.init}
    if callable(fields.get("criterion")):
        name = _qualified(fields["criterion"])
        if name is None:
            raise SaveError("the model's confidence criterion is a callable that cannot be imported by name (a lambda "
                            "or a local function); define it at module level to save the model")
        fields["criterion"] = name
    if isinstance(fields.get("fraction"), tuple):
        fields["fraction"] = list(fields["fraction"])
    return fields


def _recipe(model, source: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    conversion = dict(getattr(model, "conversion", None) or {})
    if not conversion:
        raise SaveError("this AnytimeModel does not record how it was made; save the weights with "
                        "anytimeify.train.save_weights instead")
    if conversion.get("method", "convert") == "convert":
        conversion["confidence"] = _confidence_dict(model.confidence)
    if None in conversion.get("leaf_modules", []) + conversion.get("autowrap_functions", []):
        raise SaveError("a leaf module or autowrap function of the conversion cannot be imported by name (a local "
                        "class or function); define it at module level, or pass leaf modules by qualified name")
    source = dict(source) if source is not None else getattr(model, "source", None)
    if source is None:
        raise SaveError(f"anytimeify does not know how to build the base network ({model.base_class}) again; pass "
                        "source={'factory': 'package.module:callable', 'args': [...], 'kwargs': {...}} (a function "
                        "or class that returns the base network with random weights)")
    return {"format": FORMAT, "source": source, "conversion": conversion, "frozen": bool(model.frozen),
            "latency_profile": model.latency_profile}


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Write a folder whole or not at all: yields an empty staging folder beside ``target``; when
    the block ends without an error it replaces ``target`` (an existing one is moved aside first
    and removed only once the new one is in place), else it is removed and ``target`` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save(model, directory: PathLike, *, source: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Path:
    """Save an anytime model as ``directory/model.safetensors`` and ``directory/anytimeify.json``.

    Args:
        model (AnytimeModel): an :class:`~anytimeify.AnytimeModel` made by :func:`~anytimeify.convert` or
            :func:`~anytimeify.from_exits` (frozen or not).
        directory: created; written completely in a temporary folder first, then renamed.
        source: how to build the base network, ``{"factory": "module:callable", "args": [...],
            "kwargs": {...}}``, when anytimeify cannot tell (see :func:`describe_source`).
        overwrite: replace an existing ``directory``.

    Returns:
        The directory written.

    Raises:
        SaveError: the base network's factory is unknown or does not rebuild the same tensors, or
            the confidence criterion is an unnamed callable; the message says what to pass.
        FileExistsError: ``directory`` exists and ``overwrite`` is False.
    """
    from .model import AnytimeModel
    from .train.checkpointing import check_state_dict

    if not isinstance(model, AnytimeModel):
        raise TypeError(f"save() takes an anytimeify.AnytimeModel, got {type(model).__name__}; convert it first")
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} exists; pass overwrite=True (--overwrite) to replace it")
    recipe = _recipe(model, source)
    if model.frozen and getattr(model, "_unfrozen_state", None) is None:
        raise SaveError("this frozen model no longer holds the weights it was frozen from (it was pickled and "
                        "loaded); save the model it was frozen from, or a model loaded with anytimeify.load")
    state = model._unfrozen_state if model.frozen else model.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    try:
        rebuilt = _rebuild(recipe)  # what load() will build: it must take these tensors exactly
        check_state_dict(rebuilt, state, f"the model saved to {str(target)!r}")
    except (ValueError, TypeError) as err:
        raise SaveError(f"the recipe {recipe['source']} does not rebuild this model: {err} Pass source=... with the "
                        "factory and arguments that built the base network") from None
    with staged_folder(target) as staging:
        from safetensors.torch import save_file

        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        recipe["files"] = {WEIGHTS_FILE: {"sha256": _sha256(staging / WEIGHTS_FILE),
                                          "bytes": (staging / WEIGHTS_FILE).stat().st_size}}
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n", encoding="utf-8")
    return target


def load(directory: PathLike, *, map_location: Union[str, torch.device] = "cpu"):
    """Rebuild a model saved by :func:`save` (no pickle is read).

    The base network is built by the factory the JSON names, converted with the stored
    arguments, loaded with the weights (after their SHA-256 is checked) and frozen when it was
    saved frozen; latency profiles come back in ``model.latency_profile``.

    Args:
        directory: the folder :func:`save` wrote.
        map_location: where the weights go (``"cpu"``, ``"cuda"``, a ``torch.device``).

    Returns:
        (AnytimeModel): the rebuilt model, in eval mode.

    Raises:
        FileNotFoundError: the directory, ``anytimeify.json`` or ``model.safetensors`` is missing
            (the message names it).
        SaveError: a file is altered or truncated (its SHA-256 differs), the JSON is not a recipe of
            this format, or the factory cannot be imported.
    """
    from safetensors.torch import load_file

    from .train.checkpointing import check_state_dict

    folder = Path(directory)
    recipe_path, weights_path = folder / RECIPE_FILE, folder / WEIGHTS_FILE
    for path in (folder, recipe_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist; a saved model is a directory with {RECIPE_FILE} "
                                    f"and {WEIGHTS_FILE} (anytimeify.save)")
    try:
        recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SaveError(f"{str(recipe_path)!r} is not valid JSON ({err}); was it altered?") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT or "source" not in recipe:
        raise SaveError(f"{str(recipe_path)!r} is not an anytimeify model recipe of format {FORMAT}")
    expected = (recipe.get("files") or {}).get(WEIGHTS_FILE, {}).get("sha256")
    if expected != _sha256(weights_path):
        raise SaveError(f"{str(weights_path)!r} differs from the file that was saved (SHA-256 mismatch): it was altered "
                        "or truncated")
    model = _rebuild(recipe)
    state = load_file(str(weights_path), device=str(map_location))
    check_state_dict(model, state, str(weights_path))
    model.load_state_dict(state)
    model = model.to(map_location).eval()
    if recipe.get("frozen"):
        model = model.freeze()
    model.latency_profile = recipe.get("latency_profile")
    return model
