"""DDP: `anytimeify train` under torchrun, 2 gloo processes on CPU, equals one process on the same
global batch (weights, losses, and the evaluation's confusion matrices summed across ranks)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from test_train import tiny_config

from anytimeify.train import build_model, config_from_dict, run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out, batch_size):
    # norm_eval: batch norms use their running statistics, so a sample's forward does not depend on
    # which process it lands on (PyTorch has SyncBatchNorm on GPUs only); no crop padding and no
    # class weights, so every sample has the same number of labelled pixels and the mean of the two
    # processes' losses is the loss of the global batch. A small learning rate keeps the second step near
    # the first: with frozen statistics an untrained HRNet's deep exits have large logits
    return tiny_config(out, **{"data.batch_size": batch_size, "norm_eval": True, "data.train.transforms": {"scale": None},
                               "checkpoint.every": 0, "confidence.threshold": 0.3, "optim.lr": 1e-4})


def _losses(out):
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return ([r["loss_exits"] for r in records if r["event"] == "train"],
            [r for r in records if r["event"] == "eval"][-1]["exits"])


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    ddp_out = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(_config(ddp_out, 1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "anytimeify.cli", "train", str(config), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, done.stdout  # only rank 0 reports

    single_out = tmp_path / "single"
    result = run(config_from_dict(_config(single_out, 2)))
    assert result.steps == 2

    ddp_losses, ddp_eval = _losses(ddp_out)
    single_losses, single_eval = _losses(single_out)
    assert torch.allclose(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-4, atol=1e-5)
    ddp_weights = load_file(str(ddp_out / "model.safetensors"))
    single_weights = load_file(str(single_out / "model.safetensors"))
    initial = build_model(config_from_dict(_config(single_out, 2))).state_dict()  # same seed: the start of both
    assert ddp_weights.keys() == single_weights.keys() == initial.keys()
    moved = 0
    for key, start in initial.items():
        if not start.is_floating_point():
            continue
        ddp_step, single_step = ddp_weights[key] - start, single_weights[key] - start
        if single_step.abs().max() == 0:
            assert ddp_step.abs().max() == 0, key
            continue
        moved += 1
        # the two steps of the two runs agree up to float rounding (a rank that skipped the all-reduce would
        # step on its own image's gradient: off by the order of the step). The runs sum the gradients in
        # different orders with different thread counts (oneDNN picks kernels by CPU and threads), and the
        # gradients of this untrained network's early layers are sums with heavy cancellation, so that
        # rounding is a visible share of the step: up to 5e-3 was seen on an AVX-512 Xeon (1e-3 on AVX2)
        ratio = ((ddp_step - single_step).norm() / single_step.norm()).item()
        assert ratio <= 2e-2, (key, ratio)
    assert moved > 100
    # each rank evaluated one of the two images; the reduced confusion matrices give the single run's figures
    assert [e["metrics"]["miou"] for e in ddp_eval] == pytest.approx([e["metrics"]["miou"] for e in single_eval],
                                                                      abs=1e-6)
    assert [e["skipped"] for e in ddp_eval] == pytest.approx([e["skipped"] for e in single_eval], abs=1e-6)
    # only rank 0 wrote the run's files
    assert sorted(p.name for p in ddp_out.iterdir()) == ["checkpoints", "config.yaml", "log.jsonl", "metrics.json",
                                                         "model.safetensors"]
