"""Export a converted model for serving: ``torch.export`` of ``forward`` and of each segment.

A serving runtime that stops between exits runs the exported segments one after another: segment
k takes the values earlier segments produced (activations, exit logits and, with confidence
adaptivity, the masks as ``(B, 1, h, w)`` bool tensors, True = computed) and returns the values
later segments read plus its exit's logits. :meth:`AnytimeExport.run` does exactly that and is
what a runtime in another language reimplements; :meth:`AnytimeExport.save` writes the programs
(``.pt2``) with a JSON description of the wiring, :func:`load_export` reads them back, and
:meth:`AnytimeExport.to_onnx` writes ONNX files through torch's ``torch.export``-based exporter.

Exported programs compute the dense execution of the model (every masked conv computes every
position and blends, the oracle the sparse engine equals): the compiled sparse kernels do not
export. Confidence adaptivity still decides the masks and copies confident predictions forward,
so the outputs equal the model's.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .masking.masks import MaskSet
from .saving import staged_folder

__all__ = ["AnytimeExport", "ExportedSegment", "SegmentOutput", "export", "load_export", "check_archive"]

FORMAT = "anytimeify-export/1"
MANIFEST = "export.json"


@dataclass
class ExportedSegment:
    """One segment's program and its wiring.

    Attributes:
        index: 0-based segment number (segment k ends at exit k + 1).
        program: the ``torch.export.ExportedProgram``; call ``program.module()(*inputs)``.
        inputs: names of the values it takes, in order (the model input's name for segment 0).
        outputs: names of the values it returns, in order.
        exit: which output is this segment's exit logits.
        mask: which output is the mask this exit decides (``(B, 1, h, w)`` bool, True = computed),
            None without confidence adaptivity or for the last exit.
    """

    index: int
    program: "torch.export.ExportedProgram"
    inputs: List[str]
    outputs: List[str]
    exit: str
    mask: Optional[str]


@dataclass
class SegmentOutput:
    """What :meth:`AnytimeExport.run` yields per exit: its 1-based ``index``, ``logits`` and the
    ``mask`` it decided for later segments (None without confidence adaptivity)."""

    index: int
    logits: torch.Tensor
    mask: Optional[torch.Tensor]


class _SegmentModule(nn.Module):
    """A segment with tensors in and out: masks enter as bool tensors and leave as bool tensors."""

    def __init__(self, module: nn.Module, mask_positions: Sequence[int], all_computed: bool):
        super().__init__()
        self.segment = module
        self.mask_positions = frozenset(mask_positions)
        self.all_computed = all_computed

    def forward(self, *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        values = [MaskSet(a, sparse=False, all_computed=self.all_computed) if i in self.mask_positions else a
                  for i, a in enumerate(args)]
        outputs = self.segment(*values)
        return tuple(o.computed if isinstance(o, MaskSet) else o for o in outputs)


class _ForwardModule(nn.Module):
    """The whole graph: every exit's logits."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.net = graph_module  # not "graph": the exported program's module has its fx graph there

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.net(x))


