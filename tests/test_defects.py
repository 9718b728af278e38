"""Defects found by using the converted models as a user would: pickling, export, empty batches,
non-finite inputs, conversion errors, saved sizes, truncated checkpoints."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import anytimeify
from anytimeify import Confidence
from anytimeify.checkpoint import read_state_dict
from anytimeify.masking.criteria import CRITERIA, computed_mask
from anytimeify.models import hrnet_seg
from anytimeify.train import save_weights
from anytimeify.train.checkpointing import read_weights


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return hrnet_seg("w18_small_v2", num_classes=5).eval()


@pytest.fixture(scope="module")
def ca(net):
    """Confidence adaptivity that skips half of the positions after every exit (partial masks, so
    the sparse engine packs weights), whatever the random weights' confidence."""
    return anytimeify.convert(net, confidence=Confidence(criterion="topk", fraction=0.5)).eval()


def _image(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def _saved_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getbuffer().nbytes


def test_whole_model_pickle_round_trip_with_confidence(ca):
    x = _image(1, 3, 64, 64)
    buffer = io.BytesIO()
    torch.save(ca, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for before, after in zip(ca(x), loaded(x)):
            torch.testing.assert_close(after, before, rtol=0, atol=0)
        for before, after in zip(ca.anytime(x), loaded.anytime(x)):
            torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
            assert after.paper_macs == before.paper_macs


def test_export_under_no_grad_matches_eager(net):
    x = _image(1, 3, 64, 64)
    plain = anytimeify.convert(net).eval()
    dense_ca = anytimeify.convert(net, confidence=Confidence(threshold=0.5, execution="dense")).eval()
    for model in (plain, dense_ca):
        with torch.no_grad():
            exported = torch.export.export(model, (x,))
            eager = model(x)
            outputs = exported.module()(x)
        assert len(outputs) == len(eager)
        for out, ref in zip(outputs, eager):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_empty_batch_yields_every_exit_with_zero_macs(ca):
    with torch.no_grad():
        outputs = list(ca.anytime(torch.zeros(0, 3, 64, 64)))
    assert len(outputs) == ca.num_exits
    for out in outputs:
        assert out.logits.shape[0] == 0 and out.logits.shape[1] == 5
        assert out.macs == 0 and out.paper_macs == 0.0
        assert out.skipped == 0.0


def test_non_finite_logits_are_computed_by_every_criterion(ca):
    # every built-in criterion: a NaN or infinite position is computed, even where it would skip
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 0] = 50.0  # confident everywhere
    logits[0, :, 1, 2] = float("nan")
    logits[1, 1, 3, 0] = float("inf")
    for criterion in CRITERIA:
        confidence = Confidence(threshold=0.5 if criterion != "heatmap" else 100.0, criterion=criterion,
                                fraction=0.9, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = computed_mask(logits, confidence, 0)
        assert mask[0, 0, 1, 2] and mask[1, 0, 3, 0], criterion
    # a custom criterion that skips everything
    confidence = Confidence(criterion=lambda lg: torch.zeros(lg.shape[0], 1, *lg.shape[-2:], dtype=torch.bool))
    with pytest.warns(RuntimeWarning, match="non-finite logits"):
        mask = computed_mask(logits, confidence, 0)
    assert mask[0, 0, 1, 2] and mask[1, 0, 3, 0] and mask.sum() == 2

    # in a model: a NaN patch in the input
    x = _image(1, 3, 64, 64)
    x[..., 8:12, 8:12] = float("nan")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="non-finite logits"):
        first = next(ca.anytime(x))
    nan = first.logits.isnan().any(dim=1, keepdim=True)
    assert nan.any() and not nan.all()
    assert first.mask[nan].all()


def test_finite_logits_whose_sum_overflows_are_not_non_finite():
    # the fast test sums the channels; a sum that overflows from finite logits goes to the exact test
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, :2, 0, 1] = 3e38  # finite, but their sum is inf in float32
    logits[0, 2, 1, 1] = float("-inf")
    confidence = Confidence(criterion=lambda lg: torch.zeros(lg.shape[0], 1, *lg.shape[-2:], dtype=torch.bool))
    with pytest.warns(RuntimeWarning, match="non-finite logits"):
        mask = computed_mask(logits, confidence, 0)
    assert mask[0, 0].tolist() == [[False, False], [False, True]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all finite (one overflowing sum): no warning, nothing forced
        mask = computed_mask(logits[..., :1, :], confidence, 0)
    assert not mask.any()


def test_convert_errors_say_what_works(net):
    converted = anytimeify.convert(net)
    with pytest.raises(TypeError, match="already converted"):
        anytimeify.convert(converted)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x):
            if x.sum() > 0:
                return self.inner(x)
            return self.inner(-x)

    with pytest.raises(Exception) as info:
        anytimeify.convert(Branchy())
    message = str(info.value)
    assert "Branchy" in message
    assert "leaf_modules=['Branchy']" not in message and "leaf_modules" in message  # says it cannot help
    assert "control flow" in message and "traceable part" in message


def test_pickled_size_does_not_grow_after_sparse_inference(ca):
    model = copy.deepcopy(ca)
    before = _saved_size(model)
    with torch.no_grad():
        model(_image(1, 3, 64, 64))
    assert any(getattr(m, "_weights_cache", None) is not None for m in model.modules())  # the cache exists
    after = _saved_size(model)
    assert after <= before * 1.03, (before, after)


def test_truncated_safetensors_errors_name_the_path(ca, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_weights(ca, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for read in (read_state_dict, read_weights):
        with pytest.raises(ValueError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "truncated" in message and "safetensors" in message, read.__name__


def test_input_dtype_that_differs_from_the_weights_is_named(ca):
    x = _image(1, 3, 64, 64)
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"input's dtype {dtype} differs from the model's weights "
                                             r"\(torch.float32\).*x.to\(torch.float32\)"):
            ca(x.to(dtype))
        with pytest.raises(ValueError, match="differs from the model's weights"):
            next(ca.anytime(x.to(dtype)))
    # autocast is how mixed precision runs: the input stays as it is and no error is raised
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert len(ca(x.to(torch.bfloat16))) == ca.num_exits
