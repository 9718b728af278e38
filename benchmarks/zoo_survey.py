"""How much of the public model zoo converts: one model per timm family, every smp architecture.

For each timm architecture family (``timm.list_modules()``; the smallest variant of each, listed
in ``benchmarks/zoo_families.json``, random weights) two checks, and for each smp architecture
with five common encoders one:

* **segmenter**: ``TimmSegmenter(model)`` converted with ``exits="stages"`` at the backbone's
  native input size (timm's ``pretrained_cfg["input_size"]``); usable when it has at least one
  early exit, runs at that size, its last exit equals the base model exactly, ``anytime()``
  yields every exit, and under forced masks (confidence adaptivity) sparse execution equals
  dense execution (max difference relative to the largest logit <= 1e-4, or, where a deep
  network's float32 rounding exceeds that, sparse equals dense execution in float64 within 1e-6
  under the same masks, and sparse float32 is within 1e-3 of dense float64);
* **classifier**: the timm model converted with ``task="classification"`` at its native size;
  usable when it has at least one early exit, its last exit equals the model exactly, and
  ``anytime()`` and ``predict()`` run;
* **smp**: the smp model (``encoder_weights=None``) converted with ``exits="stages"`` at 256x256
  (a size every smp model takes), checked as a segmenter.

Prints one JSON object per check (model, ok, exits, seconds, and the error's first line where it
failed), then the counts. A full run (no ``--only``) with ``--write`` also keeps its lines in
``benchmarks/zoo_results.jsonl`` and regenerates the zoo tables of ``docs/model-table.md`` from
them (the block between its ``zoo-table`` markers); ``--docs`` regenerates them from that file
without running anything. ``tests/test_zoo_docs.py`` checks that the page is what the results
give, and the thorough ``tests/test_zoo_families.py`` that a fixed list of families still gives
the recorded results::

    HF_HUB_OFFLINE=1 python benchmarks/zoo_survey.py --write          # everything (about 15 min)
    HF_HUB_OFFLINE=1 python benchmarks/zoo_survey.py --only vit deit  # some timm families
    HF_HUB_OFFLINE=1 python benchmarks/zoo_survey.py --pick           # refresh zoo_families.json
    python benchmarks/zoo_survey.py --docs                            # the page from the results
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn

import anytimeify
from anytimeify import Confidence, MaskedConv2d
from anytimeify.bench import FixedMasks
from anytimeify.models import TimmSegmenter
from anytimeify.train.checkpointing import atomic_write

FAMILIES_FILE = Path(__file__).with_name("zoo_families.json")
RESULTS_FILE = Path(__file__).with_name("zoo_results.jsonl")
DOCS_FILE = Path(__file__).resolve().parents[1] / "docs" / "model-table.md"
BEGIN, END = "<!-- zoo-table:begin (benchmarks/zoo_survey.py --docs) -->", "<!-- zoo-table:end -->"
SMP_ARCHS = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet",
             "PAN", "UPerNet", "Segformer", "DPT")
SMP_ENCODERS = ("resnet18", "mobilenet_v2", "efficientnet-b0", "tu-convnext_atto", "mit_b0")
SMP_SIZE = (256, 256)
CLASSES = 3
TOLERANCE = 1e-4
#: sparse against dense execution, both in float64 (the interpolation's tap weights stay float32)
SEMANTIC_TOLERANCE = 1e-6
#: sparse execution in float32 against dense in float64, where float32 rounding exceeds TOLERANCE
FLOAT32_BOUND = 1e-3


def pick_families() -> Dict[str, str]:
    """The smallest model (fewest parameters, built on the meta device) of every timm module."""
    import timm

    picked = {}
    for module in timm.list_modules():
        best: Optional[Tuple[int, str]] = None
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # a model that needs arguments is not a family's default
                continue
            if best is None or params < best[0]:
                best = (params, name)
        if best is not None:
            picked[module] = best[1]
    return picked


def native_size(name: str) -> Tuple[int, int]:
    import timm

    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
    size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return int(size[-2]), int(size[-1])


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _max_relative(outs, refs) -> float:
    """Largest difference of exit logits, relative to the largest logit of the reference (at least 1)."""
    return max((o.logits.double() - r.logits.double()).abs().max().item()
               / max(1.0, r.logits.abs().max().item()) for o, r in zip(outs, refs))


def check_dense(net: nn.Module, size: Tuple[int, int], exits="stages", **convert_kwargs) -> dict:
    """The segmenter contract; returns the facts (raises on the first broken one)."""
    torch.manual_seed(0)
    model = anytimeify.convert(net, exits=exits, input_size=size, **convert_kwargs).eval()
    if model.num_exits < 2:
        raise AssertionError(f"no early exit ({model.num_exits} exit)")
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = model(x)
        streamed = list(model.anytime(x))
        reference = net(x)
    if len(streamed) != model.num_exits:
        raise AssertionError(f"anytime() yielded {len(streamed)} of {model.num_exits} exits")
    if not torch.equal(outs[-1], reference):
        raise AssertionError("last exit differs from the base model")
    skips = [0.2, 0.4, 0.6, 0.7, 0.8, 0.9][: model.num_exits - 1]
    masked = anytimeify.convert(net, exits=exits, input_size=size,
                                confidence=Confidence(criterion=FixedMasks(skips, seed=0, sigma=1.0),
                                                      execution="dense"), **convert_kwargs).eval()
    masked_convs = sum(isinstance(m, MaskedConv2d) for m in masked.modules())
    with torch.no_grad():
        dense = list(masked.anytime(x))
        masked.set_execution("sparse")
        sparse = list(masked.anytime(x))
    err = _max_relative(sparse, dense)
    if err > TOLERANCE:
        # a deep network's float32 rounding alone can exceed the fixed bound (and how far dense
        # float32 is from float64 depends on the kernels oneDNN picks): then sparse execution in
        # float64 (the same masks and algorithm without float32 rounding; the compiled kernels,
        # float32 only, are checked against PyTorch's ops by the kernel tests) must equal dense
        # float64, and sparse float32 stay within FLOAT32_BOUND of it
        masked.set_execution("dense")
        exact_model = copy.deepcopy(masked).double()
        with torch.no_grad():
            exact = list(exact_model.anytime(x.double()))
            exact_model.set_execution("sparse")
            sparse64 = list(exact_model.anytime(x.double()))
        semantic, sparse_err = _max_relative(sparse64, exact), _max_relative(sparse, exact)
        if semantic > SEMANTIC_TOLERANCE or sparse_err > FLOAT32_BOUND:
            raise AssertionError(f"sparse differs from dense execution by {err:.2e}; in float64 by "
                                 f"{semantic:.2e} (at most {SEMANTIC_TOLERANCE:g}), float32 sparse from float64 "
                                 f"dense by {sparse_err:.2e} (at most {FLOAT32_BOUND:g})")
    return {"exits": model.num_exits, "exit_names": [e["name"] for e in model.exit_info[:-1]],
            "masked_convs": masked_convs}


def check_classifier(net: nn.Module, size: Tuple[int, int]) -> dict:
    torch.manual_seed(0)
    model = anytimeify.convert(net, task="classification", input_size=size).eval()
    if model.num_exits < 2:
        raise AssertionError(f"no early exit ({model.num_exits} exit)")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = model(x)
        reference = net(x)
        streamed = list(model.anytime(x))
        model.predict(x, thresholds=[0.5] * (model.num_exits - 1))
    if len(streamed) != model.num_exits:
        raise AssertionError(f"anytime() yielded {len(streamed)} of {model.num_exits} exits")
    if not torch.equal(outs[-1], reference):
        raise AssertionError("last exit differs from the base model")
    return {"exits": model.num_exits, "exit_names": [e["name"] for e in model.exit_info[:-1]]}


def _run(kind: str, label: str, fn) -> dict:
    start = time.perf_counter()
    row = {"kind": kind, "model": label}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.update(fn())
        row["ok"] = True
    except Exception as err:  # every failure is a row of the survey
        row["ok"] = False
        row["error"] = _first_line(err)
        if os.environ.get("ZOO_TRACEBACK"):
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)
    return row


def survey_timm(families: Dict[str, str], kinds=("segmenter", "classifier")) -> List[dict]:
    import timm

    rows = []
    for family, name in families.items():
        size = native_size(name)
        label = f"{family}:{name}@{size[0]}x{size[1]}"
        if "segmenter" in kinds:
            rows.append(_run("segmenter", label, lambda: check_dense(
                TimmSegmenter(name, CLASSES, width=16).eval(), size)))
        if "classifier" in kinds:
            rows.append(_run("classifier", label, lambda: check_classifier(
                timm.create_model(name, pretrained=False, num_classes=CLASSES).eval(), size)))
    return rows


def survey_smp(archs=SMP_ARCHS, encoders=SMP_ENCODERS, unbuilt: Optional[List[dict]] = None) -> List[dict]:
    """The smp checks; combinations smp does not build go to ``unbuilt`` (not counted)."""
    import segmentation_models_pytorch as smp

    unbuilt = [] if unbuilt is None else unbuilt
    rows = []
    for arch in archs:
        for encoder in encoders:
            try:
                torch.manual_seed(0)
                net = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=CLASSES).eval()
            except Exception as err:  # a combination smp itself does not build is not counted
                row = {"kind": "smp", "model": f"{arch}:{encoder}", "built": False, "error": _first_line(err)}
                print(json.dumps(row), flush=True)
                unbuilt.append(row)
                continue
            rows.append(_run("smp", f"{arch}:{encoder}", lambda: check_dense(net, SMP_SIZE)))
    return rows


def summarize(rows: List[dict]) -> dict:
    """The counts per kind of check: usable, of, share and the models that failed."""
    summary = {}
    for kind in ("segmenter", "classifier", "smp"):
        done = [r for r in rows if r.get("kind") == kind and "ok" in r]
        if done:
            ok = sum(r["ok"] for r in done)
            summary[kind] = {"usable": ok, "of": len(done), "share": round(ok / len(done), 3),
                             "failed": [r["model"] for r in done if not r["ok"]]}
    return summary


def read_results(path: Path = RESULTS_FILE) -> Tuple[List[dict], dict]:
    """A results file's check rows and its last line (the summary and the package versions)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if "kind" in r], lines[-1]


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _cell(row: Optional[dict]) -> str:
    if row is None or not row.get("built", True):
        return "-"
    if row["ok"]:
        return f"{row['exits']} exits"  # the early exits and the last one
    error = row["error"].replace("|", "\\|").replace("\n", " ")
    return "fails: " + (error if len(error) <= 140 else error[:137] + "...")


