"""torch.export of forward and of each segment, saving and loading the programs, and ONNX: exported
programs equal the eager model's outputs, masks included."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import anytimeify
from anytimeify import Confidence
from anytimeify import export, load_export


class Small(nn.Module):
    """Three strided stages and a head at stride 4: three exits, small enough to export in seconds."""

    def __init__(self, num_classes: int = 4):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

        self.stem = nn.Sequential(stage(3, 8), stage(8, 16))
        self.stage1 = stage(16, 24)
        self.stage2 = stage(24, 32)
        self.head = nn.Conv2d(16 + 32, num_classes, 1)

    def forward(self, x):
        low = self.stem(x)
        high = self.stage2(self.stage1(low))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([low, high], dim=1))


def _convert(confidence=None) -> anytimeify.AnytimeModel:
    torch.manual_seed(0)
    net = Small().eval()
    model = anytimeify.convert(net, exits=["stem", "stage1"], input_size=(32, 48), width=8, confidence=confidence)
    # weights that give varied confidences, and trained-looking batch-norm statistics
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=2.0 / (module.weight[0].numel() ** 0.5))
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def ca_model():
    return _convert(Confidence(threshold=0.8))


@pytest.fixture(scope="module")
def exported(ca_model):
    """forward and every segment, with a dynamic batch dimension (exported at batch 2)."""
    return export(ca_model, _inputs(2), dynamic_batch=True)


def _inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 48, generator=torch.Generator().manual_seed(batch))


def _check_against_eager(model, exported, x):
    with torch.no_grad():
        eager = list(model.anytime(x))
        served = list(exported.run(x))
        forward = exported(x) if exported.forward is not None else None
    assert [s.index for s in served] == [e.index for e in eager] == list(range(1, model.num_exits + 1))
    for s, e in zip(served, eager):
        torch.testing.assert_close(s.logits, e.logits, rtol=1e-4, atol=1e-4)
        if e.mask is None:
            assert s.mask is None
        else:
            assert s.mask.dtype == torch.bool and torch.equal(s.mask, e.mask)
    if forward is not None:
        assert len(forward) == len(eager)
        for f, e in zip(forward, eager):
            torch.testing.assert_close(f, e.logits, rtol=1e-4, atol=1e-4)
    return eager


def test_segments_and_forward_equal_eager_with_confidence(ca_model, exported):
    assert len(exported.segments) == ca_model.num_exits == 3
    for batch in (2, 1, 3):  # the batch it was exported with and others
        eager = _check_against_eager(ca_model, exported, _inputs(batch))
        # the masks really skip something here, so the copy of confident predictions is exercised
        assert 0.0 < eager[0].skipped < 1.0
    # segment 0 takes the image, later ones the masks as bool tensors
    assert exported.segments[0].inputs == [exported.input_name]
    assert exported.segments[0].mask in exported.segments[1].inputs
    # the model itself is untouched (its masked convs still run as they did)
    assert ca_model.confidence.execution == "auto"


def test_models_without_confidence_and_frozen_models_export(ca_model):
    plain = _convert()
    x = _inputs(1)
    fixed = export(plain, x)
    _check_against_eager(plain, fixed, x)
    with pytest.raises(ValueError, match=r"exported for inputs of shape \(1, 3, 32, 48\)"):
        next(fixed.run(_inputs(2)))
    # a dynamic batch from an example of one image (torch.export specializes size-1 dimensions)
    _check_against_eager(plain, export(plain, x, forward=False, dynamic_batch=True), _inputs(3))
    frozen = ca_model.freeze()
    _check_against_eager(frozen, export(frozen, x, forward=False), x)


def test_save_and_load(ca_model, exported, tmp_path):
    folder = exported.save(tmp_path / "served")
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["format"] == "anytimeify-export/1" and manifest["dynamic_batch"] is True
    assert [s["file"] for s in manifest["segments"]] == ["segment_0.pt2", "segment_1.pt2", "segment_2.pt2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded = load_export(folder)
    _check_against_eager(ca_model, loaded, _inputs(3))
    with pytest.raises(FileExistsError, match="exists"):
        exported.save(folder)
    with pytest.raises(ValueError, match="export read from disk"):
        loaded.to_onnx(tmp_path / "onnx")
    (folder / "segment_1.pt2").unlink()
    with pytest.raises(FileNotFoundError, match="segment_1.pt2"):
        load_export(folder)
    with pytest.raises(FileNotFoundError, match="export.json"):
        load_export(tmp_path)


def test_bad_arguments(ca_model):
    with pytest.raises(TypeError, match="converted model"):
        export(Small(), _inputs(1))
    with pytest.raises(ValueError, match="multiples of 16"):
        export(ca_model, torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match="nothing to export"):
        export(ca_model, _inputs(1), segments=False, forward=False)


def test_onnx_segments_equal_eager(ca_model, exported, tmp_path):
    import onnxruntime as ort  # in the [test] extra

    files = exported.to_onnx(tmp_path / "onnx")
    assert [f.name for f in files] == ["forward.onnx", "segment_0.onnx", "segment_1.onnx", "segment_2.onnx"]
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    x3 = _inputs(3)
    with torch.no_grad():
        eager = list(ca_model.anytime(x3))
    env = {manifest["input_name"]: x3.numpy()}
    for entry, ref in zip(manifest["segments"], eager):
        session = ort.InferenceSession(str(tmp_path / "onnx" / entry["file"]))
        assert [i.name for i in session.get_inputs()] == entry["inputs"]
        env.update(zip(entry["outputs"], session.run(None, {name: env[name] for name in entry["inputs"]})))
        torch.testing.assert_close(torch.from_numpy(env[entry["exit"]]), ref.logits, rtol=1e-4, atol=1e-4)
        if entry["mask"]:
            assert torch.equal(torch.from_numpy(env[entry["mask"]]), ref.mask)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "forward.onnx"))
    for out, ref in zip(session.run(None, {manifest["input_name"]: x3.numpy()}), eager):
        torch.testing.assert_close(torch.from_numpy(out), ref.logits, rtol=1e-4, atol=1e-4)


def test_cli_export(ca_model, tmp_path, capsys):
    from anytimeify.cli import main

    anytimeify.save(ca_model, tmp_path / "model", source={"factory": "test_export:Small"})
    # the folder names a factory of this test module: code, which runs only with the user's opt-in
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "served"), "--input", "32x48",
                 "--no-forward", "--json"]) == 2
    assert "--trust-code test_export:Small" in capsys.readouterr().err
    assert not (tmp_path / "served").exists()
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "served"), "--input", "32x48",
                 "--no-forward", "--json", "--trust-code", "test_export:Small"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["input"] == [1, 3, 32, 48] and len(payload["files"]) == 3
    _check_against_eager(ca_model, load_export(tmp_path / "served"), _inputs(1))
    # errors are one line naming what is wrong
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "served"), "--input", "32x48"]) == 2
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "other"), "--input", "30x48",
                 "--trust-code", "test_export:Small"]) == 2
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "other"), "--input", "32x48"]) == 2
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "other"), "--input", "32x48",
                 "--batch", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("anytimeify export: error: ") for line in lines)
    assert "exists" in lines[0] and "30x48" in lines[1] and "nowhere" in lines[2] and "--batch" in lines[3]
    assert not (tmp_path / "other").exists()
