"""The zoo survey's contract on a fixed list of timm families and smp models (thorough tier).

Each check is the one ``benchmarks/zoo_survey.py`` counts: a ``TimmSegmenter`` of the family's
smallest model converted at its native size (an early exit, the last exit exactly the base
model, ``anytime()`` yields every exit, sparse equals dense execution under forced masks), the
timm classifier converted with ``task="classification"`` (an early exit, the last exit exact,
``anytime()`` and ``predict()`` run), and smp models as segmenters. The families are the ones
that check in a few seconds, across the kinds of network: CNNs, plain and hierarchical
transformers, NHWC backbones, hook-based features, modules timm marks untraceable, levels found
by value (MViTv2, Twins), a deep network whose float32 rounding exceeds 1e-4 (Visformer).
"""
import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import anytimeify

timm = pytest.importorskip("timm")
smp = pytest.importorskip("segmentation_models_pytorch")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zoo_survey", ROOT / "benchmarks" / "zoo_survey.py")
zoo_survey = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_survey)
FAMILIES = json.loads((ROOT / "benchmarks" / "zoo_families.json").read_text())

#: families checked here (their models from zoo_families.json)
CHECKED = [
    "byobnet", "convit", "convnext", "cpubone", "cspnext", "efficientnet", "efficientvit_msra", "fasternet",
    "hiera", "levit", "mambaout", "maxxvit", "mobilenetv3", "mobilevit", "mvitv2", "nfnet", "pit", "pvt_v2", "regnet",
    "resnet", "resnetv2", "twins", "vision_transformer", "visformer",
]
SMP = [("DeepLabV3", "tu-convnext_atto"), ("PAN", "tu-convnext_atto"), ("Unet", "mit_b0")]


RECORDED = {(r["kind"], r["model"]): r for r in zoo_survey.read_results()[0]}


def _recorded(kind: str, family: str) -> dict:
    name = FAMILIES[family]
    size = zoo_survey.native_size(name)
    return RECORDED[(kind, f"{family}:{name}@{size[0]}x{size[1]}")]


def test_the_checked_families_are_in_the_survey():
    assert set(CHECKED) <= set(FAMILIES)
    assert len(FAMILIES) >= 90  # one per timm module


@pytest.mark.parametrize("family", CHECKED)
def test_family_gives_an_anytime_segmenter_and_classifier(family):
    name = FAMILIES[family]
    size = zoo_survey.native_size(name)
    torch.manual_seed(0)
    net = zoo_survey.TimmSegmenter(name, zoo_survey.CLASSES, width=16).eval()
    dense = zoo_survey.check_dense(net, size)
    assert 2 <= dense["exits"] <= 1 + 3
    classifier = timm.create_model(name, pretrained=False, num_classes=zoo_survey.CLASSES).eval()
    checked = zoo_survey.check_classifier(classifier, size)
    assert 2 <= checked["exits"] <= 1 + 3
    # what the survey recorded (and docs/model-table.md shows) is what the code gives now
    for kind, now in (("segmenter", dense), ("classifier", checked)):
        recorded = _recorded(kind, family)
        assert recorded["ok"] and (recorded["exits"], recorded["exit_names"]) == (now["exits"], now["exit_names"])


@pytest.mark.parametrize("arch, encoder", SMP, ids=[f"{a}-{e}" for a, e in SMP])
def test_smp_model_with_modules_timm_marks_untraceable(arch, encoder):
    torch.manual_seed(0)
    net = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=zoo_survey.CLASSES).eval()
    now = zoo_survey.check_dense(net, zoo_survey.SMP_SIZE)
    assert now["exits"] >= 2
    recorded = RECORDED[("smp", f"{arch}:{encoder}")]
    assert recorded["ok"] and (recorded["exits"], recorded["exit_names"]) == (now["exits"], now["exit_names"])


def _meets_the_survey_checks(net, size, **convert_kwargs) -> dict:
    """The survey's segmenter checks (an early exit, the last exit exact, sparse equals dense)."""
    torch.manual_seed(0)
    return zoo_survey.check_dense(net, size, **convert_kwargs)


def test_the_advice_for_coat_works():
    """CoaT's feature_info names its parallel blocks for three levels, so no early exit is found
    and convert says to name maps from ``inspect(..., nodes=True)``: the channels-first maps of its
    serial stages (``contiguous*``) it lists give a segmenter that meets the survey's checks."""
    name = FAMILIES["coat"]
    size = zoo_survey.native_size(name)
    net = zoo_survey.TimmSegmenter(name, zoo_survey.CLASSES, width=16).eval()
    with pytest.warns(UserWarning, match=r"no early exit.*exits=\[\.\.\.\].*inspect\(model, nodes=True\)"):
        assert anytimeify.convert(net, exits="stages", input_size=size).num_exits == 1
    listed = {c.name: c for c in anytimeify.inspect(net, size, nodes=True) if c.kind == "node"}
    exits = ["contiguous", "contiguous_1", "contiguous_2"]
    assert [listed[e].stride for e in exits] == [4.0, 8.0, 16.0]
    checked = _meets_the_survey_checks(net, size, exits=exits)
    assert checked["exits"] == 4 and checked["masked_convs"] > 0


def test_the_advice_for_crossvit_works():
    """CrossViT's segmenter reads maps of its last blocks only, so convert finds no early exit
    and says that a TimmSegmenter reads the levels of its out_indices: built with its earlier
    blocks there, it converts with exits='stages' and meets the survey's checks."""
    name = FAMILIES["crossvit"]
    size = zoo_survey.native_size(name)
    net = zoo_survey.TimmSegmenter(name, zoo_survey.CLASSES, width=16).eval()
    with pytest.warns(UserWarning, match=r"no early exit.*TimmSegmenter.*out_indices"):
        assert anytimeify.convert(net, exits="stages", input_size=size).num_exits == 1
    levels = len(net.backbone.model.feature_info)
    net = zoo_survey.TimmSegmenter(name, zoo_survey.CLASSES, width=16, out_indices=range(levels)).eval()
    checked = _meets_the_survey_checks(net, size)
    assert checked["exits"] >= 2 and checked["masked_convs"] > 0
