"""Shared fixtures: small converted HRNets, built once per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# kernel choices by the analytical cost model, not by timings measured on the test machine (which
# would make the strategies tests see depend on the machine's load); the tuner's tests turn it on
os.environ.setdefault("ANYTIMEIFY_TUNE", "off")

import pytest
import torch

import anytimeify
from anytimeify.models import hrnet_seg

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def w18():
    torch.manual_seed(0)
    return hrnet_seg("w18_small_v2", num_classes=5).eval()


@pytest.fixture(scope="session")
def w18_rh(w18):
    return anytimeify.convert(w18, head="redesigned").eval()


@pytest.fixture(scope="session")
def w18_ee(w18):
    return anytimeify.convert(w18, head="original").eval()


@pytest.fixture
def image():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
