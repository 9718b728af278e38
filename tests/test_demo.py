"""`anytimeify demo`: trains, evaluates on held-out scenes, writes its outputs, reuses the model."""
import dataclasses
import json
import os

import pytest
import torch

from anytimeify import demo
from anytimeify.cli import main


@pytest.fixture
def small_demo(monkeypatch):
    # the real recipe evaluates 100 pages of 512x512 after minutes of training; the mechanics are the same
    monkeypatch.setattr(demo, "DEFAULT_SETTINGS", demo.DemoSettings(val_scenes=3, batch_size=4, eval_scene=96,
                                                                    eval_digits=(3, 5)))


def test_demo_trains_evaluates_writes_and_reuses(tmp_path, capsys, small_demo, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.1", "--out", str(out), "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"exit", "miou", "miou_ca", "paper_gflops", "paper_gflops_ca", "skipped", "seconds", "seconds_ca"}
    assert [set(e) for e in result["exits"]] == [keys] * 4
    assert [e["exit"] for e in result["exits"]] == [1, 2, 3, 4]
    exits = result["exits"]
    assert all(b["paper_gflops"] > a["paper_gflops"] for a, b in zip(exits, exits[1:]))  # cumulative
    # without confidence adaptivity the counts are fvcore's for the same network without masks
    import anytimeify
    from anytimeify.models import hrnet_seg

    settings = demo.DEFAULT_SETTINGS
    fvcore = anytimeify.flops(anytimeify.convert(hrnet_seg(settings.model.replace("hrnet_", ""), num_classes=11)),
                              (settings.eval_scene, settings.eval_scene))
    assert [e["paper_gflops"] for e in exits] == pytest.approx([e.paper_gflops for e in fvcore.exits], abs=2e-6)
    assert all(e["paper_gflops_ca"] <= e["paper_gflops"] + 1e-9 for e in exits)
    assert exits[0]["paper_gflops_ca"] == exits[0]["paper_gflops"]  # nothing is masked before exit 1
    assert all(0.0 <= e["skipped"] <= 1.0 for e in exits) and exits[-1]["skipped"] == 0.0
    assert all(0.0 <= e["miou"] <= 100.0 and 0.0 <= e["miou_ca"] <= 100.0 for e in exits)
    assert all(b["seconds"] > a["seconds"] and b["seconds_ca"] > a["seconds_ca"] for a, b in zip(exits, exits[1:]))
    assert result["train_seconds"] > 0 and result["iterations"] >= 1 and not result["reused"]
    assert result["val_images"] == 3 and result["timed_images"] == 3
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "anytime-model", "demo.json", "log.jsonl", "model.safetensors", "progression.png", "result.json"]
    # the saved anytime model is the trained one: it reloads with the same weights
    import anytimeify
    from safetensors.torch import load_file

    reloaded = anytimeify.load(out / "anytime-model").state_dict()
    trained = load_file(str(out / "model.safetensors"))
    assert reloaded.keys() == trained.keys() and all(torch.equal(reloaded[k], trained[k]) for k in trained)
    from PIL import Image

    with Image.open(out / "progression.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] / 2
    assert json.loads((out / "result.json").read_text())["exits"] == exits

    # a second run reuses the trained model: no training, the same weights file
    weights_mtime = os.stat(out / "model.safetensors").st_mtime_ns
    assert main(["demo", "--out", str(out), "--threads", "1", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["reused"] and again["iterations"] == result["iterations"]
    assert again["train_seconds"] == result["train_seconds"]
    assert [e["miou"] for e in again["exits"]] == [e["miou"] for e in exits]  # the same model on the same scenes
    assert os.stat(out / "model.safetensors").st_mtime_ns == weights_mtime

    # evaluation-only settings (the held-out pages) do not retrain; a training setting does
    settings = demo.DEFAULT_SETTINGS
    monkeypatch.setattr(demo, "DEFAULT_SETTINGS", dataclasses.replace(settings, eval_scene=128, val_scenes=2))
    assert main(["demo", "--out", str(out), "--threads", "1", "--json"]) == 0
    other_pages = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other_pages["reused"] and other_pages["eval_scene"] == [128, 128] and other_pages["val_images"] == 2
    monkeypatch.setattr(demo, "DEFAULT_SETTINGS", dataclasses.replace(settings, lr=1e-3))
    assert main(["demo", "--minutes", "0.05", "--out", str(out), "--threads", "1", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"]


def test_demo_rejects_a_non_positive_budget(tmp_path, capsys):
    assert main(["demo", "--minutes", "0", "--out", str(tmp_path)]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err
