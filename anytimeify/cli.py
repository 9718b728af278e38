"""The ``anytimeify`` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

__all__ = ["main"]

#: The built-in model names (``anytimeify.models.list_models()``, which imports torch: ``--help`` must not).
HRNET_NAMES = tuple(f"hrnet_{v}" for v in ("w18_small", "w18_small_v2", "w18", "w32", "w48"))
BUILTIN_MODELS = tuple(sorted(HRNET_NAMES + tuple(f"{n}_pose" for n in HRNET_NAMES)
                              + ("ranet_cifar10", "ranet_cifar100", "ranet_imagenet")))
#: what a built-in model takes, known without building it: HRNet's branches go down to 1/32
#: (``anytimeify.models.hrnet.HRNET_INPUT_DIVISOR``); RANet's classifiers are built for one size
HRNET_DIVISOR = 32
RANET_SIZES = {"ranet_cifar10": 32, "ranet_cifar100": 32, "ranet_imagenet": 224}
#: the files of a saved model folder (``anytimeify.saving.RECIPE_FILE`` and ``WEIGHTS_FILE``)
MODEL_FILES = ("anytimeify.json", "model.safetensors")


def parse_size(text: str) -> Tuple[int, int]:
    """``"1024x2048"`` -> ``(1024, 2048)``."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 512x1024), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


# -- checks done before anything is built: one line each, naming the value and what to do ----------------------


def check_spec(spec: str) -> None:
    """Refuse a model spec that is neither a built-in name, ``timm:NAME`` nor ``smp:ARCH:ENCODER``."""
    kind, _, rest = spec.partition(":")
    if (kind == "timm" and rest) or (kind == "smp" and rest.count(":") == 1) or spec in BUILTIN_MODELS:
        return
    raise ValueError(f"unknown model {spec!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), timm:NAME or "
                     "smp:ARCH:ENCODER")


def known_input(spec: str) -> Tuple[int, Optional[Tuple[int, int]]]:
    """``(divisor, fixed size)`` of the inputs a built-in model takes, known without building it;
    ``(1, None)`` (nothing known) for the others."""
    if spec.removesuffix("_pose") in HRNET_NAMES:
        return HRNET_DIVISOR, None
    if spec in RANET_SIZES:
        return 1, (RANET_SIZES[spec], RANET_SIZES[spec])
    return 1, None


