"""Speed of confidence adaptivity against the dense model, measured side by side.

Three executions of one image, repeated interleaved, medians reported:

* ``eager_s``: the base model in PyTorch eager, as users run it;
* ``dense_s``: the base model in its best dense execution here (:func:`fold_for_inference`: BN
  folded into the convs, channels-last activations, HRNet's fuse layers in one pass each, every
  conv run by the engine's fastest dense kernel with a ReLU that only reads it fused): what
  confidence adaptivity is measured against;
* ``dense_pytorch_s``: the same without the engine's conv kernels (PyTorch's convs and ReLUs),
  for comparison;
* ``anytime_s``: the converted model, frozen the same way (:meth:`AnytimeModel.freeze`), running
  every exit with confidence adaptivity in sparse execution, index building included.

Masks are fixed, spatially clustered (a Gaussian-smoothed random field thresholded to the skip
fraction of each exit, nested across exits), so runs are comparable across versions and the
paper's average skip fractions can be imposed.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._machine import machine_info
from .peers import PEERS, prepare_peers

__all__ = ["clustered_field", "FixedMasks", "fold_for_inference", "ca_speedup", "profile_ops", "layer_profile",
           "stage_profile",
           "PAPER_SKIPS", "tune_for", "machine_info"]

#: average fraction of pixels skipped after exits 1, 2, 3 on Cityscapes (REFERENCE.md §5)
PAPER_SKIPS = (0.193, 0.384, 0.630)
"""The paper's average fractions of pixels skipped after exits 1, 2 and 3 (Cityscapes, W48 ADP-C)."""


