"""The command line answers at once: ``--help`` and ``--version`` import no torch, and every argument
and file error is one line that comes before any model is built."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import anytimeify
from anytimeify import cli
from anytimeify.cli import main

SAVED = ("anytimeify.json", "model.safetensors")  # the files of a saved model folder
HEAVY = ("torch", "timm", "segmentation_models_pytorch", "rich.table", "matplotlib")


def _subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_version_and_every_subcommands_help_import_no_torch():
    script = textwrap.dedent(f"""
        import sys
        from anytimeify.cli import build_parser, main
        action = next(a for a in build_parser()._actions if a.dest == "command")
        calls = [["--help"], ["--version"]] + [[name, "--help"] for name in action.choices]
        for argv in calls:
            try:
                main(argv)
            except SystemExit as done:
                assert done.code == 0, (argv, done.code)
            else:
                raise AssertionError(f"{{argv}} did not exit")
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(len(calls), heavy, file=sys.stderr)
        assert not heavy, heavy
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(_subcommands()) + 2} []" in done.stderr


def test_the_console_entry_point_help_imports_no_torch():
    # python -m anytimeify.cli runs the package's __init__ first, as the console script does
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "anytimeify.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: anytimeify" in done.stdout, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "anytimeify" in imported and "argparse" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "timm", "segmentation_models_pytorch")}