def render_markdown(rows: List[dict], versions: str) -> str:
    """The zoo tables of docs/model-table.md: the counts, every timm family's two checks, every
    smp architecture x encoder (exits, or the error's first line)."""
    summary = summarize(rows)
    names = {"segmenter": "timm family as a segmenter", "classifier": "timm family as a classifier",
             "smp": "smp architecture x encoder (that smp builds)"}
    lines = [f"Counts ({versions}; `python benchmarks/zoo_survey.py --write`, about 15 minutes on 2 cores):", "",
             "| check | usable | of | share |", "|---|---|---|---|"]
    for kind, counts in summary.items():
        lines.append(f"| {names[kind]} | {counts['usable']} | {counts['of']} | {100 * counts['share']:.1f}% |")
    lines += ["", "Every timm family (its smallest model, at its native size; exits: the early exits and the last one):",
              "", "| family | model | segmenter | classifier |", "|---|---|---|---|"]
    timm_rows: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        if r["kind"] in ("segmenter", "classifier"):
            timm_rows.setdefault(r["model"], {})[r["kind"]] = r
    for label, checks in timm_rows.items():
        family, model = label.split(":", 1)
        lines.append(f"| {family} | `{model}` | {_cell(checks.get('segmenter'))} | {_cell(checks.get('classifier'))} |")
    smp_rows = [r for r in rows if r["kind"] == "smp"]
    if smp_rows:
        encoders = list(dict.fromkeys(r["model"].split(":", 1)[1] for r in smp_rows))
        by = {tuple(r["model"].split(":", 1)): r for r in smp_rows}
        archs = list(dict.fromkeys(r["model"].split(":", 1)[0] for r in smp_rows))
        lines += ["", f"smp models at {SMP_SIZE[0]}x{SMP_SIZE[1]} (\"-\": a combination smp itself does not build):", "",
                  "| architecture | " + " | ".join(f"`{e}`" for e in encoders) + " |",
                  "|---|" + "---|" * len(encoders)]
        for arch in archs:
            lines.append(f"| {arch} | " + " | ".join(_cell(by.get((arch, e))) for e in encoders) + " |")
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for dist in ("timm", "segmentation_models_pytorch", "torch"):
        try:
            found.append(f"{dist.replace('segmentation_models_pytorch', 'smp')} {md.version(dist).split('+')[0]}")
        except md.PackageNotFoundError:
            continue  # not installed: not named
    return ", ".join(found)