def clustered_field(size: Tuple[int, int], seed: int = 0, sigma: float = 4.0) -> torch.Tensor:
    """A smooth random field ``(1, 1, h, w)``: white noise blurred by a Gaussian of ``sigma`` pixels."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 1, *size, generator=g)
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    field = F.conv2d(F.pad(noise, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return field


class FixedMasks:
    """A confidence criterion that imposes nested clustered masks with given skip fractions.

    After exit ``k`` the ``skips[k]`` fraction of positions with the highest field values is
    confident; since the fractions grow, the confident sets are nested, as with copy aggregation.
    Pass it as ``Confidence(criterion=FixedMasks(...))``; ``anytimeify bench`` uses it so that
    runs are comparable whatever the weights.

    Args:
        skips: the fraction of positions skipped after each early exit, non-decreasing, in [0, 1].
        seed: seed of the random field the masks are cut from.
        sigma: blur of the field, pixels: larger values make larger clusters.

    Raises:
        ValueError: fractions outside [0, 1] or decreasing.
    """

    def __init__(self, skips: Sequence[float], seed: int = 0, sigma: float = 4.0):
        if any(not 0.0 <= s <= 1.0 for s in skips) or list(skips) != sorted(skips):
            raise ValueError(f"skip fractions must be non-decreasing values in [0, 1], got {list(skips)}")
        self.skips = list(skips)
        self.seed = seed
        self.sigma = sigma
        self._fields: Dict[Tuple[int, int], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, exit_index: int) -> torch.Tensor:
        size = tuple(logits.shape[-2:])
        field = self._fields.get(size)
        if field is None:
            field = self._fields[size] = clustered_field(size, self.seed, self.sigma)
        flat = field.flatten()
        n_skip = int(round(self.skips[exit_index] * flat.numel()))
        computed = torch.ones_like(flat, dtype=torch.bool)
        if n_skip:
            computed[flat.topk(n_skip).indices] = False
        return computed.view(1, 1, *size).expand(logits.shape[0], 1, *size).to(logits.device)


def fold_for_inference(model: nn.Module, engine_convs: bool = True) -> nn.Module:
    """The base model as the engine runs it densely: every BN folded into its conv (torch.fx), the
    sums of upsampled branches (HRNet's fuse layers) in one pass each, every conv run by the
    engine's fastest dense kernel for its shape (:class:`~anytimeify.masking.conv.EngineConv2d`)
    with a residual addition and a ReLU that only read it applied as its output is written (into
    the residual's memory where nothing reads the residual afterwards), channels-last memory format.

    These are the rewrites :meth:`~anytimeify.AnytimeModel.freeze` applies to the unmasked parts of
    an anytime model, so the dense baseline gets them too. With ``engine_convs=False`` the convs
    (and the ReLUs after them) stay PyTorch's.
    """
    from torch.fx.experimental.optimization import fuse

    from ._fx.fold import fuse_residuals, fuse_sums, mark_dead_residuals, use_engine_convs

    folded = fuse(model.eval())
    rewritten = 0
    if engine_convs:
        use_engine_convs(folded, graph=folded.graph)  # ReLUs that only read a conv become its activation
        rewritten += fuse_residuals(folded, folded.graph)  # and residual additions move into the convs
    rewritten += fuse_sums(folded, folded.graph)
    if engine_convs:
        mark_dead_residuals(folded, folded.graph)  # after the rewrites that move nodes
    if rewritten:
        folded.recompile()
    return folded.to(memory_format=torch.channels_last)


def _seconds_without_measuring(fn) -> float:
    """Seconds ``fn()`` takes, less any first-use kernel measuring inside it
    (:func:`anytimeify.masking.tune.measuring_seconds`; the benchmarks tune ahead, this is the guard)."""
    from .masking.tune import measuring_seconds

    measured = measuring_seconds()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start - (measuring_seconds() - measured)


def ca_speedup(name: str, size: Tuple[int, int] = (1024, 2048), skips: Sequence[float] = PAPER_SKIPS,
               reps: int = 5, threads: int = 2, seed: int = 0, base: Optional[nn.Module] = None,
               peers: Sequence[str] = PEERS) -> dict:
    """Measure eager, folded-dense, the dense runtimes users deploy (``peers``, see
    :mod:`anytimeify.peers`) and anytime-with-CA latency of a built-in model (see module doc), or of
    ``base`` (any network ``convert`` takes; ``name`` then only labels it).

    Every execution runs once per repetition, in turn, so that load affects them alike; medians are
    reported. ``best_dense_s`` is the fastest dense execution measured (the engine's, PyTorch's
    folded one or a peer's), ``best_dense_runtime`` names it, and ``speedup_vs_best_dense`` /
    ``realisation_vs_best_dense`` compare the anytime model (every exit) with it. Per exit,
    ``fraction_of_best_dense`` is the time to reach the exit over ``best_dense_s``, next to the
    exit's share of the base model's FLOPs. A peer that is not installed or fails is listed under
    ``peers`` with its ``error``.
    """
    import anytimeify

    base, dense, model, x_cl = _frozen_pair(name, size, skips, threads, seed, base)
    if model.num_exits - 1 != len(skips):
        raise ValueError(f"{name} has {model.num_exits - 1} early exits; give that many skip fractions, got {list(skips)}")
    tuned = tune_for(size, model, dense)
    dense_pytorch = fold_for_inference(base, engine_convs=False)
    x = x_cl.contiguous()  # the eager model as users run it: NCHW
    with torch.no_grad():
        ref = base(x)
        for folded in (dense, dense_pytorch):
            err = (folded(x_cl) - ref).abs().max().item() / max(1.0, ref.abs().max().item())
            if err > 1e-3:
                raise RuntimeError(f"BN folding changed {name}'s output by {err:.2e} (relative); not comparable")
    prepared = prepare_peers(base, x, threads, peers, reference=ref) if peers else []
    runs = {"eager": lambda: base(x), "dense": lambda: dense(x_cl), "dense_pytorch": lambda: dense_pytorch(x_cl)}
    for peer in prepared:
        if peer.ok:
            runs[peer.name] = (lambda run: lambda: run(x))(peer.run)
    exit_times: List[List[float]] = []

    def anytime() -> None:
        exit_times.append([o.elapsed for o in model.anytime(x_cl)])

    runs["anytime"] = anytime
    with torch.no_grad():
        outs = list(model.anytime(x_cl))  # warm-up, and the counts
        for key, run in runs.items():
            if key != "anytime":
                run()  # warm-up of every execution (oneDNN primitives, ORT/OpenVINO first-run allocations)
        base_paper = anytimeify.flops(base, x).exits[-1].paper_gflops
        times = _interleaved(runs, reps)
    med = {key: statistics.median(t) for key, t in times.items()}
    eager_s, dense_s, dense_pytorch_s, anytime_s = med["eager"], med["dense"], med["dense_pytorch"], med["anytime"]
    anytime_paper = outs[-1].paper_macs / 2 ** 30
    flops_speedup = base_paper / anytime_paper
    speedup = dense_s / anytime_s
    candidates = {"anytimeify_dense": dense_s, "pytorch_dense": dense_pytorch_s,
                  **{p.name: med[p.name] for p in prepared if p.ok}}
    best_runtime = min(candidates, key=candidates.get)
    best_s = candidates[best_runtime]
    per_exit = [statistics.median(t[i] for t in exit_times) for i in range(len(outs))]
    result = {
        "model": name,
        "machine": machine_info(),
        "tuned_layer_shapes": tuned,
        "input": [1, 3, *size],
        "threads": threads,
        "reps": reps,
        "skips": [round(o.skipped, 4) for o in outs[:-1]],
        "eager_s": round(eager_s, 4),
        "dense_s": round(dense_s, 4),
        "dense_pytorch_s": round(dense_pytorch_s, 4),
    }
    for peer in prepared:
        result[f"{peer.name}_s"] = round(med[peer.name], 4) if peer.ok else None
    result.update({
        "peers": {peer.name: peer.summary() for peer in prepared},
        "anytime_s": round(anytime_s, 4),
        "best_dense_s": round(best_s, 4),
        "best_dense_runtime": best_runtime,
        "base_paper_gflops": round(base_paper, 2),
        "anytime_paper_gflops": [round(o.paper_macs / 2 ** 30, 2) for o in outs],
        "flops_speedup": round(flops_speedup, 4),
        "speedup": round(speedup, 4),
        "speedup_vs_eager": round(eager_s / anytime_s, 4),
        "speedup_vs_pytorch_dense": round(dense_pytorch_s / anytime_s, 4),
        "realisation": round(speedup / flops_speedup, 4),
        "speedup_vs_best_dense": round(best_s / anytime_s, 4),
        "realisation_vs_best_dense": round(best_s / anytime_s / flops_speedup, 4),
        "dense_vs_best_dense": round(dense_s / best_s, 4),
        "exits": [{"exit": o.index, "elapsed_s": round(t, 4), "fraction_of_best_dense": round(t / best_s, 4),
                   "flop_share": round(o.paper_macs / 2 ** 30 / base_paper, 4)}
                  for o, t in zip(outs, per_exit)],
    })
    return result


#: seconds between two timed runs, so that the worker threads of the run before (OpenMP's, ONNX
#: Runtime's and OpenVINO's thread pools spin for a while after their work) are asleep again
SETTLE_S = 0.02


def _interleaved(runs: Dict[str, "callable"], reps: int) -> Dict[str, List[float]]:
    """``reps`` rounds, each running every entry of ``runs`` once in turn: seconds per entry, first-use
    kernel measuring left out, :data:`SETTLE_S` between runs (not timed)."""
    times: Dict[str, List[float]] = {key: [] for key in runs}
    for _ in range(reps):
        for key, run in runs.items():
            time.sleep(SETTLE_S)
            times[key].append(_seconds_without_measuring(run))
    return times


def tune_for(size: Tuple[int, int], *models: nn.Module) -> int:
    """Measure the engine's kernel choices for ``models`` at ``size`` on this machine before they
    are timed (cached; see :mod:`anytimeify.masking.tune`), so no timed run measures a layer. Returns
    how many layer shapes the cache holds for them (0 with tuning off or no compiled kernels)."""
    from .masking import _ext, tune

    if tune.tune_mode() == "off" or not _ext.available():
        return 0
    return len(tune.tune(list(models), size).layers)


def _frozen_pair(name: str, size: Tuple[int, int], skips: Sequence[float], threads: int,
                 seed: int, base: Optional[nn.Module] = None) -> Tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    """The eager base model, its BN-folded dense form, the frozen anytime model with fixed CA masks
    (BN folded as in the dense reference), and a channels-last input."""
    import anytimeify
    from anytimeify.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base = (create_model(name) if base is None else base).eval()
    model = anytimeify.convert(base, confidence=anytimeify.Confidence(criterion=FixedMasks(skips, seed=seed),
                                                                      execution="sparse")).eval().freeze()
    x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last)
    return base, fold_for_inference(base), model, x


def profile_ops(name: str, size: Tuple[int, int] = (1024, 2048), skips: Sequence[float] = PAPER_SKIPS,
                threads: int = 2, seed: int = 0, top: int = 12) -> dict:
    """Where the time goes: self CPU time per operator (torch.profiler), dense vs anytime with CA.

    Operators of the engine's Python code show up under the aten ops they call; the compiled
    kernels under ``anytimeify::<kernel>`` labels (``implicit_conv``, ``masked_output``,
    ``halo_stencil``, ``add_residual``, ``fuse_branches``, ...). ``wall_s`` is the median
    wall-clock time of 3 runs without the profiler, ``outside_ops_s`` that time less the
    operators' summed self time: the Python between the operators (module calls, the engine's
    dispatch, the MAC ledger) and whatever else runs outside them (freeing large tensors),
    ``outside_ops_share`` its share of the wall-clock time.
    """
    from torch.profiler import ProfilerActivity, profile

    from .masking.tune import measuring_seconds

    _, dense, model, x = _frozen_pair(name, size, skips, threads, seed)
    tune_for(size, model, dense)
    result = {}
    with torch.no_grad():
        for label, fn in (("dense", lambda: dense(x)), ("anytime", lambda: list(model.anytime(x)))):
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) / 1e6
            walls = []
            for _ in range(3):
                measured = measuring_seconds()
                start = time.perf_counter()
                fn()
                walls.append(time.perf_counter() - start - (measuring_seconds() - measured))
            wall = statistics.median(walls)
            result[label] = {
                "total_s": round(total, 3), "wall_s": round(wall, 3),
                "outside_ops_s": round(max(0.0, wall - total), 4),
                "outside_ops_share": round(max(0.0, wall - total) / wall, 3),
                "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count,
                             "share": round(e.self_cpu_time_total / 1e6 / total, 3)} for e in events[:top]],
            }
    return {"model": name, "machine": machine_info(), "input": [1, 3, *size], "threads": threads, **result}


#: the top-level modules of HRNet's stem, reported as one stage
STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2")


def _group_of(name: str) -> str:
    """The stage a module belongs to, from its path (``stage4.2.branches.0...`` -> ``stage4``,
    ``exits.0...`` -> ``exit1``, HRNet's ``conv1`` ... ``act2`` -> ``stem``)."""
    head = name.split(".")[0]
    if head == "exits":
        return "exit" + str(int(name.split(".")[1]) + 1)
    return "stem" if head in STEM else head


def layer_profile(name: str, size: Tuple[int, int] = (1024, 2048), skips: Sequence[float] = PAPER_SKIPS,
                  threads: int = 2, seed: int = 0, reps: int = 3) -> dict:
    """Where the time goes, per stage: every conv of the dense model and of the anytime model with CA.

    Each conv call is timed by forward hooks (CPU ops are synchronous); a masked conv's time
    includes its whole output pass (fill, halo interpolation, shift, ReLU, residual). Calls are
    summed per stage (``conv1``, ``layer1``, ``transition2``, ``stage3``, ``exit1``, ``last_layer``,
    ...), medians over ``reps`` runs, with the mean kept fraction of the stage's masked convs and
    the strategies the engine chose. The rest of each model's time (additions, resizing, masks)
    is reported as ``other_s``.
    """
    from anytimeify.masking.conv import MaskedConv2d
    from anytimeify.masking.tune import measuring_seconds

    _, dense, model, x = _frozen_pair(name, size, skips, threads, seed)
    tune_for(size, model, dense)

    def timed(module: nn.Module, run) -> Tuple[List[Dict[str, float]], List[float], Dict[str, dict]]:
        starts: Dict[int, float] = {}
        current: Dict[str, float] = {}
        info: Dict[str, dict] = {}
        handles = []
        for path, sub in module.named_modules():
            if not isinstance(sub, nn.Conv2d):
                continue
            group = _group_of(path)

            def pre(m, args, key=id(sub)):
                starts[key] = (time.perf_counter(), measuring_seconds())

            def post(m, args, out, key=id(sub), group=group):
                start, measured = starts[key]
                spent = time.perf_counter() - start - (measuring_seconds() - measured)  # first-use measuring left out
                current[group] = current.get(group, 0.0) + spent
                if isinstance(m, MaskedConv2d) and len(args) > 1 and args[1] is not None:
                    entry = info.setdefault(group, {"keep": [], "strategies": set()})
                    plan = args[2] if len(args) > 2 else None
                    entry["keep"].append(plan.density if plan is not None else float(args[1].float().mean()))
                    entry["strategies"].add(m.chosen_strategy(args[0].shape, args[1], plan))
            handles += [sub.register_forward_pre_hook(pre), sub.register_forward_hook(post)]
        runs, totals = [], []
        try:
            run()  # warm-up
            info.clear()
            for _ in range(reps):
                current.clear()
                totals.append(_seconds_without_measuring(run))
                runs.append(dict(current))
        finally:
            for h in handles:
                h.remove()
        return runs, totals, info

    with torch.no_grad():
        dense_runs, dense_totals, _ = timed(dense, lambda: dense(x))
        any_runs, any_totals, info = timed(model, lambda: list(model.anytime(x)))
    groups = list(dict.fromkeys(list(dense_runs[0]) + list(any_runs[0])))
    rows = []
    for group in groups:
        d = statistics.median(r.get(group, 0.0) for r in dense_runs)
        a = statistics.median(r.get(group, 0.0) for r in any_runs)
        entry = info.get(group)
        rows.append({"stage": group, "dense_s": round(d, 4), "anytime_s": round(a, 4),
                     "keep": round(statistics.mean(entry["keep"]), 3) if entry else 1.0,
                     "strategies": sorted(entry["strategies"]) if entry else ["plain"]})
    dense_total, any_total = statistics.median(dense_totals), statistics.median(any_totals)
    return {
        "model": name, "machine": machine_info(), "input": [1, 3, *size], "threads": threads, "reps": reps,
        "dense_total_s": round(dense_total, 4), "anytime_total_s": round(any_total, 4),
        "convs": rows,
        "dense_other_s": round(dense_total - sum(r["dense_s"] for r in rows), 4),
        "anytime_other_s": round(any_total - sum(r["anytime_s"] for r in rows), 4),
    }


def stage_profile(name: str, size: Tuple[int, int] = (1024, 2048), skips: Sequence[float] = PAPER_SKIPS,
                  threads: int = 2, seed: int = 0, reps: int = 3, peers: Sequence[str] = ("onnxruntime", "openvino"),
                  base: Optional[nn.Module] = None) -> dict:
    """Where realisation is lost, per stage: the anytime model with CA against the same stage of the
    dense model in each dense runtime of ``peers`` (their own profilers, see
    :func:`anytimeify.peers.profile_stages`).

    The anytime model's stages are timed whole: forward pre-hooks on its leaf modules mark a
    timeline, and the time from one leaf module to the next goes to the first one's stage (so a
    stage's fuse layers, residuals and interpolations count with it); exits and mask decisions are
    stages of their own, the time before the first module is ``other``. Each row gives the stage's mean kept fraction (1.0 where unmasked),
    seconds in the anytime model and in each runtime, and ``anytime_over_best``: the anytime
    stage's time over the fastest runtime's time for it (a masked stage should come in near its
    kept fraction, an unmasked one at 1.0 or below). Medians over ``reps`` runs.
    """
    from anytimeify.masking.conv import MaskedConv2d
    from anytimeify.masking.tune import measuring_seconds

    base, dense, model, x = _frozen_pair(name, size, skips, threads, seed, base)
    tune_for(size, model, dense)
    # a timeline of the run: every leaf module marks the start of its stage's time (the frozen
    # model's segments call leaf modules and functions, such as the fuse layers, in order, so time
    # up to the next leaf module belongs to the stage of the last one)
    keeps: Dict[str, List[float]] = {}
    events: List[Tuple[float, float, str]] = []
    handles = []
    for path, sub in model.named_modules():
        if next(sub.children(), None) is not None:
            continue
        group = "masks" if path.startswith("mask_deciders") else _group_of(path)
        handles.append(sub.register_forward_pre_hook(
            lambda m, args, group=group: events.append((time.perf_counter(), measuring_seconds(), group))))
        if isinstance(sub, MaskedConv2d):
            handles.append(sub.register_forward_hook(lambda m, args, out, group=group: keeps.setdefault(group, []).append(
                args[2].density if len(args) > 2 and args[2] is not None else
                (float(args[1].float().mean()) if len(args) > 1 and args[1] is not None else 1.0))))

    def run_once() -> None:
        events.append((time.perf_counter(), measuring_seconds(), "other"))
        list(model.anytime(x))
        events.append((time.perf_counter(), measuring_seconds(), "other"))

    runs, totals = [], []
    try:
        with torch.no_grad():
            run_once()  # warm-up
            for _ in range(reps):
                events.clear()
                keeps.clear()
                run_once()
                current: Dict[str, float] = {}
                for (t0, m0, group), (t1, m1, _) in zip(events, events[1:]):
                    current[group] = current.get(group, 0.0) + (t1 - t0) - (m1 - m0)
                totals.append(sum(current.values()))
                runs.append(current)
    finally:
        for h in handles:
            h.remove()
    from .peers import profile_stages

    peer_profiles = profile_stages(base, x.contiguous(), threads, _group_of, peers, reps) if peers else {}
    groups = list(dict.fromkeys([g for r in runs for g in r]
                                + [g for p in peer_profiles.values() for g in p.get("stages", {})]))
    rows = []
    for group in groups:
        row = {"stage": group, "keep": round(statistics.mean(keeps[group]), 3) if group in keeps else 1.0,
               "anytime_s": round(statistics.median(r.get(group, 0.0) for r in runs), 4)}
        times = {}
        for peer, prof in peer_profiles.items():
            if "stages" in prof:
                row[f"{peer}_s"] = times[peer] = round(prof["stages"].get(group, 0.0), 4)
        best = min(times.values()) if times else 0.0
        row["anytime_over_best"] = round(row["anytime_s"] / best, 3) if best > 0 else None
        rows.append(row)
    any_total = statistics.median(totals)
    return {
        "model": name, "machine": machine_info(), "input": [1, 3, *size], "threads": threads, "reps": reps,
        "skips": list(skips), "anytime_total_s": round(any_total, 4),
        "peers": {peer: ({"profiled_s": round(p["profiled_s"], 4)} if "stages" in p else {"error": p["error"]})
                  for peer, p in peer_profiles.items()},
        "stages": rows,
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(ca_speedup("hrnet_w18_small_v2", (512, 1024), reps=3), indent=2))
