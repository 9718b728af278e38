"""Training configuration: typed sections, read from YAML, overridden with ``--set key=value``.

A config file mirrors these dataclasses (every key optional, defaults are the paper's Cityscapes
recipe where the paper has one)::

    task: segmentation              # segmentation | pose | custom
    model: {name: hrnet_w18_small_v2, num_classes: 19, head: redesigned, backbone: imagenet.pth}
    confidence: {enabled: true, threshold: 0.998, start_epoch: 0}
    data:
      train: {name: folder, root: data/cityscapes, transforms: {crop_size: [512, 1024]}}
      val: {name: folder, root: data/cityscapes}
      batch_size: 3
    loss: {ignore_index: 255, exit_weights: [1, 1, 1, 1]}
    optim: {name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}
    schedule: {name: poly, power: 0.9, epochs: 484}

Unknown keys are errors that list the known ones; ``--set optim.lr=0.02`` parses the value as
YAML (``--set data.train.transforms.crop_size=[256,512]`` works too).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    "TrainConfig", "ModelConfig", "ConfidenceConfig", "DataConfig", "LossConfig", "OptimConfig",
    "ScheduleConfig", "CheckpointConfig", "EvalConfig", "load_config", "apply_overrides", "config_from_dict",
    "ConfigError", "TASKS", "PRECISIONS",
]

TASKS = ("segmentation", "pose", "custom")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """What to build and convert.

    Attributes:
        name: a built-in model (``anytimeify.models.list_models()``) or ``"module.path:callable"``
            returning an ``nn.Module`` (called with ``kwargs``).
        num_classes: classes (segmentation) or joints (pose); None: the model's default.
        kwargs: extra arguments of a ``"module:callable"`` model.
        backbone: path of a local ImageNet checkpoint loaded into the trunk before conversion
            (``anytimeify.checkpoint.load_backbone``); the exits always start from scratch.
        exits: ``"stages"`` or a list of boundary names (see ``anytimeify.inspect``).
        head: ``"redesigned"`` or ``"original"``.
        width: width of the redesigned heads (None: the model's default).
    """

    name: str = "hrnet_w18_small_v2"
    num_classes: Optional[int] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    backbone: Optional[str] = None
    exits: Union[str, List[str]] = "stages"
    head: str = "redesigned"
    width: Optional[int] = None


@dataclass
class ConfidenceConfig:
    """Confidence adaptivity (REFERENCE.md §3). ``enabled: false`` trains plain early exits.

    Attributes:
        enabled: convert with confidence adaptivity.
        threshold: max-prob above which a position is skipped (0.998 in the paper; pose: the
            heatmap value below which it is skipped, 0.002).
        criterion: ``max_prob``, ``entropy``, ``topk``, ``random`` or ``heatmap``.
        start_epoch: epoch from which masks are applied (``AnytimeModel.set_confidence``); before
            it every position is computed. The paper's pose recipe starts at 10.
        execution: ``auto`` (dense under autograd, sparse under no_grad), ``dense`` or ``sparse``.
    """

    enabled: bool = True
    threshold: float = 0.998
    criterion: str = "max_prob"
    start_epoch: int = 0
    execution: str = "auto"


@dataclass
class DataConfig:
    """Data sets and loading.

    ``train`` and ``val`` are data set specs: ``{name: ..., <options>..., transforms: {...}}``
    (``name`` from ``anytimeify.data.list_datasets()`` or ``"module.path:callable"``; options go to
    the factory; ``transforms`` to ``segmentation_transforms`` / ``pose_transforms``).

    Attributes:
        batch_size: images per process per step (the global batch is ``batch_size * world size *
            grad_accum``).
        workers: DataLoader worker processes per training process.
        pin_memory: pin batches (CUDA only).
        val_batch_size: evaluation batch per process.
    """

    train: Dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    val: Optional[Dict[str, Any]] = None
    batch_size: int = 8
    workers: int = 2
    pin_memory: bool = True
    val_batch_size: int = 1


@dataclass
class LossConfig:
    """The multi-exit loss: ``sum_i exit_weights[i] * loss(upsampled logits_i, target)``.

    Attributes:
        name: ``cross_entropy`` (segmentation), ``heatmap_mse`` (pose) or ``"module.path:callable"``
            (a loss ``fn(prediction, target) -> scalar`` or a factory returning one).
        exit_weights: one weight per exit (None: 1 each, as in the paper).
        ignore_index: label of unlabelled pixels.
        class_weights: per-class weights of the cross-entropy (None: unweighted).
        use_target_weight: weight each joint's heatmap MSE by its target weight (pose).
    """

    name: Optional[str] = None
    exit_weights: Optional[List[float]] = None
    ignore_index: int = 255
    class_weights: Optional[List[float]] = None
    use_target_weight: bool = True


@dataclass
class OptimConfig:
    """Optimiser.

    Attributes:
        name: ``sgd``, ``adam`` or ``adamw``.
        lr: base learning rate.
        exit_lr: learning rate of the exit heads (``exits.*``); None: ``lr``.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        betas: Adam betas.
        weight_decay: L2 weight decay (decoupled for ``adamw``).
        grad_accum: micro-batches per optimiser step.
        clip_grad: clip the global gradient norm to this value (None: no clipping).
    """

    name: str = "sgd"
    lr: float = 0.01
    exit_lr: Optional[float] = None
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4
    grad_accum: int = 1
    clip_grad: Optional[float] = None


@dataclass
class ScheduleConfig:
    """Length of training and the learning-rate schedule, stepped every iteration.

    Attributes:
        name: ``poly`` (``lr * (1 - it / total) ** power``), ``step`` (``lr * gamma ** k`` after the
            k-th milestone), ``cosine`` or ``constant``.
        epochs: training length in epochs (ignored when ``iterations`` is set).
        iterations: training length in optimiser steps.
        power: poly exponent.
        milestones: epochs at which ``step`` multiplies the rate by ``gamma``.
        gamma: step decay factor.
        warmup_iters: linear warm-up from ``warmup_factor * lr`` over this many steps.
        warmup_factor: starting fraction of the warm-up.
        min_lr: floor of the learning rate.
    """

    name: str = "poly"
    epochs: int = 484
    iterations: Optional[int] = None
    power: float = 0.9
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    min_lr: float = 0.0


@dataclass
class CheckpointConfig:
    """Checkpoints of the training state (model, optimiser, scheduler, scaler, RNGs, data position).

    Attributes:
        every: write one every this many optimiser steps (0: only at the end).
        keep: how many periodic checkpoints to keep (the newest).
        at_end: write one when training stops, at its end or early (``max_seconds``, ``stop_at``),
            so that it can resume; the weights (``model.safetensors``) are written in any case.
    """

    every: int = 1000
    keep: int = 2
    at_end: bool = True


@dataclass
class EvalConfig:
    """Evaluation during training.

    Attributes:
        every_epochs: evaluate after every this many epochs (0: only at the end).
        every: evaluate every this many optimiser steps instead (0: by epochs).
        confidence: evaluate with confidence adaptivity on (as the model is trained) and also off.
        max_images: evaluate on at most this many images (None: all).
        flip_test: pose: average each exit's heatmaps with those of the mirrored image (flipped
            back, left/right joints swapped, shifted one pixel: HRNet pose's test), as the MPII
            evaluation does. The GFLOPs and times reported are those of one pass.
    """

    every_epochs: int = 1
    every: int = 0
    confidence: bool = True
    max_images: Optional[int] = None
    flip_test: bool = False


@dataclass
class TrainConfig:
    """A whole training run. See the module docstring for the file format.

    Attributes:
        task: ``segmentation``, ``pose`` or ``custom``.
        seed: seed of the weights, the data order and the augmentation.
        out: the run folder (checkpoints, ``log.jsonl``, ``config.yaml``, final weights).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with a gradient scaler).
        channels_last: channels-last activations and weights (faster convolutions on CPU).
        sync_bn: SyncBatchNorm under DDP on CUDA.
        norm_eval: keep batch norms in eval mode (frozen statistics, learnable affine), for small
            batches; makes DDP exactly equal to one process on the global batch.
        log_every: log (JSON lines and progress bar) every this many steps.
        progress: ``auto`` (a progress bar on a terminal), ``on`` or ``off``.
        threads: torch CPU threads per process (0: torch's default).
    """

    task: str = "segmentation"
    seed: int = 0
    out: str = "runs/anytimeify"
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = True
    sync_bn: bool = True
    norm_eval: bool = False
    log_every: int = 10
    progress: str = "auto"
    threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.progress, bool):  # YAML reads a bare on/off as a boolean
            self.progress = "on" if self.progress else "off"
        validate(self)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (YAML/JSON-ready) of every setting."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config key {key!r}: {message}")


def _text_hint(value: Any) -> str:
    """What to write instead of a number YAML read as text (``1e-3`` has no dot: YAML 1.1 text)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads a number without a dot before its exponent as text: write e.g. 1.0e-3)"
    return ""