class AnytimeExport:
    """Exported programs of a converted model (made by :func:`export` or :func:`load_export`).

    Attributes:
        forward: the program of ``forward`` (every exit's logits), or None when not exported.
        segments: one :class:`ExportedSegment` per exit, in order.
        input_name: the name segment 0 takes the image by.
        input_shape: the example input's shape; with ``dynamic_batch`` the batch size may differ.
        dynamic_batch: whether the batch dimension is dynamic.
    """

    def __init__(self, forward, segments: List[ExportedSegment], input_name: str, input_shape: Sequence[int],
                 dynamic_batch: bool):
        self.forward = forward
        self.segments = segments
        self.input_name = input_name
        self.input_shape = [int(v) for v in input_shape]
        self.dynamic_batch = dynamic_batch
        self._callables: Dict[int, nn.Module] = {}
        #: per program (-1: forward) the module and example arguments it was exported from
        self._sources: Optional[Dict[int, Tuple[nn.Module, tuple]]] = None

    def _callable(self, key: int, program) -> nn.Module:
        # ExportedProgram.module() builds a module each call: once per program is enough
        module = self._callables.get(key)
        if module is None:
            module = self._callables[key] = program.module()
        return module

    def __repr__(self) -> str:
        return (f"AnytimeExport(exits={len(self.segments)}, input={'x'.join(map(str, self.input_shape))}, "
                f"forward={'yes' if self.forward is not None else 'no'}, dynamic_batch={self.dynamic_batch})")

    def _check(self, x: torch.Tensor) -> None:
        shape = list(x.shape)
        expected = list(self.input_shape)
        if self.dynamic_batch:
            shape, expected = shape[1:], expected[1:]
        if shape != expected:
            raise ValueError(f"the programs were exported for inputs of shape {tuple(self.input_shape)}"
                             f"{' (any batch size)' if self.dynamic_batch else ''}, got {tuple(x.shape)}; "
                             "export again with an example of that shape")

    def run(self, x: torch.Tensor) -> Iterator[SegmentOutput]:
        """Run the exported segments one after another, yielding each exit as it is ready; stop
        iterating to skip the rest. This is the serving loop: values pass between segments by
        name, and what no later segment reads is dropped."""
        if not self.segments:
            raise ValueError("these programs hold no segments; export with segments=True")
        self._check(x)
        env: Dict[str, torch.Tensor] = {self.input_name: x}
        for k, seg in enumerate(self.segments):
            outputs = self._callable(seg.index, seg.program)(*[env[name] for name in seg.inputs])
            env.update(zip(seg.outputs, outputs))
            yield SegmentOutput(seg.index + 1, env[seg.exit], env[seg.mask] if seg.mask else None)
            later = {name for s in self.segments[k + 1:] for name in s.inputs}
            for name in [n for n in env if n not in later]:
                del env[name]

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Every exit's logits, from the exported ``forward``."""
        if self.forward is None:
            raise ValueError("forward was not exported; export with forward=True or use run()")
        self._check(x)
        return tuple(self._callable(-1, self.forward)(x))

    def manifest(self) -> dict:
        """The JSON-able description of the programs and their wiring (what :meth:`save` writes)."""
        return {
            "format": FORMAT,
            "input_name": self.input_name,
            "input_shape": self.input_shape,
            "dynamic_batch": self.dynamic_batch,
            "forward": "forward.pt2" if self.forward is not None else None,
            "segments": [{"index": s.index, "file": f"segment_{s.index}.pt2", "inputs": s.inputs,
                          "outputs": s.outputs, "exit": s.exit, "mask": s.mask} for s in self.segments],
        }

    def save(self, directory: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
        """Write ``forward.pt2``, ``segment_<k>.pt2`` (``torch.export.save``) and ``export.json``
        into ``directory``, through a temporary folder renamed at the end."""
        target = Path(directory)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) or choose another folder")
        with staged_folder(target) as tmp:
            if self.forward is not None:
                torch.export.save(self.forward, str(tmp / "forward.pt2"))
            for seg in self.segments:
                torch.export.save(seg.program, str(tmp / f"segment_{seg.index}.pt2"))
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")
        return target

    def to_onnx(self, directory: Union[str, os.PathLike], *, opset: Optional[int] = None,
                overwrite: bool = False) -> List[Path]:
        """Write ``forward.onnx`` and ``segment_<k>.onnx`` (inputs and outputs named as in
        :meth:`manifest`; masks are bool tensors) plus ``export.json`` through torch's
        ``torch.export``-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``). Needs the
        ``onnx`` and ``onnxscript`` packages (``pip install 'anytimeify[onnx]'``) and an export
        made in this process by :func:`export` (not one read by :func:`load_export`). Returns the
        ONNX files written.

        Raises:
            ImportError: onnx or onnxscript is not installed.
            ValueError: this export was read from disk.
            FileExistsError: ``directory`` exists and ``overwrite`` is False.
        """
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({error}); "
                              "install them with: pip install 'anytimeify[onnx]'") from None
        if self._sources is None:
            raise ValueError("ONNX export needs the model: export read from disk holds only the programs; "
                             "call anytimeify.export(model, example).to_onnx(directory)")
        target = Path(directory)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) or choose another folder")
        names = []
        with staged_folder(target) as tmp:
            jobs = []
            if self.forward is not None:
                jobs.append(("forward.onnx", -1, [self.input_name], [s.exit for s in self.segments] or None))
            for seg in self.segments:
                jobs.append((f"segment_{seg.index}.onnx", seg.index, seg.inputs, seg.outputs))
            for file, key, inputs, outputs in jobs:
                module, args = self._sources[key]
                kwargs = {"dynamo": True, "input_names": list(inputs), "verbose": False}
                if outputs:
                    kwargs["output_names"] = list(outputs)
                if opset is not None:
                    kwargs["opset_version"] = opset
                if self.dynamic_batch:
                    kwargs["dynamic_shapes"] = _batch_dims(len(args), module)
                with torch.no_grad(), warnings.catch_warnings():
                    # one Dim object names every input's batch axis: the exporter says so once per input
                    warnings.filterwarnings("ignore", message=".*The axis name: batch will not be used")
                    onnx_program = torch.onnx.export(module, args, **kwargs)
                onnx_program.save(str(tmp / file))
                names.append(file)
            manifest = self.manifest()
            manifest["forward"] = "forward.onnx" if self.forward is not None else None
            for entry in manifest["segments"]:
                entry["file"] = f"segment_{entry['index']}.onnx"
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return [target / name for name in names]


