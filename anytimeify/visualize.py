"""Pictures of the anytime progression (matplotlib, an optional extra: ``pip install anytimeify[plot]``).

* :func:`progression_figure`: the paper's Figure-4 kind of grid for one image: per exit, the
  prediction (the Cityscapes palette for 19-class models, joints drawn on the image for pose), the
  confidence map, and the positions the exit leaves to be computed and skips.
* :func:`curves_figure`: metric against GFLOPs, one curve per evaluation JSON (``anytimeify eval
  --json`` output or a run's ``metrics.json``), e.g. EE, EE+RH and ADP-C side by side.

Both return a matplotlib ``Figure``; :func:`save_figure` writes it atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

__all__ = ["progression_figure", "curves_figure", "save_figure", "class_palette", "load_results"]

PathLike = Union[str, os.PathLike]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("pictures need matplotlib: pip install 'anytimeify[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_palette(num_classes: int) -> torch.Tensor:
    """``(num_classes, 3)`` uint8 colours: Cityscapes' for 19 classes, else a fixed qualitative set."""
    if num_classes == 19:
        from .data.cityscapes import CITYSCAPES_PALETTE

        return torch.tensor(CITYSCAPES_PALETTE, dtype=torch.uint8)
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    colours = [[int(255 * c) for c in cmap(i % 20)[:3]] for i in range(num_classes)]
    return torch.tensor(colours, dtype=torch.uint8)


def _is_pose(model) -> bool:
    criterion = getattr(getattr(model, "confidence", None), "criterion", None)
    return criterion == "heatmap" or "Pose" in str(getattr(model, "base_class", ""))