def check_size(size: Sequence[int], divisor: int = 1, fixed: Optional[Sequence[int]] = None, *,
               option: str = "--input", model: str = "this model") -> None:
    """Refuse an ``HxW`` a model does not take, in the words of :meth:`AnytimeModel.check_input`,
    with the nearest size that works."""
    h, w = (int(v) for v in size)
    if fixed is not None and (h, w) != tuple(fixed):
        raise ValueError(f"{option} {h}x{w}: {model} takes {fixed[0]}x{fixed[1]} inputs only (its classifiers are "
                         f"built for that size); pass {option} {fixed[0]}x{fixed[1]}")
    d = max(1, int(divisor))
    if h % d or w % d:
        fix_h, fix_w = max(d, -(-h // d) * d), max(d, -(-w // d) * d)
        raise ValueError(f"{option} {h}x{w} is not supported: height and width must be positive multiples of {d} "
                         f"for {model} (its stages and exits halve the resolution down to 1/{d}); pass e.g. "
                         f"{option} {fix_h}x{fix_w}")


def check_model_size(net, size: Sequence[int], *, option: str = "--input", model: str = "this model") -> None:
    """:func:`check_size` with what a built network declares (``input_divisor``, ``fixed_input_size``)."""
    divisor = getattr(net, "input_divisor", None)
    fixed = getattr(net, "fixed_input_size", None)
    check_size(size, divisor if isinstance(divisor, int) and divisor > 0 else 1,
               tuple(fixed) if fixed is not None else None, option=option, model=model)


def check_file(path: str, what: str) -> None:
    """Refuse a file to read that does not exist or is a folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder; give a file")


def check_folder(path: str, what: str) -> None:
    """Refuse a folder to read that does not exist or is a file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a folder")


def check_model_dir(path: str) -> None:
    """Refuse a path that is not a saved model (a folder with ``anytimeify.json`` and ``model.safetensors``)."""
    saved = f"a saved model is a folder with {' and '.join(MODEL_FILES)} (anytimeify.save, anytimeify convert)"
    if not os.path.exists(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist; {saved}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"model folder {path!r} is a file; {saved}")
    for name in MODEL_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"model folder {path!r} has no {name}; {saved}")


def check_output(path: str, option: str, kind: str = "file", overwrite: Optional[bool] = None) -> None:
    """Refuse an output path that cannot be written, before any work is done for it.

    Args:
        path: the path given.
        option: the option that gave it (named in the message).
        kind: ``"file"`` (written whole, replacing one there), ``"new folder"`` (written whole:
            refused when it exists unless ``overwrite``) or ``"folder"`` (written into: an
            existing one is used).
        overwrite: for ``"new folder"``: whether an existing one may be replaced.
    """
    here = os.path.abspath(path)
    if os.path.lexists(here):
        if kind == "file" and os.path.isdir(here):
            raise IsADirectoryError(f"{option} {path!r} is a folder; give a file name")
        if kind != "file" and not os.path.isdir(here):
            raise NotADirectoryError(f"{option} {path!r} is a file, not a folder; choose another path")
        if kind == "new folder" and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite or choose another folder")
    # where the new entries go: the folder itself when it is written into, else the nearest existing parent
    where = here if kind == "folder" and os.path.isdir(here) else os.path.dirname(here)
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise NotADirectoryError(f"{option} {path!r}: {where!r} is a file, so nothing can be written inside it; "
                                 "choose another path")
    if not os.access(where, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path!r}: no permission to write in {where!r}; choose another path")


def check_at_least(value, low, option: str) -> None:
    """Refuse a number below ``low`` (None: not given)."""
    if value is not None and not value >= low:
        raise ValueError(f"{option} must be at least {low}, got {value}")


def check_positive(value, option: str) -> None:
    """Refuse a number that is not above 0 (None: not given)."""
    if value is not None and not value > 0:
        raise ValueError(f"{option} must be positive, got {value}")


def _check_base_args(args: argparse.Namespace) -> None:
    """The checks of the commands that build a base network from a spec: the spec, ``--checkpoint``,
    ``--num-classes``, ``--width`` and ``--input`` against what a built-in model takes."""
    check_spec(args.model)
    if getattr(args, "checkpoint", None):
        check_file(args.checkpoint, "--checkpoint")
    check_at_least(getattr(args, "num_classes", None), 1, "--num-classes")
    check_at_least(getattr(args, "width", None), 1, "--width")
    if getattr(args, "input", None) is not None:
        divisor, fixed = known_input(args.model)
        check_size(args.input, divisor, fixed, model=args.model)


def _need_module(name: str, extra: str) -> None:
    """Refuse, before any work, a command whose optional dependency is not installed."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ImportError(f"this needs {name}: pip install 'anytimeify[{extra}]'")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _emit(payload: dict, as_json: bool, output: Optional[str], table) -> None:
    text = json.dumps(payload, indent=2)
    if output:
        write_atomic(output, text + "\n")
    if as_json:
        print(text)
    else:
        from rich.console import Console

        Console().print(table)


def cmd_flops(args: argparse.Namespace) -> int:
    _check_base_args(args)
    if args.output:
        check_output(args.output, "--output")
    import torch

    import anytimeify

    net = base_from_args(args).eval()
    model = anytimeify.convert(net, head=args.head, width=args.width)
    model.check_input(torch.zeros(1, 3, *args.input))  # names the nearest size that works
    base = anytimeify.flops(net, args.input)
    report = anytimeify.flops(model, args.input, name=args.model)
    payload = {
        "model": args.model,
        "head": args.head,
        "input": report.input,
        "exits": [{"exit": e.exit, "gmacs": round(e.gmacs, 4), "paper_gflops": round(e.paper_gflops, 4)}
                  for e in report.exits],
        "base_paper_gflops": round(base.exits[-1].paper_gflops, 4),
        "params": report.params,
        "base_params": base.params,
    }
    from rich.table import Table

    table = Table(title=f"{args.model} ({args.head} exits) at {args.input[0]}x{args.input[1]}")
    for col in ("exit", "GMACs", "paper GFLOPs (MACs/2^30)"):
        table.add_column(col, justify="right")
    for e in payload["exits"]:
        table.add_row(str(e["exit"]), f'{e["gmacs"]:.2f}', f'{e["paper_gflops"]:.2f}')
    table.caption = (f'base model: {payload["base_paper_gflops"]:.2f} paper GFLOPs; '
                     f'params {payload["params"] / 1e6:.2f}M (base {payload["base_params"] / 1e6:.2f}M)')
    _emit(payload, args.json, args.output, table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    _check_base_args(args)
    import anytimeify

    net = base_from_args(args).eval()
    found = anytimeify.inspect(net, input_size=args.input, nodes=args.nodes)
    if args.json:
        print(json.dumps([{"name": c.name, "kind": c.kind, "shapes": c.shapes, "channels": c.channels,
                           "stride": c.stride, "picked": c.picked} for c in found], indent=2))
    else:
        print("  name                                     kind   stride  [C x H x W per tensor]   (* = exits='stages')")
        for c in found:
            print(c)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    _check_base_args(args)
    check_at_least(args.threads, 0, "--threads")
    import torch

    import anytimeify
    from anytimeify.models import create_model

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = create_model(args.model).eval()
    check_model_size(net, args.input, model=args.model)
    model = anytimeify.convert(net, head=args.head).eval()
    image = _demo_image(args.input, args.seed)
    from rich.console import Console
    from rich.table import Table

    console = Console(quiet=args.json)
    console.print(f"[bold]{args.model}[/] with {model.num_exits} exits ({args.head} heads), "
                  f"input {args.input[0]}x{args.input[1]}, {torch.get_num_threads()} threads")
    table = Table(title="anytime predictions, exit after exit")
    for col in ("exit", "logits", "cumulative GMACs", "paper GFLOPs", "elapsed s"):
        table.add_column(col, justify="right")
    rows = []
    with torch.no_grad():
        model(image)  # warm-up, so the timings are not first-call overhead
        for out in model.anytime(image):
            shape = "x".join(map(str, out.logits.shape[1:]))
            table.add_row(str(out.index), shape, f"{out.gmacs:.2f}", f"{out.paper_gflops:.2f}", f"{out.elapsed:.3f}")
            rows.append({"exit": out.index, "gmacs": out.gmacs, "paper_gflops": out.paper_gflops,
                         "elapsed_s": out.elapsed})
    if args.json:
        print(json.dumps({"model": args.model, "input": [1, 3, *args.input], "exits": rows}, indent=2))
    else:
        console.print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _check_base_args(args)
    check_at_least(args.reps, 1, "--reps")
    check_at_least(args.threads, 1, "--threads")
    if args.output:
        check_output(args.output, "--output")
    if args.layers:
        return _bench_layers(args)
    from anytimeify.bench import ca_speedup

    payload = ca_speedup(args.model, args.input, args.skip, reps=args.reps, threads=args.threads, seed=args.seed,
                         base=base_from_args(args), peers=args.peers)
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"{args.model} at {args.input[0]}x{args.input[1]}, skips {payload['skips']}, "
                        f"{args.threads} threads, median of {args.reps}")
    table.add_column("execution")
    table.add_column("seconds", justify="right")
    table.add_column("anytime speed-up", justify="right")
    rows = [("eager PyTorch", payload["eager_s"]), ("anytimeify dense", payload["dense_s"]),
            ("PyTorch dense (BN folded)", payload["dense_pytorch_s"])]
    rows += [(name, payload.get(f"{name}_s")) for name in payload["peers"]]
    for label, seconds in rows:
        error = payload["peers"].get(label, {}).get("error")
        if seconds is None:
            table.add_row(label, "-", error or "-")
        else:
            best = " (best dense)" if _runtime_label(payload["best_dense_runtime"]) == label else ""
            table.add_row(label + best, f"{seconds:.3f}", f"{seconds / payload['anytime_s']:.2f}x")
    table.add_row("anytime, CA, every exit", f"{payload['anytime_s']:.3f}", "")
    from rich.text import Text

    verdict = Text(f"{payload['machine']['cpu']}: the anytime model (every exit) against the best dense execution "
                   f"({_runtime_label(payload['best_dense_runtime'])}): speed-up {payload['speedup_vs_best_dense']:.2f}x "
                   f"for a FLOP speed-up of {payload['flops_speedup']:.2f}x, realisation "
                   f"{payload['realisation_vs_best_dense']:.2f}")
    summary = Table()
    summary.add_column("exit", justify="right")
    summary.add_column("time to reach it / best dense", justify="right")
    summary.add_column("its FLOP share", justify="right")
    for e in payload["exits"]:
        summary.add_row(str(e["exit"]), f"{e['fraction_of_best_dense']:.2f}", f"{e['flop_share']:.2f}")
    _emit(payload, args.json, args.output, Group(table, verdict, summary))
    return 0


def _bench_layers(args: argparse.Namespace) -> int:
    """``bench --layers``: per stage, the anytime model against the same stage in each dense runtime."""
    from anytimeify.bench import stage_profile
    from rich.table import Table

    peers = [p for p in args.peers if p != "torch_compile"]  # inductor has no per-node profile to map
    payload = stage_profile(args.model, args.input, args.skip, threads=args.threads, seed=args.seed,
                            reps=args.reps, peers=peers, base=base_from_args(args))
    table = Table(title=f"{args.model} at {args.input[0]}x{args.input[1]}, {payload['machine']['cpu']}, "
                        f"{args.threads} threads: seconds per stage (median of {args.reps})",
                  caption="anytime / best: the anytime stage's time over the fastest runtime's; a masked stage "
                          "should come in near its kept fraction. Runtimes' times are from their profilers.")
    table.add_column("stage")
    table.add_column("keep", justify="right")
    table.add_column("anytime (CA)", justify="right")
    ok = [p for p, info in payload["peers"].items() if "error" not in info]
    for peer in ok:
        table.add_column(peer, justify="right")
    table.add_column("anytime / best", justify="right")
    for row in payload["stages"]:
        ratio = row["anytime_over_best"]
        table.add_row(row["stage"], f"{row['keep']:.2f}", f"{row['anytime_s']:.4f}",
                      *[f"{row[f'{p}_s']:.4f}" for p in ok], "-" if ratio is None else f"{ratio:.2f}")
    table.add_row("total", "", f"{payload['anytime_total_s']:.4f}",
                  *[f"{payload['peers'][p]['profiled_s']:.4f}" for p in ok], "")
    failed = [f"{peer}: {info['error']}" for peer, info in payload["peers"].items() if "error" in info]
    if failed:
        table.caption += " Not profiled: " + "; ".join(failed)
    _emit(payload, args.json, args.output, table)
    return 0


def _runtime_label(runtime: str) -> str:
    return {"anytimeify_dense": "anytimeify dense", "pytorch_dense": "PyTorch dense (BN folded)"}.get(runtime, runtime)


def cmd_tune(args: argparse.Namespace) -> int:
    _check_base_args(args)
    check_at_least(args.threads, 0, "--threads")
    if args.output:
        check_output(args.output, "--output")
    import torch

    import anytimeify
    from anytimeify.bench import FixedMasks, PAPER_SKIPS, fold_for_inference
    from anytimeify.masking import tune

    if args.threads:
        torch.set_num_threads(args.threads)
    net = base_from_args(args).eval()
    skips = args.skip or PAPER_SKIPS
    # the frozen anytime model (its masked convs) and the dense model the benchmarks compare with:
    # every conv shape the engine decides for at this input size
    model = anytimeify.convert(net, head=args.head, confidence=anytimeify.Confidence(
        criterion=FixedMasks(skips[:3]))).eval().freeze()
    model.check_input(torch.zeros(1, 3, *args.input))
    # one call: a layer shape both models have is measured once, with every candidate either needs
    report = tune.tune([model, fold_for_inference(net)], args.input, force=args.force)
    payload = {"model": args.model, "input": [1, 3, *args.input], "machine": report.machine,
               "cache": report.cache, "seconds": round(report.seconds, 2),
               "measured": report.measured, "layers": report.layers}
    from rich.table import Table

    keeps = [str(k) for k in tune.TUNE_KEEPS]
    table = Table(title=f"{args.model} at {args.input[0]}x{args.input[1]} on {payload['machine'].get('cpu')} "
                        f"({payload['machine'].get('kernel_isa')} kernels, {torch.get_num_threads()} threads)")
    for col in ["layer shape", "dense"] + [f"keep {k}" for k in keeps]:
        table.add_column(col)
    for row in payload["layers"]:
        masked = row["masked"] or {}
        table.add_row(row["shape"], row["dense"], *[masked.get(k, "") for k in keeps])
    table.caption = (f"{payload['measured']} layer shapes measured in {payload['seconds']:.1f} s "
                     f"(the rest were cached); cache: {payload['cache']}")
    _emit(payload, args.json, args.output, table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.minutes is not None:
        raise ValueError(f"--minutes {args.minutes:g}: the demo no longer trains for a time but a fixed number of "
                         "steps, so that its result does not depend on the machine's load; use --steps N (default 450)")
    check_at_least(args.threads, 0, "--threads")
    if args.steps is not None:
        check_at_least(args.steps, 2, "--steps")
    check_output(args.out, "--out", "folder")
    from anytimeify.demo import run_demo

    run_demo(out=args.out, steps=args.steps, seed=args.seed, threads=args.threads, retrain=args.retrain,
             as_json=args.json, minutes=args.minutes)
    return 0


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo", help="train an anytime HRNet on handwritten-digit scenes (CPU, 450 steps) and show its exits")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps of 16 scenes (default 450, the second half with confidence adaptivity); "
                           "a loaded machine trains the same steps, only later")
    demo.add_argument("--minutes", type=float, default=None, help=argparse.SUPPRESS)  # removed: run_demo says so
    demo.add_argument("--out", default="anytimeify-demo", help="output folder (default ./anytimeify-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--retrain", action="store_true", help="train again even if --out holds a trained model")
    demo.add_argument("--json", action="store_true",
                      help="print the result as one JSON object on the last line (no table)")
    demo.set_defaults(func=cmd_demo)


def _check_run_args(args: argparse.Namespace) -> None:
    """The checks shared by train and eval: the config, --data-root, --set and --pretrained."""
    check_file(args.config, "config file")
    if args.data_root is not None:
        check_folder(args.data_root, "--data-root")
    for item in args.set or []:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE (e.g. --set optim.lr=0.02)")
    if getattr(args, "pretrained", None):
        check_file(args.pretrained, "--pretrained")


def cmd_train(args: argparse.Namespace) -> int:
    _check_run_args(args)
    if args.resume is not None and args.resume != "auto":
        check_file(args.resume, "--resume")
    check_positive(args.max_minutes, "--max-minutes")
    if args.out:
        check_output(args.out, "--out", "folder")
    from anytimeify.train import load_config, run

    cfg = load_config(args.config, _overrides(args), data_root=args.data_root)
    check_output(cfg.out, "--out" if args.out else "the config's out", "folder")
    result = run(cfg, resume=args.resume, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.evaluations[-1].to_dict() if result.evaluations else None
        summary = {"out": cfg.out, "steps": result.steps, "epochs": result.epochs,
                   "seconds": round(result.seconds, 2), "stopped_early": result.stopped_early, "eval": last}
        if args.json:
            print(json.dumps(summary))
        else:
            from rich.console import Console

            Console().print(f"trained {result.steps} steps in {result.seconds:.0f} s; weights "
                            f"{os.path.join(cfg.out, 'model.safetensors')}, log {os.path.join(cfg.out, 'log.jsonl')}")
            if result.evaluations:
                Console().print(_eval_table([result.evaluations[-1]], "validation after training"))
    return 0


def _overrides(args: argparse.Namespace) -> List[str]:
    """``--set`` values, then what the named options set (JSON strings are valid YAML); ``--data-root``
    goes to :func:`load_config`."""
    overrides = list(args.set or [])
    if getattr(args, "pretrained", None):
        overrides.append(f"model.backbone={json.dumps(args.pretrained)}")
    if getattr(args, "out", None):
        overrides.append(f"out={json.dumps(args.out)}")
    return overrides


def _add_train(sub) -> None:
    tr = sub.add_parser("train", help="train an anytime model from a YAML config (also under torchrun)")
    tr.add_argument("config", help="YAML config (see examples/configs/)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=0.02 (repeatable)")
    tr.add_argument("--resume", metavar="PATH", help="continue from a training checkpoint, or 'auto' (the newest "
                                                     "in <out>/checkpoints)")
    tr.add_argument("--out", help="run folder (overrides the config's out)")
    tr.add_argument("--data-root", metavar="PATH", help="the data set's folder (sets data.train.root and data.val.root)")
    tr.add_argument("--pretrained", metavar="PATH", help="a local ImageNet checkpoint of the backbone "
                                                         "(sets model.backbone)")
    tr.add_argument("--max-minutes", type=float, default=None,
                    help="stop after this many minutes with a checkpoint (resume later)")
    tr.add_argument("--json", action="store_true", help="print a JSON summary")
    tr.set_defaults(func=cmd_train)


#: the metric a results table shows when an evaluation gives many (MPII's PCKh per joint group)
HEADLINE_METRICS = ("miou", "pckh", "pck", "accuracy")


def _eval_table(reports, title: str):
    """Per exit: the metrics, paper GFLOPs, skipped share and time of each report, side by side
    (short headers, so that an evaluation with and without CA fits in 80 columns)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    first = reports[0]
    keys = [k for k, v in first.exits[0].metrics.items() if isinstance(v, float)]
    notes = ["GFLOPs: paper GFLOPs (MACs/2^30)", "ms: per image"]
    if len(keys) > 3:  # too many to show side by side: the headline one, the rest in the JSON
        headline = next((k for k in HEADLINE_METRICS if k in keys), keys[0])
        notes.append(f"more metrics with --json ({', '.join(k for k in keys if k != headline)})")
        keys = [headline]
    if any(r.confidence for r in reports):
        notes += ["CA: with confidence adaptivity", "skip: share of positions skipped after the exit"]

    def column(header: str, ca: bool = False) -> None:
        table.add_column(f"{header}\nCA" if ca else header, justify="right", no_wrap=True)

    column("exit")
    for report in reports:
        for key in keys:
            column(key, report.confidence)
        column("GFLOPs", report.confidence)
        if report.confidence:
            column("skip")
        column("ms", report.confidence)
    for i in range(len(first.exits)):
        row = [str(i + 1)]
        for report in reports:
            e = report.exits[i]
            row += [f"{e.metrics[k]:.2f}" for k in keys]
            row.append(f"{e.paper_gflops:.3f}")
            if report.confidence:
                row.append(f"{e.skipped:.2f}" if i < len(first.exits) - 1 else "")
            row.append(f"{1000 * e.seconds:.1f}")
        table.add_row(*row)
    table.caption = "; ".join(notes)
    return table


def cmd_eval(args: argparse.Namespace) -> int:
    _check_run_args(args)
    check_file(args.checkpoint, "--checkpoint")
    check_at_least(args.batch_size, 1, "--batch-size")
    check_at_least(args.max_images, 1, "--max-images")
    check_at_least(args.threads, 0, "--threads")
    if args.output:
        check_output(args.output, "--output")
    import torch

    from anytimeify.train import cleanup, init_distributed, load_config

    cfg = load_config(args.config, _overrides(args), data_root=args.data_root)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed(cfg.device)  # under torchrun each process evaluates its share
    try:
        return _evaluate_checkpoint(args, cfg, dist)
    finally:
        cleanup(dist)


def _evaluate_checkpoint(args: argparse.Namespace, cfg, dist) -> int:
    from anytimeify.train import build_metric, exit_table, num_outputs
    from anytimeify.train import evaluate as evaluate_model
    from anytimeify.train.builders import build_model, build_val_dataset, flip_pairs_of
    from anytimeify.train.checkpointing import load_weights

    val_set = build_val_dataset(cfg)  # the data's errors before the model is built
    if val_set is None:
        raise ValueError(f"{args.config} has no data.val; add one (or --set data.val.name=...)")
    model = build_model(cfg).to(dist.device)
    if args.reference:
        from anytimeify.checkpoint import load_reference_checkpoint

        load_reference_checkpoint(model, args.checkpoint)
    else:
        try:
            load_weights(model, args.checkpoint)
        except ValueError as err:  # CheckpointMismatch and unreadable training states
            raise ValueError(f"{err} (A checkpoint of the ADP-C reference implementation loads with "
                             "--reference.)") from err
    model.eval()
    metric = build_metric(cfg, num_outputs(model))
    if metric is None:
        raise ValueError("task 'custom' has no built-in metric; evaluate with anytimeify.train.evaluate and your own")
    settings = [True, False] if model.confidence is not None and not args.no_confidence else [False]
    reports = [evaluate_model(model, val_set, metric, confidence=ca, batch_size=args.batch_size,
                              max_images=args.max_images, channels_last=cfg.channels_last, dist=dist,
                              flip_pairs=flip_pairs_of(cfg, val_set)) for ca in settings]
    if not dist.is_main:
        return 0
    payload = {"config": args.config, "checkpoint": args.checkpoint, "reference": bool(args.reference),
               "images": reports[0].images, "confidence": reports[0].confidence,
               "exits": exit_table(reports[0]), "reports": [r.to_dict() for r in reports]}
    title = f"{cfg.model.name}: {reports[0].images} images of {cfg.data.val['name']}"
    _emit(payload, args.json, args.output, _eval_table(reports, title))
    return 0


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="per-exit metrics, GFLOPs and time of a trained checkpoint")
    ev.add_argument("config", help="the run's YAML config or a recipe (its data.val is evaluated)")
    ev.add_argument("--checkpoint", required=True, help="model.safetensors or a training checkpoint (.pt); with "
                                                        "--reference, a checkpoint of the ADP-C reference code")
    ev.add_argument("--reference", action="store_true",
                    help="the checkpoint is the ADP-C reference implementation's (e.g. a released .pth); its keys "
                         "are mapped by anytimeify.checkpoint.load_reference_checkpoint")
    ev.add_argument("--data-root", metavar="PATH", help="the data set's folder (sets data.train.root and data.val.root)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    ev.add_argument("--no-confidence", action="store_true", help="only evaluate with every position computed")
    ev.add_argument("--batch-size", type=int, default=1, help="images per pass (default 1: per-image times)")
    ev.add_argument("--max-images", type=int, default=None)
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table: 'exits' lists each exit's "
                                                        "metric (miou or pckh) and paper_gflops")
    ev.add_argument("--output", help="also write the JSON to this file")
    ev.set_defaults(func=cmd_eval)


