"""Run the ADP-C reference implementation's model on random weights and store its outputs as test vectors.

The reference implementation (https://github.com/liuzhuang13/anytime, ``lib/models/model_anytime.py``
with ``lib/models/conv_mask.py``) is the ground truth for ADP-C. This script imports its model from a
checkout given on the command line (none of its code is copied into this repository), fills it with
the weights of ``tests/reference_weights.py`` (a function of seed, key and shape only), runs it as
its own ``tools/test_ee.py`` does (eval mode; one warm-up forward at the same input size, since its
masked convs learn their output sizes from the previous call) and writes, per case:

* ``tests/data/reference/<case>.npz``: the input-independent record of what it printed: every
  exit's logits (after copy aggregation for ADP-C) as float32, and for ADP-C the number of
  positions marked confident after each early exit at the logits' resolution;
* ``tests/data/reference/cases.json``: the case's variant, head, width, threshold, seed and input
  size, so ``tests/test_reference_outputs.py`` can rebuild the same weights and input.

The threshold of an ADP-C case is chosen here, on a grid, so that the last early exit marks about a
target fraction of the positions confident and exit 1 at least 15%, with no position's confidence
within 1e-5 of it (so float rounding cannot flip a position between implementations; the smallest
distance is recorded as ``margin``).

The pose case does the same with the HRNet pose code (``deep-high-resolution-net.pytorch``,
``lib/models/pose_hrnet.py``, its MPII W32 config): its heatmaps for ``hrnet_pose("w32")``.

    git clone https://github.com/liuzhuang13/anytime /tmp/anytime     # any checkout of the reference
    git clone https://github.com/leoxiaobin/deep-high-resolution-net.pytorch /tmp/pose-hrnet
    python tests/reference/make_vectors.py --reference /tmp/anytime --pose-reference /tmp/pose-hrnet

Needs numpy, yacs, pyyaml and torch (the references' own requirements); it runs on CPU in a few
minutes (the threshold search runs each ADP-C model some 130 times).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: reference_weights

from reference_weights import reference_state  # noqa: E402

OUT = HERE.parent / "data" / "reference"

#: (case name, variant, head, target fraction confident after exit 3 or None without CA, seed, input HxW)
CASES = [
    ("w18_small_v2_ee", "w18_small_v2", "original", None, 1, (64, 96)),
    ("w18_small_v2_rh", "w18_small_v2", "redesigned", None, 2, (64, 96)),
    ("w18_small_v2_adpc", "w18_small_v2", "redesigned", 0.6, 3, (64, 96)),
    ("w48_ee", "w48", "original", None, 5, (64, 96)),
    ("w48_rh", "w48", "redesigned", None, 6, (64, 96)),
    ("w48_adpc", "w48", "redesigned", 0.7, 7, (64, 96)),
]
#: exit width of the redesigned heads, as the reference's README trains them
WIDTH = {"w18_small_v2": 64, "w48": 128}
YAML = {"w18_small_v2": "w18.yaml", "w48": "w48.yaml"}
BATCH = 2
NUM_CLASSES = 19
#: standard deviation of every exit's logits on the case's input, before confidence adaptivity
LOGIT_STD = 4.0


def reference_input(seed: int, size) -> torch.Tensor:
    """The input batch of a case (the test builds the same)."""
    return torch.randn(BATCH, 3, *size, generator=torch.Generator().manual_seed(10_000 + seed))


def _import_reference(root: Path):
    lib = root / "lib"
    if not (lib / "models" / "model_anytime.py").is_file():
        raise SystemExit(f"{root} is not a checkout of liuzhuang13/anytime (no lib/models/model_anytime.py)")
    sys.path.insert(0, str(lib))
    if not hasattr(np, "int"):  # the reference predates NumPy 1.24, which removed np.int
        np.int = int  # type: ignore[attr-defined]
    from config import config  # type: ignore  # noqa: E402  (lib/config)
    import models.model_anytime as model_anytime  # type: ignore  # noqa: E402

    return config, model_anytime


def _config(base, root: Path, variant: str, head: str, masked: bool):
    cfg = base.clone()
    cfg.defrost()
    cfg.merge_from_file(str(root / "experiments" / "cityscapes" / YAML[variant]))
    options: List[object] = ["DATASET.NUM_CLASSES", NUM_CLASSES]
    if head == "redesigned":
        options += ["EXIT.TYPE", "flex", "EXIT.INTER_CHANNEL", WIDTH[variant]]
    if masked:
        options += ["MASK.USE", True, "MASK.CONF_THRE", 0.998, "MASK.CRIT", "conf_thre", "MASK.AGGR", "copy"]
    cfg.merge_from_list(options)
    return cfg


def _margin(logits: torch.Tensor, threshold: float) -> float:
    return float((logits.double().softmax(1).amax(1) - threshold).abs().min())


EXITS = ("exit1", "exit2", "exit3", "last_layer")


def _classifier_gains(model, x, shapes, seed) -> Optional[Dict[str, float]]:
    """Gains for every exit's classifier such that each exit's own logits (before copy
    aggregation) have standard deviation :data:`LOGIT_STD` on ``x``, set exit by exit (an exit's
    gain changes the masks, and so the features, of the exits after it); None where an exit's
    logits are constant (every position confident before it)."""
    gains: Dict[str, float] = {}
    raw: Dict[str, torch.Tensor] = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, a, out, name=name: raw.__setitem__(name, out))
             for name in EXITS]
    try:
        for name in EXITS:
            model.load_state_dict(reference_state(shapes, seed, gains))
            model(x)
            classifier = [n for n, _ in getattr(model, name).named_children()][-1]
            spread = float(raw[name].std())
            if spread == 0.0:
                return None  # every position confident before this exit: nothing to scale
            gain = LOGIT_STD / spread
            gains[f"{name}.{classifier}.weight"] = gain
            gains[f"{name}.{classifier}.bias"] = gain
    finally:
        for hook in hooks:
            hook.remove()
    model.load_state_dict(reference_state(shapes, seed, gains))
    return gains


def run_case(config, model_anytime, root: Path, name: str, variant: str, head: str, target: Optional[float],
             seed: int, size) -> Dict[str, object]:
    masked = target is not None
    cfg = _config(config, root, variant, head, masked)
    torch.manual_seed(0)  # the reference's warm-up call draws random masks
    model = model_anytime.HighResolutionNet(cfg)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(reference_state(shapes, seed))
    model.eval()
    x = reference_input(seed, size)
    entry: Dict[str, object] = {"variant": variant, "head": head, "width": WIDTH[variant] if head == "redesigned" else None,
                                "seed": seed, "input": [BATCH, 3, *size], "num_classes": NUM_CLASSES}
    with torch.no_grad():
        if masked:
            model.mask_cfg.CONF_THRE = 2.0  # nothing confident (the plain model) for the warm-up
        model(x)  # warm-up: the masked convs learn their output sizes
        if not masked:
            # every exit's classifier scaled to logits of one spread, so that the vectors test every
            # exit at a similar scale (random weights alone give exits orders of magnitude apart)
            gains = _classifier_gains(model, x, shapes, seed)
            outs = model(x)
        else:
            # the threshold (on a grid) whose last mask marks about ``target`` of the positions
            # confident while exit 1 marks at least 15%, with no position's confidence within 1e-5
            # of it, so float rounding cannot flip a position between implementations; the gains
            # are set under confidence adaptivity with that threshold
            best = None
            for threshold in torch.sigmoid(torch.linspace(0.0, 14.0, 57)).tolist():
                model.mask_cfg.CONF_THRE = threshold
                gains = _classifier_gains(model, x, shapes, seed)
                if gains is None:
                    continue
                outs = model(x)
                out_size = tuple(outs[0].shape[-2:])
                positions = BATCH * out_size[0] * out_size[1]
                confident = [int((1 - model.part_mask_dicts[f"out{k}"][out_size]).sum()) for k in (1, 2, 3)]
                margin = min(_margin(o, threshold) for o in outs[:3])
                if confident[0] < 0.15 * positions or margin < 1e-5:
                    continue
                score = abs(confident[-1] / positions - target)
                if best is None or score < best[0]:
                    best = (score, threshold, confident, margin, outs, gains)
            if best is None:
                raise SystemExit(f"{name}: no threshold on the grid fits; try another seed")
            _, threshold, confident, margin, outs, gains = best
            entry.update(threshold=threshold, confident=confident, positions=positions, margin=margin)
    entry["gains"] = gains
    arrays = {f"exit{k + 1}": o.numpy().astype(np.float32) for k, o in enumerate(outs)}
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / f"{name}.npz", **arrays)
    entry["max_abs_logit"] = [float(o.abs().max()) for o in outs]
    return entry


#: (case name, seed, input HxW) of the pose network (HRNet-W32, MPII's 16 joints)
POSE_CASE = ("w32_pose", 8, (128, 96))
#: the pose network's BN weights are scaled by this (W32's deeper trunk grows its activations to
#: 1e5 with the weights of the segmentation cases)
POSE_BN_SCALE = 0.5


def run_pose_case(root: Path) -> Dict[str, object]:
    """HRNet-W32 of ``deep-high-resolution-net.pytorch`` (``lib/models/pose_hrnet.py``, MPII
    config) on random weights: its heatmaps, for ``tests/test_reference_outputs.py``."""
    import importlib.util

    import yaml

    name, seed, size = POSE_CASE
    source = root / "lib" / "models" / "pose_hrnet.py"
    if not source.is_file():
        raise SystemExit(f"{root} is not a checkout of leoxiaobin/deep-high-resolution-net.pytorch (no {source})")
    spec = importlib.util.spec_from_file_location("pose_hrnet", source)
    pose_hrnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pose_hrnet)  # type: ignore[union-attr]
    cfg = yaml.safe_load((root / "experiments" / "mpii" / "hrnet" / "w32_256x256_adam_lr1e-3.yaml").read_text())
    model = pose_hrnet.get_pose_net(cfg, is_train=False)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(reference_state(shapes, seed, bn_scale=POSE_BN_SCALE))
    model.eval()
    x = reference_input(seed, size)
    with torch.no_grad():
        heatmaps = model(x)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / f"{name}.npz", heatmaps=heatmaps.numpy().astype(np.float32))
    return {"variant": "w32", "task": "pose", "seed": seed, "input": [BATCH, 3, *size], "bn_scale": POSE_BN_SCALE,
            "num_joints": int(cfg["MODEL"]["NUM_JOINTS"]), "max_abs_logit": [float(heatmaps.abs().max())]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="checkout of liuzhuang13/anytime")
    parser.add_argument("--pose-reference", type=Path,
                        help="checkout of leoxiaobin/deep-high-resolution-net.pytorch (the pose case)")
    parser.add_argument("--cases", nargs="*", default=None, help="only these cases (default: all)")
    args = parser.parse_args()
    if args.reference is None and args.pose_reference is None:
        parser.error("give --reference, --pose-reference or both")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    manifest_path = OUT / "cases.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if args.reference is not None:
        config, model_anytime = _import_reference(args.reference.resolve())
        for name, variant, head, target, seed, size in CASES:
            if args.cases and name not in args.cases:
                continue
            manifest[name] = run_case(config, model_anytime, args.reference.resolve(), name, variant, head, target,
                                      seed, size)
            print(name, json.dumps(manifest[name]))
    if args.pose_reference is not None and (not args.cases or POSE_CASE[0] in args.cases):
        manifest[POSE_CASE[0]] = run_pose_case(args.pose_reference.resolve())
        print(POSE_CASE[0], json.dumps(manifest[POSE_CASE[0]]))
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)


if __name__ == "__main__":
    main()
