"""anytimeify.save / anytimeify.load: safetensors + a JSON recipe, exact round trips, no pickle on
the load path, clear errors for missing or altered files; deadline- and budget-aware anytime()."""
import json
import os
import pickle

import pytest
import torch

import anytimeify
from anytimeify.models import create_model, hrnet_seg
from anytimeify.saving import RECIPE_FILE, WEIGHTS_FILE, SaveError

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _same(a, b, x=X):
    with torch.no_grad():
        for u, v in zip(a.anytime(x), b.anytime(x)):
            assert u.index == v.index and torch.equal(u.logits, v.logits)
            assert u.paper_macs == v.paper_macs


def _roundtrip(model, path, **kwargs):
    # weights that differ from any fresh initialisation, so a load that built but did not load fails
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    anytimeify.save(model.eval(), path, **kwargs)
    return anytimeify.load(path)


@pytest.mark.parametrize("kind", ["ee", "ee_rh", "adpc"])
def test_round_trip_is_exact_for_the_papers_models(kind, tmp_path):
    torch.manual_seed(0)
    confidence = anytimeify.Confidence(threshold=0.4) if kind == "adpc" else None
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5), head="original" if kind == "ee" else "redesigned",
                               confidence=confidence)
    loaded = _roundtrip(model, tmp_path / kind)
    assert set(os.listdir(tmp_path / kind)) == {RECIPE_FILE, WEIGHTS_FILE}
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    _same(model, loaded)
    if kind == "adpc":
        assert loaded.confidence.threshold == 0.4 and loaded.confidence.criterion == "max_prob"
        assert any(o.skipped > 0 for o in loaded.anytime(X))


def test_round_trip_of_timm_smp_and_ranet_models(tmp_path):
    import segmentation_models_pytorch as smp
    import timm

    torch.manual_seed(1)
    classifier = anytimeify.convert(timm.create_model("resnet18", pretrained=False, num_classes=7),
                                    task="classification", input_size=(64, 64))
    _same(classifier, _roundtrip(classifier, tmp_path / "timm"))
    segmenter = anytimeify.convert(smp.Unet("resnet18", encoder_weights=None, classes=3), input_size=(64, 64))
    _same(segmenter, _roundtrip(segmenter, tmp_path / "smp"))
    ranet = create_model("ranet_cifar10")
    x = torch.randn(2, 3, 32, 32)
    _same(ranet, _roundtrip(ranet, tmp_path / "ranet"), x)


def test_a_frozen_model_saves_as_its_source_and_loads_frozen(tmp_path):
    torch.manual_seed(2)
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5),
                               confidence=anytimeify.Confidence(threshold=0.4)).eval()
    frozen = model.freeze()
    anytimeify.save(frozen, tmp_path / "f")
    loaded = anytimeify.load(tmp_path / "f")
    assert loaded.frozen
    _same(frozen, loaded)


def test_the_load_path_reads_no_pickle(tmp_path, monkeypatch):
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5)).eval()
    anytimeify.save(model, tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("load() unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _same(model, anytimeify.load(tmp_path / "m"))


def test_missing_or_altered_files_are_named(tmp_path):
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5)).eval()
    anytimeify.save(model, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        anytimeify.save(model, tmp_path / "m")
    anytimeify.save(model, tmp_path / "m", overwrite=True)
    weights = tmp_path / "m" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SaveError, match=f"{WEIGHTS_FILE}.*altered"):
        anytimeify.load(tmp_path / "m")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        anytimeify.load(tmp_path / "m")
    (tmp_path / "m" / RECIPE_FILE).write_text("{not json")
    anytimeify.save(model, tmp_path / "n")
    (tmp_path / "n" / RECIPE_FILE).write_text("{not json")
    with pytest.raises(SaveError, match=RECIPE_FILE):
        anytimeify.load(tmp_path / "n")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        anytimeify.load(tmp_path / "nowhere")
    # nothing half-written is left next to the saved directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "n"]


def test_an_unknown_base_network_needs_a_source(tmp_path):
    model = anytimeify.convert(Mine(), exits=["net.layer1", "net.stage2", "net.stage3"]).eval()
    with pytest.raises(SaveError, match="source="):
        anytimeify.save(model, tmp_path / "mine")
    assert not (tmp_path / "mine").exists()
    # a factory that builds another network is caught at save time, not at load time
    wrong = {"factory": "anytimeify.models.hrnet:hrnet_seg", "args": ["w18_small_v2", 7]}
    with pytest.raises(SaveError, match="does not rebuild"):
        anytimeify.save(model, tmp_path / "mine", source=wrong)
    right = {"factory": "test_saving:Mine", "args": [], "kwargs": {}}
    anytimeify.save(model, tmp_path / "mine", source=right)
    # the user's own factory is code the folder names: it loads only with the user's opt-in
    with pytest.raises(SaveError, match=r"trust_code=\['test_saving:Mine'\]"):
        anytimeify.load(tmp_path / "mine")
    _same(model, anytimeify.load(tmp_path / "mine", trust_code=["test_saving:Mine"]))
    recipe = json.loads((tmp_path / "mine" / RECIPE_FILE).read_text())
    assert recipe["conversion"]["exits"] == ["net.layer1", "net.stage2", "net.stage3"]


