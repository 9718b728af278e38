"""Loading weights from local files: an ImageNet HRNet backbone and a reference ADP-C checkpoint.

Nothing is downloaded. The script writes, in a temporary directory, files in the on-disk layouts
users have, filled with random values, and loads them:

1. ``hrnet_w18_small_v2_imagenet.pth``: an ImageNet classification checkpoint as
   HRNet-Image-Classification and timm save it (a bare state dict; timm's key names are the same),
   and ``model.safetensors``, the same weights as timm's Hugging Face hub files hold them.
   :func:`anytimeify.checkpoint.load_backbone` loads the trunk and ignores the classifier.
2. ``adpc_w18_small_v2.pth``: a checkpoint of the ADP-C reference implementation
   (``{"state_dict": {"model.<key>": ...}}``, exits ``exit1..exit3``, masked convs with ``Lambda``
   and ``square_dis``), built key by key from the layout listed in
   ``tests/data/hrnet_w18_small_v2_adpc_state_dict.tsv``.
   :func:`anytimeify.checkpoint.load_reference_checkpoint` loads it into a converted model.

    python examples/load_checkpoints.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import anytimeify
from anytimeify.checkpoint import load_backbone, load_reference_checkpoint
from anytimeify.models import hrnet_seg

#: every key, shape and dtype of the reference's W18-Small-v2 ADP-C checkpoint (one per line, tab-separated)
REFERENCE_LAYOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "hrnet_w18_small_v2_adpc_state_dict.tsv"


def write_imagenet_checkpoints(folder: Path) -> tuple[Path, Path, dict]:
    """An ImageNet HRNet-W18-Small-v2 classifier's state dict, as .pth and as .safetensors."""
    state = timm.create_model("hrnet_w18_small_v2", pretrained=False).state_dict()
    pth = folder / "hrnet_w18_small_v2_imagenet.pth"
    torch.save(state, pth)
    safetensors = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors))
    return pth, safetensors, state


def write_reference_checkpoint(folder: Path, layout: Path, with_masks: bool = True) -> tuple[Path, dict]:
    """A checkpoint with every key of the reference layout, random values, saved as the reference saves it.

    Args:
        with_masks: keep the masked convs' ``Lambda`` and ``square_dis`` entries (ADP-C); without
            them the file has the layout of the EE+RH checkpoint.
    """
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in layout.read_text().splitlines():
        key, shape_text, dtype = line.split("\t")
        if not with_masks and key.endswith((".Lambda", ".square_dis")):
            continue
        shape = tuple(int(s) for s in shape_text.strip("()").split(",") if s.strip())
        if dtype == "int64":
            value = torch.randint(0, 100, shape, generator=g)
        elif key.endswith(".Lambda"):
            value = torch.tensor(3.0) + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(".running_var"):  # a variance is positive: a negative one gives NaN outputs
            value = 0.5 + torch.rand(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g)
        state[key] = value
    path = folder / ("adpc_w18_small_v2.pth" if with_masks else "ee_rh_w18_small_v2.pth")
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()}, "epoch": 484}, path)
    return path, state


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        # 1. ImageNet backbone -> the trunk of the base network, then convert.
        pth, safetensors, imagenet = write_imagenet_checkpoints(folder)
        for path in (pth, safetensors):
            net = hrnet_seg("w18_small_v2", num_classes=19)
            result = load_backbone(net, path)
            same = torch.equal(net.stage4[0].branches[3][1].conv2.weight, imagenet["stage4.0.branches.3.1.conv2.weight"])
            print(f"load_backbone({path.name}): {len(result.loaded)} tensors loaded, "
                  f"{len(result.ignored)} ignored (classifier: {sorted({k.split('.')[0] for k in result.ignored})}), "
                  f"{len(result.missing)} missing; stage4 weights match the file: {same}")
        # Load the backbone before converting: the converted model inherits the weights under the same
        # names; exits and interpolation parameters start from their initialisation.
        model = anytimeify.convert(net, head="redesigned", confidence=anytimeify.Confidence(threshold=0.998))
        assert torch.equal(model.state_dict()["conv1.weight"], imagenet["conv1.weight"])
        print("converted after loading: the anytime model carries the ImageNet trunk\n")

        # 2. Reference ADP-C checkpoint -> a model converted with the same settings as the checkpoint
        #    (W18-Small-v2, 19 classes, redesigned exits of width 64, confidence adaptivity).
        path, reference = write_reference_checkpoint(folder, REFERENCE_LAYOUT)
        result = load_reference_checkpoint(model, path)
        own = model.state_dict()
        print(f"load_reference_checkpoint({path.name}): {len(result.loaded)} tensors loaded, "
              f"{len(result.missing)} missing, {len(result.ignored)} unused "
              f"({sum(k.endswith('.square_dis') for k in reference)} square_dis tables dropped)")
        for ref_key, own_key in [("exit1.21.weight", "exits.0.21.weight"),
                                 ("stage3.0.branches.2.0.conv1.Lambda", "stage3.0.branches.2.0.conv1.interp_lambda"),
                                 ("last_layer.3.bias", "last_layer.3.bias")]:
            assert torch.equal(own[own_key], reference[ref_key])
            print(f"  {ref_key:<40} -> {own_key}")

        # The EE+RH checkpoint has the same keys without Lambda / square_dis: convert without confidence.
        path, _ = write_reference_checkpoint(folder, REFERENCE_LAYOUT, with_masks=False)
        rh = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=19), head="redesigned")
        result = load_reference_checkpoint(rh, path)
        print(f"load_reference_checkpoint({path.name}) into a model without confidence: "
              f"{len(result.loaded)} loaded, {len(result.missing)} missing")

        # A mismatch (ADP-C file, model without confidence adaptivity) is refused with an explanation.
        try:
            load_reference_checkpoint(rh, folder / "adpc_w18_small_v2.pth")
        except ValueError as err:
            print(f"mismatch refused: {str(err)[:160]}...")

        # The loaded model runs as usual.
        model.eval()
        with torch.no_grad():
            outs = list(model.anytime(torch.randn(1, 3, 128, 256)))
        print(f"\nloaded ADP-C model: {len(outs)} exits, logits {tuple(outs[-1].logits.shape)}")


if __name__ == "__main__":
    main()
