"""``anytimeify demo``: train an anytime HRNet on real handwritten digits on the CPU, then show it.

The demo is the whole method end to end, in a few minutes on two cores:

1. data: scikit-learn's handwritten digits composed into scenes on textured backgrounds
   (:class:`~anytimeify.data.DigitScenes`; 11 classes): 64x64 crops with 2-4 digits for training,
   512x512 pages with 20-32 digits for evaluation (the network is fully convolutional); a quarter
   of the digit instances is held out and only ever used for evaluation;
2. model: HRNet-W18-Small-v2 converted with redesigned exits and confidence adaptivity;
3. training: every exit at once with :class:`~anytimeify.train.Trainer` for a fixed number of
   steps (``--steps``, default 450), confidence adaptivity switched on for the second half (the
   paper's "trained in" CA). The amount of work is fixed, so the result does not depend on the
   machine's load: the first steps are timed, and where the projected time is far beyond a quiet
   machine's the demo says so and trains the same steps, only later. A training whose loss did not
   fall (:attr:`DemoSettings.max_loss_ratio`) is not kept as the demo's model;
4. evaluation on held-out scenes, one image at a time on the frozen model (batch norms folded):
   per exit the mIoU without and with confidence adaptivity, the paper's GFLOPs, the skipped
   fraction and the wall-clock time to reach the exit (with confidence adaptivity in the engine's
   sparse execution, which really skips the confident positions; one-off kernel measuring is
   never inside a time);
5. outputs in ``--out``: ``model.safetensors`` + ``demo.json`` (the training's settings and figures,
   reused by a second run with the same settings), ``anytime-model/`` (the model saved by
   :func:`anytimeify.save`, for ``anytimeify visualize``), ``page.png`` (a held-out page to try it
   on), ``result.json``, ``progression.png`` and the training log ``log.jsonl``. A training that
   failed the loss check leaves its weights, log and ``demo.json`` in ``failed-training/`` only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["run_demo", "DemoSettings", "demo_config"]

#: the clock the demo times its training with (tests put a slow one in its place)
_clock = time.perf_counter

#: where :attr:`DemoSettings.reference_step_seconds` was measured (the README's run: 457 steps of the
#: default recipe in 196 s, 0.43 s each)
REFERENCE_MACHINE = "AMD EPYC Zen 3, 2 threads"


@dataclass(frozen=True)
class DemoSettings:
    """The demo's recipe (``demo.json`` records the training part; a second run reuses a model
    trained with the same settings)."""

    model: str = "hrnet_w18_small_v2"
    scene: int = 64                 # scenes are scene x scene pixels
    digits: tuple = (2, 4)          # digits per scene
    digit_size: tuple = (20, 36)    # side of a pasted digit
    batch_size: int = 16
    lr: float = 2e-3                # Adam, poly decay
    threshold: float = 0.99         # max-prob confidence threshold (the paper: 0.998, see docs/training.md)
    background_weight: float = 0.5  # class weight of the background in the cross-entropy
    steps: int = 450                # optimiser steps (the second half with confidence adaptivity)
    val_scenes: int = 100           # held-out scenes evaluated (mIoU, GFLOPs, skipped)
    timed_scenes: int = 30          # of those, the first ones timed without and with CA, interleaved
    val_seed: int = 12345           # the held-out scenes are the same for every --seed
    # the held-out scenes are larger than the training crops (the network is fully convolutional):
    # a whole image with digits here and there, where most positions are background, which is what
    # confidence adaptivity saves time on
    eval_scene: int = 512           # held-out scenes are eval_scene x eval_scene pixels
    eval_digits: tuple = (20, 32)   # digits per held-out scene
    # how the run is watched (none of these changes the model)
    probe_steps: int = 4            # the first steps, timed to project the training's time
    reference_step_seconds: float = 0.43  # seconds per step of this recipe on REFERENCE_MACHINE, quiet
    slow_factor: float = 3.0        # a projected time above this many times the reference's gets a warning
    # a usable training ends with a loss (mean of its last tenth of steps) below this fraction of
    # its first steps' loss
    max_loss_ratio: float = 0.5


#: settings that only change the evaluation: a model trained with other values of these is reused
EVAL_ONLY = ("val_scenes", "val_seed", "timed_scenes", "eval_scene", "eval_digits")
#: settings that only change how the training is watched and judged (not recorded in demo.json; the
#: loss check is made again with the current max_loss_ratio when a model is reused)
WATCH_ONLY = ("probe_steps", "reference_step_seconds", "slow_factor", "max_loss_ratio")


#: the recipe ``anytimeify demo`` runs
DEFAULT_SETTINGS = DemoSettings()


def demo_config(settings: DemoSettings, out: str, seed: int, iterations: int, threads: int = 0):
    """The :class:`~anytimeify.train.TrainConfig` of the demo for a run of ``iterations`` steps.

    The training set is sized so that the run is two epochs; confidence adaptivity starts with
    the second (``confidence.start_epoch = 1``).
    """
    from .train import config_from_dict

    scenes = max(settings.batch_size, (iterations * settings.batch_size + 1) // 2)
    classes = 11
    return config_from_dict({
        "task": "segmentation",
        "seed": seed,
        "out": out,
        "device": "cpu",
        "threads": threads,
        "progress": "auto",
        "log_every": 5,
        "model": {"name": settings.model, "num_classes": classes, "head": "redesigned"},
        "confidence": {"enabled": True, "threshold": settings.threshold, "start_epoch": 1},
        "data": {
            "train": {"name": "digits", "length": scenes, "size": [settings.scene, settings.scene],
                      "digits": list(settings.digits), "digit_size": list(settings.digit_size), "seed": seed,
                      "transforms": {"scale": None, "flip": False}},
            "val": {"name": "digits", "length": settings.val_scenes, "size": [settings.eval_scene, settings.eval_scene],
                    "digits": list(settings.eval_digits), "digit_size": list(settings.digit_size),
                    "seed": settings.val_seed, "transforms": {}},
            "batch_size": settings.batch_size, "workers": 0, "val_batch_size": 1,
        },
        "loss": {"class_weights": [settings.background_weight] + [1.0] * (classes - 1)},
        "optim": {"name": "adam", "lr": settings.lr, "weight_decay": 1e-4},
        "schedule": {"name": "poly", "power": 0.9, "iterations": iterations},
        "checkpoint": {"every": 0, "keep": 1, "at_end": False},  # the weights are what the demo keeps
        "eval": {"every_epochs": 0, "every": 0},
    }, source="demo")


def _build_engine_in_background() -> threading.Thread:
    """Compile the sparse engine's kernels while training runs (training does not use them).

    The build is a compiler subprocess; evaluation, which needs it, waits for this thread.
    """
    from .masking import _ext

    thread = threading.Thread(target=_ext.load, name="anytimeify-kernel-build", daemon=True)
    thread.start()
    return thread


def _interleaved_seconds(model: nn.Module, dataset, count: int) -> Dict[bool, List[float]]:
    """Mean seconds to reach each exit without and with confidence adaptivity, over the first
    ``count`` images one at a time; the two runs of an image follow each other (in alternating
    order), so that both see the same state of the machine. Kernel measuring at first use (which
    the warm-up before this leaves none of) would not be counted."""
    from .masking.tune import measuring_seconds

    totals = {False: [0.0] * model.num_exits, True: [0.0] * model.num_exits}
    with torch.no_grad():
        for index in range(count):
            image = dataset[index][0][None].contiguous(memory_format=torch.channels_last)
            for ca in ((False, True) if index % 2 == 0 else (True, False)):
                model.set_confidence(ca)
                measured = measuring_seconds()
                for out in model.anytime(image):
                    totals[ca][out.index - 1] += out.elapsed - (measuring_seconds() - measured)
    return {ca: [t / max(1, count) for t in times] for ca, times in totals.items()}


def _loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _duration(seconds: float) -> str:
    """``3 min 14 s``, ``2 h 5 min``, ``45 s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return round(value, 5) if value is not None and math.isfinite(value) else None