def _batch_dims(count: int, module: Optional[nn.Module] = None):
    """``dynamic_shapes`` with a dynamic batch dimension: a segment takes ``*args`` (one tuple),
    ``forward`` one tensor."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    if isinstance(module, _ForwardModule):
        return ({0: batch},)
    return (tuple({0: batch} for _ in range(count)),)


def export(model: nn.Module, example: torch.Tensor, *, segments: bool = True, forward: bool = True,
           dynamic_batch: bool = False, strict: bool = False) -> AnytimeExport:
    """Export a converted model with ``torch.export``: its ``forward`` (every exit) and each
    segment on its own, so that a serving runtime can stop between exits.

    Args:
        model: an :class:`~anytimeify.AnytimeModel` (frozen or not; it is not changed: a copy in
            eval mode is exported, with every masked conv in dense execution).
        example: an input of the shape to serve, e.g. ``torch.zeros(1, 3, 512, 1024)``.
        segments: export each segment (``AnytimeExport.segments``, ``run``).
        forward: export ``forward`` (``AnytimeExport.forward``, calling the export).
        dynamic_batch: make the batch dimension dynamic (any batch size from 1).
        strict: passed to ``torch.export.export``.

    Returns:
        An :class:`AnytimeExport`.

    Raises:
        TypeError: ``model`` is not an AnytimeModel.
        ValueError: ``example`` is not an input the model takes (the message says why), or
            neither ``segments`` nor ``forward`` is asked for.
    """
    from .model import AnytimeModel

    if not isinstance(model, AnytimeModel):
        raise TypeError(f"export takes a converted model (anytimeify.convert / anytimeify.load), got "
                        f"{type(model).__name__}; for a plain network use torch.export.export")
    if not (segments or forward):
        raise ValueError("nothing to export: pass segments=True and/or forward=True")
    model.check_input(example)
    served = copy.deepcopy(model).eval()
    if served.confidence is not None:
        served.set_execution("dense")
    program = served.program
    mask_names = {name for name in program.mask_names if name is not None}
    all_computed = served.confidence is not None and not served.confidence.enabled
    example = example.detach()
    if dynamic_batch and example.shape[0] < 2:
        # torch.export specializes dimensions of size 0 and 1: trace a dynamic batch with two images
        example = example[:1].expand(2, *example.shape[1:]).clone() if example.shape[0] else \
            torch.zeros(2, *example.shape[1:], dtype=example.dtype, device=example.device)

    sources: Dict[int, Tuple[nn.Module, tuple]] = {}
    with torch.no_grad():
        forward_program = None
        if forward:
            module = _ForwardModule(program.graph_module).eval()
            forward_program = torch.export.export(module, (example,), strict=strict,
                                                  dynamic_shapes=_batch_dims(1, module) if dynamic_batch else None)
            sources[-1] = (module, (example,))
        exported: List[ExportedSegment] = []
        if segments:
            env: Dict[str, torch.Tensor] = {program.input_name: example}
            for seg in program.segments:
                wrapper = _SegmentModule(seg.module, [i for i, n in enumerate(seg.inputs) if n in mask_names],
                                         all_computed).eval()
                args = tuple(env[name] for name in seg.inputs)
                seg_program = torch.export.export(wrapper, args, strict=strict,
                                                  dynamic_shapes=_batch_dims(len(args)) if dynamic_batch else None)
                sources[seg.index] = (wrapper, args)
                env.update(zip(seg.outputs, wrapper(*args)))
                exit_name = program.exit_names[seg.index]
                mask_name = program.mask_names[seg.index]
                exported.append(ExportedSegment(seg.index, seg_program, list(seg.inputs), list(seg.outputs),
                                                exit_name, mask_name if mask_name in seg.outputs else None))
    result = AnytimeExport(forward_program, exported, program.input_name, example.shape, dynamic_batch)
    result._sources = sources
    return result


def _field(manifest_path: Path, manifest: dict, name: str, *types: type, optional: bool = False):
    if name not in manifest:
        if optional:
            return None
        raise ValueError(f"{manifest_path}: field {name!r} is missing; not a complete export description")
    value = manifest[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ValueError(f"{manifest_path}: field {name!r} has the wrong type ({type(value).__name__}: {value!r})")
    return value


def _names(manifest_path: Path, where: str, value) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{manifest_path}: {where} must be a list of names, got {value!r}")
    return list(value)


#: zip members of a ``.pt2`` archive whose loading would unpickle (torch's legacy weights and
#: constants files, pickled tensor subclasses, script and opaque objects)
_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


def check_archive(data: bytes, path: Path) -> None:
    """Refuse a ``.pt2`` archive whose loading by ``torch.export.load`` would unpickle anything.

    ``torch.export.load`` reads tensors stored raw (what ``torch.export.save`` writes for plain
    tensors), the program as JSON and the sample inputs with ``torch.load(weights_only=True)``, but
    falls back to a full unpickle for sample inputs that the restricted loader rejects, and
    unpickles tensor subclasses, script objects and legacy weight files. Each of those is refused
    here; what passes loads without a full unpickle.
    """
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a torch.export archive ({error})") from None
    for name in names:
        parts = name.split("/")
        if len(parts) < 2:
            continue
        inner = "/".join(parts[1:])
        if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"):
            raise ValueError(f"{path} holds {name}, a pickled (legacy) weights file; anytimeify does not load "
                             "archives that need an unpickle (pass trust_code=True if you trust its author)")
        if inner.endswith(("_weights_config.json", "_constants_config.json")):
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise ValueError(f"{path}: {name} is not valid JSON") from None
            for fqn, meta in config.items():
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False or \
                        str(meta.get("path_name", "")).startswith(_PICKLED_PREFIXES):
                    raise ValueError(f"{path}: tensor {fqn!r} ({name}) is stored as a pickle; anytimeify does not "
                                     "load archives that need an unpickle (pass trust_code=True if you trust its "
                                     "author)")
        if inner.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception as error:
                raise ValueError(f"{path}: {name} is not plain tensors ({type(error).__name__}); torch would unpickle "
                                 "it in full, which anytimeify does not do (pass trust_code=True if you trust its "
                                 "author)") from None


def load_export(directory: Union[str, os.PathLike], *, trust_code: bool = False) -> AnytimeExport:
    """Read what :meth:`AnytimeExport.save` wrote (``torch.export.load``; no model code needed).

    An export folder is data: only program files inside the folder are read (no ``..``, absolute
    paths or links out of it), and an archive whose loading would unpickle is refused (see
    :func:`check_archive`); what :meth:`AnytimeExport.save` writes never needs one.

    Args:
        directory: the folder.
        trust_code: read the archives with plain ``torch.export.load``, unpickling what it
            unpickles; only for folders whose author you trust.

    Raises:
        FileNotFoundError: the folder, its ``export.json`` or a program file is missing (named).
        ValueError: ``export.json`` is not an anytimeify export description (the field is named),
            names a file outside the folder, or an archive would need an unpickle.
    """
    import io

    folder = Path(directory)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: not a folder written by AnytimeExport.save "
                                "(anytimeify export MODEL_DIR --out DIR)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest_path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not an anytimeify export description (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    known = {"format", "input_name", "input_shape", "dynamic_batch", "forward", "segments"}
    unknown = sorted(set(manifest) - known)
    if unknown:
        raise ValueError(f"{manifest_path}: field {unknown[0]!r} is not part of {FORMAT}")
    root = folder.resolve()

    def read(name):
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{manifest_path} names program file {name!r}; only plain file names inside the folder "
                             "are read")
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (listed in {manifest_path})")
        if path.is_symlink() or path.resolve().parent != root:
            raise ValueError(f"{path} is a link out of {folder}; only files inside the folder are read")
        if path.suffix != ".pt2":
            raise ValueError(f"{path} is not a torch.export program (.pt2); ONNX files are loaded with onnxruntime")
        data = path.read_bytes()  # checked and loaded from the same bytes
        if not trust_code:
            check_archive(data, path)
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as error:
            raise ValueError(f"cannot read {path}: {error}") from None

    input_name = _field(manifest_path, manifest, "input_name", str)
    input_shape = _field(manifest_path, manifest, "input_shape", list)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_shape):
        raise ValueError(f"{manifest_path}: field 'input_shape' must be positive integers, got {input_shape!r}")
    dynamic = _field(manifest_path, manifest, "dynamic_batch", bool, optional=True)
    forward_file = _field(manifest_path, manifest, "forward", str, optional=True)
    entries = _field(manifest_path, manifest, "segments", list)
    segments = []
    for k, entry in enumerate(entries):
        where = f"segments[{k}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{manifest_path}: {where} must be an object, got {entry!r}")
        missing = [f for f in ("index", "file", "inputs", "outputs", "exit") if f not in entry]
        if missing:
            raise ValueError(f"{manifest_path}: {where} lacks field {missing[0]!r}")
        index = entry["index"]
        if not isinstance(index, int) or isinstance(index, bool) or index != k:
            raise ValueError(f"{manifest_path}: {where}.index must be {k}, got {index!r}")
        outputs = _names(manifest_path, f"{where}.outputs", entry["outputs"])
        exit_name, mask = entry["exit"], entry.get("mask")
        if exit_name not in outputs or (mask is not None and mask not in outputs):
            raise ValueError(f"{manifest_path}: {where}'s exit {exit_name!r} and mask {mask!r} must be among its "
                             f"outputs {outputs}")
        segments.append((index, entry["file"], _names(manifest_path, f"{where}.inputs", entry["inputs"]), outputs,
                         exit_name, mask))
    forward = read(forward_file) if forward_file else None
    return AnytimeExport(forward, [ExportedSegment(i, read(f), ins, outs, e, m) for i, f, ins, outs, e, m in segments],
                         input_name, input_shape, bool(dynamic))
