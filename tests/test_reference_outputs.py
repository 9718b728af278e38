"""A checkpoint in the reference implementation's layout gives the reference model's outputs.

The vectors in ``tests/data/reference`` were printed by the ADP-C reference implementation's own
model (``liuzhuang13/anytime``, ``lib/models/model_anytime.py`` with ``conv_mask.py``) on random
weights, by ``tests/reference/make_vectors.py`` (which says how). Here the same weights (a
function of seed, key and shape: ``tests/reference_weights.py``) are written to a checkpoint file in
the reference's layout, loaded with :func:`anytimeify.checkpoint.load_reference_checkpoint` into
the converted ``hrnet_seg`` model, and every exit's logits must equal the reference's within
``1e-4 * max|logit|``, in dense and sparse execution and frozen, with confidence adaptivity marking
exactly the positions the reference marked confident. The pose network's heatmaps are compared
with those of the HRNet pose code (``deep-high-resolution-net.pytorch``) the same way.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import anytimeify
from anytimeify import Confidence
from anytimeify.checkpoint import load_reference_checkpoint
from anytimeify.models import hrnet_pose, hrnet_seg
from reference_weights import reference_state

DATA = Path(__file__).resolve().parent / "data" / "reference"
ALL_CASES = json.loads((DATA / "cases.json").read_text())
CASES = {name: case for name, case in ALL_CASES.items() if case.get("task") != "pose"}


def reference_key(key: str) -> str:
    """anytimeify's name of a tensor -> the reference implementation's (written out here, not
    taken from the library, so a mapping error in the library cannot hide)."""
    key = re.sub(r"^exits\.(\d+)\.", lambda m: f"exit{int(m.group(1)) + 1}.", key)
    return re.sub(r"\.interp_lambda$", ".Lambda", key)


def write_reference_checkpoint(model: torch.nn.Module, case: dict, path: Path) -> None:
    """The case's weights in the reference's layout, as its training wrapper saves them
    (``{"state_dict": {"model.<key>": ...}}``, with every masked conv's ``square_dis`` table)."""
    shapes = []
    for key, value in model.state_dict().items():
        shapes.append((reference_key(key), tuple(value.shape)))
        if key.endswith(".interp_lambda"):
            shapes.append((reference_key(key)[: -len("Lambda")] + "square_dis", (7, 7)))
    state = reference_state(shapes, case["seed"], case["gains"])
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()}}, path)


def reference_input(case: dict) -> torch.Tensor:
    return torch.randn(*case["input"], generator=torch.Generator().manual_seed(10_000 + case["seed"]))


def converted(case: dict, tmp_path: Path, execution: str = "auto") -> anytimeify.AnytimeModel:
    net = hrnet_seg(case["variant"], num_classes=case["num_classes"])
    confidence = Confidence(threshold=case["threshold"], execution=execution) if "threshold" in case else None
    model = anytimeify.convert(net, head=case["head"], width=case["width"], confidence=confidence)
    path = tmp_path / "reference.pth"
    write_reference_checkpoint(model, case, path)
    result = load_reference_checkpoint(model, path)
    assert not result.missing and not result.ignored
    return model.eval()


def assert_matches(outs, expected: dict, case: dict) -> None:
    assert len(outs) == len(expected) == 4
    for k, out in enumerate(outs):
        ref = torch.from_numpy(expected[f"exit{k + 1}"])
        logits = out.logits if hasattr(out, "logits") else out
        assert logits.shape == ref.shape
        error = (logits.float() - ref).abs().max().item()
        assert error <= 1e-4 * ref.abs().max().item(), f"exit {k + 1}: max error {error:.3g}, max logit {ref.abs().max():.3g}"
    if "confident" in case:
        confident = [int((~o.mask).sum()) for o in outs[:3]]
        assert confident == case["confident"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_equal_the_reference(name, tmp_path):
    case = CASES[name]
    expected = dict(np.load(DATA / f"{name}.npz"))
    x = reference_input(case)
    model = converted(case, tmp_path)
    with torch.no_grad():
        if "threshold" in case:
            for execution in ("dense", "sparse"):
                model.set_execution(execution)
                assert_matches(list(model.anytime(x)), expected, case)
            model.set_execution("auto")
        else:
            assert_matches(model(x), expected, case)
        # the inference form: BN folded, the engine's kernels, the sparse execution
        assert_matches(list(model.freeze().anytime(x)), expected, case)


def test_reference_vectors_cover_the_issue():
    """W18-Small-v2 and W48, EE, EE+RH and ADP-C; thresholds that skip 20-80% of the positions
    at the last early exit; interpolation lambdas drawn in 0.3-3; inputs not a power-of-two size."""
    kinds = {(c["variant"], c["head"], "threshold" in c) for c in CASES.values()}
    for variant in ("w18_small_v2", "w48"):
        assert {(variant, "original", False), (variant, "redesigned", False), (variant, "redesigned", True)} <= kinds
    for case in CASES.values():
        height, width = case["input"][-2:]
        assert height % 32 == 0 and width % 32 == 0 and (height & (height - 1) or width & (width - 1))
        if "threshold" in case:
            last = case["confident"][-1] / case["positions"]
            assert 0.2 <= last <= 0.85 and case["confident"] == sorted(case["confident"])
            assert case["margin"] >= 1e-5


def test_pose_network_equals_the_hrnet_pose_code():
    """``hrnet_pose("w32")`` computes what ``pose_hrnet.py`` of deep-high-resolution-net.pytorch
    computes (nearest-neighbour fuse layers, stage 4 fusing into branch 0 only, a 1x1 heatmap conv),
    with its checkpoints' names; so does the converted model's last exit."""
    case = ALL_CASES["w32_pose"]
    expected = torch.from_numpy(np.load(DATA / "w32_pose.npz")["heatmaps"])
    net = hrnet_pose("w32", num_joints=case["num_joints"]).eval()
    shapes = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    net.load_state_dict(reference_state(shapes, case["seed"], bn_scale=case["bn_scale"]), strict=True)
    x = reference_input(case)
    with torch.no_grad():
        heatmaps = net(x)
        last = anytimeify.convert(net, head="redesigned").eval()(x)[-1]
    assert heatmaps.shape == expected.shape
    bound = 1e-4 * expected.abs().max().item()
    assert (heatmaps - expected).abs().max().item() <= bound
    assert (last - expected).abs().max().item() <= bound