def _loss_text(value: Optional[float]) -> str:
    return "nothing" if value is None else f"{value:.4g}"


def _loss_is_sane(initial: Optional[float], final: Optional[float], settings: DemoSettings) -> bool:
    """A usable training: finite losses, the last ones below ``max_loss_ratio`` of the first ones."""
    return (initial is not None and final is not None and math.isfinite(initial) and math.isfinite(final)
            and initial > 0 and final <= settings.max_loss_ratio * initial)


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    from .train.checkpointing import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=2) + "\n")

    atomic_write(path, write)


def _recorded_settings(settings: DemoSettings, seed: int) -> Dict[str, Any]:
    """What ``demo.json`` records of a training: its settings and seed."""
    return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
                         if k not in EVAL_ONLY + WATCH_ONLY}, "seed": seed}


def _reusable(out: str, wanted: Dict[str, Any], settings: DemoSettings, console) -> Optional[Dict[str, Any]]:
    """The record of the model in ``out`` if it is a completed, sane training of ``wanted``; else
    None (saying why, where there is a model)."""
    record_path, weights_path = os.path.join(out, "demo.json"), os.path.join(out, "model.safetensors")
    if not (os.path.isfile(record_path) and os.path.isfile(weights_path)):
        return None
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        console.print(f"[yellow]{record_path} is unreadable: training again[/]")
        return None
    if {k: record.get(k) for k in wanted} != wanted:
        console.print(f"[yellow]{out} holds a model trained with other settings: training again[/]")
        return None
    training = record.get("training") if isinstance(record.get("training"), dict) else {}
    if record.get("completed") is not True or training.get("steps") != settings.steps:
        console.print(f"[yellow]{out} holds a model whose training did not complete {settings.steps} steps: "
                      "training again[/]")
        return None
    if not _loss_is_sane(training.get("initial_loss"), training.get("final_loss"), settings):
        console.print(f"[yellow]{out} holds a model whose training loss did not fall enough "
                      f"({training.get('initial_loss')} to {training.get('final_loss')}): training again[/]")
        return None
    return record


