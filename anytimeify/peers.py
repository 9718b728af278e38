"""The dense model as users deploy it: ONNX Runtime, OpenVINO and ``torch.compile``, timed side by side.

A speed claim about the anytime model is only worth something against the fastest way to run the
dense model on the same CPU. :func:`prepare_peers` builds the base model in each dense runtime that
is installed (``pip install "anytimeify[bench]"``) with the thread count the anytime model gets:

* ``onnxruntime``: the model exported with ``torch.onnx.export(..., dynamo=True)``, run by ONNX
  Runtime's CPU execution provider (all graph optimisations, ``intra_op_num_threads=threads``, one
  inter-op thread);
* ``openvino``: the same ONNX file compiled by OpenVINO for the CPU with fp32 inference precision,
  the latency hint, one stream and ``threads`` inference threads;
* ``torch_compile``: ``torch.compile`` (inductor) with weight freezing, the setting PyTorch
  recommends for CPU inference, on a channels-last model and input.

Each peer's output is checked against the eager model before it is timed; a peer that is not
installed, fails to export, compile or run, or gives a different answer is kept with the reason
(:attr:`Peer.error`) so a benchmark reports it instead of silently leaving it out.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["PEERS", "Peer", "prepare_peers", "peer_versions"]

#: the dense runtimes a benchmark compares with, in the order they are prepared
PEERS = ("onnxruntime", "openvino", "torch_compile")

#: the largest relative difference (max abs difference over max abs output) a peer may show against eager
TOLERANCE = 1e-3


@dataclass
class Peer:
    """One dense runtime running the base model.

    Attributes:
        name: ``"onnxruntime"``, ``"openvino"`` or ``"torch_compile"``.
        run: ``run(x)`` runs the model once on an NCHW float tensor (``None`` when :attr:`error` is set).
        error: why the peer cannot be timed (not installed, export/compile/run failure, wrong output).
        version: the runtime's version.
        prepare_s: seconds spent exporting/compiling it.
        max_rel_diff: its output's largest difference from eager, over the eager output's largest magnitude.
    """

    name: str
    run: Optional[Callable[[torch.Tensor], object]] = None
    error: Optional[str] = None
    version: Optional[str] = None
    prepare_s: float = 0.0
    max_rel_diff: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.run is not None and self.error is None

    def summary(self) -> dict:
        out = {"version": self.version, "prepare_s": round(self.prepare_s, 2)}
        if self.max_rel_diff is not None:
            out["max_rel_diff"] = float(f"{self.max_rel_diff:.3g}")
        if self.error:
            out["error"] = self.error
        return out


def peer_versions() -> Dict[str, Optional[str]]:
    """The installed version of each peer runtime (``None`` where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {}
    for name, dist in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("torch_compile", "torch")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


def _first_tensor(out) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return torch.as_tensor(out)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _export_onnx(base: nn.Module, x: torch.Tensor, path: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(base, (x,), dynamo=True, verbose=False, input_names=["image"])
    program.save(path)


def _ort_session(path: str, threads: int, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session as the benchmarks run it (all graph optimisations, ``threads``
    intra-op threads, one inter-op thread); with ``profile_prefix``, profiling into files named so."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _onnxruntime(path: str, threads: int) -> Callable[[torch.Tensor], object]:
    session = _ort_session(path, threads)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor):
        return session.run(None, {name: x.contiguous().numpy()})

    return run


def _ov_compiled(path: str, threads: int, perf_count: bool = False):
    """The ONNX file compiled by OpenVINO for the CPU as the benchmarks run it (fp32 inference
    precision, latency hint, one stream, ``threads`` threads; ``perf_count``: per-node counters)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if perf_count:
        config["PERF_COUNT"] = True
    return core.compile_model(core.read_model(path), "CPU", config)


def _openvino(path: str, threads: int) -> Callable[[torch.Tensor], object]:
    request = _ov_compiled(path, threads).create_infer_request()

    def run(x: torch.Tensor):
        request.infer({0: x.contiguous().numpy()})
        return request.get_output_tensor(0).data

    return run


def _torch_compile(base: nn.Module) -> Callable[[torch.Tensor], object]:
    import copy

    from torch._inductor import config as inductor_config

    model = copy.deepcopy(base).eval().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="inductor")
    first = [True]

    def run(x: torch.Tensor):
        x = x.contiguous(memory_format=torch.channels_last)
        if first[0]:  # freezing applies when the graph is compiled, at the first call
            first[0] = False
            with inductor_config.patch(freezing=True):
                return compiled(x)
        return compiled(x)

    return run


def prepare_peers(base: nn.Module, x: torch.Tensor, threads: int,
                  names: Sequence[str] = PEERS, reference: Optional[torch.Tensor] = None) -> List[Peer]:
    """Build ``base`` in each dense runtime of ``names`` and check its output on ``x`` (NCHW).

    Args:
        base: the dense network in eval mode.
        x: an example input at the size the peers will be timed at (their programs are static).
        threads: the number of threads each runtime may use.
        names: which of :data:`PEERS` to prepare.
        reference: the eager output on ``x`` (computed when not given).

    Returns:
        One :class:`Peer` per name, in order; a peer that cannot run has ``error`` set and ``run``
        ``None``.
    """
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown dense runtime(s) {unknown}; choose from {list(PEERS)}")
    base = base.eval()
    x = x.contiguous()
    versions = peer_versions()
    with torch.no_grad():
        ref = _first_tensor(base(x) if reference is None else reference).float()
    scale = max(1.0, ref.abs().max().item())
    peers: List[Peer] = []
    needs_onnx = [n for n in names if n in ("onnxruntime", "openvino") and versions[n] is not None]
    workdir = tempfile.TemporaryDirectory(prefix="anytimeify-peers-")
    try:  # the sessions and compiled models hold the model in memory: the file goes at the end
        onnx_path = os.path.join(workdir.name, "model.onnx")
        onnx_error: Optional[str] = None
        onnx_s = 0.0
        if needs_onnx:
            start = time.perf_counter()
            try:
                if importlib.util.find_spec("onnxscript") is None:
                    raise ImportError("onnxscript is not installed (pip install 'anytimeify[bench]')")
                _export_onnx(base, x, onnx_path)
            except Exception as exc:  # noqa: BLE001 -- reported in the benchmark's JSON
                onnx_error = "ONNX export failed: " + _short(exc)
            onnx_s = time.perf_counter() - start
        for name in names:
            peer = Peer(name, version=versions[name])
            peers.append(peer)
            if versions[name] is None:
                peer.error = f"not installed (pip install 'anytimeify[bench]' adds {name.replace('torch_compile', 'torch')})"
                continue
            if name in ("onnxruntime", "openvino") and onnx_error:
                peer.error, peer.prepare_s = onnx_error, onnx_s
                continue
            start = time.perf_counter()
            try:
                if name == "onnxruntime":
                    run = _onnxruntime(onnx_path, threads)
                elif name == "openvino":
                    run = _openvino(onnx_path, threads)
                else:
                    run = _torch_compile(base)
                with torch.no_grad():
                    out = _first_tensor(run(x)).float()
            except Exception as exc:  # noqa: BLE001 -- reported in the benchmark's JSON
                peer.error = "failed: " + _short(exc)
                peer.prepare_s = time.perf_counter() - start + (onnx_s if name != "torch_compile" else 0.0)
                continue
            peer.prepare_s = time.perf_counter() - start + (onnx_s if name != "torch_compile" else 0.0)
            if tuple(out.shape) != tuple(ref.shape):
                peer.error = f"wrong output shape {tuple(out.shape)}, eager gives {tuple(ref.shape)}"
                continue
            peer.max_rel_diff = (out - ref).abs().max().item() / scale
            if not peer.max_rel_diff <= TOLERANCE:
                peer.error = f"output differs from eager by {peer.max_rel_diff:.2e} of its largest value (> {TOLERANCE})"
                continue
            peer.run = run
    finally:
        workdir.cleanup()
    return peers


# ------------------------------------------------------------------------------- per-stage profiles
def onnx_node_modules(path: str) -> Dict[str, str]:
    """The module path each node of an ONNX file exported by ``torch.onnx.export(..., dynamo=True)``
    came from (its ``pkg.torch.onnx.name_scopes`` metadata; ``""`` for ops of the top-level forward).

    The metadata is parsed as a Python literal (``ast.literal_eval``): nothing in the file is run.
    """
    import ast

    import onnx

    out: Dict[str, str] = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        module = ""
        if scopes:
            try:
                names = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                names = []
            if isinstance(names, list) and len(names) >= 3 and isinstance(names[-2], str):
                module = names[-2]  # the innermost module; the last entry is the op itself
        out[node.name] = module
        for value in node.output:  # runtimes name fused nodes after the value they produce
            out.setdefault(value, module)
    return out


def _group(name: str, node_module: Dict[str, str], group_of: Callable[[str], str]) -> str:
    """The stage of a runtime's node: its own name, the name before a ``/`` part (OpenVINO's split
    nodes) or before ``_nchwc`` (ONNX Runtime's blocked-layout nodes, named after their output),
    else the exported node whose name it ends with (layout reorders)."""
    module = None
    for candidate in (name, name.split("/")[0], name[: -len("_nchwc")] if name.endswith("_nchwc") else None):
        if candidate is not None and candidate in node_module:
            module = node_module[candidate]
            break
    if module is None:
        module = next((m for n, m in node_module.items() if n and name.split("/")[0].endswith(n)), "")
    return group_of(module) if module else "other"


def _median_groups(runs: List[Dict[str, float]]) -> Dict[str, float]:
    import statistics

    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def profile_stages(base: nn.Module, x: torch.Tensor, threads: int, group_of: Callable[[str], str],
                   names: Sequence[str] = ("onnxruntime", "openvino"), reps: int = 3) -> Dict[str, dict]:
    """Seconds per stage of the dense model in each runtime of ``names``, from the runtime's own
    profiler (ONNX Runtime's node events, OpenVINO's performance counters), its nodes mapped to the
    module they were exported from and ``group_of(module path)``.

    Returns ``{runtime: {"stages": {stage: seconds}, "profiled_s": sum}}`` (medians over ``reps``
    runs after a warm-up), or ``{runtime: {"error": reason}}``. Profiled sums are a little above
    the runtime's unprofiled time (the counters' own cost).
    """
    versions = peer_versions()
    result: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="anytimeify-profile-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            _export_onnx(base.eval(), x.contiguous(), path)
            node_module = onnx_node_modules(path)
        except Exception as exc:  # noqa: BLE001 -- reported
            return {name: {"error": "ONNX export failed: " + _short(exc)} for name in names}
        feed = x.contiguous().numpy()
        for name in names:
            if versions.get(name) is None:
                result[name] = {"error": "not installed (pip install 'anytimeify[bench]')"}
                continue
            try:
                if name == "onnxruntime":
                    runs = _profile_onnxruntime(path, feed, threads, reps, tmp)
                elif name == "openvino":
                    runs = _profile_openvino(path, feed, threads, reps)
                else:
                    raise ValueError(f"no per-stage profile for {name}")
            except Exception as exc:  # noqa: BLE001 -- reported
                result[name] = {"error": "profiling failed: " + _short(exc)}
                continue
            grouped = []
            for run in runs:
                stages: Dict[str, float] = {}
                for node, seconds in run:
                    key = _group(node, node_module, group_of)
                    stages[key] = stages.get(key, 0.0) + seconds
                grouped.append(stages)
            stages = _median_groups(grouped)
            result[name] = {"stages": stages, "profiled_s": sum(stages.values())}
    return result


def _profile_onnxruntime(path, feed, threads, reps, tmp) -> List[List[tuple]]:
    import json

    session = _ort_session(path, threads, profile_prefix=os.path.join(tmp, "ort"))
    name = session.get_inputs()[0].name
    for _ in range(reps + 1):  # the first run warms up and is dropped
        session.run(None, {name: feed})
    with open(session.end_profiling(), encoding="utf-8") as f:
        events = json.load(f)
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    runs: List[List[tuple]] = [[] for _ in windows]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        for i, (start, end) in enumerate(windows):
            if start <= e["ts"] <= end:
                runs[i].append((e["name"][: -len("_kernel_time")], e["dur"] / 1e6))
                break
    return runs[1:]


def _profile_openvino(path, feed, threads, reps) -> List[List[tuple]]:
    request = _ov_compiled(path, threads, perf_count=True).create_infer_request()
    request.infer({0: feed})  # warm-up
    runs = []
    for _ in range(reps):
        request.infer({0: feed})
        runs.append([(p.node_name, p.real_time.total_seconds()) for p in request.get_profiling_info()])
    return runs