def write_docs(rows: List[dict], versions: str, path: Path = DOCS_FILE) -> None:
    """Replace the block between the markers of ``path`` with :func:`render_markdown` (atomically)."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no zoo-table markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    _write_text(path, head + BEGIN + "\n" + render_markdown(rows, versions) + END + tail)


def _write_results(rows: List[dict], versions: str, path: Path = RESULTS_FILE) -> None:
    lines = [json.dumps(r) for r in rows] + [json.dumps({"summary": summarize(rows), "versions": versions})]
    _write_text(path, "\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="timm families (or model names) to check")
    parser.add_argument("--kinds", default="segmenter,classifier,smp", help="comma-separated")
    parser.add_argument("--pick", action="store_true", help="rewrite zoo_families.json and stop")
    parser.add_argument("--write", action="store_true",
                        help="keep a full run's lines in zoo_results.jsonl and regenerate docs/model-table.md's tables")
    parser.add_argument("--docs", action="store_true",
                        help="regenerate docs/model-table.md's tables from zoo_results.jsonl and stop")
    args = parser.parse_args(argv)
    if args.docs:
        rows, last = read_results()
        write_docs(rows, last.get("versions", ""))
        print(f"{DOCS_FILE}: tables from {RESULTS_FILE}")
        return 0
    if args.write and args.only:
        parser.error("--write keeps a full run only: drop --only")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.pick:
        picked = pick_families()
        _write_text(FAMILIES_FILE, json.dumps(picked, indent=1) + "\n")
        print(f"{len(picked)} families -> {FAMILIES_FILE}")
        return 0
    families = json.loads(FAMILIES_FILE.read_text())
    if args.only:
        families = {f: n for f, n in families.items() if f in args.only or n in args.only}
    kinds = args.kinds.split(",")
    rows = survey_timm(families, [k for k in kinds if k in ("segmenter", "classifier")])
    unbuilt: List[dict] = []
    if "smp" in kinds and not args.only:
        rows += survey_smp(unbuilt=unbuilt)
    print(json.dumps({"summary": summarize(rows), "torch": torch.__version__}), flush=True)
    if args.write:
        versions = _versions()
        kept = [{k: v for k, v in r.items() if k != "seconds"} for r in rows + unbuilt]
        _write_results(kept, versions)
        write_docs(kept, versions)
        print(f"results -> {RESULTS_FILE}, tables -> {DOCS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
