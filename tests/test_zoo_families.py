"""The zoo survey's contract on a fixed list of timm families and smp models (thorough tier).

Each check is the one ``benchmarks/zoo_survey.py`` counts: a ``TimmSegmenter`` of the family's
smallest model converted at its native size (an early exit, the last exit exactly the base
model, ``anytime()`` yields every exit, sparse equals dense execution under forced masks), the
timm classifier converted with ``task="classification"`` (an early exit, the last exit exact,
``anytime()`` and ``predict()`` run), and smp models as segmenters. The families are the ones
that check in a few seconds, across the kinds of network: CNNs, plain and hierarchical
transformers, NHWC backbones, hook-based features, modules timm marks untraceable.
"""
import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

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
    "hiera", "levit", "mambaout", "maxxvit", "mobilenetv3", "mobilevit", "nfnet", "pit", "pvt_v2", "regnet", "resnet",
    "resnetv2", "vision_transformer",
]
SMP = [("DeepLabV3", "tu-convnext_atto"), ("PAN", "tu-convnext_atto"), ("Unet", "mit_b0")]


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
    assert 2 <= zoo_survey.check_classifier(classifier, size)["exits"] <= 1 + 3


@pytest.mark.parametrize("arch, encoder", SMP, ids=[f"{a}-{e}" for a, e in SMP])
def test_smp_model_with_modules_timm_marks_untraceable(arch, encoder):
    torch.manual_seed(0)
    net = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=zoo_survey.CLASSES).eval()
    assert zoo_survey.check_dense(net, zoo_survey.SMP_SIZE)["exits"] >= 2
