"""`anytimeify demo`: trains a fixed number of steps whatever the machine's load (warning where the
run will be long), keeps only a sane training, evaluates on held-out scenes, writes its outputs,
reuses the model.

The real recipe trains 450 steps and evaluates 100 pages of 512x512; the mechanics are the same on
a tiny recipe (the smallest HRNet, 32x32 scenes, 4 steps of 2, one 64x64 page). The demo's clock is
replaced by one that advances a set number of seconds per optimiser step, so that "a fast machine"
and "a loaded machine" are what the test says, not what the test machine happens to be.
"""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

from anytimeify import demo
from anytimeify.cli import main
from anytimeify.train import loop

TINY = demo.DemoSettings(model="hrnet_w18_small", scene=32, digits=(1, 2), digit_size=(12, 20), batch_size=2,
                         steps=4, val_scenes=2, timed_scenes=2, eval_scene=64, eval_digits=(2, 3), probe_steps=2,
                         reference_step_seconds=1.0, max_loss_ratio=2.0)


@pytest.fixture
def step_clock(monkeypatch):
    """``step_clock(s)``: the demo's clock reads ``s`` seconds per optimiser step done so far."""
    done = {"steps": 0}
    original = loop.Trainer._optimizer_step

    def counted(self):
        original(self)
        done["steps"] += 1

    monkeypatch.setattr(loop.Trainer, "_optimizer_step", counted)

    def install(seconds_per_step: float) -> None:
        monkeypatch.setattr(demo, "_clock", lambda: seconds_per_step * done["steps"])

    return install


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_SETTINGS", TINY)