@torch.no_grad()
def progression_figure(model, image: torch.Tensor, *, display: Optional[torch.Tensor] = None,
                       title: Optional[str] = None):
    """Figure-4 grid of one image: a column per exit; rows: prediction, confidence, computed mask.

    Args:
        model (AnytimeModel): an :class:`~anytimeify.AnytimeModel` (dense prediction; eval mode is used).
        image: the network input ``(3, H, W)`` or ``(1, 3, H, W)``, normalised as the model expects.
        display: the image to show ``(3, H, W)`` in [0, 1] (default: ``image`` min-max scaled).
        title: the figure's title.

    Confidence is the largest softmax probability (segmentation) or the largest heatmap value
    (pose). The mask row shows, for each exit but the last, the positions it leaves to the next
    segments (light) and the ones it skips (dark); without confidence adaptivity every position
    is computed.
    """
    plt = _pyplot()
    x = image[None] if image.dim() == 3 else image
    if display is None:
        display = (x[0] - x[0].amin()) / (x[0].amax() - x[0].amin()).clamp(min=1e-6)
    was = model.training
    model.eval()
    try:
        outs = list(model.anytime(x))
    finally:
        model.train(was)
    pose = _is_pose(model)
    n = len(outs)
    fig, axes = plt.subplots(3, n + 1, figsize=(1.9 * (n + 1), 1.9 * 3 * x.shape[-2] / x.shape[-1] + 0.6),
                             squeeze=False, constrained_layout=True)
    shown = display.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    axes[0, 0].imshow(shown)
    axes[0, 0].set_title("input", fontsize=8)
    for r in (1, 2):
        axes[r, 0].axis("off")
    palette = None if pose else class_palette(outs[0].logits.shape[1])
    conf_image = None
    for k, out in enumerate(outs):
        logits = out.logits[0].float()
        col = k + 1
        if pose:
            h, w = logits.shape[-2:]
            flat = logits.reshape(logits.shape[0], -1).argmax(1)
            ys, xs = (flat // w).float(), (flat % w).float()
            axes[0, col].imshow(shown)
            scale_x, scale_y = shown.shape[1] / w, shown.shape[0] / h
            axes[0, col].scatter((xs + 0.5) * scale_x, (ys + 0.5) * scale_y, s=8, c=range(len(xs)), cmap="tab20")
            confidence = logits.amax(0)
        else:
            labels = logits.argmax(0)
            axes[0, col].imshow(palette[labels].cpu().numpy())
            confidence = torch.softmax(logits, 0).amax(0)
        conf_image = axes[1, col].imshow(confidence.cpu().numpy(), cmap="viridis", vmin=0,
                                         vmax=1 if not pose else None)
        if out.mask is not None:
            axes[2, col].imshow(out.mask[0, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[2, col].set_title(f"skips {100 * out.skipped:.0f}%", fontsize=7)
        else:
            axes[2, col].axis("off")
        axes[0, col].set_title(f"exit {out.index} ({out.paper_gflops:.2f} GFLOPs)", fontsize=8)
    for row, name in enumerate(("prediction", "confidence", "computed")):
        axes[row, 1].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if conf_image is not None:
        fig.colorbar(conf_image, ax=axes[1, 1:].tolist(), shrink=0.8, label="max prob" if not pose else "max heatmap")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def load_results(path: PathLike) -> dict:
    """An evaluation JSON with an ``exits`` list (``anytimeify eval --json``, ``metrics.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"results file {str(path)!r} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("exits"), list) or not data["exits"]:
        raise ValueError(f"results file {str(path)!r} has no 'exits' list; give the output of anytimeify eval --json "
                         "or a run's metrics.json")
    return data


def _curves(data: dict, path: PathLike, metric: Optional[str]) -> List[tuple]:
    """``(suffix, metric key, gflops, values, exit numbers)`` per curve of one results file: its
    ``exits`` (with a second curve where exits carry ``<metric>_ca`` and ``paper_gflops_ca``, as
    the demo's result.json does) or, for ``anytimeify eval --json`` output, one per report (with
    and without confidence adaptivity)."""
    reports = data.get("reports")
    if isinstance(reports, list) and reports and all(isinstance(r, dict) and "exits" in r for r in reports):
        rows = [(" (CA)" if r.get("confidence") else "", [{"exit": e["exit"], "paper_gflops": e["paper_gflops"],
                                                         **e.get("metrics", {})} for e in r["exits"]])
                for r in reports]
    else:
        rows = [("", data["exits"])]
        first = data["exits"][0]
        key = metric or next((k for k in ("miou", "pckh", "accuracy") if k in first), None)
        if key and f"{key}_ca" in first and "paper_gflops_ca" in first:
            rows.append((" (CA)", [{"exit": e["exit"], key: e[f"{key}_ca"], "paper_gflops": e["paper_gflops_ca"]}
                                   for e in data["exits"]]))
    curves = []
    for suffix, exits in rows:
        key = metric or next((k for k in ("miou", "pckh", "accuracy") if k in exits[0]), None)
        if key is None or any(key not in e or "paper_gflops" not in e for e in exits):
            raise ValueError(f"results file {str(path)!r}: every exit needs {key or 'a metric (miou, pckh, accuracy)'!r} "
                             "and 'paper_gflops'")
        curves.append((suffix, key, [e["paper_gflops"] for e in exits], [e[key] for e in exits],
                       [e["exit"] for e in exits]))
    return curves


def curves_figure(results: Sequence[PathLike], *, labels: Optional[Sequence[str]] = None,
                  metric: Optional[str] = None, title: Optional[str] = None):
    """Metric against the paper's GFLOPs per exit, one curve per results file (two for a file with
    results with and without confidence adaptivity).

    Args:
        results: evaluation JSONs (see :func:`load_results`).
        labels: a legend label per file (default: the file's name without extension).
        metric: the per-exit key to plot (default: ``miou``, else ``pckh``, else ``accuracy``).
        title: the figure's title.
    """
    plt = _pyplot()
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results files")
    fig, ax = plt.subplots(figsize=(3.4, 2.6), constrained_layout=True)
    key = metric
    for i, path in enumerate(results):
        label = labels[i] if labels is not None else Path(path).stem
        for suffix, key, gflops, values, numbers in _curves(load_results(path), path, metric):
            ax.plot(gflops, values, "o-", markersize=3.5, label=label + suffix)
            for x, y, k in zip(gflops, values, numbers):
                ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, -8), fontsize=6)
    ax.set_xlabel("GFLOPs (MACs / 2^30, cumulative)", fontsize=8)
    ax.set_ylabel({"miou": "mIoU (%)", "pckh": "PCKh@0.5 (%)", "accuracy": "accuracy (%)"}.get(key, key), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return fig


def save_figure(fig, path: PathLike, dpi: int = 200) -> Path:
    """Write ``fig`` to ``path`` (format from the extension) through a temporary file."""
    from .train.checkpointing import atomic_write

    path = Path(path)
    suffix = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=suffix))
    _pyplot().close(fig)
    return path