def parse_skips(text: str) -> List[float]:
    """``"0.193,0.384,0.630"`` -> ``[0.193, 0.384, 0.63]``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"skip fractions must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"skip fractions must lie in [0, 1], got {text!r}")
    return values


#: the dense runtimes ``bench`` can time (:data:`anytimeify.peers.PEERS`; kept here so that ``--help`` imports no torch)
PEER_NAMES = ("onnxruntime", "openvino", "torch_compile")


def parse_peers(text: str) -> List[str]:
    """``"onnxruntime,openvino"`` -> ``["onnxruntime", "openvino"]``; ``"none"`` -> ``[]``."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in PEER_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown dense runtime(s) {unknown or [text]}: give a comma-separated "
                                         f"list of {', '.join(PEER_NAMES)}, or 'none'")
    return list(dict.fromkeys(names))


def _demo_image(size: Tuple[int, int], seed: int):
    """A generated street-like test image: smooth colour regions and edges, normalised like ImageNet."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.rand(1, 3, max(2, h // 64), max(2, w // 64), generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="nearest")
    image = image + 0.05 * torch.randn(1, 3, h, w, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image.clamp(0, 1) - mean) / std


def build_base(spec: str, num_classes: Optional[int] = None):
    """A base network from a model spec: a built-in name (``anytimeify.models.list_models()``),
    ``timm:NAME`` (random weights) or ``smp:ARCH:ENCODER`` (segmentation-models-pytorch, random
    encoder weights)."""
    from anytimeify.models import create_model, list_models

    kind, _, rest = spec.partition(":")
    if kind == "timm" and rest:
        import timm

        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        try:
            return timm.create_model(rest, pretrained=False, **kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ValueError(f"model {spec!r}: {err}") from None
    if kind == "smp" and rest.count(":") == 1:
        import segmentation_models_pytorch as smp

        arch, encoder = rest.split(":")
        factory = next((getattr(smp, n) for n in dir(smp) if n.lower() == arch.lower()), None)
        if factory is None or not isinstance(factory, type):
            raise ValueError(f"model {spec!r}: segmentation-models-pytorch has no architecture {arch!r}")
        return factory(encoder_name=encoder, encoder_weights=None, classes=num_classes or 1)
    if spec in list_models():
        return create_model(spec, num_classes)
    raise ValueError(f"unknown model {spec!r}: give a built-in name ({', '.join(list_models())}), timm:NAME or "
                     "smp:ARCH:ENCODER")


def base_from_args(args: argparse.Namespace):
    """``args.model`` built by :func:`build_base`, with ``args.checkpoint``'s weights when given."""
    net = build_base(args.model, getattr(args, "num_classes", None))
    if getattr(args, "input", None) is not None:  # what the built network declares (a timm backbone's stride)
        check_model_size(net, args.input, model=args.model)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        from anytimeify.checkpoint import read_state_dict
        from anytimeify.train.checkpointing import check_state_dict

        state = read_state_dict(checkpoint)
        check_state_dict(net, state, checkpoint)  # names missing, unexpected and wrongly shaped tensors
        net.load_state_dict(state)
    return net


