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


def validate(cfg: TrainConfig) -> None:
    """Check values that would otherwise fail late, deep inside training."""
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
        if value not in allowed:
            _fail(key, f"must be one of {list(allowed)}, got {value!r}")
    positive = {"data.batch_size": cfg.data.batch_size, "data.val_batch_size": cfg.data.val_batch_size,
                "optim.grad_accum": cfg.optim.grad_accum, "log_every": cfg.log_every}
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            _fail(key, f"must be a positive integer, got {value!r}")
    non_negative = {"data.workers": cfg.data.workers, "checkpoint.every": cfg.checkpoint.every,
                    "eval.every_epochs": cfg.eval.every_epochs, "eval.every": cfg.eval.every,
                    "schedule.warmup_iters": cfg.schedule.warmup_iters, "threads": cfg.threads,
                    "confidence.start_epoch": cfg.confidence.start_epoch, "schedule.epochs": cfg.schedule.epochs}
    for key, value in non_negative.items():
        if not isinstance(value, int) or value < 0:
            _fail(key, f"must be an integer >= 0, got {value!r}")
    if cfg.schedule.iterations is not None and (not isinstance(cfg.schedule.iterations, int) or cfg.schedule.iterations < 1):
        _fail("schedule.iterations", f"must be a positive integer or null, got {cfg.schedule.iterations!r}")
    if cfg.schedule.iterations is None and cfg.schedule.epochs < 1:
        _fail("schedule.epochs", "must be >= 1 when schedule.iterations is not set")
    if not cfg.optim.lr > 0:
        _fail("optim.lr", f"must be > 0, got {cfg.optim.lr!r}")
    if cfg.optim.clip_grad is not None and not cfg.optim.clip_grad > 0:
        _fail("optim.clip_grad", f"must be > 0 or null, got {cfg.optim.clip_grad!r}")
    if cfg.checkpoint.keep < 1:
        _fail("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep!r}")
    if not isinstance(cfg.data.train, Mapping) or "name" not in cfg.data.train:
        _fail("data.train", "must be a mapping with a 'name' (e.g. {name: digits})")
    if cfg.data.val is not None and (not isinstance(cfg.data.val, Mapping) or "name" not in cfg.data.val):
        _fail("data.val", "must be null or a mapping with a 'name'")


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
