"""The compiled fuse_sum kernel (HRNet's fuse layers) against PyTorch's ops, on every path it takes.

The kernel works an output row at a time and reads each term's row in one of three ways: a term of
the output's width with the identity columns is its source row as it is, any other nearest term is
its source row with the columns gathered into a scratch row (kept while the next output rows read
the same source row), a bilinear term is its two source rows interpolated along x (kept the same
way). Vectors of the build's width run over the row, the values past the last whole vector one at
a time, and a column's last vector of a gather runs into the next column. The cases below take each
of these paths with channel counts below, at and off the vector width (3, 18, 48), batch 2 and 3
(cached rows must not be reused across images) and 1 and 2 threads (each thread's rows start with
empty scratch rows). Nearest-only sums add the same values in the same order as PyTorch's chain of
additions, so they must agree bit for bit; bilinear terms are weighted in another order of
operations than PyTorch's kernel, so they agree up to float rounding.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from anytimeify.masking import _ext
from anytimeify.masking.fuse import _resize_tables, fuse_sum

pytestmark = pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                                reason="C++ extension not built (no compiler?)")

#: output size of every case (small enough that PyTorch's reference ops run on one thread)
OUT = (16, 24)


def _near(scale: float, mode: str = "nearest") -> dict:
    return {"scale_factor": scale, "mode": mode}


def _bil(scale: float, align_corners: bool = False) -> dict:
    return {"scale_factor": scale, "mode": "bilinear", "align_corners": align_corners}


#: name -> [(source (h, w), resize)] per term, all resized to OUT
CASES = {
    # same-size terms only (a residual add, the lowest branch's fuse layer): rows read in place
    "identity": [(OUT, None), (OUT, None), (OUT, None)],
    "one term": [(OUT, None)],
    # HRNet's fuse layer of the first branch (timm's trunk): integer nearest factors 2, 4, 8
    "nearest x2 x4 x8": [(OUT, None), ((8, 12), _near(2.0)), ((4, 6), _near(4.0)), ((2, 3), _near(8.0))],
    # an upsampled first term: the row pass starts from a scratch row
    "nearest first": [((8, 12), _near(2.0)), (OUT, None), ((4, 6), _near(4.0))],
    "nearest alone": [((2, 3), _near(8.0))],
    # factors that are no integer, nearest-exact, and a downsampling nearest (every other column)
    "nearest non-integer": [(OUT, None), ((7, 9), {"size": OUT, "mode": "nearest"}),
                            ((5, 11), {"size": OUT, "mode": "nearest-exact"}),
                            ((32, 48), {"size": OUT, "mode": "nearest"}), ((11, 16), _near(1.5))],
    # the segmentation HRNet's fuse layer: bilinear, align_corners=False, factors 2, 4, 8
    "bilinear x2 x4 x8": [(OUT, None), ((8, 12), _bil(2.0)), ((4, 6), _bil(4.0)), ((2, 3), _bil(8.0))],
    # bilinear first, sizes (a ratio that is no scale factor), align_corners, a downsampling
    # bilinear, mixed with nearest
    "bilinear mixed": [((5, 7), {"size": OUT, "mode": "bilinear", "align_corners": False}), (OUT, None),
                       ((7, 9), {"size": OUT, "mode": "bilinear", "align_corners": True}),
                       ((8, 12), _near(2.0)), ((27, 40), {"size": OUT, "mode": "bilinear", "align_corners": False})],
    "bilinear alone": [((4, 6), _bil(4.0, align_corners=True))],
    # sources of one row (a pooled map broadcast back): every output row of every image reads its
    # image's row 0, so a kept scratch row must be the image's own
    "one source row": [(OUT, None), ((1, 12), {"size": OUT, "mode": "nearest"}),
                       ((1, 1), {"size": OUT, "mode": "bilinear", "align_corners": False})],
}


def _reference(terms, resizes, relu):
    out = F.interpolate(terms[0], **resizes[0]) if resizes[0] else terms[0]
    for t, r in zip(terms[1:], resizes[1:]):
        out = out + (F.interpolate(t, **r) if r else t)
    return torch.relu(out) if relu else out


def _agree(got, expected, bilinear):
    if bilinear:
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    else:  # nearest: the same additions in the same order, bit for bit (NaN where PyTorch has NaN)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("channels", [3, 18, 48])
@pytest.mark.parametrize("case", list(CASES))
def test_fuse_sum_kernel_paths_match_pytorch(case, channels):
    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    ext = _ext.load()
    spec = CASES[case]
    resizes = [r for _, r in spec]
    bilinear = any(r is not None and r["mode"] == "bilinear" for r in resizes)
    generator = torch.Generator().manual_seed(channels * 100 + len(case))
    threads = torch.get_num_threads()
    try:
        for batch in (2, 3):
            terms = [torch.randn(batch, channels, *size, generator=generator).contiguous(
                memory_format=torch.channels_last) for size, _ in spec]
            for relu in (None, "relu"):
                expected = _reference(terms, resizes, relu)
                assert expected.shape == (batch, channels, *OUT)
                tables = [_resize_tables(t, r, OUT) for t, r in zip(terms, resizes)]
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    with torch.no_grad():
                        out = fuse_sum(terms, resizes, relu)
                    assert out.is_contiguous(memory_format=torch.channels_last)
                    _agree(out, expected, bilinear)
                    raw = ext.fuse_sum([t.permute(0, 2, 3, 1) for t in terms], *(list(c) for c in zip(*tables)),
                                       *OUT, relu == "relu")
                    _agree(raw.permute(0, 3, 1, 2), expected, bilinear)
    finally:
        torch.set_num_threads(threads)


def test_fuse_sum_kernel_keeps_nan_and_signs():
    """NaN stays NaN through the sum and the ReLU (as in torch.relu), infinities add as PyTorch adds
    them, and values that are not negative pass the ReLU unchanged."""
    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    spec = CASES["nearest x2 x4 x8"]
    resizes = [r for _, r in spec]
    generator = torch.Generator().manual_seed(5)
    terms = [torch.randn(2, 18, *size, generator=generator).contiguous(memory_format=torch.channels_last)
             for size, _ in spec]
    terms[0][0, 3, 5, 7] = float("nan")
    terms[1][1, 17, 7, 11] = float("nan")  # the last channel of the last column: the one-at-a-time values
    terms[2][0, 0, 2, 3] = float("inf")
    terms[3][1, 5, 1, 1] = float("-inf")
    terms[0][1, 1, 0, 0] = -0.0
    for relu in (None, "relu"):
        expected = _reference(terms, resizes, relu)
        with torch.no_grad():
            out = fuse_sum(terms, resizes, relu)
        assert out.isnan().sum() == expected.isnan().sum() > 0
        _agree(out, expected, bilinear=False)
