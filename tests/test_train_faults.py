"""Training-run faults: config values refused naming their key, a diverged run that stops before it
saves non-finite weights, temporary files of killed checkpoint writes, resuming with another config."""
import math
import os
import signal

import pytest
import torch
from test_train import tiny_config, write_config

from anytimeify.cli import main
from anytimeify.train import (CheckpointMismatch, ConfigError, Trainer, build_datasets, build_loss, build_model,
                              config_from_dict, load_config, load_training_state)
from anytimeify.train.checkpointing import (RESUMABLE_KEYS, atomic_write, prune_checkpoints, remove_temporaries,
                                            resume_conflicts, save_training_state)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key, message", [
    ("optim.lr=.inf", "optim.lr", "must be a finite number > 0, got inf"),
    ("optim.lr=.nan", "optim.lr", "must be a finite number > 0, got nan"),
    ("optim.lr=0", "optim.lr", "must be a finite number > 0, got 0"),
    ("optim.lr=abc", "optim.lr", "must be a finite number > 0, got 'abc'"),
    ("optim.lr=true", "optim.lr", "must be a finite number > 0, got True"),
    ("optim.lr=1e-3", "optim.lr", "got '1e-3' (YAML reads a number without a dot"),
    ("optim.exit_lr=-1.0", "optim.exit_lr", "> 0 or null, got -1.0"),
    ("optim.momentum=1.5", "optim.momentum", ">= 0 and < 1, got 1.5"),
    ("optim.betas=[0.9]", "optim.betas", "must be a list of 2 numbers"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]", ">= 0 and < 1, got 1.0"),
    ("optim.weight_decay=.inf", "optim.weight_decay", "finite number >= 0"),
    ("optim.clip_grad=.nan", "optim.clip_grad", "> 0 or null, got nan"),
    ("optim.nesterov=1", "optim.nesterov", "must be true or false, got 1"),
    ("confidence.threshold=true", "confidence.threshold", "must be a finite number > 0 and <= 1, got True"),
    ("confidence.threshold=1.5", "confidence.threshold", "must be a finite number > 0 and <= 1, got 1.5"),
    ("confidence.threshold=0", "confidence.threshold", "> 0 and <= 1, got 0"),
    ("confidence.enabled=maybe", "confidence.enabled", "must be true or false, got 'maybe'"),
    ("seed=abc", "seed", "must be an integer >= 0"),
    ("seed=-1", "seed", "must be an integer >= 0"),
    ("seed=1.5", "seed", "must be an integer >= 0"),
    ("device=gpu", "device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("device=meta", "device", "got 'meta'"),
    ("device=3", "device", "got 3"),
    ("log_every=true", "log_every", "must be an integer >= 1, got True"),
    ("checkpoint.keep=abc", "checkpoint.keep", "must be an integer >= 1, got 'abc'"),
    ("schedule.gamma=0", "schedule.gamma", "> 0, got 0"),
    ("schedule.milestones=[10, x]", "schedule.milestones[1]", "must be an integer >= 0, got 'x'"),
    ("schedule.warmup_factor=2.0", "schedule.warmup_factor", ">= 0 and <= 1, got 2.0"),
    ("loss.exit_weights=[1, .nan]", "loss.exit_weights[1]", "finite number >= 0, got nan"),
    ("loss.exit_weights=[0, 0]", "loss.exit_weights", "at least one exit a weight > 0"),
    ("model.num_classes=0", "model.num_classes", "must be an integer >= 1 or null, got 0"),
    ("model.exits=[]", "model.exits", "'stages' or a non-empty list"),
    ("eval.max_images=0", "eval.max_images", "must be an integer >= 1 or null, got 0"),
    ("data.pin_memory=sometimes", "data.pin_memory", "must be true or false"),
])
def test_config_values_are_checked_naming_their_key(override, key, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert f"config key {key!r}: " in text and message in text, text
    assert "\n" not in text


def test_values_in_range_are_accepted():
    cfg = load_config(None, ["optim.lr=1", "confidence.threshold=1", "device=cuda:1", "device=cpu", "seed=12345",
                             "optim.betas=[0, 0.99]", "schedule.warmup_factor=0"])
    assert cfg.optim.lr == 1 and cfg.confidence.threshold == 1 and cfg.device == "cpu"
    # the threshold's range depends on the criterion: entropy in nats, heatmap values
    assert load_config(None, ["confidence.criterion=entropy", "confidence.threshold=1.5"]).confidence.threshold == 1.5
    assert load_config(None, ["confidence.criterion=heatmap", "confidence.threshold=0.002"])


def test_an_infinite_learning_rate_fails_on_the_command_line_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_config(out))
    assert main(["train", str(config), "--set", "optim.lr=.inf"]) == 2
    assert "config key 'optim.lr': must be a finite number > 0, got inf" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------- divergence
SMALL = {"data.val": None, "data.train.size": [32, 32], "data.train.digit_size": [12, 24],
         "data.train.transforms.crop_size": [32, 32]}


def _trainer(raw):
    cfg = config_from_dict(raw)
    model = build_model(cfg)
    train, _ = build_datasets(cfg)
    return Trainer(model, train, config=cfg, loss=build_loss(cfg))


