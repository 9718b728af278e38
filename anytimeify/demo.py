"""``anytimeify demo``: train an anytime HRNet on real handwritten digits on the CPU, then show it.

The demo is the whole method end to end, in a few minutes on two cores:

1. data: scikit-learn's handwritten digits composed into scenes on textured backgrounds
   (:class:`~anytimeify.data.DigitScenes`; 11 classes): 64x64 crops with 2-4 digits for training,
   512x512 pages with 20-32 digits for evaluation (the network is fully convolutional); a quarter
   of the digit instances is held out and only ever used for evaluation;
2. model: HRNet-W18-Small-v2 converted with redesigned exits and confidence adaptivity;
3. training: every exit at once with :class:`~anytimeify.train.Trainer`, confidence adaptivity
   switched on for the second half of the run (the paper's "trained in" CA), a schedule fitted to
   the time budget (a few timed steps decide how many steps fit);
4. evaluation on held-out scenes, one image at a time on the frozen model (batch norms folded):
   per exit the mIoU without and with confidence adaptivity, the paper's GFLOPs, the skipped
   fraction and the wall-clock time to reach the exit (with confidence adaptivity in the engine's
   sparse execution, which really skips the confident positions);
5. outputs in ``--out``: ``model.safetensors`` + ``demo.json`` (settings, reused by a second run),
   ``anytime-model/`` (the model saved by :func:`anytimeify.save`, for ``anytimeify visualize``),
   ``result.json``, ``progression.png`` and the training log ``log.jsonl``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["run_demo", "DemoSettings", "demo_config"]


@dataclass(frozen=True)
class DemoSettings:
    """The demo's recipe (what ``demo.json`` records; a second run reuses a model trained with
    the same settings)."""

    model: str = "hrnet_w18_small_v2"
    scene: int = 64                 # scenes are scene x scene pixels
    digits: tuple = (2, 4)          # digits per scene
    digit_size: tuple = (20, 36)    # side of a pasted digit
    batch_size: int = 16
    lr: float = 2e-3                # Adam, poly decay
    threshold: float = 0.99         # max-prob confidence threshold (the paper: 0.998, see docs/training.md)
    background_weight: float = 0.5  # class weight of the background in the cross-entropy
    val_scenes: int = 100           # held-out scenes evaluated (mIoU, GFLOPs, skipped)
    timed_scenes: int = 30          # of those, the first ones timed without and with CA, interleaved
    val_seed: int = 12345           # the held-out scenes are the same for every --seed
    minutes: float = 4.0            # default training budget
    # the held-out scenes are larger than the training crops (the network is fully convolutional):
    # a whole image with digits here and there, where most positions are background, which is what
    # confidence adaptivity saves time on
    eval_scene: int = 512           # held-out scenes are eval_scene x eval_scene pixels
    eval_digits: tuple = (20, 32)   # digits per held-out scene


#: settings that only change the evaluation: a model trained with other values of these is reused
EVAL_ONLY = ("val_scenes", "val_seed", "timed_scenes", "eval_scene", "eval_digits", "minutes")


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


def _seconds_per_step(cfg, steps: int = 3) -> float:
    """Time a few training steps of a throwaway copy of the demo model (the first is warm-up)."""
    from .train import build_loss, build_model

    model = build_model(cfg).to(memory_format=torch.channels_last)
    loss = build_loss(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = cfg.data.train["size"]
    images = torch.randn(cfg.data.batch_size, 3, *size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 11, (cfg.data.batch_size, *size))
    model.set_confidence(True)  # the dearer half of the run
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        total, _ = loss(model(images), labels)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / max(1, len(times) - 1)


def _interleaved_seconds(model: nn.Module, dataset, count: int) -> Dict[bool, List[float]]:
    """Mean seconds to reach each exit without and with confidence adaptivity, over the first
    ``count`` images one at a time; the two runs of an image follow each other (in alternating
    order), so that both see the same state of the machine."""
    totals = {False: [0.0] * model.num_exits, True: [0.0] * model.num_exits}
    with torch.no_grad():
        for index in range(count):
            image = dataset[index][0][None].contiguous(memory_format=torch.channels_last)
            for ca in ((False, True) if index % 2 == 0 else (True, False)):
                model.set_confidence(ca)
                for out in model.anytime(image):
                    totals[ca][out.index - 1] += out.elapsed
    return {ca: [t / max(1, count) for t in times] for ca, times in totals.items()}


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
    table.caption = (f"trained {result['iterations']} steps in {result['train_seconds']:.0f} s"
                     f"{' (reused)' if result.get('reused') else ''}; ms: time to the exit, frozen model, sparse "
                     f"execution with CA, mean of {result['timed_images']} images one by one, the runs without and "
                     f"with CA interleaved, {result['threads']} threads; "
                     f"skipped: share of positions the exit marks confident")
    return table


def run_demo(out: str = "anytimeify-demo", minutes: Optional[float] = None, seed: int = 0, threads: int = 0,
             retrain: bool = False, as_json: bool = False, settings: Optional[DemoSettings] = None) -> Dict[str, Any]:
    """Train (or reuse) the demo model, evaluate it on held-out scenes, write and print the result.

    Args:
        out: output folder.
        minutes: training budget (default ``settings.minutes``).
        seed: seed of the weights, the training scenes and their order.
        threads: torch threads (0: torch's default).
        retrain: train even when ``out`` holds a model trained with the same settings.
        as_json: print only the JSON result (one line) instead of the table.
        settings: the recipe (default :class:`DemoSettings`).

    Returns:
        The result dict (also ``out/result.json``).
    """
    from rich.console import Console

    from .train import Trainer, build_datasets, build_loss, build_metric, build_model
    from .train.checkpointing import atomic_write, load_weights
    from .train.evaluate import evaluate

    settings = settings or DEFAULT_SETTINGS
    minutes = settings.minutes if minutes is None else float(minutes)
    if not minutes > 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    if threads:
        torch.set_num_threads(threads)
    console = Console(quiet=as_json)
    os.makedirs(out, exist_ok=True)
    record_path = os.path.join(out, "demo.json")
    weights_path = os.path.join(out, "model.safetensors")
    wanted = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.__dict__.items()
                           if k not in EVAL_ONLY}, "seed": seed}
    previous = None
    if not retrain and os.path.isfile(record_path) and os.path.isfile(weights_path):
        with open(record_path, encoding="utf-8") as f:
            previous = json.load(f)
        if {k: previous.get(k) for k in wanted} != wanted:
            console.print(f"[yellow]{out} holds a model trained with other settings: training again[/]")
            previous = None

    build = _build_engine_in_background()
    if previous is not None:
        cfg = demo_config(settings, out, seed, previous["iterations"], threads)
        model = build_model(cfg)
        load_weights(model, weights_path)
        train_seconds, iterations = previous["train_seconds"], previous["iterations"]
        stopped_early = bool(previous.get("stopped_early", False))
        console.print(f"reusing the model trained in {out} ({iterations} steps, {train_seconds:.0f} s); "
                      "--retrain trains it again")
    else:
        budget = 60.0 * minutes
        start = time.perf_counter()
        probe_cfg = demo_config(settings, out, seed, 1, threads)
        step_time = _seconds_per_step(probe_cfg)
        remaining = budget - (time.perf_counter() - start)
        iterations = max(2, int(0.95 * remaining / step_time))
        cfg = demo_config(settings, out, seed, iterations, threads)
        console.print(f"[bold]training[/] {settings.model} with redesigned exits and confidence adaptivity on "
                      f"{settings.scene}x{settings.scene} digit scenes: {iterations} steps of {settings.batch_size} "
                      f"({step_time:.2f} s/step measured, budget {minutes:g} min, {torch.get_num_threads()} threads)")
        model = build_model(cfg)
        train_set, _ = build_datasets(cfg)
        trainer = Trainer(model, train_set, config=cfg, loss=build_loss(cfg))
        result = trainer.fit(max_seconds=budget - (time.perf_counter() - start))
        train_seconds = time.perf_counter() - start
        stopped_early = result.stopped_early
        iterations = result.steps
        atomic_write(record_path, lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(
            {**wanted, "iterations": iterations, "train_seconds": round(train_seconds, 2),
             "stopped_early": stopped_early}, indent=2)))

    build.join()  # the kernels the frozen model's sparse execution runs
    _, val_set = build_datasets(cfg)
    metric = build_metric(cfg, 11)
    model.eval()
    console.print(f"evaluating {len(val_set)} held-out {settings.eval_scene}x{settings.eval_scene} scenes one by one, "
                  "without and with confidence adaptivity (sparse execution) ...")
    # the inference model (batch norms folded), one image at a time: its per-exit outputs, FLOP
    # counts and skipped fractions are those of the trained model (dense execution computes the
    # same to float rounding); the times come from a separate pass that interleaves the runs
    # without and with CA image by image (with CA in the engine's sparse execution)
    frozen = model.freeze()
    for ca in (False, True):  # warm-up: the engine's kernel choices for new layer shapes
        evaluate(frozen, torch.utils.data.Subset(val_set, [0]), metric, confidence=ca)
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
    payload = {"exits": exits, "train_seconds": round(train_seconds, 2), "iterations": iterations,
               "stopped_early": stopped_early, "reused": previous is not None, "threshold": settings.threshold,
               "val_images": accuracy[True].images, "timed_images": timed,
               "threads": torch.get_num_threads(), "model": settings.model,
               "scene": [settings.scene, settings.scene],
               "eval_scene": [settings.eval_scene, settings.eval_scene], "seed": seed}
    atomic_write(os.path.join(out, "result.json"), lambda tmp: open(tmp, "w", encoding="utf-8").write(
        json.dumps(payload, indent=2) + "\n"))
    _progression_png(frozen, val_set, list(range(min(2, len(val_set)))), os.path.join(out, "progression.png"))
    from .saving import save

    save(model, os.path.join(out, "anytime-model"), overwrite=True)  # for anytimeify.load / anytimeify visualize
    if as_json:
        print(json.dumps(payload))
    else:
        console.print(_table(payload, settings))
        console.print(f"wrote {os.path.join(out, 'progression.png')}, {os.path.join(out, 'result.json')}, "
                      f"{weights_path} and {os.path.join(out, 'anytime-model')} (anytimeify.load)")
    return payload
