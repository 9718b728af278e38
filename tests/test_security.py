"""Reading a saved model, a checkpoint or an export folder runs no code that the files choose
(unless the user opts in with trust_code), reads no file outside the folder, and checks every
field; saving replaces a folder so that it is always loadable."""
import copy
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import anytimeify
from anytimeify import saving
from anytimeify.models import hrnet_seg
from anytimeify.saving import RECIPE_FILE, WEIGHTS_FILE, SaveError


class Marker:
    """Unpickling this creates a file: proof that code from the data ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _folder(tmp_path, source, conversion=None, **fields):
    """A saved-model folder with a given recipe and a small weights file (the SHA matches)."""
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / WEIGHTS_FILE))
    recipe = {"format": 1, "source": source, "conversion": conversion or {"method": "convert"}, "frozen": False,
              "latency_profile": None, "files": {WEIGHTS_FILE: {"sha256": _sha(folder / WEIGHTS_FILE)}}}
    recipe.update(fields)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    return folder


ATTACKS = [
    {"factory": "os:system", "args": ["touch {marker}"]},
    {"factory": "builtins:eval", "args": ["__import__('pathlib').Path('{marker}').touch()"]},
    {"factory": "subprocess:run", "args": [["touch", "{marker}"]]},
    {"factory": "pathlib:Path.touch", "args": ["{marker}"]},
    {"factory": "torch:load", "args": ["{pickle}"], "kwargs": {"weights_only": False}},
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a["factory"] for a in ATTACKS])
def test_load_builds_no_factory_the_folder_names(attack, tmp_path):
    marker, pickled = tmp_path / "ran", tmp_path / "evil.pkl"
    pickled.write_bytes(pickle.dumps(Marker(marker)))
    source = json.loads(json.dumps(attack).replace("{marker}", str(marker)).replace("{pickle}", str(pickled)))
    folder = _folder(tmp_path, source)
    with pytest.raises(SaveError, match=r"does not import from a file unless told to.*trust_code"):
        anytimeify.load(folder)
    assert not marker.exists()


def test_names_in_the_json_never_import_from_the_folder_or_the_working_directory(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass X: pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = {"factory": "anytimeify.models.hrnet:HRNetSeg", "args": ["w18_small_v2", 3]}
    conversions = {"leaf": {"method": "convert", "leaf_modules": ["evilmod:X"]},
                   "wrap": {"method": "convert", "autowrap_functions": ["evilmod:X"]},
                   "criterion": {"method": "convert", "confidence": {"criterion": "evilmod:X"}}}
    for name, conversion in conversions.items():
        (tmp_path / name).mkdir()
        with pytest.raises(SaveError, match="evilmod:X"):
            anytimeify.load(_folder(tmp_path / name, source, conversion))
    assert not marker.exists() and "evilmod" not in sys.modules


@pytest.mark.parametrize("source, match", [
    ({"factory": "timm:create_model", "args": ["local-dir:/tmp/x"]}, "not a model name in timm's registry"),
    ({"factory": "timm:create_model", "args": ["resnet18"], "kwargs": {"pretrained": True}}, "pretrained"),
    ({"factory": "timm:create_model", "args": ["resnet18"], "kwargs": {"checkpoint_path": "/tmp/x.pth"}},
     "checkpoint_path"),
    ({"factory": "anytimeify.models.timm_seg:TimmSegmenter", "args": ["hf-hub:a/b", 3]}, "timm backbone"),
    ({"factory": "segmentation_models_pytorch:Unet", "kwargs": {"encoder_weights": "imagenet"}}, "encoder_weights"),
    ({"factory": "segmentation_models_pytorch:Unet", "kwargs": {"encoder_name": "tu-local-dir:x",
                                                                "encoder_weights": None}}, "timm encoder"),
    ({"factory": "torch.nn:Identity"}, "does not import from a file"),
])
def test_safe_factories_take_no_argument_that_loads_files(source, match, tmp_path):
    with pytest.raises(SaveError, match=match):
        anytimeify.load(_folder(tmp_path, source))


def test_the_native_method_needs_an_anytime_model_even_when_trusted(tmp_path):
    folder = _folder(tmp_path, {"factory": "torch.nn:Identity"}, {"method": "native"})
    with pytest.raises(SaveError, match="does not import"):
        anytimeify.load(folder)
    with pytest.raises(SaveError, match="returned Identity"):
        anytimeify.load(folder, trust_code=["torch.nn:Identity"])


def test_trust_code_must_be_a_flag_or_names(tmp_path):
    folder = _folder(tmp_path, {"factory": "os:system", "args": ["true"]})
    with pytest.raises(ValueError, match="package.module:attribute"):
        anytimeify.load(folder, trust_code=["system"])
    with pytest.raises(TypeError, match="trust_code"):
        anytimeify.load(folder, trust_code=3)


# --- the JSON, field by field ---------------------------------------------------------------------

GOOD = {"factory": "anytimeify.models.hrnet:HRNetSeg", "args": ["w18_small_v2", 3]}


@pytest.mark.parametrize("change, match", [
    ({"frozen": "false"}, r"'frozen' must be true/false, got 'false'"),
    ({"frozen": 0}, r"'frozen' must be true/false"),
    ({"extra": 1}, r"field 'extra' is not a field"),
    ({"latency_profile": "garbage"}, r"'latency_profile' must be an object or null"),
    ({"latency_profile": {"1x3x64x64": {"seconds": [float("nan")], "paper_gflops": [0.0]}}},
     r"latency_profile.1x3x64x64.seconds\[0\]' must be a finite number"),
    ({"latency_profile": {"big": {"seconds": [], "paper_gflops": []}}}, r"keyed by an input shape"),
    ({"format": "1"}, r"'format' must be a number"),
    ({"source": {"factory": 3}}, r"'source.factory' must be a string"),
    ({"source": {**GOOD, "args": "w18"}}, r"'source.args' must be a list"),
    ({"source": {**GOOD, "code": "x"}}, r"'source.code' is not a field"),
    ({"conversion": {"method": "native2"}}, r"'conversion.method' is 'native2'"),
    ({"conversion": {"method": "convert", "width": "64"}}, r"'conversion.width' must be a number"),
    ({"conversion": {"method": "convert", "confidence": {"threshold": True}}}, r"threshold' must be a number"),
    ({"conversion": {"method": "convert", "input_size": [1, 3, -4, 4]}}, r"input_size\[2\]' must be a positive"),
    ({"conversion": {"method": "from_exits", "head": "x"}}, r"'conversion.head' is not a field"),
])
def test_every_field_of_the_recipe_is_checked_and_named(change, match, tmp_path):
    folder = _folder(tmp_path, GOOD, **{k: v for k, v in change.items() if k not in ("source",)})
    if "source" in change:
        recipe = json.loads((folder / RECIPE_FILE).read_text())
        recipe["source"] = change["source"]
        (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(SaveError, match=match) as info:
        anytimeify.load(folder)
    assert RECIPE_FILE in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("field", ["source", "conversion", "frozen", "files"])
def test_a_missing_field_is_named(field, tmp_path):
    folder = _folder(tmp_path, GOOD)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    del recipe[field]
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(SaveError, match=f"field '{field}' is missing"):
        anytimeify.load(folder)


# --- weights and folders of a real model ----------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=3)).eval()
    path = tmp_path_factory.mktemp("saved") / "model"
    anytimeify.save(model, path)
    return model, path


def _copy(saved, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(saved[1], target)
    return target


def _rewrite_weights(folder, change):
    from safetensors.torch import load_file

    state = change(load_file(str(folder / WEIGHTS_FILE)))
    save_file(state, str(folder / WEIGHTS_FILE))
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    recipe["files"][WEIGHTS_FILE] = {"sha256": _sha(folder / WEIGHTS_FILE)}
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.bool])
def test_weights_of_another_dtype_are_refused_not_cast(saved, tmp_path, dtype):
    folder = _copy(saved, tmp_path)
    name = next(k for k, v in saved[0].state_dict().items() if v.is_floating_point())
    _rewrite_weights(folder, lambda s: {**s, name: s[name].to(dtype)})
    with pytest.raises(SaveError, match=rf"tensor '{name}' is {dtype}.*does not cast"):
        anytimeify.load(folder)


def test_a_truncated_weights_file_with_a_matching_sha_names_the_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    recipe["files"][WEIGHTS_FILE] = {"sha256": _sha(folder / WEIGHTS_FILE)}
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(SaveError, match=rf"{WEIGHTS_FILE}.*not a readable safetensors file"):
        anytimeify.load(folder)


def test_saved_files_have_the_users_permissions_not_private_ones(saved):
    umask = os.umask(0)
    os.umask(umask)
    for path in [saved[1], saved[1] / WEIGHTS_FILE, saved[1] / RECIPE_FILE]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_an_interrupted_overwrite_leaves_a_loadable_model(saved, tmp_path, monkeypatch, exchange):
    model, _ = saved
    folder = _copy(saved, tmp_path)
    before = (folder / WEIGHTS_FILE).read_bytes()
    if not exchange:
        monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):  # the rename that puts the new folder in place fails
        calls.append((src, dst))
        if Path(dst) == folder and ".old." not in str(src):
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    real_rmtree = shutil.rmtree

    def interrupted_cleanup(path, *args, **kwargs):  # after the exchange, before the old copy is removed
        if exchange and Path(path).name.startswith(".copy.") and ".old." not in str(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_cleanup)
    with torch.no_grad():
        changed = copy.deepcopy(model)
        next(changed.parameters()).add_(1.0)
    with pytest.raises((OSError, KeyboardInterrupt)):
        anytimeify.save(changed, folder, overwrite=True)
    monkeypatch.undo()
    loaded = anytimeify.load(folder)  # the old model or the new one, whole
    state = next(loaded.parameters())
    assert torch.equal(state, next(model.parameters())) or torch.equal(state, next(changed.parameters()))
    if not exchange:
        assert (folder / WEIGHTS_FILE).read_bytes() == before


def test_a_folder_left_aside_by_a_killed_save_is_named(saved, tmp_path):
    aside = tmp_path / ".copy.old.abc" / "previous"
    aside.parent.mkdir()
    shutil.copytree(saved[1], aside)
    with pytest.raises(FileNotFoundError, match=r"interrupted save left the previous model in .*previous"):
        anytimeify.load(tmp_path / "copy")


# --- checkpoints ------------------------------------------------------------------------------------

def test_model_from_checkpoint_builds_no_model_the_file_names(tmp_path):
    from anytimeify.train import model_from_checkpoint

    marker = tmp_path / "ran"
    config = {"task": "segmentation", "model": {"name": "os:system", "num_classes": 3,
                                                "kwargs": {"command": f"touch {marker}"}}}
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"anytimeify_config": json.dumps(config)})
    with pytest.raises(ValueError, match=r"'os:system'.*trust_code"):
        model_from_checkpoint(str(path))
    assert not marker.exists()


# --- export folders ---------------------------------------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def program_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "p.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.randn(1, 3, 8, 8),)), str(path))
    return path.read_bytes()


def _swap_member(data, suffix, payload):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, payload(src.read(info.filename)) if info.filename.endswith(suffix)
                         else src.read(info.filename))
    return out.getvalue()


def _export_folder(tmp_path, program, **manifest):
    from anytimeify.exporting import FORMAT, MANIFEST

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "segment_0.pt2").write_bytes(program)
    entry = {"index": 0, "file": "segment_0.pt2", "inputs": ["x"], "outputs": ["out"], "exit": "out", "mask": None}
    description = {"format": FORMAT, "input_name": "x", "input_shape": [1, 3, 8, 8], "dynamic_batch": False,
                   "forward": None, "segments": [entry]}
    description.update(manifest)
    (folder / MANIFEST).write_text(json.dumps(description))
    return folder


def test_load_export_reads_a_plain_archive(program_bytes, tmp_path):
    loaded = anytimeify.load_export(_export_folder(tmp_path, program_bytes))
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(0)
    assert loaded.segments[0].program.module()(x).shape == (1, 2, 6, 6)


def test_load_export_unpickles_nothing(program_bytes, tmp_path):
    marker = tmp_path / "ran"
    evil = _swap_member(program_bytes, "sample_inputs/model.pt", lambda _: pickle.dumps(Marker(marker)))
    folder = _export_folder(tmp_path, evil)
    with pytest.raises(ValueError, match="would unpickle|not plain tensors"):
        anytimeify.load_export(folder)
    assert not marker.exists()

    def pickled_weights(raw):
        config = json.loads(raw)
        for meta in config["config"].values():
            meta["use_pickle"] = True
        return json.dumps(config).encode()

    (folder / "segment_0.pt2").write_bytes(_swap_member(program_bytes, "_weights_config.json", pickled_weights))
    with pytest.raises(ValueError, match="stored as a pickle"):
        anytimeify.load_export(folder)


@pytest.mark.parametrize("name", ["../outside.pt2", "/tmp/outside.pt2", "sub/segment_0.pt2", "link.pt2"])
def test_load_export_reads_only_files_inside_the_folder(program_bytes, tmp_path, name):
    (tmp_path / "outside.pt2").write_bytes(program_bytes)
    folder = _export_folder(tmp_path, program_bytes)
    (folder / "link.pt2").symlink_to(tmp_path / "outside.pt2")
    manifest = json.loads((folder / "export.json").read_text())
    manifest["segments"][0]["file"] = name
    (folder / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="inside the folder|link out of"):
        anytimeify.load_export(folder)


@pytest.mark.parametrize("change, match", [
    ({"segments": [{"index": 0}]}, "lacks field 'file'"),
    ({"input_shape": "1x3"}, "'input_shape' has the wrong type"),
    ({"input_name": None}, "'input_name' has the wrong type"),
    ({"extra": 1}, "'extra' is not part of"),
])
def test_load_export_names_a_bad_manifest_field(program_bytes, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        anytimeify.load_export(_export_folder(tmp_path, program_bytes, **change))