def _train(settings: DemoSettings, out: str, seed: int, threads: int, wanted: Dict[str, Any], console,
           warnings) -> Dict[str, Any]:
    """Train the demo model for ``settings.steps`` steps in ``out/.training``; keep its weights and
    log in ``out`` when the loss check passes, else move them to ``out/failed-training`` and raise.

    Returns:
        The record written to ``out/demo.json`` (``training``: what was trained, on what, how long).
    """
    from ._machine import cpu_model
    from .train import Trainer, build_datasets, build_loss, build_model

    steps = settings.steps
    staging = os.path.join(out, ".training")
    shutil.rmtree(staging, ignore_errors=True)
    cfg = demo_config(settings, staging, seed, steps, threads)
    model = build_model(cfg)
    train_set, _ = build_datasets(cfg)
    trainer = Trainer(model, train_set, config=cfg, loss=build_loss(cfg))
    ca_from = trainer.steps_per_epoch
    training: Dict[str, Any] = {"steps": steps, "batch_size": settings.batch_size, "threads": torch.get_num_threads(),
                                "cpu": cpu_model(), "loadavg_start": _loadavg()}
    console.print(f"[bold]training[/] {settings.model} with redesigned exits and confidence adaptivity on "
                  f"{settings.scene}x{settings.scene} digit scenes: {steps} steps of {settings.batch_size} "
                  f"(confidence adaptivity from step {ca_from + 1}), {training['threads']} threads")
    probe = max(1, min(settings.probe_steps, steps - 1))
    start = _clock()
    try:
        progress = cfg.progress
        cfg.progress = "off"  # the bar starts after the timed first steps, with its time to go
        first = trainer.fit(stop_at=probe)
        per_step = (_clock() - start) / probe
        projected, usual = per_step * steps, settings.reference_step_seconds * steps
        training.update({"seconds_per_step_first": round(per_step, 4), "projected_seconds": round(projected, 2),
                         "slow": projected > settings.slow_factor * usual})
        if training["slow"]:
            load = training["loadavg_start"]
            warnings.print(
                f"[bold yellow]warning:[/] this machine seems loaded"
                f"{f' (load average {load[0]:g} on {os.cpu_count()} CPUs)' if load else ''} or much slower than "
                f"usual: the first {probe} steps took {per_step:.2f} s each, so the {steps} steps will take about "
                f"{_duration(projected)} instead of about {_duration(usual)} on a quiet machine ({REFERENCE_MACHINE}: "
                f"{settings.reference_step_seconds:g} s per step). The demo trains the same {steps} steps "
                "and gives the same result, only later; Ctrl-C stops it without saving anything.")
        else:
            console.print(f"the first {probe} steps took {per_step:.2f} s each: about {_duration(projected)} "
                          "of training")
        cfg.progress = progress
        rest = trainer.fit()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-trained stays where a later run looks
        raise
    losses = [h["loss"] for h in first.history + rest.history]
    tail = max(1, len(losses) // 10)
    initial = sum(losses[:probe]) / probe if len(losses) >= probe else None
    final = sum(losses[-tail:]) / tail if losses else None
    training.update({"seconds": round(_clock() - start, 2), "loadavg_end": _loadavg(),
                     "initial_loss": _finite_or_none(initial), "final_loss": _finite_or_none(final)})
    completed = rest.steps == steps
    record = {**wanted, "completed": completed, "iterations": rest.steps, "train_seconds": training["seconds"],
              "training": training}
    if not completed or not _loss_is_sane(initial, final, settings):
        failed = os.path.join(out, "failed-training")
        _write_json(os.path.join(staging, "demo.json"), {**record, "sane": False})
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(staging, failed)
        raise RuntimeError(
            f"the demo's model did not train: its loss went from {_loss_text(initial)} to {_loss_text(final)} in "
            f"{rest.steps} steps (a usable model ends below {settings.max_loss_ratio:g} of the first steps' loss), "
            f"so it was not saved as the demo's model (its weights and log are in {failed}); train more steps "
            "(--steps)")
    record_path = os.path.join(out, "demo.json")
    if os.path.exists(record_path):
        os.remove(record_path)  # no record may describe other weights, even if stopped between the two writes
    os.replace(os.path.join(staging, "model.safetensors"), os.path.join(out, "model.safetensors"))
    os.replace(os.path.join(staging, "log.jsonl"), os.path.join(out, "log.jsonl"))
    _write_json(record_path, {**record, "sane": True})
    shutil.rmtree(staging, ignore_errors=True)
    return record


def _palette() -> torch.Tensor:
    colours = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    return torch.tensor(colours, dtype=torch.uint8)


def _progression_png(model: nn.Module, dataset, indices: List[int], path: str) -> None:
    """Rows of (image, labels, exit 1..N predictions) and under them the masks each exit decides."""
    from PIL import Image, ImageDraw

    from .train.checkpointing import atomic_write

    if getattr(model, "confidence", None) is not None:
        model.set_confidence(True)
    palette = _palette()
    side = max(dataset[0][1].shape[-2:])
    scale = max(1, 192 // side) if side < 192 else 256 / side  # tiles of 192-256 pixels
    rows = []
    titles: List[str] = []
    with torch.no_grad():
        for index in indices:
            image, target = dataset[index]
            raw, _, _ = dataset.dataset.scene(index) if hasattr(dataset, "dataset") else dataset.scene(index)
            outputs = list(model.anytime(image[None].contiguous(memory_format=torch.channels_last)))
            size = target.shape[-2:]
            preds = [torch.nn.functional.interpolate(o.logits, size=size, mode="bilinear",
                                                     align_corners=False).argmax(1)[0] for o in outputs]
            tiles = [(raw.clamp(0, 1) * 255).to(torch.uint8), palette[target].permute(2, 0, 1)]
            tiles += [palette[p].permute(2, 0, 1) for p in preds]
            rows.append(tiles)
            mask_tiles = [torch.full_like(tiles[0], 255), torch.full_like(tiles[0], 255)]
            for o in outputs:
                if o.mask is None:
                    mask_tiles.append(torch.full_like(tiles[0], 255))
                    continue
                computed = torch.nn.functional.interpolate(o.mask[:, :1].float(), size=size, mode="nearest")[0, 0]
                grey = (computed * 200 + 30).to(torch.uint8)
                mask_tiles.append(grey.expand(3, *size))
            rows.append(mask_tiles)
            titles = ["image", "labels"] + [f"exit {o.index}" for o in outputs]
    tile_h, tile_w = round(rows[0][0].shape[-2] * scale), round(rows[0][0].shape[-1] * scale)
    header, gap = 16, 4
    canvas = Image.new("RGB", (len(rows[0]) * (tile_w + gap), header + len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * (tile_w + gap) + 4, 2), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            picture = Image.fromarray(tile.permute(1, 2, 0).contiguous().numpy()).resize(
                (tile_w, tile_h), Image.BILINEAR if c == 0 and scale < 1 else Image.NEAREST)
            canvas.paste(picture, (c * (tile_w + gap), header + r * (tile_h + gap)))
        if r % 2 == 1:
            draw.text((2 * (tile_w + gap) - tile_w + 4, header + r * (tile_h + gap) + 4),
                      "computed\n(white) after\nthe exit", fill=(0, 0, 0))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def _page_png(dataset, index: int, path: str) -> None:
    """Held-out page ``index`` as an 8-bit RGB PNG (what ``anytimeify visualize`` reads)."""
    from PIL import Image

    from .train.checkpointing import atomic_write

    scenes = dataset.dataset if hasattr(dataset, "dataset") else dataset
    raw, _, _ = scenes.scene(index)
    picture = Image.fromarray((raw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _load_text(load: Optional[List[float]]) -> str:
    return f"{load[0]:g}" if load else "?"


def _trained_text(result: Dict[str, Any]) -> str:
    t = result["training"]
    return (f"trained {t['steps']} steps of {t['batch_size']} scenes in {t['seconds']:.0f} s"
            f"{' (reused)' if result.get('reused') else ''} on {t['cpu']}, {t['threads']} threads, load average "
            f"{_load_text(t.get('loadavg_start'))} at the start and {_load_text(t.get('loadavg_end'))} at the end")


def _table(result: Dict[str, Any], settings: DemoSettings):
    from rich.table import Table

    table = Table(title=f"{settings.model} anytime, {result['val_images']} held-out digit scenes "
                        f"({settings.eval_scene}x{settings.eval_scene}), threshold {settings.threshold}")
    for col in ("exit", "mIoU", "mIoU (CA)", "paper GFLOPs", "paper GFLOPs (CA)", "skipped", "ms", "ms (CA)"):
        table.add_column(col, justify="right")
    for e in result["exits"]:
        table.add_row(str(e["exit"]), f"{e['miou']:.2f}", f"{e['miou_ca']:.2f}", f"{e['paper_gflops']:.4f}",
                      f"{e['paper_gflops_ca']:.4f}", f"{e['skipped']:.2f}" if e["exit"] < len(result["exits"]) else "",
                      f"{1000 * e['seconds']:.1f}", f"{1000 * e['seconds_ca']:.1f}")
    table.caption = (f"{_trained_text(result)}; ms: time to the exit, frozen model, sparse execution with CA, mean "
                     f"of {result['timed_images']} images one by one, the runs without and with CA interleaved, "
                     f"{result['threads']} threads, load average {_load_text(result.get('loadavg_start'))} at the "
                     f"start of this run and {_load_text(result.get('loadavg_end'))} at its end; skipped: share of "
                     "positions the exit marks confident")
    return table


def run_demo(out: str = "anytimeify-demo", steps: Optional[int] = None, seed: int = 0, threads: int = 0,
             retrain: bool = False, as_json: bool = False, settings: Optional[DemoSettings] = None,
             minutes: Optional[float] = None) -> Dict[str, Any]:
    """Train (or reuse) the demo model, evaluate it on held-out scenes, write and print the result.

    Args:
        out: output folder.
        steps: optimiser steps of the training (default ``settings.steps``, 450); the second half
            trains with confidence adaptivity.
        seed: seed of the weights, the training scenes and their order.
        threads: torch threads (0: torch's default).
        retrain: train even when ``out`` holds a model trained with the same settings.
        as_json: print only the JSON result (one line) instead of the table.
        settings: the recipe (default :class:`DemoSettings`).
        minutes: removed (the demo trains a fixed number of steps); anything but None raises.

    Returns:
        The result dict (also ``out/result.json``).

    Raises:
        ValueError: ``minutes`` given, or ``steps`` below 2.
        RuntimeError: the training's loss did not fall (nothing is kept as the demo's model).
    """
    from rich.console import Console

    from ._machine import cpu_model
    from .train import build_datasets, build_metric, build_model
    from .train.checkpointing import load_weights
    from .train.evaluate import evaluate

    if minutes is not None:
        raise ValueError(f"--minutes {minutes:g}: the demo no longer trains for a time but a fixed number of steps, "
                         "so that its result does not depend on the machine's load; use --steps N (default "
                         f"{DEFAULT_SETTINGS.steps})")
    settings = settings or DEFAULT_SETTINGS
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"--steps must be a whole number of at least 2 (the second half trains with confidence "
                             f"adaptivity), got {steps!r}")
        settings = dataclasses.replace(settings, steps=steps)
    if settings.steps < 2:
        raise ValueError(f"steps must be at least 2, got {settings.steps}")
    if threads:
        torch.set_num_threads(threads)
    console = Console(quiet=as_json)
    warnings = Console(stderr=True)  # shown with --json too
    loadavg_start = _loadavg()
    os.makedirs(out, exist_ok=True)
    weights_path = os.path.join(out, "model.safetensors")
    wanted = _recorded_settings(settings, seed)
    previous = None if retrain else _reusable(out, wanted, settings, console)

    build = _build_engine_in_background()
    if previous is not None:
        training = previous["training"]
        console.print(f"reusing the model trained in {out} ({training['steps']} steps, {training['seconds']:.0f} s); "
                      "--retrain trains it again")
        record = previous
    else:
        record = _train(settings, out, seed, threads, wanted, console, warnings)
    cfg = demo_config(settings, out, seed, settings.steps, threads)
    model = build_model(cfg)
    load_weights(model, weights_path)

    build.join()  # the kernels the frozen model's sparse execution runs
    _, val_set = build_datasets(cfg)
    metric = build_metric(cfg, 11)
    model.eval()
    console.print(f"evaluating {len(val_set)} held-out {settings.eval_scene}x{settings.eval_scene} scenes one by one, "
                  "without and with confidence adaptivity (sparse execution) ...")
    # the inference model (batch norms folded), one image at a time: its per-exit outputs, FLOP
    # counts and skipped fractions are those of the trained model (dense execution computes the
    # same to float rounding); the times come from a separate pass that interleaves the runs
    # without and with CA image by image (with CA in the engine's sparse execution), after the
    # accuracy passes have met every layer shape and mask (first-use kernel measuring is never timed)
    frozen = model.freeze()
    accuracy = {ca: evaluate(frozen, val_set, metric, confidence=ca, batch_size=1) for ca in (False, True)}
    timed = min(settings.timed_scenes, len(val_set))
    seconds = _interleaved_seconds(frozen, val_set, timed)
    exits = []
    for plain, adaptive, time_plain, time_adaptive in zip(accuracy[False].exits, accuracy[True].exits,
                                                          seconds[False], seconds[True]):
        exits.append({"exit": plain.exit, "miou": round(plain.metrics["miou"], 2),
                      "miou_ca": round(adaptive.metrics["miou"], 2),
                      "paper_gflops": round(plain.paper_gflops, 6), "paper_gflops_ca": round(adaptive.paper_gflops, 6),
                      "skipped": round(adaptive.skipped, 4), "seconds": round(time_plain, 5),
                      "seconds_ca": round(time_adaptive, 5)})
    training = record["training"]
    payload = {"exits": exits, "steps": training["steps"], "batch_size": training["batch_size"],
               "iterations": record["iterations"], "train_seconds": record["train_seconds"],
               "reused": previous is not None, "training": training, "threshold": settings.threshold,
               "val_images": accuracy[True].images, "timed_images": timed,
               "threads": torch.get_num_threads(), "cpu": cpu_model(), "loadavg_start": loadavg_start,
               "model": settings.model, "scene": [settings.scene, settings.scene],
               "eval_scene": [settings.eval_scene, settings.eval_scene], "seed": seed}
    page = min(2, len(val_set) - 1)  # not one of the pages progression.png shows (where there are more)
    _page_png(val_set, page, os.path.join(out, "page.png"))
    _progression_png(frozen, val_set, list(range(min(2, len(val_set)))), os.path.join(out, "progression.png"))
    from .saving import save

    save(model, os.path.join(out, "anytime-model"), overwrite=True)  # for anytimeify.load / anytimeify visualize
    payload["loadavg_end"] = _loadavg()
    _write_json(os.path.join(out, "result.json"), payload)
    if as_json:
        print(json.dumps(payload))
    else:
        console.print(_table(payload, settings))
        console.print(f"wrote {os.path.join(out, 'progression.png')}, {os.path.join(out, 'result.json')}, "
                      f"{os.path.join(out, 'page.png')} (a held-out page), {weights_path} and "
                      f"{os.path.join(out, 'anytime-model')} (anytimeify.load)")
    return payload
