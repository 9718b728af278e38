"""The command line: stream, inspect, argument errors (demo: test_demo.py; train, eval: test_train_cli.py)."""
import json
import subprocess
import sys

import pytest

from anytimeify.cli import main, parse_size, parse_skips, write_atomic


def test_stream_streams_every_exit(capsys):
    assert main(["stream", "--input", "64x128", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    exits = payload["exits"]
    assert [e["exit"] for e in exits] == [1, 2, 3, 4]
    assert all(b["gmacs"] > a["gmacs"] for a, b in zip(exits, exits[1:]))
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(exits, exits[1:]))
    # W18-Small-v2 RH at 64x128 is 1/256 of the 1024x2048 figures (REFERENCE.md §4)
    assert [round(256 * e["paper_gflops"], 2) for e in exits] == [23.69, 34.74, 49.87, 73.23]


def test_stream_table_runs_as_a_console_script():
    out = subprocess.run([sys.executable, "-m", "anytimeify.cli", "stream", "--input", "64x64"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "exit after exit" in out.stdout and "paper GFLOPs" in out.stdout


def test_inspect_lists_picked_stages(capsys):
    assert main(["inspect", "hrnet_w18_small_v2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in found if c["picked"]] == ["layer1", "stage2", "stage3"]


def test_parsers_reject_bad_values():
    import argparse

    assert parse_size("512x1024") == (512, 1024)
    with pytest.raises(argparse.ArgumentTypeError, match="HxW"):
        parse_size("512")
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        parse_size("0x5")
    assert parse_skips("0.1,0.5") == [0.1, 0.5]
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\]"):
        parse_skips("0.1,1.5")


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "out.json"
    write_atomic(str(target), "first")

    class Boom(str):
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        write_atomic(str(target), 123)  # not text: fails while writing
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_model_specs_and_checkpoints_for_flops_and_inspect(capsys, tmp_path, monkeypatch):
    import torch

    from anytimeify.cli import build_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "smp:Unet:resnet18", "--input", "64x64", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    picked = [c["name"] for c in found if c["picked"]]
    assert picked and all(name.startswith("encoder.") for name in picked)
    # --checkpoint: the base network's weights from a local file change nothing in the counts but are read
    net = build_base("hrnet_w18_small_v2")
    torch.save(net.state_dict(), tmp_path / "w.pth")
    assert main(["flops", "hrnet_w18_small_v2", "--input", "64x128", "--checkpoint",
                 str(tmp_path / "w.pth"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    # W18-Small-v2 RH at 64x128 is 1/256 of 73.23 paper GFLOPs (REFERENCE.md §4); JSON keeps 4 decimals
    assert abs(256 * payload["exits"][-1]["paper_gflops"] - 73.23) < 0.02
    # a checkpoint of another network, an unknown spec: one line each
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    assert main(["flops", "hrnet_w18_small_v2", "--checkpoint", str(tmp_path / "other.pth")]) == 2
    assert main(["inspect", "timm:no_such_net"]) == 2
    assert main(["inspect", "smp:NoArch:resnet18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "does not fit" in err[0] and "no_such_net" in err[1] and "NoArch" in err[2]
    with pytest.raises(ValueError, match="unknown model"):
        main(["--debug", "inspect", "nonsense"])


def test_build_kernels_says_where_they_are(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("ANYTIMEIFY_NO_EXT", raising=False)
    assert main(["build-kernels", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert Path(payload["module"]).is_file() and payload["isa"]["lanes"] in (8, 16)
    monkeypatch.setenv("ANYTIMEIFY_NO_EXT", "1")
    assert main(["build-kernels"]) == 2
    assert "ANYTIMEIFY_NO_EXT" in capsys.readouterr().err
