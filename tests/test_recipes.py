"""The paper's recipes (recipes/*.yaml) on small data sets written in the real on-disk formats:
Cityscapes' label-id mapping and file checks, every recipe training two iterations with its own
settings scaled down (input size, batch), resuming and evaluating, `anytimeify eval --json`, and
the per-exit FLOPs at the paper's 1024x2048."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from formats import write_cityscapes, write_mpii

from anytimeify.cli import main
from anytimeify.data import (CITYSCAPES_CLASS_WEIGHTS, CITYSCAPES_CLASSES, CityscapesSegmentation, DataFileError,
                             cityscapes_label_table)
from anytimeify.train import Trainer, build_datasets, build_loss, build_model, load_config, load_weights, run
from anytimeify.train.builders import build_val_dataset

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CITYSCAPES = sorted((RECIPES / "cityscapes").glob("*.yaml"))
MPII = sorted((RECIPES / "mpii").glob("*.yaml"))

# Scaled down, everything else as the recipe has it: input size, batch, length, evaluation.
COMMON = ["progress=off", "threads=1", "device=cpu", "data.workers=0", "schedule.iterations=2", "checkpoint.every=1",
          "eval.every_epochs=0", "log_every=1"]
SCALED = {
    "cityscapes": COMMON + ["data.batch_size=2", "data.train.transforms.crop_size=[32,64]"],
    "mpii": COMMON + ["data.batch_size=2", "data.val_batch_size=2", "data.train.transforms.image_size=[64,64]",
                      "data.train.transforms.heatmap_size=[16,16]", "data.val.transforms.image_size=[64,64]",
                      "data.val.transforms.heatmap_size=[16,16]"],
}


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    write_cityscapes(root, size=(64, 128))
    return root


@pytest.fixture(scope="module")
def mpii_root(tmp_path_factory):
    return write_mpii(tmp_path_factory.mktemp("mpii"))


def test_every_paper_row_has_a_recipe():
    assert [p.stem for p in CITYSCAPES] == ["hrnet_w18_small_v2_adpc", "hrnet_w48_adpc", "hrnet_w48_ee",
                                             "hrnet_w48_ee_rh"]
    assert [p.stem for p in MPII] == ["hrnet_w32_adpc", "hrnet_w32_ee", "hrnet_w32_ee_rh"]


@pytest.mark.parametrize("recipe", CITYSCAPES + MPII, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_hold_the_papers_settings(recipe):
    cfg = load_config(recipe)
    ee = recipe.stem.endswith("_ee")
    assert cfg.model.head == ("original" if ee else "redesigned")
    assert cfg.confidence.enabled == recipe.stem.endswith("_adpc")
    assert cfg.loss.exit_weights == [1, 1, 1, 1]
    if recipe.parent.name == "cityscapes":
        assert (cfg.task, cfg.model.num_classes, cfg.data.train["name"]) == ("segmentation", 19, "cityscapes")
        assert cfg.data.train["transforms"] == {"crop_size": [512, 1024], "scale": [0.5, 2.1], "scale_step": 0.1,
                                                "flip": True}
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
        assert (cfg.schedule.name, cfg.schedule.power, cfg.schedule.epochs) == ("poly", 0.9, 484)
        assert cfg.data.batch_size * 4 == 12
        assert cfg.loss.class_weights == list(CITYSCAPES_CLASS_WEIGHTS)
        assert cfg.model.width == (None if ee else 64 if "w18" in recipe.stem else 128)
        if cfg.confidence.enabled:
            assert (cfg.confidence.criterion, cfg.confidence.threshold) == ("max_prob", 0.998)
    else:
        assert (cfg.task, cfg.model.name, cfg.model.num_classes) == ("pose", "hrnet_w32_pose", 16)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 0.001, 1e-4)
        assert (cfg.schedule.name, cfg.schedule.epochs, cfg.schedule.milestones, cfg.schedule.gamma) == \
            ("step", 210, [170, 200], 0.1)
        assert cfg.data.batch_size * 4 == 128
        assert cfg.eval.flip_test
        t = cfg.data.train["transforms"]
        assert (t["image_size"], t["heatmap_size"], t["sigma"], t["rotation"], t["scale_factor"]) == \
            ([256, 256], [64, 64], 2.0, 30.0, 0.25)
        if cfg.confidence.enabled:
            assert (cfg.confidence.criterion, cfg.confidence.threshold, cfg.confidence.start_epoch) == \
                ("heatmap", 0.002, 10)


# --- Cityscapes' format -------------------------------------------------------------------------

def test_label_ids_map_to_the_19_train_ids_of_the_official_table():
    table = cityscapes_label_table()
    # road, sidewalk, building, ..., bicycle (the 19 evaluated classes in train-id order)
    assert {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18} == {i: int(table[i]) for i in range(34) if table[i] != 255}
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle" and len(CITYSCAPES_CLASSES) == 19
    assert int(cityscapes_label_table(ignore_index=250)[0]) == 250


def test_the_data_set_reads_the_shipped_layout(cityscapes_root):
    train = CityscapesSegmentation(cityscapes_root, "train")
    assert len(train) == 2 and [p[0].parent.name for p in train.samples] == ["aachen", "bochum"]
    image, labels = train[0]
    assert image.shape == (3, 64, 128) and image.dtype == torch.uint8 and labels.shape == (64, 128)
    ids = torch.from_numpy(np.array(Image.open(train.samples[0][1]))).long()
    assert torch.equal(labels, cityscapes_label_table()[ids])
    assert set(labels.unique().tolist()) == set(range(19)) | {255}


def test_cityscapes_file_problems_name_the_file(tmp_path):
    labels = write_cityscapes(tmp_path / "a", size=(16, 32), splits=("val",))
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesSegmentation(tmp_path / "nowhere", "val")
    missing = labels["val"][0]
    missing.rename(missing.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        CityscapesSegmentation(tmp_path / "a", "val")
    labels = write_cityscapes(tmp_path / "b", size=(16, 32), splits=("val",))
    Image.fromarray(np.zeros((8, 32), dtype=np.uint8), mode="L").save(labels["val"][0])
    with pytest.raises(DataFileError, match=f"{labels['val'][0]}.*16 .*32x16|{labels['val'][0]}.*32x8"):
        CityscapesSegmentation(tmp_path / "b", "val")[0]
    with pytest.raises(ValueError, match="split"):
        CityscapesSegmentation(tmp_path / "b", "training")


def test_scale_steps_draw_the_references_grid():
    from anytimeify.data import RandomScale

    t = RandomScale((0.5, 2.1), step=0.1)
    torch.manual_seed(0)
    sizes = {t.make_params([torch.zeros(3, 100, 100)])["size"][0] for _ in range(400)}
    assert sizes == {round(100 * (0.5 + k / 10)) for k in range(17)}


# --- the recipes, scaled down -------------------------------------------------------------------

def _root(recipe, cityscapes_root, mpii_root):
    return cityscapes_root if recipe.parent.name == "cityscapes" else mpii_root


@pytest.mark.parametrize("recipe", CITYSCAPES + MPII, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_trains_resumes_and_evaluates(recipe, cityscapes_root, mpii_root, tmp_path):
    out = tmp_path / "run"
    overrides = SCALED[recipe.parent.name] + [f"out={out}"]
    cfg = load_config(recipe, overrides, data_root=_root(recipe, cityscapes_root, mpii_root))
    first = Trainer(build_model(cfg), build_datasets(cfg)[0], config=cfg, loss=build_loss(cfg))
    assert first.fit(stop_at=1).steps == 1
    result = run(cfg, resume="auto")
    assert result.steps == 2 and [h["step"] for h in result.history] == [2]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    metrics = json.loads((out / "metrics.json").read_text())
    key = "miou" if recipe.parent.name == "cityscapes" else "pckh"
    assert len(metrics["exits"]) == 4 and all(key in e and e["paper_gflops"] > 0 for e in metrics["exits"])
    gflops = [e["paper_gflops"] for e in metrics["exits"]]
    assert gflops == sorted(gflops)
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


def test_eval_json_lists_each_exits_metric_and_gflops(cityscapes_root, tmp_path, capsys):
    recipe = RECIPES / "cityscapes" / "hrnet_w18_small_v2_adpc.yaml"
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--data-root", str(cityscapes_root), "--out", str(out), "--json",
                 *sum((["--set", s] for s in SCALED["cityscapes"] + ["schedule.iterations=1"]), [])]) == 0
    capsys.readouterr()
    assert main(["eval", str(recipe), "--data-root", str(cityscapes_root), "--checkpoint",
                 str(out / "model.safetensors"), "--json", "--threads", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["images"] == 1 and payload["confidence"] is True
    assert [e["exit"] for e in payload["exits"]] == [1, 2, 3, 4]
    assert all(0 <= e["miou"] <= 100 and e["paper_gflops"] > 0 for e in payload["exits"])
    trained = json.loads((out / "metrics.json").read_text())
    # the same weights on the same image: the evaluation after training and `anytimeify eval` agree
    assert [e["miou"] for e in payload["exits"]] == pytest.approx([e["miou"] for e in trained["exits"]], abs=1e-9)


def test_miou_equals_cityscapesscripts_evaluation(tmp_path):
    """Our per-exit mIoU (one confusion matrix over the set) equals the official evaluation of
    ``cityscapesscripts`` on the same predictions, written as label-id PNGs as it expects."""
    import copy

    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import trainId2label

    from anytimeify.metrics import SegmentationMetrics

    labels = write_cityscapes(tmp_path / "cs", size=(48, 80), per_city=3, splits=("val",), seed=3)["val"]
    data = CityscapesSegmentation(tmp_path / "cs", "val")
    ours = SegmentationMetrics(19)
    g = torch.Generator().manual_seed(0)
    predictions = []
    for index, (_, target) in enumerate(data):
        # right where the label says so on most pixels, random elsewhere
        guess = torch.randint(0, 19, target.shape, generator=g)
        right = (torch.rand(target.shape, generator=g) < 0.6) & (target != 255)
        pred = torch.where(right, target, guess)
        ours.update(pred[None], target[None])
        path = tmp_path / f"pred_{index}.png"
        to_id = np.vectorize(lambda t: trainId2label[int(t)].id)
        Image.fromarray(to_id(pred.numpy()).astype(np.uint8), mode="L").save(path)
        predictions.append(str(path))
    args = copy.copy(official.args)
    args.quiet, args.JSONOutput, args.evalInstLevelScore, args.colorized = True, False, False, False
    results = official.evaluateImgLists(predictions, [str(p) for p in labels], args)
    assert ours.compute()["miou"] == pytest.approx(100 * results["averageScoreClasses"], abs=1e-9)


def _untrained_weights(recipe, root, path, overrides=()):
    from anytimeify.train import save_weights

    cfg = load_config(recipe, ["device=cpu", *overrides], data_root=root)
    save_weights(build_model(cfg), path)
    return path


def _eval_json(capsys, recipe, root, checkpoint, *extra):
    capsys.readouterr()
    assert main(["eval", str(recipe), "--data-root", str(root), "--checkpoint", str(checkpoint), "--json",
                 "--threads", "2", "--set", "device=cpu", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_eval_prints_the_papers_gflops_at_1024x2048(tmp_path, capsys):
    """On a generated 1024x2048 Cityscapes image: the EE and EE+RH recipes' per-exit GFLOPs are the
    reference implementation's counts (REFERENCE.md §4); ADP-C's depend on the image."""
    root = tmp_path / "cs"
    write_cityscapes(root, size=(1024, 2048), splits=("val",))
    expected = {"hrnet_w48_ee": [48.44, 113.46, 388.88, 722.20], "hrnet_w48_ee_rh": [41.92, 105.56, 368.03, 701.35]}
    for name, figures in expected.items():
        recipe = RECIPES / "cityscapes" / f"{name}.yaml"
        weights = _untrained_weights(recipe, root, tmp_path / f"{name}.safetensors")
        payload = _eval_json(capsys, recipe, root, weights)
        assert [e["paper_gflops"] for e in payload["exits"]] == pytest.approx(figures, abs=0.006)

    recipe = RECIPES / "cityscapes" / "hrnet_w18_small_v2_adpc.yaml"
    weights = _untrained_weights(recipe, root, tmp_path / "adpc.safetensors")
    # an untrained model is never 99.8% sure: take as threshold the median confidence of its first
    # exit on this image, so that it skips about half of the pixels there
    cfg = load_config(recipe, ["device=cpu"], data_root=root)
    model = build_model(cfg).eval()
    load_weights(model, weights)
    with torch.no_grad():
        logits = next(model.anytime(build_val_dataset(cfg)[0][0][None])).logits
    threshold = float(logits.softmax(1).amax(1).median())
    low = ["--set", f"confidence.threshold={threshold}"]
    first = _eval_json(capsys, recipe, root, weights, *low)
    image = next((root / "leftImg8bit" / "val").glob("*/*.png"))
    Image.fromarray(np.full((1024, 2048, 3), 90, dtype=np.uint8)).save(image)
    second = _eval_json(capsys, recipe, root, weights, *low)
    dense = [23.69, 34.74, 49.87, 73.23]  # EE+RH, every pixel computed
    assert 0.3 < first["exits"][0]["skipped"] < 0.7
    gflops = [e["paper_gflops"] for e in first["exits"]]
    assert gflops[0] == pytest.approx(dense[0], abs=0.006)  # nothing is skipped before the first exit
    assert all(g < d - 1 for g, d in zip(gflops[1:], dense[1:])), gflops
    assert [e["paper_gflops"] for e in second["exits"]][1:] != pytest.approx(gflops[1:], abs=0.05)
    off = [e["paper_gflops"] for e in first["reports"][1]["exits"]]  # the same model with every pixel computed
    assert off == pytest.approx(dense, abs=0.006)


def test_two_gloo_processes_evaluate_as_one(cityscapes_root, tmp_path, capsys):
    """`anytimeify eval` under torchrun (2 CPU processes, gloo) gives the single process's metrics:
    the confusion matrices and cost sums are reduced over processes, not averaged."""
    import socket
    import subprocess
    import sys

    root = tmp_path / "cs"
    write_cityscapes(root, size=(64, 128), per_city=3, splits=("val",), seed=5)
    recipe = RECIPES / "cityscapes" / "hrnet_w18_small_v2_adpc.yaml"
    weights = _untrained_weights(recipe, root, tmp_path / "w.safetensors", ["confidence.threshold=0.12"])
    args = ["eval", str(recipe), "--data-root", str(root), "--checkpoint", str(weights), "--json",
            "--set", "confidence.threshold=0.12", "--set", "device=cpu"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "anytimeify.cli", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    together = json.loads(done.stdout)
    capsys.readouterr()
    assert main(args + ["--threads", "1"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert together["images"] == alone["images"] == 3
    for a, b in zip(together["exits"], alone["exits"]):
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6)
        assert a["paper_gflops"] == pytest.approx(b["paper_gflops"], rel=1e-9)
        assert a["skipped"] == pytest.approx(b["skipped"], abs=1e-9)


def test_eval_reference_evaluates_a_checkpoint_of_the_reference_code(cityscapes_root, tmp_path, capsys):
    """`--reference` reads the reference implementation's layout ({"state_dict": {"model.exit1...."}},
    `Lambda`, `square_dis`): the figures equal those of the same weights saved by anytimeify; without
    the flag the file is refused with the key problem named."""
    from test_reference_outputs import write_reference_checkpoint

    from anytimeify.checkpoint import load_reference_checkpoint
    from anytimeify.train import save_weights

    recipe = RECIPES / "cityscapes" / "hrnet_w18_small_v2_adpc.yaml"
    cfg = load_config(recipe, ["device=cpu"], data_root=cityscapes_root)
    model = build_model(cfg)
    released = tmp_path / "adpc_w18_reference.pth"
    write_reference_checkpoint(model, {"seed": 11, "gains": {}}, released)
    load_reference_checkpoint(model, released)
    save_weights(model, tmp_path / "mapped.safetensors")

    from_reference = _eval_json(capsys, recipe, cityscapes_root, released, "--reference")
    from_mapped = _eval_json(capsys, recipe, cityscapes_root, tmp_path / "mapped.safetensors")
    assert from_reference["reference"] is True
    for a, b in zip(from_reference["exits"], from_mapped["exits"]):
        assert (a["miou"], a["paper_gflops"]) == pytest.approx((b["miou"], b["paper_gflops"]), abs=1e-9)
    capsys.readouterr()
    assert main(["eval", str(recipe), "--data-root", str(cityscapes_root), "--checkpoint", str(released),
                 "--set", "device=cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(released) in error and "--reference" in error


def test_the_pose_evaluation_averages_each_exit_with_the_mirrored_image(mpii_root):
    """eval.flip_test: each exit's heatmaps are averaged with the mirrored image's (flipped back,
    left/right joints swapped, shifted one pixel) before PCKh, as the HRNet pose code tests."""
    from anytimeify.metrics import MPIIPCKh, flip_test_average
    from anytimeify.train import evaluate

    recipe = RECIPES / "mpii" / "hrnet_w32_ee_rh.yaml"
    cfg = load_config(recipe, SCALED["mpii"], data_root=mpii_root)
    model = build_model(cfg).eval()
    val = build_val_dataset(cfg)
    gt = mpii_root / "annot" / "gt_valid.mat"
    report = evaluate(model, val, lambda: MPIIPCKh(gt), confidence=False, flip_pairs=val.flip_pairs)
    plain = evaluate(model, val, lambda: MPIIPCKh(gt), confidence=False)
    expected = [MPIIPCKh(gt) for _ in range(model.num_exits)]
    moved = False  # the flip test must change some predicted joint, else this test shows nothing
    with torch.no_grad():
        for image, target in val:
            outs = model(image[None])
            mirrored = model(image[None].flip(-1))
            for metric, a, b in zip(expected, outs, mirrored):
                averaged = flip_test_average(a, b, val.flip_pairs)
                metric.update(averaged, {k: v[None] for k, v in target.items()})
                moved |= not torch.equal(averaged.flatten(2).argmax(-1), a.flatten(2).argmax(-1))
    assert moved
    for exit_result, metric in zip(report.exits, expected):
        want = metric.compute()
        assert {k: exit_result.metrics[k] for k in want} == pytest.approx(want, nan_ok=True)
    assert [e.paper_gflops for e in report.exits] == [e.paper_gflops for e in plain.exits]  # one pass counted
