"""Training: two-iteration runs (segmentation, pose), gradients of every exit, bit-identical resume,
checkpoints that do not fit, configs and schedules."""
import json
import os

import pytest
import torch
import yaml
from torch.utils.data import Dataset

import anytimeify
from anytimeify.cli import main
from anytimeify.train import (CheckpointMismatch, ConfigError, HeatmapMSELoss, MultiExitLoss, SegmentationLoss,
                              Trainer, build_datasets, build_loss, build_model, config_from_dict, load_config,
                              load_training_state, load_weights, read_training_state)
from anytimeify.train.checkpointing import atomic_write, save_training_state
from anytimeify.train.optim import LRFactor


def tiny_config(out, **overrides):
    """HRNet-W18-Small-v2 on four 64x64 digit scenes, batch 2, one thread (the suite's processes
    share two cores; more threads than free cores make oneDNN spin)."""
    raw = {
        "out": str(out), "progress": "off", "log_every": 1, "threads": 1, "seed": 7,
        "model": {"name": "hrnet_w18_small_v2", "num_classes": 11},
        "confidence": {"threshold": 0.5},
        "data": {"train": {"name": "digits", "length": 4, "size": [64, 64],
                           "transforms": {"crop_size": [64, 64], "scale": [0.75, 1.25], "flip": True}},
                 "val": {"name": "digits", "length": 2, "size": [64, 64]},
                 "batch_size": 2, "workers": 0},
        "optim": {"name": "sgd", "lr": 0.01},
        "schedule": {"iterations": 2},
        "checkpoint": {"every": 1, "keep": 3},
        "eval": {"every_epochs": 0},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def write_config(tmp_path, raw):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_two_iterations_of_segmentation_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_config(out))
    assert main(["train", str(config), "--set", "optim.lr=0.02", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and not summary["stopped_early"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(len(r["loss_exits"]) == 4 and all(v > 0 for v in r["loss_exits"]) for r in train)
    assert train[0]["lr"] == pytest.approx(0.02)  # the override reached the optimiser
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) == 1 and [e["exit"] for e in evals[0]["exits"]] == [1, 2, 3, 4]
    assert all(0 <= e["metrics"]["miou"] <= 100 for e in evals[0]["exits"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-0000001.pt", "ckpt-0000002.pt"]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.02
    # the trained weights load into a freshly built model, and differ from its initialisation
    fresh = build_model(load_config(out / "config.yaml"))
    before = fresh.state_dict()["conv1.weight"].clone()
    load_weights(fresh, out / "model.safetensors")
    assert not torch.equal(before, fresh.state_dict()["conv1.weight"])
    # and `anytimeify eval` reads them back
    assert main(["eval", str(config), "--checkpoint", str(out / "model.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [len(r["exits"]) for r in report["reports"]] == [4, 4]
    assert [r["confidence"] for r in report["reports"]] == [True, False]
    with_ca, without = report["reports"]
    assert all(a["paper_gflops"] <= b["paper_gflops"] + 1e-9 for a, b in zip(with_ca["exits"], without["exits"]))


class TinyPose(Dataset):
    """Three joints drawn as bright dots on noise: enough structure for a loss that moves."""

    def __init__(self, n=4, transform=None):
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 64, 64, generator=g) * 0.3
        joints = torch.randint(8, 56, (3, 2), generator=g).float()
        for x, y in joints.long().tolist():
            image[:, y - 2:y + 3, x - 2:x + 3] = 1.0
        return self.transform(image, joints, torch.ones(3))


def test_two_iterations_of_pose_with_the_heatmap_criterion(tmp_path):
    from anytimeify.data import pose_transforms
    from anytimeify.metrics import HeatmapPCK

    cfg = config_from_dict({"task": "pose", "out": str(tmp_path), "progress": "off", "threads": 1,
                            "model": {"name": "hrnet_w18_small_v2_pose", "num_classes": 3},
                            "confidence": {"criterion": "heatmap", "threshold": 0.002},
                            "data": {"batch_size": 2, "workers": 0},
                            "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
                            "schedule": {"name": "step", "iterations": 2, "milestones": [1]},
                            "checkpoint": {"every": 0}, "eval": {"every_epochs": 0}})
    model = build_model(cfg)
    transform = pose_transforms(True, input_size=(64, 64), rotation=30, scale=0.25, flip_pairs=[(0, 1)])
    data = TinyPose(2, transform)  # one step per epoch: the milestone at epoch 1 is step 2
    trainer = Trainer(model, data, config=cfg, loss=build_loss(cfg), val_set=TinyPose(2, pose_transforms(False, input_size=(64, 64))),
                      metric=HeatmapPCK)
    result = trainer.fit()
    assert result.steps == 2
    assert all(len(h["loss_exits"]) == 4 and all(torch.isfinite(torch.tensor(h["loss_exits"]))) for h in result.history)
    assert result.history[1]["lr"] == pytest.approx(1e-4)  # x0.1 from the milestone on
    assert [sorted(e.metrics) for e in result.evaluations[-1].exits] == [["pck"]] * 4


def test_every_exit_loss_reaches_the_trunk_its_head_and_the_interpolation_lambdas():
    from anytimeify.masking import MaskedConv2d
    from anytimeify.models import hrnet_seg

    torch.manual_seed(0)
    net = hrnet_seg("w18_small_v2", num_classes=3)
    # the random criterion skips 30% of positions at every size, so every masked conv interpolates
    model = anytimeify.convert(net, confidence=anytimeify.Confidence(criterion="random", fraction=0.3, seed=0)).train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    outputs = model(images)
    lambdas = {n: p for n, p in model.named_parameters() if n.endswith("interp_lambda")}
    assert lambdas, "confidence adaptivity added no interpolation lambdas"
    # the classifier conv of a masked head: copy aggregation replaces its output wherever it
    # interpolated (confident positions keep the earlier exit's logits), so its lambda gets no gradient
    classifiers = set()
    for prefix in ("exits.1.", "exits.2.", "last_layer."):
        masked = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, MaskedConv2d)]
        classifiers.add(masked[-1] + ".interp_lambda")
    criterion = SegmentationLoss()
    heads = [[p for n, p in model.named_parameters() if n.startswith(f"exits.{k}.")] for k in range(3)]
    heads.append([p for n, p in model.named_parameters() if n.startswith("last_layer.")])
    for k, out in enumerate(outputs):
        loss = criterion(out, labels)
        names = ["conv1.weight"] + [f"head {k}"] * len(heads[k]) + list(lambdas)
        params = [model.conv1.weight] + heads[k] + list(lambdas.values())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        nonzero = {name: g is not None and bool(g.abs().sum() > 0) for name, g in zip(names, grads)}
        assert nonzero["conv1.weight"], f"exit {k + 1}'s loss does not reach the stem"
        head_names = [n for n, p in model.named_parameters() if any(p is q for q in heads[k])]
        assert all(g is not None and g.abs().sum() > 0 for n, g in zip(head_names, grads[1:1 + len(heads[k])])
                   if n not in classifiers), f"exit {k + 1}'s loss does not reach every parameter of its head"
        if k > 0:  # exit 1 comes before any masked conv
            assert any(nonzero[n] for n in lambdas), f"exit {k + 1}'s loss reaches no interpolation lambda"
    total, _ = MultiExitLoss(criterion)(outputs, labels)
    grads = dict(zip(lambdas, torch.autograd.grad(total, list(lambdas.values()))))
    without = [n for n, g in grads.items() if not g.abs() > 0]
    assert sorted(without) == sorted(classifiers), without


def _trainer(cfg):
    model = build_model(cfg)
    train, _ = build_datasets(cfg)
    return Trainer(model, train, config=cfg, loss=build_loss(cfg))


def test_resume_continues_bit_identically_on_cpu(tmp_path):
    raw = tiny_config(tmp_path / "straight", **{"schedule.iterations": 4, "data.val": None,
                                                 "confidence.start_epoch": 1})
    straight = _trainer(config_from_dict(raw))
    whole = straight.fit()
    assert whole.steps == 4 and [h["epoch"] for h in whole.history] == [0, 0, 1, 1]  # CA switches on at epoch 1

    raw["out"] = str(tmp_path / "interrupted")
    first = _trainer(config_from_dict(raw))
    part = first.fit(stop_at=2)
    assert part.steps == 2 and part.stopped_early
    second = _trainer(config_from_dict(raw))
    rest = second.fit(resume="auto")
    assert [h["step"] for h in rest.history] == [3, 4]
    assert [h["loss_exits"] for h in rest.history] == [h["loss_exits"] for h in whole.history[2:]]
    assert [h["lr"] for h in rest.history] == [h["lr"] for h in whole.history[2:]]
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def test_a_checkpoint_of_another_model_fails_naming_the_keys_and_changes_nothing(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path / "a", **{"data.val": None}))
    trainer = _trainer(cfg)
    path = tmp_path / "a" / "state.pt"
    save_training_state(path, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                        position={"epoch": 0, "step": 0, "sample": 0})
    other_cfg = config_from_dict(tiny_config(tmp_path / "b", **{"model.num_classes": 5, "data.val": None}))
    other = _trainer(other_cfg)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    optimizer_before = other.optimizer.state_dict()
    with pytest.raises(CheckpointMismatch, match=r"last_layer\.3\.weight: checkpoint \(11, 270, 1, 1\) vs model "
                                                 r"\(5, 270, 1, 1\)") as err:
        load_training_state(path, model=other.model, optimizer=other.optimizer)
    assert "Nothing was loaded" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())
    assert other.optimizer.state_dict() == optimizer_before
    # a model without confidence adaptivity lacks the lambdas: they are named too
    no_ca = _trainer(config_from_dict(tiny_config(tmp_path / "c", **{"confidence.enabled": False, "data.val": None})))
    with pytest.raises(CheckpointMismatch, match="interp_lambda"):
        load_weights(no_ca.model, path)


def test_corrupt_or_missing_checkpoints_fail_with_their_path(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=str(bad)):
        read_training_state(bad)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_training_state(tmp_path / "nope.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not an anytimeify training checkpoint"):
        read_training_state(plain)


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write(target, lambda tmp: torch.save({"a": torch.ones(2)}, tmp))

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's private mode


def test_config_errors_name_the_key_and_what_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*optim takes"):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        config_from_dict({"modle": {}})
    with pytest.raises(ConfigError, match=r"'precision': must be one of \['fp32', 'bf16', 'fp16'\]"):
        config_from_dict({"precision": "fp8"})
    with pytest.raises(ConfigError, match="data.batch_size"):
        config_from_dict({"data": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    cfg = load_config(None, ["optim.lr=0.5", "data.train.name=digits", "data.train.transforms.crop_size=[32,64]",
                             "schedule.iterations=3"])
    assert cfg.optim.lr == 0.5 and cfg.data.train["transforms"]["crop_size"] == [32, 64]
    assert cfg.schedule.iterations == 3


def test_learning_rate_schedules():
    poly = LRFactor("poly", total=100, power=0.9)
    assert [poly(i) for i in (0, 50, 100)] == pytest.approx([1.0, 0.5 ** 0.9, 0.0])
    step = LRFactor("step", total=300, iters_per_epoch=10, milestones=(17, 20), gamma=0.1)
    assert [step(i) for i in (0, 169, 170, 199, 200)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = LRFactor("constant", total=10, warmup_iters=4, warmup_factor=0.2)
    assert [warm(i) for i in (0, 2, 4)] == pytest.approx([0.2, 0.6, 1.0])


def test_losses_upsample_weight_and_ignore():
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1, 255, 255]] * 4])
    loss = SegmentationLoss(class_weights=[1.0, 3.0])(logits, labels)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # uniform logits: log 2 per pixel
    loss.backward()
    assert logits.grad is not None
    pred = torch.zeros(1, 2, 4, 4)
    target = {"heatmaps": torch.ones(1, 2, 4, 4), "weights": torch.tensor([[1.0, 0.0]])}
    # joint 0: 0.5 * mean((0 - 1)^2) = 0.5; joint 1 weighted out: 0; mean over joints 0.25
    assert HeatmapMSELoss()(pred, target).item() == pytest.approx(0.25)
    total, parts = MultiExitLoss(lambda out, t: out.sum(), exit_weights=[1.0, 2.0])([torch.ones(1), torch.ones(1)], None)
    assert total.item() == 3.0 and [p.item() for p in parts] == [1.0, 1.0]
    with pytest.raises(ValueError, match="exit_weights has 2 values but the model has 3 exits"):
        MultiExitLoss(lambda out, t: out.sum(), exit_weights=[1.0, 2.0])([torch.ones(1)] * 3, None)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "examples", "configs"))))
def test_example_configs_are_valid(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", name)
    cfg = load_config(path)
    assert cfg.model.name in anytimeify.models.list_models()
    assert cfg.data.val is not None


def test_evaluation_uses_confidence_from_the_epoch_it_was_switched_on_in_training(tmp_path):
    # two steps per epoch; confidence adaptivity trains from epoch 1: the evaluation after epoch 0
    # sees the model trained without it, and so runs without it; the final one with it
    raw = tiny_config(tmp_path / "run", **{"schedule.iterations": 4, "confidence.start_epoch": 1,
                                           "eval.every_epochs": 1, "checkpoint.every": 0})
    from anytimeify.train import build_metric

    cfg = config_from_dict(raw)
    train, val = build_datasets(cfg)
    trainer = Trainer(build_model(cfg), train, val_set=val, metric=build_metric(cfg, 11), config=cfg,
                      loss=build_loss(cfg))
    result = trainer.fit()
    assert [h["epoch"] for h in result.history] == [0, 0, 1, 1]
    assert [report.confidence for report in result.evaluations] == [False, True]