def _result(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_trains_evaluates_writes_and_reuses(tmp_path, capsys, tiny_demo, step_clock, monkeypatch):
    step_clock(0.01)  # a fast machine: no warning
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--threads", "1", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "seems loaded" not in captured.err
    keys = {"exit", "miou", "miou_ca", "paper_gflops", "paper_gflops_ca", "skipped", "seconds", "seconds_ca"}
    assert [set(e) for e in result["exits"]] == [keys] * 4
    assert [e["exit"] for e in result["exits"]] == [1, 2, 3, 4]
    exits = result["exits"]
    assert all(b["paper_gflops"] > a["paper_gflops"] for a, b in zip(exits, exits[1:]))  # cumulative
    # without confidence adaptivity the counts are fvcore's for the same network without masks
    import anytimeify
    from anytimeify.models import hrnet_seg

    fvcore = anytimeify.flops(anytimeify.convert(hrnet_seg(TINY.model.replace("hrnet_", ""), num_classes=11)),
                              (TINY.eval_scene, TINY.eval_scene))
    assert [e["paper_gflops"] for e in exits] == pytest.approx([e.paper_gflops for e in fvcore.exits], abs=2e-6)
    assert all(e["paper_gflops_ca"] <= e["paper_gflops"] + 1e-9 for e in exits)
    assert exits[0]["paper_gflops_ca"] == exits[0]["paper_gflops"]  # nothing is masked before exit 1
    assert all(0.0 <= e["skipped"] <= 1.0 for e in exits) and exits[-1]["skipped"] == 0.0
    assert all(0.0 <= e["miou"] <= 100.0 and 0.0 <= e["miou_ca"] <= 100.0 for e in exits)
    assert all(b["seconds"] > a["seconds"] and b["seconds_ca"] > a["seconds_ca"] for a, b in zip(exits, exits[1:]))
    # what was trained, on what, and how long (by the demo's clock: 4 steps of 0.01 s)
    training = result["training"]
    assert result["steps"] == result["iterations"] == training["steps"] == 4 and not result["reused"]
    assert result["batch_size"] == training["batch_size"] == 2
    assert training["seconds"] == result["train_seconds"] == pytest.approx(0.04)
    assert training["threads"] == result["threads"] == torch.get_num_threads() == 1
    assert isinstance(training["cpu"], str) and training["cpu"] == result["cpu"]
    if hasattr(os, "getloadavg"):
        assert all(len(load) == 3 for load in (training["loadavg_start"], training["loadavg_end"],
                                                result["loadavg_start"], result["loadavg_end"]))
    assert training["slow"] is False and training["projected_seconds"] == pytest.approx(0.04)
    assert result["val_images"] == 2 and result["timed_images"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "anytime-model", "demo.json", "log.jsonl", "model.safetensors", "page.png", "progression.png", "result.json"]
    # the saved anytime model is the trained one: it reloads with the same weights
    from safetensors.torch import load_file

    reloaded = anytimeify.load(out / "anytime-model").state_dict()
    trained = load_file(str(out / "model.safetensors"))
    assert reloaded.keys() == trained.keys() and all(torch.equal(reloaded[k], trained[k]) for k in trained)
    from PIL import Image

    with Image.open(out / "progression.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] / 2
    # page.png: a held-out page as it is evaluated, for `anytimeify visualize anytime-model page.png`
    with Image.open(out / "page.png") as picture:
        assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (TINY.eval_scene,) * 2
    pages = demo.demo_config(TINY, str(out), 0, 4)
    from anytimeify.train import build_datasets

    raw, _, _ = build_datasets(pages)[1].scene(1)  # the last page of two (never one progression.png shows first)
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(out / "page.png") as picture:
        assert (pil_to_tensor(picture).float() / 255 - raw).abs().max() <= 0.5 / 255 + 1e-6
    assert json.loads((out / "result.json").read_text())["exits"] == exits
    # README's command on the demo's outputs
    assert main(["visualize", str(out / "anytime-model"), str(out / "page.png"), "--out", str(tmp_path / "exits.png"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"].endswith("exits.png")

    # a second run reuses the trained model: no training, the same weights file
    weights_mtime = os.stat(out / "model.safetensors").st_mtime_ns
    assert main(["demo", "--out", str(out), "--threads", "1", "--json"]) == 0
    again = _result(capsys)
    assert again["reused"] and again["iterations"] == 4 and again["training"] == training
    assert [e["miou"] for e in again["exits"]] == [e["miou"] for e in exits]  # the same model on the same scenes
    assert os.stat(out / "model.safetensors").st_mtime_ns == weights_mtime

    # evaluation-only settings (the held-out pages) do not retrain; a training setting does
    monkeypatch.setattr(demo, "DEFAULT_SETTINGS", dataclasses.replace(TINY, eval_scene=96, val_scenes=1))
    assert main(["demo", "--out", str(out), "--threads", "1", "--json"]) == 0
    other_pages = _result(capsys)
    assert other_pages["reused"] and other_pages["eval_scene"] == [96, 96] and other_pages["val_images"] == 1
    monkeypatch.setattr(demo, "DEFAULT_SETTINGS", dataclasses.replace(TINY, lr=1e-3, val_scenes=1))
    assert main(["demo", "--out", str(out), "--threads", "1", "--json"]) == 0
    assert not _result(capsys)["reused"]


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_loaded_machine_trains_the_same_steps_and_says_so(tmp_path, capsys, step_clock):
    """Each step appears to take 30 s (30x the reference): the demo warns with the projected time
    and trains every step, to the same weights as on a fast machine."""
    settings = dataclasses.replace(TINY, val_scenes=1)
    step_clock(0.01)
    fast = demo.run_demo(out=str(tmp_path / "fast"), settings=settings, threads=1, as_json=True)
    assert "seems loaded" not in capsys.readouterr().err
    step_clock(30.0)
    slow = demo.run_demo(out=str(tmp_path / "slow"), settings=settings, threads=1, as_json=True)
    err = " ".join(capsys.readouterr().err.split())
    assert slow["steps"] == slow["iterations"] == slow["training"]["steps"] == fast["iterations"] == 4
    assert "this machine seems loaded" in err and "30.00 s each" in err
    assert "the 4 steps will take about 2 min 0 s instead of about 4 s" in err
    assert "the same 4 steps and gives the same result, only later" in err
    training = slow["training"]
    assert training["slow"] is True and training["projected_seconds"] == pytest.approx(120.0)
    assert training["seconds_per_step_first"] == pytest.approx(30.0) and training["seconds"] == pytest.approx(120.0)
    a, b = _weights(tmp_path / "fast"), _weights(tmp_path / "slow")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert [e["miou"] for e in slow["exits"]] == pytest.approx([e["miou"] for e in fast["exits"]], abs=0.01)


def test_a_training_whose_loss_did_not_fall_is_neither_kept_nor_reused(tmp_path, capsys, step_clock):
    step_clock(0.01)
    out = tmp_path / "demo"
    strict = dataclasses.replace(TINY, max_loss_ratio=1e-3)  # 4 steps cannot take the loss down 1000x
    with pytest.raises(RuntimeError, match=r"did not train: its loss went from [\d.]+ to [\d.]+ in 4 steps"):
        demo.run_demo(out=str(out), settings=strict, threads=1)
    # nothing the next run (or anytimeify.load) would take: no weights, record, model or result
    assert sorted(p.name for p in out.iterdir()) == ["failed-training"]
    failed = out / "failed-training"
    assert {"model.safetensors", "demo.json", "log.jsonl"} <= {p.name for p in failed.iterdir()}
    record = json.loads((failed / "demo.json").read_text())
    assert record["sane"] is False and record["training"]["steps"] == 4

    # weights whose record shows a loss that did not fall are not reused, even where they sit in
    # place of a model: the demo trains again (and, as strict as before, refuses again)
    for name in ("model.safetensors", "demo.json"):
        (out / name).write_bytes((failed / name).read_bytes())
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="did not train"):
        demo.run_demo(out=str(out), settings=strict, threads=1)
    assert "loss did not fall enough" in " ".join(capsys.readouterr().out.split())
    # a record of the earlier demo (trained for a time budget, stopped after 2 steps) is not reused either
    old = {"settings": {k: v for k, v in json.loads((failed / "demo.json").read_text())["settings"].items()
                        if k != "steps"}, "seed": 0, "iterations": 2, "train_seconds": 49.2, "stopped_early": True}
    (out / "model.safetensors").write_bytes((failed / "model.safetensors").read_bytes())
    (out / "demo.json").write_text(json.dumps(old))
    with pytest.raises(RuntimeError, match="did not train"):
        demo.run_demo(out=str(out), settings=strict, threads=1)
    assert "trained with other settings: training again" in " ".join(capsys.readouterr().out.split())


def test_a_training_that_fails_leaves_nothing_behind(tmp_path, step_clock, monkeypatch):
    from anytimeify import train

    class NaNLoss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, outputs, target):
            total, per_exit = self.inner(outputs, target)
            return total * float("nan"), per_exit

    real = train.build_loss
    monkeypatch.setattr(train, "build_loss", lambda cfg: NaNLoss(real(cfg)))
    step_clock(0.01)
    out = tmp_path / "demo"
    with pytest.raises(FloatingPointError):
        demo.run_demo(out=str(out), settings=TINY, threads=1)
    assert list(out.iterdir()) == []


def test_demo_refuses_minutes_and_too_few_steps(tmp_path, capsys):
    assert main(["demo", "--minutes", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--minutes 4: the demo no longer trains for a time but a fixed number of steps" in err
    assert "use --steps N (default 450)" in err
    for bad in (1, 0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"--steps must be a whole number of at least 2.*got {bad!r}"):
            demo.run_demo(out=str(tmp_path), steps=bad)
    assert list(tmp_path.iterdir()) == []