def test_the_package_imports_its_names_on_first_use():
    script = textwrap.dedent("""
        import sys
        import anytimeify
        assert "torch" not in sys.modules
        assert set(anytimeify.__all__) <= set(dir(anytimeify)) and anytimeify.__version__
        # a user's stage adapter goes before the built-in ones, which are registered on first use
        anytimeify.register_stage_adapter("mine")(lambda model, gm: None)
        from anytimeify._fx.registry import _ADAPTERS
        names = [name for name, _ in _ADAPTERS]
        assert names[0] == "mine" and {"hrnet", "timm", "smp"} <= set(names), names
        # the submodules convert and flops share their names with functions: importing a submodule
        # (anytimeify.models imports anytimeify.convert) leaves the package's attribute the function
        import anytimeify.convert
        import anytimeify.flops
        from anytimeify import convert, flops
        assert convert is anytimeify.convert and callable(convert) and convert.__module__ == "anytimeify.convert"
        assert flops is anytimeify.flops and callable(flops) and flops.__module__ == "anytimeify.flops"
        assert sys.modules["anytimeify.convert"].inspect is anytimeify.inspect
        try:
            anytimeify.nothing_of_that_name
        except AttributeError as err:
            assert "nothing_of_that_name" in str(err)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    for name in anytimeify.__all__:  # each name is what its module defines
        value = getattr(anytimeify, name)
        if name in ("train", "data", "metrics", "models", "visualize"):
            assert value is sys.modules[f"anytimeify.{name}"]
        else:
            assert getattr(sys.modules[value.__module__], name) is value, name


def test_the_static_model_facts_agree_with_the_models():
    from anytimeify import saving
    from anytimeify.models import list_models
    from anytimeify.models.hrnet import HRNET_INPUT_DIVISOR, HRNET_VARIANTS
    from anytimeify.models.ranet import RANetConfig

    assert list(cli.BUILTIN_MODELS) == list_models()
    assert cli.HRNET_NAMES == tuple(f"hrnet_{v}" for v in HRNET_VARIANTS)
    assert cli.HRNET_DIVISOR == HRNET_INPUT_DIVISOR
    assert cli.RANET_SIZES == {"ranet_cifar10": RANetConfig.cifar(10).input_size,
                               "ranet_cifar100": RANetConfig.cifar(100).input_size,
                               "ranet_imagenet": RANetConfig.imagenet(1000).input_size}
    assert cli.MODEL_FILES == (saving.RECIPE_FILE, saving.WEIGHTS_FILE)
    assert cli.known_input("hrnet_w32_pose") == (32, None) and cli.known_input("timm:resnet18") == (1, None)


# -- every argument and file error before anything is built ------------------------------------------------------


@pytest.fixture
def built(monkeypatch):
    """What got built: every way the commands build, load, convert or run a model is recorded and refused."""
    import anytimeify.bench
    import anytimeify.demo
    import anytimeify.models
    import anytimeify.train
    import anytimeify.train.builders

    record = []

    def refuse(label):
        def fn(*args, **kwargs):
            record.append(label)
            raise RuntimeError(f"{label} was called")
        return fn

    monkeypatch.setattr(cli, "build_base", refuse("build_base"))
    monkeypatch.setattr(anytimeify.models, "create_model", refuse("create_model"))
    for name in ("load", "convert", "export"):
        monkeypatch.setattr(anytimeify, name, refuse(name))
    monkeypatch.setattr(anytimeify.bench, "ca_speedup", refuse("ca_speedup"))
    monkeypatch.setattr(anytimeify.demo, "run_demo", refuse("run_demo"))
    monkeypatch.setattr(anytimeify.train, "run", refuse("run"))
    monkeypatch.setattr(anytimeify.train.builders, "build_model", refuse("build_model"))
    monkeypatch.setattr(anytimeify.train.builders, "build_val_dataset", refuse("build_val_dataset"))
    return record


@pytest.fixture
def place(tmp_path):
    """Paths the cases name: a file, a folder, a fake saved model, an image, a config, a checkpoint."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "model").mkdir()
    for name in SAVED:
        (tmp_path / "model" / name).write_text("{}")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_text("")
    (tmp_path / "img.png").write_bytes(b"not decoded by these checks")
    (tmp_path / "cfg.yaml").write_text("{}\n")
    (tmp_path / "ck.pt").write_text("")
    (tmp_path / "r.json").write_text(json.dumps({"exits": [{"exit": 1, "miou": 1.0, "paper_gflops": 1.0}]}))
    return tmp_path


CASES = [
    # (argv with {} for the tmp folder, what the message names)
    ("flops hrnet_w18_small_v2 --input 500x1000", "512x1024"),
    ("flops hrnet_w48_pose --input 256x200", "multiples of 32"),
    ("flops nonsense", "unknown model 'nonsense'"),
    ("flops smp:Unet", "unknown model 'smp:Unet'"),
    ("flops hrnet_w18_small_v2 --checkpoint {}/missing.pth", "missing.pth' does not exist"),
    ("flops hrnet_w18_small_v2 --checkpoint {}/adir", "is a folder"),
    ("flops hrnet_w18_small_v2 --num-classes 0", "--num-classes must be at least 1"),
    ("flops hrnet_w18_small_v2 --width 0", "--width must be at least 1"),
    ("flops hrnet_w18_small_v2 --output {}/adir", "--output"),
    ("flops hrnet_w18_small_v2 --output {}/afile/x.json", "is a file, so nothing can be written"),
    ("flops ranet_cifar10 --input 64x64", "32x32 inputs only"),
    ("inspect hrnet_w18_small_v2 --input 100x64", "multiples of 32"),
    ("stream --input 100x100", "128x128"),
    ("stream --threads -1", "--threads must be at least 0"),
    ("bench hrnet_w18_small_v2 --reps 0", "--reps must be at least 1"),
    ("bench hrnet_w18_small_v2 --threads 0", "--threads must be at least 1"),
    ("bench hrnet_w18_small_v2 --input 64x100", "64x100"),
    ("bench hrnet_w18_small_v2 --output {}/afile/b.json", "afile"),
    ("tune hrnet_w18_small_v2 --input 60x64", "60x64"),
    ("tune hrnet_w18_small_v2 --output {}/adir", "is a folder"),
    ("convert hrnet_w18_small_v2 --out {}/adir", "exists; pass --overwrite"),
    ("convert hrnet_w18_small_v2 --out {}/afile --overwrite", "is a file, not a folder"),
    ("convert hrnet_w18_small_v2 --out {}/afile/m", "is a file, so nothing can be written"),
    ("convert hrnet_w18_small_v2 --out {}/afile/deeper/m", "afile' is a file"),
    ("convert ranet_cifar10 --input 64x64 --out {}/m", "32x32 inputs only"),
    ("convert hrnet_w18_small_v2 --input 250x250 --out {}/m", "256x256"),
    ("convert timm:resnet18 --checkpoint {}/none.pth --out {}/m", "none.pth"),
    ("export {}/nowhere --out {}/x --input 32x32", "nowhere' does not exist"),
    ("export {}/afile --out {}/x --input 32x32", "is a file"),
    ("export {}/half --out {}/x --input 32x32", "has no anytimeify.json"),
    ("export {}/model --out {}/adir --input 32x32", "exists; pass --overwrite"),
    ("export {}/model --out {}/afile --input 32x32 --overwrite", "is a file, not a folder"),
    ("export {}/model --out {}/afile/x --input 32x32", "is a file, so nothing can be written"),
    ("export {}/model --out {}/x --input 32x32 --batch 0", "--batch must be at least 1"),
    ("visualize {}/nowhere {}/img.png --out {}/f.png", "nowhere"),
    ("visualize {}/model {}/missing.png --out {}/f.png", "image '{}/missing.png' does not exist"),
    ("visualize {}/model {}/img.png --out {}/adir", "is a folder"),
    ("visualize {}/model {}/img.png --out {}/afile/f.png", "is a file, so nothing can be written"),
    ("visualize {}/model {}/img.png --out {}/f.xyz", "no .xyz files"),
    ("plot {}/missing.json --out {}/f.png", "missing.json' does not exist"),
    ("plot {}/r.json {}/r.json --labels one --out {}/f.png", "--labels gives 1 labels for 2"),
    ("plot {}/r.json --out {}/afile/f.png", "is a file, so nothing can be written"),
    ("train {}/missing.yaml", "config file '{}/missing.yaml' does not exist"),
    ("train {}/cfg.yaml --resume {}/missing.pt", "--resume"),
    ("train {}/cfg.yaml --pretrained {}/missing.pth", "--pretrained"),
    ("train {}/cfg.yaml --data-root {}/nodata", "--data-root '{}/nodata' does not exist"),
    ("train {}/cfg.yaml --data-root {}/afile", "is a file, not a folder"),
    ("train {}/cfg.yaml --set nokey", "--set 'nokey' must look like KEY=VALUE"),
    ("train {}/cfg.yaml --max-minutes 0", "--max-minutes must be positive"),
    ("train {}/cfg.yaml --out {}/afile", "is a file, not a folder"),
    ("train {}/cfg.yaml --out {}/afile/run", "is a file, so nothing can be written"),
    ("eval {}/missing.yaml --checkpoint {}/ck.pt", "missing.yaml"),
    ("eval {}/cfg.yaml --checkpoint {}/missing.pt", "--checkpoint '{}/missing.pt' does not exist"),
    ("eval {}/cfg.yaml --checkpoint {}/ck.pt --batch-size 0", "--batch-size must be at least 1"),
    ("eval {}/cfg.yaml --checkpoint {}/ck.pt --max-images 0", "--max-images must be at least 1"),
    ("eval {}/cfg.yaml --checkpoint {}/ck.pt --output {}/afile/e.json", "is a file, so nothing can be written"),
    ("demo --out {}/afile", "is a file, not a folder"),
    ("demo --out {}/afile/demo", "is a file, so nothing can be written"),
    ("demo --minutes 0 --out {}/d", "--minutes 0: the demo no longer trains for a time"),
    ("demo --steps 1 --out {}/d", "--steps"),
    ("demo --threads -2 --out {}/d", "--threads must be at least 0"),
]


@pytest.mark.parametrize("argv, named", CASES, ids=[c[0].split()[0] + ":" + c[1][:24] for c in CASES])
def test_errors_come_in_one_line_before_anything_is_built(argv, named, built, place, capsys):
    args = argv.replace("{}", str(place)).split()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"anytimeify {args[0]}: error: "), err
    assert named.replace("{}", str(place)) in err[0], err[0]
    assert built == []
    assert not (place / "m").exists() and not (place / "x").exists() and not (place / "f.png").exists()