class Mine(torch.nn.Module):
    """A user's own network: anytimeify does not know its factory."""

    def __init__(self):
        super().__init__()
        self.net = hrnet_seg("w18_small_v2", num_classes=5)

    def forward(self, x):
        return self.net(x)


# --- deadlines and budgets ----------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(3)
    return anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5)).eval()


def _profile(model, seconds, key="1x3x64x64"):
    model.latency_profile = {key: {"seconds": list(seconds), "paper_gflops": [0.0] * len(seconds)}}


def test_a_deadline_never_starts_a_segment_that_cannot_finish(small):
    x = X[:1]
    _profile(small, [1.0, 2.0, 3.0, 4.0])
    clock = FakeClock()
    seen = []
    with torch.no_grad():
        for out in small.anytime(x, deadline=3.5, clock=clock):
            seen.append(out.index)
            clock.now += {1: 1.2, 2: 1.8}[out.index]  # the segment's time and the consumer's, together
    # exit 1 needs 1 of 3.5; exit 2 needs 2 of the 2.3 left; exit 3 needs 3 of the 0.5 left: not started
    assert seen == [1, 2]
    clock.now = 0.0
    assert [o.index for o in small.anytime(x, deadline=0.5, clock=clock)] == []  # not even exit 1 fits
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # random profiles, deadlines and segment times: the rule holds at every start
        seconds = (torch.rand(4, generator=g) * 2).tolist()
        _profile(small, seconds)
        deadline = float(torch.rand((), generator=g) * 5)
        clock = FakeClock()
        started = []
        for out in small.anytime(x, deadline=deadline, clock=clock):
            started.append(out.index)
            clock.now += float(torch.rand((), generator=g) * 2)
        k = len(started)
        assert started == list(range(1, k + 1))
        if k < 4:  # stopped because the next segment would not fit
            assert seconds[k] > deadline - clock.now


def test_a_deadline_needs_a_profile_and_profile_latency_makes_one(small):
    small.latency_profile = None
    with pytest.raises(ValueError, match="profile_latency"):
        list(small.anytime(X[:1], deadline=1.0))
    profile = small.profile_latency((64, 64), reps=1)
    assert len(profile["seconds"]) == 4 and all(s > 0 for s in profile["seconds"])
    assert "1x3x64x64" in small.latency_profile
    outs = list(small.anytime(X[:1], deadline=60.0))
    assert len(outs) == 4 and small.exits_until(X[:1], 60.0).index == 4


def test_a_flop_budget_stops_before_the_segment_that_would_exceed_it(small):
    small.latency_profile = None
    cumulative = [o.paper_gflops for o in small.anytime(X[:1])]
    budget = (cumulative[1] + cumulative[2]) / 2
    assert [o.index for o in small.anytime(X[:1], budget_gflops=budget)] == [1, 2]
    assert [o.index for o in small.anytime(X[:1], budget_gflops=cumulative[0] * 0.99)] == []


def test_the_latency_profile_is_saved_with_the_model(small, tmp_path):
    _profile(small, [0.1, 0.2, 0.3, 0.4])
    anytimeify.save(small, tmp_path / "p")
    assert anytimeify.load(tmp_path / "p").latency_profile == small.latency_profile


# --- the command line ---------------------------------------------------------------------------

def test_convert_command_saves_what_load_rebuilds(tmp_path, capsys):
    from anytimeify.cli import main

    out = tmp_path / "resnet"
    assert main(["convert", "timm:resnet18", "--task", "classification", "--num-classes", "5", "--input", "32x32",
                 "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["exits"] == 4 and payload["out"] == str(out)
    model = anytimeify.load(out)
    assert [e["name"] for e in model.exit_info] == ["layer1", "layer2", "layer3", "output"]
    assert model(torch.randn(1, 3, 32, 32))[-1].shape == (1, 5)
    assert main(["convert", "smp:unet:resnet18", "--num-classes", "3", "--input", "64x64", "--out",
                 str(tmp_path / "unet")]) == 0
    assert anytimeify.load(tmp_path / "unet")(torch.randn(1, 3, 64, 64))[-1].shape == (1, 3, 64, 64)
    capsys.readouterr()
    for argv, named in ((["convert", "nope", "--out", str(tmp_path / "x")], "'nope'"),
                        (["convert", "smp:nonet:resnet18", "--out", str(tmp_path / "x")], "nonet"),
                        (["convert", "timm:resnet18", "--task", "classification", "--out", str(out)], "overwrite")):
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and named in error, error
    assert not (tmp_path / "x").exists()


def test_version(capsys):
    from anytimeify.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"anytimeify {anytimeify.__version__}"