def test_a_diverged_run_stops_at_its_step_and_saves_no_non_finite_tensors(tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(tiny_config(out, **SMALL, **{"schedule.iterations": 2}))
    for group in trainer.optimizer.param_groups:  # what optim.lr=.inf did before the config refused it
        group["lr"] = math.inf
    with pytest.raises(FloatingPointError, match=r"^the model's weights are not finite after step 1 \(\d+ tensors"):
        trainer.fit()
    assert not (out / "model.safetensors").exists()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    # a checkpoint asked for directly is refused too
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.save_checkpoint(str(tmp_path / "direct.pt"))
    assert not (tmp_path / "direct.pt").exists()


# ------------------------------------------------------------------------- temporary checkpoints
def _killed_write(target):
    """A process killed (SIGKILL) inside atomic_write, after writing part of ``target``: its temporary file."""
    before = set(target.parent.iterdir()) if target.parent.is_dir() else set()
    pid = os.fork()
    if pid == 0:  # the child writes and is killed before the rename (nothing else runs in it)
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)

        try:
            atomic_write(target, write)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = [p for p in set(target.parent.iterdir()) - before]
    assert len(left) == 1 and left[0].name.startswith(".tmp-") and left[0].name.endswith("-" + target.name), left
    return left[0]


def test_pruning_removes_temporaries_of_killed_checkpoint_writes_only(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = _killed_write(folder / "ckpt-0000009.pt")
    for step in (1, 2, 3):
        (folder / f"ckpt-{step:07d}.pt").write_bytes(b"x")
    others = [".tmp-notes.txt", ".tmp-abcdefgh-notes.txt", "x.tmp-abcdefgh-ckpt-0000001.pt",
              ".tmp-abc-ckpt-0000001.pt", "README"]
    for name in others:
        (folder / name).write_bytes(b"keep")
    (folder / ".tmp-abcd_1z9-ckpt-0000004.pt").write_bytes(b"stale")
    prune_checkpoints(folder, keep=2)
    assert not stale.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["ckpt-0000002.pt", "ckpt-0000003.pt"] + others)
    assert remove_temporaries(tmp_path / "missing") == []


# --------------------------------------------------------------------------------------- resuming
def test_resume_refuses_a_config_that_trains_differently_and_allows_operational_changes(tmp_path):
    out = tmp_path / "run"
    base = {**SMALL, "schedule.iterations": 2, "optim.name": "adam", "optim.lr": 0.001, "checkpoint.every": 0}
    first = _trainer(tiny_config(out, **base))
    assert first.fit(stop_at=1).steps == 1
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())

    # the optimiser the issue saw fail with KeyError: 'momentum' after loading Adam's state into SGD
    sgd = _trainer(tiny_config(out, **{**base, "optim.name": "sgd"}))
    # a changed learning rate (and seed), asked of the first run's trainer itself
    first.config = config_from_dict(tiny_config(out, **{**base, "optim.lr": 0.002, "seed": 8}))
    for trainer, listed in [(sgd, "optim.name: checkpoint 'adam', this run 'sgd'"),
                            (first, "optim.lr: checkpoint 0.001, this run 0.002; seed: checkpoint 7, this run 8")]:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        step = trainer.step
        with pytest.raises(CheckpointMismatch) as err:
            trainer.fit(resume="auto")
        text = str(err.value)
        assert listed in text and "new run folder" in text and "Nothing was loaded" in text and "\n" not in text
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        assert trainer.step == step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == saved

    # where it logs, loads data, evaluates and checkpoints may change; stale temporaries of writes
    # killed in the folder are removed when the run starts, other files are kept
    stale = [_killed_write(out / "checkpoints" / "ckpt-0000002.pt"), _killed_write(out / "model.safetensors")]
    (out / "notes.txt").write_text("mine")
    allowed = tiny_config(out, **{**base, "log_every": 5, "data.workers": 0, "eval.every": 3,
                                  "checkpoint.keep": 1, "progress": "off", "threads": 1})
    rest = _trainer(allowed).fit(resume="auto")
    assert [h["step"] for h in rest.history] == [2]
    assert not any(p.exists() for p in stale) and (out / "notes.txt").read_text() == "mine"


def test_a_checkpoint_of_another_optimiser_is_refused_without_configs(tmp_path):
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    adam.step()
    path = tmp_path / "state.pt"
    save_training_state(path, model=model, optimizer=adam, position={"epoch": 0, "step": 1, "sample": 0})
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = sgd.state_dict()
    with pytest.raises(CheckpointMismatch, match=r"another optimiser .*'betas'.*SGD.*'momentum'.*Nothing was loaded"):
        load_training_state(path, model=model, optimizer=sgd)
    assert sgd.state_dict() == before
    load_training_state(path, model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.5))  # same kind: fine


def test_resume_conflicts_compare_nested_keys_and_fill_missing_defaults():
    base = config_from_dict(tiny_config("runs/x")).to_dict()
    changed = config_from_dict(tiny_config("runs/elsewhere", **{"data.train.root": "/data", "eval.every": 9,
                                                                "data.train.transforms.flip": False,
                                                                "device": "cpu"})).to_dict()
    assert resume_conflicts(base, changed) == [("data.train.transforms.flip", True, False)]
    older = {k: v for k, v in base.items() if k != "norm_eval"}  # written before a setting existed
    assert resume_conflicts(older, base) == []
    assert resume_conflicts(older, {**base, "norm_eval": True}) == [("norm_eval", False, True)]
    assert "out" in RESUMABLE_KEYS and "optim.lr" not in RESUMABLE_KEYS