def cmd_export(args: argparse.Namespace) -> int:
    check_model_dir(args.model_dir)
    check_at_least(args.batch, 1, "--batch")
    check_output(args.out, "--out", "new folder", overwrite=args.overwrite)  # before the export, which takes a while
    if args.onnx:
        _need_module("onnx", "onnx")
        _need_module("onnxscript", "onnx")
    import torch

    import anytimeify
    from anytimeify.exporting import export

    size = args.input
    model = anytimeify.load(args.model_dir, trust_code=args.trust_code)
    check_model_size(model, size, model=f"the model in {args.model_dir}")
    example = torch.zeros(args.batch, model.in_channels, *size)
    result = export(model, example, segments=not args.no_segments, forward=not args.no_forward,
                    dynamic_batch=args.dynamic_batch)
    written = []
    if args.onnx:
        written = [str(p) for p in result.to_onnx(args.out, overwrite=args.overwrite)]
    else:
        result.save(args.out, overwrite=args.overwrite)
        written = [str(os.path.join(args.out, name)) for name in
                   ([result.manifest()["forward"]] if result.forward is not None else [])
                   + [s["file"] for s in result.manifest()["segments"]]]
    payload = {"out": str(args.out), "files": written, "input": list(example.shape),
               "dynamic_batch": args.dynamic_batch, "format": "onnx" if args.onnx else "torch.export"}
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"exported {len(written)} programs for input {'x'.join(map(str, example.shape))} to {args.out}")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    import time

    from anytimeify._machine import cpu_model
    from anytimeify.masking import _ext

    if os.environ.get("ANYTIMEIFY_NO_EXT", "") not in ("", "0"):
        raise ValueError("ANYTIMEIFY_NO_EXT is set: the compiled kernels are disabled; unset it to build them")
    logging.getLogger("anytimeify.masking._ext").setLevel(logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    module = _ext.load()
    seconds = time.perf_counter() - start
    if module is None:
        raise RuntimeError("the compiled kernels could not be built (the warning above says why); anytimeify runs "
                           "on its PyTorch path, which computes the same results more slowly")
    isa = dict(module.isa())
    payload = {"module": module.__file__, "flags": _ext.build_flags(), "cpu": cpu_model(), "seconds": round(seconds, 1),
               "isa": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in isa.items()}}
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"compiled kernels ready ({payload['seconds']} s): {payload['module']}\n"
              f"  flags {' '.join(payload['flags'])} on {payload['cpu']}")
    return 0