def _number(key: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """A finite int or float (not a bool) within the bounds; None only when ``optional``."""
    if value is None and optional:
        return
    low_text = f"{'>' if low_open else '>='} {low:g}" if low is not None else ""
    high_text = f"{'<' if high_open else '<='} {high:g}" if high is not None else ""
    bounds = " and ".join(text for text in (low_text, high_text) if text)
    wanted = "a finite number" + (f" {bounds}" if bounds else "") + (" or null" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, f"must be {wanted}, got {value!r}{_text_hint(value)}")
    number = float(value)
    if (not math.isfinite(number) or (low is not None and (number <= low if low_open else number < low))
            or (high is not None and (number >= high if high_open else number > high))):
        _fail(key, f"must be {wanted}, got {value!r}")


def _integer(key: str, value: Any, *, low: int, high: Optional[int] = None, optional: bool = False) -> None:
    """An int (not a bool, not a float) in ``[low, high]``; None only when ``optional``."""
    if value is None and optional:
        return
    wanted = f"an integer >= {low}" + (f" and < {high}" if high is not None else "") + (" or null" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        _fail(key, f"must be {wanted}, got {value!r}")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, f"must be true or false, got {value!r}")


def _string(key: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(key, f"must be a non-empty string{' or null' if optional else ''}, got {value!r}")


def _numbers(key: str, value: Any, *, length: Optional[int] = None, optional: bool = False, **bounds: Any) -> None:
    """A list of numbers, each checked by :func:`_number` (named ``key[i]``)."""
    if value is None and optional:
        return
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        count = f"{length} " if length is not None else ""
        _fail(key, f"must be a list of {count}numbers{' or null' if optional else ''}, got {value!r}")
    for i, item in enumerate(value):
        _number(f"{key}[{i}]", item, **bounds)


#: device types a run may name (besides ``auto``)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _device(key: str, value: Any) -> None:
    """``auto`` or a device string ``torch.device`` takes (``cpu``, ``cuda``, ``cuda:1``...).

    Whether the device exists is checked when the run starts (``init_distributed``), not here: a
    config stored with a checkpoint trained on a GPU must still load on a machine without one.
    """
    import torch

    if value == "auto":
        return
    hint = "'auto', 'cpu', 'cuda' or 'cuda:N'"
    if not isinstance(value, str):
        _fail(key, f"must be {hint}, got {value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        _fail(key, f"must be {hint}, got {value!r}")
    if device.type not in DEVICE_TYPES:
        _fail(key, f"must be {hint}, got {value!r} (device type {device.type!r})")


def validate(cfg: TrainConfig) -> None:
    """Check every value's type and range, so that a wrong one fails here, naming its key, not late
    and deep inside training (or, worse, trains: a NaN learning rate, a threshold that skips nothing).

    Numbers are ints or floats, never booleans; ``inf`` and NaN are refused everywhere.
    """
    choices = {
        "task": (cfg.task, TASKS),
        "precision": (cfg.precision, PRECISIONS),
        "progress": (cfg.progress, ("auto", "on", "off")),
        "model.head": (cfg.model.head, ("redesigned", "original")),
        "optim.name": (cfg.optim.name, ("sgd", "adam", "adamw")),
        "schedule.name": (cfg.schedule.name, ("poly", "step", "cosine", "constant")),
        "confidence.execution": (cfg.confidence.execution, ("auto", "dense", "sparse")),
        "confidence.criterion": (cfg.confidence.criterion, ("max_prob", "entropy", "topk", "random", "heatmap")),
    }
    for key, (value, allowed) in choices.items():
        if not isinstance(value, str) or value not in allowed:
            _fail(key, f"must be one of {list(allowed)}, got {value!r}")
    # top level
    _integer("seed", cfg.seed, low=0, high=2 ** 63)
    _string("out", cfg.out)
    _device("device", cfg.device)
    for key in ("channels_last", "sync_bn", "norm_eval"):
        _boolean(key, getattr(cfg, key))
    _integer("log_every", cfg.log_every, low=1)
    _integer("threads", cfg.threads, low=0)
    # model
    _string("model.name", cfg.model.name)
    _integer("model.num_classes", cfg.model.num_classes, low=1, optional=True)
    if not isinstance(cfg.model.kwargs, Mapping):
        _fail("model.kwargs", f"must be a mapping of keyword arguments, got {cfg.model.kwargs!r}")
    _string("model.backbone", cfg.model.backbone, optional=True)
    exits = cfg.model.exits
    if exits != "stages" and (not isinstance(exits, list) or not exits
                              or not all(isinstance(e, str) and e for e in exits)):
        _fail("model.exits", f"must be 'stages' or a non-empty list of boundary names, got {exits!r}")
    _integer("model.width", cfg.model.width, low=1, optional=True)
    # confidence: the threshold's meaning depends on the criterion (see anytimeify.Confidence)
    _boolean("confidence.enabled", cfg.confidence.enabled)
    if cfg.confidence.criterion == "max_prob":  # a probability; above 1 nothing would ever be skipped
        _number("confidence.threshold", cfg.confidence.threshold, low=0, high=1, low_open=True)
    elif cfg.confidence.criterion in ("entropy", "heatmap"):  # nats / a heatmap value
        _number("confidence.threshold", cfg.confidence.threshold, low=0, low_open=True)
    else:  # topk and random skip a fraction and do not read the threshold
        _number("confidence.threshold", cfg.confidence.threshold)
    _integer("confidence.start_epoch", cfg.confidence.start_epoch, low=0)
    # data
    _integer("data.batch_size", cfg.data.batch_size, low=1)
    _integer("data.val_batch_size", cfg.data.val_batch_size, low=1)
    _integer("data.workers", cfg.data.workers, low=0)
    _boolean("data.pin_memory", cfg.data.pin_memory)
    if not isinstance(cfg.data.train, Mapping) or "name" not in cfg.data.train:
        _fail("data.train", "must be a mapping with a 'name' (e.g. {name: digits})")
    if cfg.data.val is not None and (not isinstance(cfg.data.val, Mapping) or "name" not in cfg.data.val):
        _fail("data.val", "must be null or a mapping with a 'name'")
    # loss
    _string("loss.name", cfg.loss.name, optional=True)
    _numbers("loss.exit_weights", cfg.loss.exit_weights, optional=True, low=0)
    if cfg.loss.exit_weights is not None and not any(w > 0 for w in cfg.loss.exit_weights):
        _fail("loss.exit_weights", f"must give at least one exit a weight > 0, got {cfg.loss.exit_weights!r}")
    _integer("loss.ignore_index", cfg.loss.ignore_index, low=-2 ** 63)
    _numbers("loss.class_weights", cfg.loss.class_weights, optional=True, low=0)
    _boolean("loss.use_target_weight", cfg.loss.use_target_weight)
    # optimiser
    _number("optim.lr", cfg.optim.lr, low=0, low_open=True)
    _number("optim.exit_lr", cfg.optim.exit_lr, low=0, low_open=True, optional=True)
    _number("optim.momentum", cfg.optim.momentum, low=0, high=1, high_open=True)
    _boolean("optim.nesterov", cfg.optim.nesterov)
    if cfg.optim.nesterov and cfg.optim.name == "sgd" and cfg.optim.momentum == 0:
        _fail("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")
    _numbers("optim.betas", cfg.optim.betas, length=2, low=0, high=1, high_open=True)
    _number("optim.weight_decay", cfg.optim.weight_decay, low=0)
    _integer("optim.grad_accum", cfg.optim.grad_accum, low=1)
    _number("optim.clip_grad", cfg.optim.clip_grad, low=0, low_open=True, optional=True)
    # schedule
    _integer("schedule.epochs", cfg.schedule.epochs, low=0)
    _integer("schedule.iterations", cfg.schedule.iterations, low=1, optional=True)
    if cfg.schedule.iterations is None and cfg.schedule.epochs < 1:
        _fail("schedule.epochs", "must be >= 1 when schedule.iterations is not set")
    _number("schedule.power", cfg.schedule.power, low=0)
    if not isinstance(cfg.schedule.milestones, list):
        _fail("schedule.milestones", f"must be a list of epochs, got {cfg.schedule.milestones!r}")
    for i, epoch in enumerate(cfg.schedule.milestones):
        _integer(f"schedule.milestones[{i}]", epoch, low=0)
    _number("schedule.gamma", cfg.schedule.gamma, low=0, low_open=True)
    _integer("schedule.warmup_iters", cfg.schedule.warmup_iters, low=0)
    _number("schedule.warmup_factor", cfg.schedule.warmup_factor, low=0, high=1)
    _number("schedule.min_lr", cfg.schedule.min_lr, low=0)
    # checkpoints and evaluation
    _integer("checkpoint.every", cfg.checkpoint.every, low=0)
    _integer("checkpoint.keep", cfg.checkpoint.keep, low=1)
    _boolean("checkpoint.at_end", cfg.checkpoint.at_end)
    _integer("eval.every_epochs", cfg.eval.every_epochs, low=0)
    _integer("eval.every", cfg.eval.every, low=0)
    _boolean("eval.confidence", cfg.eval.confidence)
    _integer("eval.max_images", cfg.eval.max_images, low=1, optional=True)
    _boolean("eval.flip_test", cfg.eval.flip_test)


_SECTIONS = {
    "model": ModelConfig, "confidence": ConfidenceConfig, "data": DataConfig, "loss": LossConfig,
    "optim": OptimConfig, "schedule": ScheduleConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig,
}


def _fields(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_from_dict(raw: Optional[Mapping[str, Any]], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts; unknown keys raise :class:`ConfigError`."""
    raw = dict(raw or {})
    top = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section {key!r} must be a mapping, got {type(value).__name__}")
            known = _fields(_SECTIONS[key])
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) {', '.join(key + '.' + u for u in unknown)}; "
                                  f"{key} takes {known}")
            top[key] = _SECTIONS[key](**value)
        elif key in _fields(TrainConfig):
            top[key] = value
        else:
            raise ConfigError(f"{source}: unknown key {key!r}; a config takes {_fields(TrainConfig)}")
    try:
        return TrainConfig(**top)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested dict (values parsed as YAML); returns ``raw``."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.02)")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = (),
                data_root: Optional[Union[str, os.PathLike]] = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides.

    ``data_root`` becomes the ``root`` of ``data.train`` and ``data.val`` (of those the config has),
    before the overrides: the recipes name no data folder.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: the YAML is invalid, or a key or value is not accepted (the message says which).
    """
    raw: Dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"config file {source!r} does not exist")
        with open(source, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: a config is a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    if data_root is not None:
        data = raw.setdefault("data", {}) or {}
        raw["data"] = data
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: section 'data' must be a mapping, got {type(data).__name__}")
        for split in ("train", "val"):
            if isinstance(data.get(split), dict):
                data[split]["root"] = os.fspath(data_root)
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)