def test_a_folder_without_write_permission_is_refused_before_the_work(built, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: deny it the way a read-only folder does
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(locked)
                                else real(p, mode, **kw))
        cases = [["convert", "hrnet_w18_small_v2", "--out", str(locked / "m")],
                 ["demo", "--out", str(locked)],
                 ["flops", "hrnet_w18_small_v2", "--output", str(locked / "sub" / "f.json")]]
        for argv in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"no permission to write in '{locked}'" in err[0], err
    finally:
        os.chmod(locked, 0o700)
    assert built == [] and list(locked.iterdir()) == []


def test_the_run_folder_a_config_names_is_checked_before_training(built, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = tmp_path / "run.yaml"
    config.write_text(f"out: {tmp_path / 'afile' / 'run'}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the config's out" in err[0] and "afile' is a file" in err[0], err
    assert built == []


def test_an_unreadable_image_is_refused_before_the_model_is_loaded(built, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    for name in SAVED:
        (tmp_path / "model" / name).write_text("{}")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["visualize", str(tmp_path / "model"), str(tmp_path / "broken.png"), "--out",
                 str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0], err
    assert built == []


def test_size_errors_of_a_loaded_model_come_before_the_export(tmp_path, capsys, monkeypatch):
    import torch.nn as nn

    import anytimeify.exporting

    class Loaded(nn.Module):
        input_divisor, fixed_input_size, in_channels = 16, None, 3

    monkeypatch.setattr(anytimeify, "load", lambda path, **kwargs: Loaded())
    exported = []
    monkeypatch.setattr(anytimeify.exporting, "export", lambda *a, **k: exported.append(a))
    (tmp_path / "model").mkdir()
    for name in SAVED:
        (tmp_path / "model" / name).write_text("{}")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "x"), "--input", "40x48"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--input 40x48 is not supported" in err and "multiples of 16" in err and "48x48" in err
    assert exported == []


def test_check_size_names_the_nearest_size_that_works():
    cli.check_size((512, 1024), 32)
    with pytest.raises(ValueError, match=r"--size 500x1000 is not supported.*multiples of 32.*--size 512x1024"):
        cli.check_size((500, 1000), 32, option="--size")
    with pytest.raises(ValueError, match=r"takes 224x224 inputs only.*--input 224x224"):
        cli.check_size((256, 256), 1, (224, 224))


# -- help texts, usage, tables ---------------------------------------------------------------------------------


def _subparser(name):
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_export_usage_shows_input_as_required(capsys):
    usage = " ".join(_subparser("export").format_usage().split())
    assert "--input INPUT" in usage and "[--input INPUT]" not in usage
    with pytest.raises(SystemExit) as done:
        main(["export", "somewhere", "--out", "x"])
    assert done.value.code == 2 and "required: --input" in capsys.readouterr().err


def test_plot_help_says_the_demos_result_json_is_accepted():
    assert "result.json" in " ".join(_subparser("plot").format_help().split())


def _report(confidence, metrics, gflops=387.123, ms=1234.5):
    from anytimeify.train.evaluate import EvalReport, ExitResult

    exits = [ExitResult(k + 1, {**metrics, "iou": [1.0]}, gflops * (k + 1) / 4, 20.0, 0.384, ms / 1000)
             for k in range(4)]
    return EvalReport(exits, 500, confidence)


@pytest.mark.parametrize("metrics", [{"miou": 81.234, "acc": 96.5},
                                     {**{k: 90.123 for k in ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee",
                                                             "Ankle", "Mean", "Mean@0.1")}, "pckh": 90.123}])
def test_the_eval_table_fits_80_columns_without_cut_headers(metrics):
    from rich.console import Console

    with open(os.devnull, "w") as nowhere:
        console = Console(width=80, record=True, file=nowhere)
        console.print(cli._eval_table([_report(True, metrics), _report(False, metrics)], "hrnet_w48: 500 images"))
    text = console.export_text()
    lines = text.splitlines()
    assert "…" not in text and max(len(line) for line in lines) <= 80, text
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("─"))
    header = " ".join(lines[:rule]).split()  # the title and the headers (two lines: name, then CA)
    assert header.count("GFLOPs") == 2 and "skip" in header and header.count("ms") == 2 and header.count("CA") >= 3
    assert "1234.5" in text and "387.123" in text and "0.38" in text
    if "pckh" in metrics:  # the headline metric; the others are named as in the JSON
        assert header.count("pckh") == 2 and "Shoulder" not in header and "--json" in text


def test_inspect_lists_a_module_after_its_children(w18):
    candidates = anytimeify.inspect(w18, input_size=(64, 64))
    found = [c.name for c in candidates]
    assert found.index("layer1.0") < found.index("layer1.1") < found.index("layer1") < found.index("transition1.0")
    for i, name in enumerate(found):
        children = [j for j, other in enumerate(found) if other.startswith(name + ".")]
        assert all(j < i for j in children), (name, found)
    assert [c.name for c in candidates if c.picked] == ["layer1", "stage2", "stage3"]