def _trusted_name(text: str) -> str:
    """``--trust-code``: a ``package.module:callable`` name."""
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 'package.module:callable' name")
    return text


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="torch.export (or ONNX) programs of forward and of each segment, for serving")
    ex.add_argument("model_dir", help="a model saved by anytimeify.save / anytimeify convert")
    ex.add_argument("--out", required=True, help="directory to write (programs + export.json)")
    ex.add_argument("--input", type=parse_size, required=True, help="image size HxW to export for")
    ex.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1, at least 1)")
    ex.add_argument("--dynamic-batch", action="store_true", help="accept any batch size")
    ex.add_argument("--onnx", action="store_true", help="write ONNX files (needs: pip install 'anytimeify[onnx]')")
    ex.add_argument("--no-forward", action="store_true", help="only the segments")
    ex.add_argument("--no-segments", action="store_true", help="only forward")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.add_argument("--trust-code", action="append", default=[], metavar="MODULE:CALLABLE", type=_trusted_name,
                    help="a 'package.module:callable' the saved model may import and call (its own network's factory); only for folders whose author you trust (repeatable; see anytimeify.load's trust_code)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)


def cmd_convert(args: argparse.Namespace) -> int:
    if args.input is None:  # the probe size: the one a model takes, if it takes one size only
        fixed = known_input(args.model)[1]
        args.input = fixed if fixed is not None else (256, 256)
    _check_base_args(args)
    check_output(args.out, "--out", "new folder", overwrite=args.overwrite)
    import anytimeify

    net = base_from_args(args)
    if isinstance(net, anytimeify.AnytimeModel):
        model = net
    else:
        confidence = None if args.threshold is None else anytimeify.Confidence(threshold=args.threshold,
                                                                                criterion=args.criterion)
        model = anytimeify.convert(net, head=args.head, width=args.width, confidence=confidence, task=args.task,
                                   input_size=args.input)
    model.eval()
    if args.profile:
        model.profile_latency(args.input)
    if args.freeze:
        model = model.freeze()
    path = anytimeify.save(model, args.out, overwrite=args.overwrite)
    payload = {"out": str(path), "model": args.model, "exits": model.num_exits, "frozen": model.frozen,
               "parameters": sum(p.numel() for p in model.parameters()), "latency_profile": model.latency_profile}
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"saved {args.model} with {model.num_exits} exits to {path} (anytimeify.load({str(path)!r}))")
    return 0


