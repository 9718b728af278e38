"""Saving and loading anytime models without pickles: safetensors weights and a JSON recipe.

``anytimeify.save(model, "dir")`` writes two files:

* ``model.safetensors``: the model's tensors (of the unfrozen model, for a frozen one);
* ``anytimeify.json``: how to rebuild it: the base network's factory (``"module:callable"``,
  positional and keyword arguments), the conversion's arguments (exits, head, width, task,
  confidence settings) or ``from_exits``, whether it was frozen, its latency profiles, and the
  SHA-256 of the weights file.

``anytimeify.load("dir")`` checks the JSON field by field, builds the base network with the
factory it names, converts it with the same arguments, loads the tensors (``safetensors``: no code
runs while reading them), checks that they fit exactly (names, shapes and dtypes), and freezes the
result if the saved model was frozen. The round trip is exact.

A saved folder is data, and loading it runs no code its author chose: the factory must be one of
anytimeify's networks, timm's ``create_model`` or a segmentation-models-pytorch architecture
(without pretrained weights or checkpoint paths), and the leaf modules, autowrap functions and
criteria it names must come from anytimeify, torch, torchvision, timm or smp. A model of your own
network loads with ``trust_code=["package.module:factory"]`` (or ``trust_code=True``), the opt-in
that says you trust the folder's author; see :mod:`anytimeify._trust`.

The base network's factory is known for anytimeify's own networks (they record it when built),
timm models (``timm.create_model`` with their architecture and ``num_classes``) and
segmentation-models-pytorch models (their recorded constructor arguments); for any other network
pass ``source=`` to :func:`save`. :func:`save` rebuilds the base network once to check that the
recipe gives the same tensor names and shapes, so a saved directory always loads.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

from ._trust import TrustCode, UntrustedCodeError, check_factory_call, import_trusted, normalise_trust

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


def _import(path: str, what: str, trust: Union[bool, Collection[str]], kind: str, where: str) -> Any:
    try:
        return import_trusted(path, what, trust, kind=kind, where=where)
    except UntrustedCodeError as err:
        raise SaveError(str(err)) from None


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


def _build_source(source: Mapping[str, Any], trust: Union[bool, Collection[str]], where: str) -> nn.Module:
    name = source.get("factory")
    factory = _import(name, "model factory", trust, "factory", where)
    args, kwargs = source.get("args", []), source.get("kwargs", {})
    try:
        check_factory_call(name, args, kwargs, trust, where)
    except UntrustedCodeError as err:
        raise SaveError(str(err)) from None
    net = factory(*args, **kwargs)
    if not isinstance(net, nn.Module):
        raise SaveError(f"{where}: model factory {name!r} returned {type(net).__name__}, not an nn.Module")
    return net


def _rebuild(recipe: Mapping[str, Any], trust: Union[bool, Collection[str]] = True, where: str = "the recipe"):
    from .convert import convert, from_exits
    from .masking.criteria import Confidence
    from .model import AnytimeModel

    net = _build_source(recipe["source"], trust, where)
    conversion = dict(recipe["conversion"])
    method = conversion.pop("method", "convert")
    if method == "native":  # the factory returns the anytime model itself (anytimeify's RANets)
        if not isinstance(net, AnytimeModel):
            raise SaveError(f"{where}: conversion.method 'native' needs a factory that returns an anytimeify."
                            f"AnytimeModel; {recipe['source'].get('factory')!r} returned {type(net).__name__}")
        return net
    leaves = [_import(v, "leaf module", trust, "class", where) if ":" in v else v
              for v in conversion.pop("leaf_modules", [])]
    wrapped = [_import(v, "autowrap function", trust, "function", where)
               for v in conversion.pop("autowrap_functions", [])]
    if method == "from_exits":
        return from_exits(net, input_size=conversion.get("input_size"), leaf_modules=leaves,
                          autowrap_functions=wrapped, inplace=True)
    confidence = conversion.pop("confidence", None)
    if confidence is not None:
        confidence = dict(confidence)
        if isinstance(confidence.get("criterion"), str) and ":" in confidence["criterion"]:
            confidence["criterion"] = _import(confidence["criterion"], "confidence criterion", trust, "criterion",
                                              where)
        confidence = Confidence(**confidence)
    return convert(net, confidence=confidence, leaf_modules=leaves, autowrap_functions=wrapped, inplace=True,
                   **conversion)


# ----------------------------------------------------------------------------- the JSON, field by field
_TOP_FIELDS = {"format", "source", "conversion", "frozen", "latency_profile", "files"}
_REQUIRED = ("format", "source", "conversion", "frozen", "files")
_CONVERSION_FIELDS = {
    "convert": {"exits", "head", "width", "task", "input_size", "align_corners", "leaf_modules",
                "autowrap_functions", "confidence"},
    "from_exits": {"input_size", "leaf_modules", "autowrap_functions"},
    "native": set(),
}
_PROFILE_FIELDS = {"seconds", "paper_gflops", "cpu", "threads", "device"}


def _kind(value: Any) -> str:
    return {bool: "true/false", str: "a string", list: "a list", dict: "an object", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


class _Checker:
    """Checks one recipe; each failure is a one-line SaveError naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, message: str):
        raise SaveError(f"{str(self.path)!r}: field {field!r} {message}; was the file altered? (save the model again "
                        "with anytimeify.save)")

    def of(self, field: str, value: Any, *types: type, optional: bool = False) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            wanted = " or ".join(sorted({_kind(t()) if t is not type(None) else "null" for t in types}))
            self.fail(field, f"must be {wanted}{' or null' if optional else ''}, got {value!r} ({_kind(value)})")
        return value

    def number(self, field: str, value: Any, *, optional: bool = False, low: float = -math.inf) -> Any:
        self.of(field, value, int, float, optional=optional)
        if value is not None and (not math.isfinite(value) or value < low):
            self.fail(field, f"must be a finite number >= {low}, got {value!r}")
        return value

    def fields(self, field: str, value: Mapping[str, Any], allowed: set, required: tuple = ()) -> None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            self.fail(f"{field}.{unknown[0]}" if field else unknown[0], f"is not a field of this format "
                      f"(known: {', '.join(sorted(allowed))})")
        for name in required:
            if name not in value:
                self.fail(f"{field}.{name}" if field else name, "is missing")

    def names(self, field: str, value: Any) -> None:
        for i, v in enumerate(self.of(field, value, list)):
            self.of(f"{field}[{i}]", v, str)

    def recipe(self, recipe: Any) -> None:
        if not isinstance(recipe, dict):
            raise SaveError(f"{str(self.path)!r} is not an anytimeify model recipe (a JSON object)")
        self.fields("", recipe, _TOP_FIELDS, _REQUIRED)
        self.of("format", recipe["format"], int)
        if recipe["format"] != FORMAT:
            self.fail("format", f"is {recipe['format']!r}; this anytimeify reads format {FORMAT}")
        source = self.of("source", recipe["source"], dict)
        self.fields("source", source, {"factory", "args", "kwargs"}, ("factory",))
        self.of("source.factory", source["factory"], str)
        self.of("source.args", source.get("args", []), list)
        self.of("source.kwargs", source.get("kwargs", {}), dict)
        self.conversion(self.of("conversion", recipe["conversion"], dict))
        self.of("frozen", recipe["frozen"], bool)
        profiles = self.of("latency_profile", recipe.get("latency_profile"), dict, optional=True)
        for key, profile in (profiles or {}).items():
            self.profile(f"latency_profile.{key}", key, profile)
        files = self.of("files", recipe["files"], dict)
        self.fields("files", files, {WEIGHTS_FILE}, (WEIGHTS_FILE,))
        entry = self.of(f"files.{WEIGHTS_FILE}", files[WEIGHTS_FILE], dict)
        self.fields(f"files.{WEIGHTS_FILE}", entry, {"sha256", "bytes"}, ("sha256",))
        digest = self.of(f"files.{WEIGHTS_FILE}.sha256", entry["sha256"], str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            self.fail(f"files.{WEIGHTS_FILE}.sha256", f"must be 64 lower-case hex digits, got {digest!r}")
        if "bytes" in entry:
            self.number(f"files.{WEIGHTS_FILE}.bytes", self.of(f"files.{WEIGHTS_FILE}.bytes", entry["bytes"], int),
                        low=0)

    def conversion(self, conversion: Dict[str, Any]) -> None:
        method = self.of("conversion.method", conversion.get("method", "convert"), str)
        if method not in _CONVERSION_FIELDS:
            self.fail("conversion.method", f"is {method!r}; expected one of {', '.join(_CONVERSION_FIELDS)}")
        self.fields("conversion", conversion, _CONVERSION_FIELDS[method] | {"method"})
        exits = conversion.get("exits", "stages")
        if not isinstance(exits, str):
            self.names("conversion.exits", exits)
        for name in ("head", "task"):
            self.of(f"conversion.{name}", conversion.get(name, ""), str)
        width = self.of("conversion.width", conversion.get("width"), int, optional=True)
        if width is not None and width <= 0:
            self.fail("conversion.width", f"must be positive, got {width}")
        self.of("conversion.align_corners", conversion.get("align_corners"), bool, optional=True)
        size = self.of("conversion.input_size", conversion.get("input_size"), list, optional=True)
        for i, v in enumerate(size or []):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                self.fail(f"conversion.input_size[{i}]", f"must be a positive integer, got {v!r}")
        for name in ("leaf_modules", "autowrap_functions"):
            self.names(f"conversion.{name}", conversion.get(name, []))
        confidence = self.of("conversion.confidence", conversion.get("confidence"), dict, optional=True)
        if confidence is not None:
            self.fields("conversion.confidence", confidence,
                        {"threshold", "criterion", "execution", "fraction", "seed", "enabled"})
            self.number("conversion.confidence.threshold", confidence.get("threshold", 0.0))
            self.of("conversion.confidence.criterion", confidence.get("criterion", ""), str)
            self.of("conversion.confidence.execution", confidence.get("execution", ""), str)
            fraction = confidence.get("fraction", 0.5)
            for i, v in enumerate(fraction if isinstance(fraction, list) else [fraction]):
                self.number(f"conversion.confidence.fraction[{i}]" if isinstance(fraction, list)
                            else "conversion.confidence.fraction", v, low=0.0)
            self.of("conversion.confidence.seed", confidence.get("seed"), int, optional=True)
            self.of("conversion.confidence.enabled", confidence.get("enabled", True), bool)

    def profile(self, field: str, key: str, profile: Any) -> None:
        self.of(field, profile, dict)
        self.fields(field, profile, _PROFILE_FIELDS, ("seconds", "paper_gflops"))
        parts = key.split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            self.fail(field, "must be keyed by an input shape 'BxCxHxW'")
        for name in ("seconds", "paper_gflops"):
            values = self.of(f"{field}.{name}", profile[name], list)
            for i, v in enumerate(values):
                self.number(f"{field}.{name}[{i}]", v, low=0.0)
        if len(profile["paper_gflops"]) != len(profile["seconds"]) and profile["seconds"]:
            self.fail(field, "has different numbers of seconds and paper_gflops")
        self.of(f"{field}.cpu", profile.get("cpu", ""), str)
        self.of(f"{field}.device", profile.get("device", ""), str)
        self.of(f"{field}.threads", profile.get("threads", 1), int)


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` in place of an existing folder ``target`` so that ``target`` is always one of
    the two, whole: an atomic exchange where the system has one; else two renames, the first undone
    if the second fails (a kill between them leaves the old folder in ``.NAME.old.*/previous``,
    which :func:`load`'s error names)."""
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / "previous")
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old / "previous", target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Write a folder whole or not at all: yields an empty staging folder beside ``target``; when
    the block ends without an error it replaces ``target`` (an existing one is swapped out in one
    atomic step where the system allows, and at every moment ``target`` is the old folder or the
    new one), else it is removed and ``target`` is untouched. The folder and its files get the
    permissions of files the user creates (umask), not the staging folder's private ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
        for path in staging.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if target.exists() or target.is_symlink():
            _replace_folder(staging, target)
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
        rebuilt = _rebuild(recipe, True)  # what load() will build: it must take these tensors exactly
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


def _leftover(folder: Path) -> str:
    """A hint when an interrupted save left the previous model aside."""
    leftovers = sorted(folder.parent.glob(f".{folder.name}.old.*/previous")) if folder.parent.is_dir() else []
    if not leftovers:
        return ""
    return f" (an interrupted save left the previous model in {str(leftovers[-1])!r}: move it back to load it)"


def load(directory: PathLike, *, map_location: Union[str, torch.device] = "cpu", trust_code: TrustCode = False):
    """Rebuild a model saved by :func:`save` (no pickle is read, and no code the folder names runs
    unless ``trust_code`` says so).

    The JSON is checked field by field; the base network is built by the factory it names,
    converted with the stored arguments, loaded with the weights (after their SHA-256 is checked,
    and their names, shapes and dtypes against the rebuilt model) and frozen when it was saved
    frozen; latency profiles come back in ``model.latency_profile``.

    Args:
        directory: the folder :func:`save` wrote.
        map_location: where the weights go (``"cpu"``, ``"cuda"``, a ``torch.device``).
        trust_code: which code the folder may make anytimeify import and call. ``False`` (the
            default): only anytimeify's networks, timm's ``create_model`` and
            segmentation-models-pytorch architectures (no pretrained weights, no checkpoint paths),
            and leaf modules, autowrap functions and criteria from anytimeify, torch, torchvision,
            timm and smp. A list of ``"package.module:attribute"`` names: those too (the factory
            of your own network). ``True``: whatever the folder names; only for folders whose
            author you trust, as it can run any code.

    Returns:
        (AnytimeModel): the rebuilt model, in eval mode.

    Raises:
        FileNotFoundError: the directory, ``anytimeify.json`` or ``model.safetensors`` is missing
            (the message names it).
        SaveError: a file is altered or truncated (its SHA-256 differs, or safetensors cannot
            read it), a field of the JSON is missing, unknown or of the wrong type (named), the
            JSON names code that ``trust_code`` does not allow, or the weights' dtypes differ from
            the model's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .train.checkpointing import check_state_dict

    trust = normalise_trust(trust_code)
    folder = Path(directory)
    recipe_path, weights_path = folder / RECIPE_FILE, folder / WEIGHTS_FILE
    for path in (folder, recipe_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist; a saved model is a directory with {RECIPE_FILE} "
                                    f"and {WEIGHTS_FILE} (anytimeify.save){_leftover(folder)}")
    try:
        recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SaveError(f"{str(recipe_path)!r} is not valid JSON ({err}); was it altered?") from None
    _Checker(recipe_path).recipe(recipe)
    expected = recipe["files"][WEIGHTS_FILE]["sha256"]
    if expected != _sha256(weights_path):
        raise SaveError(f"{str(weights_path)!r} differs from the file that was saved (SHA-256 mismatch): it was altered "
                        "or truncated")
    model = _rebuild(recipe, trust, repr(str(recipe_path)))
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise SaveError(f"{str(weights_path)!r} is not a readable safetensors file ({err}): it was altered or "
                        "truncated") from None
    check_state_dict(model, state, str(weights_path))
    own = model.state_dict()
    for name, tensor in state.items():
        if tensor.dtype != own[name].dtype:
            raise SaveError(f"{str(weights_path)!r}: tensor {name!r} is {tensor.dtype}, the model's is "
                            f"{own[name].dtype}; anytimeify does not cast saved weights (save the model again, or "
                            "convert the file's tensors yourself)")
    model.load_state_dict(state)
    model = model.to(map_location).eval()
    if recipe["frozen"]:
        model = model.freeze()
    model.latency_profile = recipe.get("latency_profile")
    return model
