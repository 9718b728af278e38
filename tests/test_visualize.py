"""Pictures: the Figure-4 grid of a saved model on an image file, metric-vs-GFLOPs curves from
evaluation JSONs, and their command-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import anytimeify
from anytimeify.cli import main
from anytimeify.models import hrnet_pose, hrnet_seg


def _image(path, size=(70, 130)):
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
    return path


def _png_size(path):
    with Image.open(path) as picture:
        return picture.size


def test_visualize_draws_every_exit_of_a_saved_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=19),
                               confidence=anytimeify.Confidence(threshold=0.06)).eval()
    anytimeify.save(model, tmp_path / "m")
    out = tmp_path / "fig.png"
    assert main(["visualize", str(tmp_path / "m"), str(_image(tmp_path / "in.png")), "--out", str(out),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    width, height = _png_size(out)
    assert width > 1.5 * height  # five columns (input and four exits) by three rows of a wide image
    # pose models draw joints; the image is resized to a multiple of the model's divisor
    pose = anytimeify.convert(hrnet_pose("w32", num_joints=16), input_size=(64, 64)).eval()
    anytimeify.save(pose, tmp_path / "p")
    assert main(["visualize", str(tmp_path / "p"), str(_image(tmp_path / "person.png", (90, 70))), "--out",
                 str(tmp_path / "pose.png")]) == 0
    assert _png_size(tmp_path / "pose.png")[0] > 0


def test_the_figure_shows_what_the_model_computes():
    from anytimeify.visualize import progression_figure

    torch.manual_seed(1)
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5),
                               confidence=anytimeify.Confidence(threshold=0.3)).eval()
    x = torch.randn(1, 3, 64, 96)
    fig = progression_figure(model, x)
    with torch.no_grad():
        outs = list(model.anytime(x))
    axes = fig.axes
    titles = [a.get_title() for a in axes[:5]]
    assert titles[0] == "input" and titles[1].startswith("exit 1")
    # the prediction panel of exit 2 is its argmax in the palette, the mask panel its computed mask
    grid = np.asarray(axes[2].get_images()[0].get_array())
    from anytimeify.visualize import class_palette

    assert np.array_equal(grid, class_palette(5)[outs[1].logits[0].argmax(0)].numpy())
    mask_panel = np.asarray(axes[12].get_images()[0].get_array())
    assert np.array_equal(mask_panel, outs[1].mask[0, 0].float().numpy())


def test_plot_draws_one_curve_per_results_file(tmp_path):
    from anytimeify.visualize import curves_figure

    files = []
    for name, values in (("ee", [34.3, 59.0, 76.9, 80.4]), ("adpc", [44.3, 60.1, 76.8, 81.3])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"exits": [{"exit": k + 1, "miou": v, "paper_gflops": g} for k, (v, g) in
                                              enumerate(zip(values, [41.9, 93.9, 259.3, 387.1]))]}))
        files.append(path)
    fig = curves_figure(files, labels=["EE", "ADP-C"])
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["EE", "ADP-C"]
    assert list(ax.get_lines()[1].get_ydata()) == [44.3, 60.1, 76.8, 81.3]
    assert ax.get_xlabel().startswith("GFLOPs") and ax.get_ylabel() == "mIoU (%)"
    assert main(["plot", *map(str, files), "--labels", "EE,ADP-C", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()


def test_picture_commands_fail_in_one_line_naming_the_problem(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    cases = [
        (["plot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")], "'exits'"),
        (["plot", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.png")], "none.json"),
        (["visualize", str(tmp_path / "nomodel"), str(tmp_path / "i.png"), "--out", str(tmp_path / "x.png")],
         "nomodel"),
    ]
    for argv, named in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and named in error, error
    assert not (tmp_path / "x.png").exists()


def test_plot_draws_both_curves_of_an_evaluation_with_and_without_confidence(tmp_path):
    from anytimeify.visualize import curves_figure

    exits = lambda gf, m: [{"exit": k + 1, "paper_gflops": g, "metrics": {"miou": v, "iou": [v]}}  # noqa: E731
                           for k, (g, v) in enumerate(zip(gf, m))]
    report = {"exits": [], "reports": [{"confidence": True, "exits": exits([1, 2, 3], [40, 50, 60])},
                                       {"confidence": False, "exits": exits([1, 3, 5], [41, 52, 61])}]}
    report["exits"] = [{"exit": 1, "miou": 40, "paper_gflops": 1}]
    (tmp_path / "eval.json").write_text(json.dumps(report))
    demo = {"exits": [{"exit": k + 1, "miou": 10 * k, "miou_ca": 10 * k + 1, "paper_gflops": k + 1,
                       "paper_gflops_ca": k + 0.5} for k in range(3)]}
    (tmp_path / "result.json").write_text(json.dumps(demo))
    ax = curves_figure([tmp_path / "eval.json", tmp_path / "result.json"], labels=["w18", "demo"]).axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"w18 (CA)": ([1, 2, 3], [40, 50, 60]), "w18": ([1, 3, 5], [41, 52, 61]),
                     "demo": ([1, 2, 3], [0, 10, 20]), "demo (CA)": ([0.5, 1.5, 2.5], [1, 11, 21])}