def _add_convert(sub) -> None:
    cv = sub.add_parser("convert", help="convert a model and save it (safetensors + JSON; anytimeify.load reads it)")
    cv.add_argument("model", help="a built-in name, timm:NAME or smp:ARCH:ENCODER")
    cv.add_argument("--out", required=True, help="directory to write")
    cv.add_argument("--num-classes", type=int, default=None)
    cv.add_argument("--checkpoint", help="weights of the base network (a local .pth/.safetensors file)")
    cv.add_argument("--task", default="dense", choices=["dense", "classification"])
    cv.add_argument("--head", default="redesigned", choices=["redesigned", "original"])
    cv.add_argument("--width", type=int, default=None, help="redesigned exit width (default: the model's)")
    cv.add_argument("--threshold", type=float, default=None,
                    help="add confidence adaptivity with this threshold (e.g. 0.998)")
    cv.add_argument("--criterion", default="max_prob", choices=["max_prob", "entropy", "heatmap"])
    cv.add_argument("--input", type=parse_size, default=None,
                    help="probe input HxW (default 256x256, or the one size a model takes)")
    cv.add_argument("--profile", action="store_true", help="also measure the per-segment latency at --input on "
                                                           "this machine (for anytime(deadline=...))")
    cv.add_argument("--freeze", action="store_true", help="save the frozen (inference) model")
    cv.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cv.add_argument("--json", action="store_true")
    cv.set_defaults(func=cmd_convert)


