"""Loading local checkpoints in the on-disk layouts of timm, HRNet-Image-Classification and ADP-C."""
import pytest
import timm
import torch

import anytimeify
from anytimeify.checkpoint import load_backbone, load_reference_checkpoint, read_state_dict
from anytimeify.models import hrnet_seg


def _shapes(path):
    with open(path) as f:
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            yield key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype


def _reference_file(tsv, tmp_path, prefix="model.", wrap=True):
    """A checkpoint with every key, shape and dtype of the reference's, random values."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in _shapes(tsv):
        state[prefix + key] = (torch.randint(0, 5, shape, generator=g) if dtype == "int64"
                               else torch.randn(shape, generator=g))
    path = tmp_path / "ref.pth"
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    return path, state


@pytest.fixture(scope="module")
def timm_classifier():
    return timm.create_model("hrnet_w18_small_v2", pretrained=False)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_imagenet_backbone_loads_into_the_trunk(timm_classifier, tmp_path, fmt):
    """timm's HRNet keys are HRNet-Image-Classification's: one file layout serves both."""
    state = timm_classifier.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "hrnet.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "wrapped":
        path = tmp_path / "hrnet.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "hrnet.pth"
        torch.save(state, path)
    net = hrnet_seg("w18_small_v2", num_classes=19)
    head_before = net.last_layer[0].weight.clone()
    result = load_backbone(net, path)
    assert torch.equal(net.stage4[0].branches[3][1].conv2.weight, state["stage4.0.branches.3.1.conv2.weight"])
    assert torch.equal(net.bn1.running_var, state["bn1.running_var"])
    assert torch.equal(net.last_layer[0].weight, head_before)
    assert any(k.startswith("incre_modules") for k in result.ignored)
    assert result.missing == []


def test_backbone_of_another_variant_is_refused(tmp_path):
    deeper = tmp_path / "w18.pth"  # same widths as W18-Small-v2, more blocks
    torch.save(timm.create_model("hrnet_w18", pretrained=False).state_dict(), deeper)
    with pytest.raises(ValueError, match="deeper HRNet variant"):
        load_backbone(hrnet_seg("w18_small_v2"), deeper)
    wider = tmp_path / "w32.pth"
    torch.save(timm.create_model("hrnet_w32", pretrained=False).state_dict(), wider)
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone(hrnet_seg("w18"), wider)


def test_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        read_state_dict(bad)
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "odd.pth")


@pytest.mark.parametrize("tsv, variant, head, confidence", [
    ("tests/data/hrnet_w18_small_v2_adpc_state_dict.tsv", "w18_small_v2", "redesigned", True),
])
def test_reference_adpc_checkpoint_loads(tsv, variant, head, confidence, tmp_path):
    path, state = _reference_file(tsv, tmp_path)
    model = anytimeify.convert(hrnet_seg(variant, num_classes=19), head=head,
                               confidence=anytimeify.Confidence() if confidence else None)
    result = load_reference_checkpoint(model, path)
    assert result.missing == [] and result.ignored == []
    own = model.state_dict()
    assert torch.equal(own["exits.0.21.weight"], state["model.exit1.21.weight"])
    assert torch.equal(own["stage3.0.branches.2.0.conv1.interp_lambda"], state["model.stage3.0.branches.2.0.conv1.Lambda"])
    assert torch.equal(own["last_layer.3.bias"], state["model.last_layer.3.bias"])


def test_reference_ee_checkpoint_loads_into_original_heads(tmp_path):
    path, state = _reference_file("tests/data/hrnet_w48_ee_state_dict.tsv", tmp_path, prefix="", wrap=False)
    model = anytimeify.convert(hrnet_seg("w48", num_classes=19), head="original")
    load_reference_checkpoint(model, path)
    assert torch.equal(model.state_dict()["exits.2.3.weight"], state["exit3.3.weight"])
    # the same file does not fit redesigned heads, and the error says why
    other = anytimeify.convert(hrnet_seg("w48", num_classes=19), head="redesigned")
    with pytest.raises(ValueError, match="Convert with the checkpoint's head kind"):
        load_reference_checkpoint(other, path)


def test_backbone_loads_into_a_model_with_confidence(timm_classifier, tmp_path):
    path = tmp_path / "hrnet.pth"
    torch.save(timm_classifier.state_dict(), path)
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=19), confidence=anytimeify.Confidence())
    result = load_backbone(model, path)
    assert result.missing == []
    assert torch.equal(model.stage3[0].branches[0][0].conv1.weight,
                       timm_classifier.state_dict()["stage3.0.branches.0.0.conv1.weight"])
    assert model.stage3[0].branches[0][0].conv1.interp_lambda.item() == 3.0


def test_the_example_reference_checkpoint_has_valid_batch_norm_statistics(tmp_path):
    """examples/load_checkpoints.py fills the reference layout with random values; a negative
    running variance made the converted model's logits NaN (and the example warn about it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "load_checkpoints.py"
    spec = importlib.util.spec_from_file_location("load_checkpoints_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    _, state = example.write_reference_checkpoint(tmp_path, example.REFERENCE_LAYOUT)
    variances = [v for k, v in state.items() if k.endswith(".running_var")]
    assert variances and all(bool((v > 0).all()) for v in variances)