def _input_image(picture, size: Optional[Tuple[int, int]], divisor: int):
    """An image (``read_image``'s uint8 tensor) as the network input (ImageNet-normalised) and as
    shown ([0, 1])."""
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    from anytimeify.data import IMAGENET_MEAN, IMAGENET_STD

    picture = picture.float()[None] / 255.0
    h, w = picture.shape[-2:]
    if size is None:  # the largest multiple of the divisor that fits
        size = (max(divisor, h // divisor * divisor), max(divisor, w // divisor * divisor))
    if tuple(size) != (h, w):
        picture = F.interpolate(picture, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return TF.normalize(picture, IMAGENET_MEAN, IMAGENET_STD), picture[0].clamp(0, 1)


def _check_figure_out(path: str) -> None:
    """The figure file: writable, in a format matplotlib writes (which needs matplotlib)."""
    check_output(path, "--out")
    _need_module("matplotlib", "plot")
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"--out {path!r}: matplotlib writes no .{suffix} files; end the name with one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def cmd_visualize(args: argparse.Namespace) -> int:
    check_model_dir(args.model_dir)
    check_file(args.image, "image")
    _check_figure_out(args.out)
    import anytimeify
    from anytimeify.data import read_image
    from anytimeify.visualize import progression_figure, save_figure

    picture = read_image(args.image)  # an unreadable image before the model is built
    model = anytimeify.load(args.model_dir, trust_code=args.trust_code)
    if args.size is not None:
        check_model_size(model, args.size, option="--size", model=f"the model in {args.model_dir}")
    if args.threshold is not None and model.confidence is None:
        raise ValueError(f"--threshold: the model in {args.model_dir} has no confidence adaptivity")
    x, shown = _input_image(picture, args.size, model.input_divisor)
    if args.threshold is not None:
        model.confidence.threshold = args.threshold
    fig = progression_figure(model, x, display=shown, title=args.title)
    path = save_figure(fig, args.out)
    print(json.dumps({"out": str(path)}) if args.json else f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    for path in args.results:
        check_file(path, "results file")
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.results):
        raise ValueError(f"--labels gives {len(labels)} labels for {len(args.results)} results files; give one per "
                         "file, comma-separated")
    _check_figure_out(args.out)
    from anytimeify.visualize import curves_figure, save_figure

    fig = curves_figure(args.results, labels=labels, metric=args.metric, title=args.title)
    path = save_figure(fig, args.out)
    print(json.dumps({"out": str(path)}) if args.json else f"wrote {path}")
    return 0


def _add_pictures(sub) -> None:
    vi = sub.add_parser("visualize", help="the anytime progression of one image: per exit, prediction, confidence "
                                          "and the computed/skipped mask (needs matplotlib)")
    vi.add_argument("model_dir", help="a model saved by anytimeify.save / anytimeify convert")
    vi.add_argument("image", help="a PNG or JPEG image")
    vi.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")
    vi.add_argument("--size", type=parse_size, default=None, help="resize the image to HxW (default: the largest "
                                                                  "multiple of the model's input divisor)")
    vi.add_argument("--threshold", type=float, default=None, help="override the confidence threshold")
    vi.add_argument("--title", default=None)
    vi.add_argument("--trust-code", action="append", default=[], metavar="MODULE:CALLABLE", type=_trusted_name,
                    help="a 'package.module:callable' the saved model may import and call (its own network's factory); only for folders whose author you trust (repeatable; see anytimeify.load's trust_code)")
    vi.add_argument("--json", action="store_true")
    vi.set_defaults(func=cmd_visualize)
    pl = sub.add_parser("plot", help="metric against GFLOPs per exit from evaluation JSONs (needs matplotlib)")
    pl.add_argument("results", nargs="+", help="anytimeify eval --json (or --output) files, runs' metrics.json or "
                                               "the demo's result.json (its curves with and without CA)")
    pl.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")
    pl.add_argument("--labels", default=None, help="comma-separated legend labels, one per file")
    pl.add_argument("--metric", default=None, help="per-exit key to plot (default: miou, pckh or accuracy)")
    pl.add_argument("--title", default=None)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (imports no torch: ``--help`` and ``--version`` answer at once)."""
    parser = argparse.ArgumentParser(prog="anytimeify", description="Anytime dense prediction (ADP-C) tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    from anytimeify import __version__

    parser.add_argument("--version", action="version", version=f"anytimeify {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_demo(sub)
    _add_convert(sub)
    _add_export(sub)
    _add_pictures(sub)
    kb = sub.add_parser("build-kernels", help="build (or find in the cache) the compiled CPU kernels now, instead of "
                                              "at first use; the cache: $ANYTIMEIFY_EXT_DIR, else torch's")
    kb.add_argument("--json", action="store_true")
    kb.set_defaults(func=cmd_kernels)
    _add_train(sub)
    _add_eval(sub)

    stream = sub.add_parser("stream", help="convert a built-in model (random weights) and stream exit after exit "
                                           "on a generated image")
    stream.add_argument("--model", default="hrnet_w18_small_v2", choices=BUILTIN_MODELS)
    stream.add_argument("--head", default="redesigned", choices=["redesigned", "original"])
    stream.add_argument("--input", type=parse_size, default=(512, 1024), help="HxW (default 512x1024)")
    stream.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stream.set_defaults(func=cmd_stream)

    fl = sub.add_parser("flops", help="per-exit cumulative FLOPs (fvcore), GMACs and paper GFLOPs")
    fl.add_argument("model", help="a built-in name, timm:NAME or smp:ARCH:ENCODER")
    fl.add_argument("--checkpoint", help="weights of the base network (a local .pth/.safetensors file)")
    fl.add_argument("--head", default="redesigned", choices=["redesigned", "original"])
    fl.add_argument("--width", type=int, default=None, help="redesigned exit width (default: 128 W48, 64 others)")
    fl.add_argument("--input", type=parse_size, default=(1024, 2048), help="HxW (default 1024x2048)")
    fl.add_argument("--num-classes", type=int, default=None)
    fl.add_argument("--json", action="store_true", help="print JSON")
    fl.add_argument("--output", help="also write the JSON to this file")
    fl.set_defaults(func=cmd_flops)

    be = sub.add_parser("bench", help="speed of confidence adaptivity (sparse) against the dense model")
    be.add_argument("model", help="a built-in name, timm:NAME or smp:ARCH:ENCODER")
    be.add_argument("--checkpoint", help="weights of the base network (a local .pth/.safetensors file)")
    be.add_argument("--skip", type=parse_skips, default=[0.193, 0.384, 0.630],
                    help="fraction of pixels skipped after each early exit (default: the paper's averages)")
    be.add_argument("--input", type=parse_size, default=(1024, 2048), help="HxW (default 1024x2048)")
    be.add_argument("--reps", type=int, default=5, help="timed runs per model, the median is reported (default 5)")
    be.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    be.add_argument("--num-classes", type=int, default=None)
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--layers", action="store_true",
                    help="per stage: the anytime model's time against the same stage in ONNX Runtime and OpenVINO "
                         "(their profilers), to see where the speed-up is lost")
    be.add_argument("--peers", type=parse_peers, default=list(PEER_NAMES),
                    help="dense runtimes timed beside the anytime model, comma-separated, or 'none' "
                         "(default: onnxruntime,openvino,torch_compile; those not installed are reported as such)")
    be.add_argument("--json", action="store_true")
    be.add_argument("--output", help="also write the JSON to this file")
    be.set_defaults(func=cmd_bench)

    tu = sub.add_parser("tune", help="measure the engine's kernel choices for a model's layers on this machine "
                                     "(cached; otherwise done at first use)")
    tu.add_argument("model", help="a built-in name, timm:NAME or smp:ARCH:ENCODER")
    tu.add_argument("--checkpoint", help="weights of the base network (a local .pth/.safetensors file)")
    tu.add_argument("--input", type=parse_size, default=(1024, 2048), help="HxW (default 1024x2048)")
    tu.add_argument("--head", default="redesigned", choices=["redesigned", "original"])
    tu.add_argument("--num-classes", type=int, default=None)
    tu.add_argument("--skip", type=parse_skips, default=None,
                    help="skip fractions of the masks the model runs while its shapes are collected")
    tu.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice); the "
                                                          "measurements are cached per thread count")
    tu.add_argument("--force", action="store_true", help="measure again what the cache holds")
    tu.add_argument("--json", action="store_true")
    tu.add_argument("--output", help="also write the JSON to this file")
    tu.set_defaults(func=cmd_tune)

    ins = sub.add_parser("inspect", help="list the stage boundaries exits can attach to")
    ins.add_argument("model", help="a built-in name, timm:NAME or smp:ARCH:ENCODER")
    ins.add_argument("--checkpoint", help="weights of the base network (a local .pth/.safetensors file)")
    ins.add_argument("--input", type=parse_size, default=(256, 256))
    ins.add_argument("--num-classes", type=int, default=None)
    ins.add_argument("--nodes", action="store_true", help="also list every tensor node")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError, ImportError) as err:
        print(f"anytimeify {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
