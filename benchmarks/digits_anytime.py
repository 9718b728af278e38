"""Anytime classification on real data that ships offline: scikit-learn's handwritten digits.

Trains, on CPU, a small RANet (``anytimeify.models.ranet``, made anytime by ``from_exits``) and a
timm ResNet-10t converted with classification exits (``convert(..., task="classification")``),
each with the sum of the exits' cross-entropies, on the digits resized to 32x32 (1078 training
images; 269 held out for calibration; 450 test images, handwriting never seen in training). Then,
for each model:

* the anytime curve: every exit's test accuracy and cost (MACs per image, conv and linear);
* the budgeted-batch curve (MSDNet's and RANet's protocol, REFERENCE.md §7): thresholds chosen
  on the calibration split for q = i/20, i = 1..39, applied to the test set with real per-sample
  early exit (``model.predict``), reporting the accuracy and the MACs actually spent;
* wall clock: the test set at the budget nearest the middle of the cost range, with real early
  exit against running every exit (and taking each image's first confident one), timed
  interleaved, same batches.

Prints a JSON object (last line) and, with ``--plot FILE``, draws both curves (matplotlib).

    python benchmarks/digits_anytime.py                    # about 3-4 minutes on 2 cores
    python benchmarks/digits_anytime.py --plot docs/images/digits-anytime.png
    python benchmarks/digits_anytime.py --from-json out.json --plot fig.png   # redraw a saved run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import anytimeify
from anytimeify._machine import machine_info
from anytimeify.budget import evaluate_budgets, exit_scores
from anytimeify.data import digit_images


def build(name: str, seed: int):
    torch.manual_seed(seed)
    if name == "ranet":
        from anytimeify.models.ranet import RANet, RANetConfig

        return anytimeify.from_exits(RANet(RANetConfig.digits()))
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    return anytimeify.convert(net, task="classification", input_size=(32, 32))


def shifted(images: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations by up to ``pixels`` (zero padding): the only augmentation."""
    padded = F.pad(images, [pixels] * 4)
    out = torch.empty_like(images)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def train(model, images, labels, epochs: int, seed: int, batch: int = 64, lr: float = 2e-3) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(images), batch):
            idx = order[first:first + batch]
            outs = model(shifted(images[idx], generator))
            loss = sum(F.cross_entropy(o, labels[idx]) for o in outs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def anytime_curve(model, images, labels):
    correct = [0] * model.num_exits
    macs = None
    for first in range(0, len(images), 128):
        outs = list(model.anytime(images[first:first + 128]))
        for k, o in enumerate(outs):
            correct[k] += int((o.logits.argmax(1) == labels[first:first + 128]).sum())
        if macs is None:
            macs = [o.macs / len(outs[0].logits) for o in outs]
    return [{"exit": k + 1, "accuracy": round(100 * correct[k] / len(images), 2), "mmacs": round(macs[k] / 1e6, 3)}
            for k in range(model.num_exits)]


@torch.no_grad()
def wall_clock(model, images, thresholds, reps: int, batch: int = 64):
    """Seconds for the test set with real early exit and with every exit computed (the first
    confident exit picked afterwards, as published codes simulate it), interleaved."""
    from anytimeify.model import confidence_scores

    def early():
        for first in range(0, len(images), batch):
            model.predict(images[first:first + batch], thresholds)

    def every_exit():
        for first in range(0, len(images), batch):
            outs = model(images[first:first + batch])
            scores = torch.stack([confidence_scores(o) for o in outs], dim=1)
            passed = scores >= torch.tensor(thresholds[:-1] + [-float("inf")], dtype=scores.dtype)
            passed.int().argmax(1)

    early(), every_exit()  # warm-up
    times = {"early_exit_s": [], "every_exit_s": []}
    for _ in range(reps):
        for key, run in (("early_exit_s", early), ("every_exit_s", every_exit)):
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {key: round(statistics.median(v), 4) for key, v in times.items()}


def run_model(name: str, args, data) -> dict:
    (x_train, y_train), (x_calib, y_calib), (x_test, y_test) = data
    model = build(name, args.seed)
    epochs = args.epochs_ranet if name == "ranet" else args.epochs_timm
    seconds = train(model, x_train, y_train, epochs, args.seed)
    curve = anytime_curve(model, x_test, y_test)
    val = exit_scores(model, (x_calib, y_calib), batch_size=128)
    budgets = evaluate_budgets(model, (x_test, y_test), None, val_scores=val, batch_size=128)
    points = [{"q": round(b.calibration.q, 2), "accuracy": round(b.accuracy, 2), "mmacs": round(b.mean_macs / 1e6, 3),
               "expected_mmacs": round(b.calibration.expected_macs / 1e6, 3),
               "exit_fractions": [round(f, 3) for f in b.exit_fractions]} for b in budgets]
    middle = (float(val.costs[0]) + float(val.costs[-1])) / 2
    chosen = min(budgets, key=lambda b: abs(b.mean_macs - middle))
    timing = wall_clock(model, x_test, chosen.calibration.thresholds, args.reps)
    timing.update(q=round(chosen.calibration.q, 2), accuracy=round(chosen.accuracy, 2),
                  mmacs=round(chosen.mean_macs / 1e6, 3), every_exit_mmacs=round(float(val.costs[-1]) / 1e6, 3),
                  speedup=round(timing["every_exit_s"] / timing["early_exit_s"], 2),
                  mac_ratio=round(float(val.costs[-1]) / chosen.mean_macs, 2))
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "epochs": epochs,
              "train_seconds": round(seconds, 1), "anytime": curve, "budgeted": points, "wall_clock": timing}
    if name == "ranet":
        from anytimeify.models.ranet import ranet_ops

        result["ranet_convention_mops"] = [round(v / 1e6, 3) for v in ranet_ops(model_base(model))]
    return result


def model_base(model):
    """The RANet module inside an anytime model (its modules are the RANet's children)."""
    from anytimeify.models.ranet import RANet, RANetConfig

    net = RANet(RANetConfig.digits())
    net.load_state_dict(model.state_dict())
    return net.eval()


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2), constrained_layout=True)
    for r, colour in zip(results, ("tab:blue", "tab:orange")):
        label = {"ranet": "RANet (small)", "resnet10t": "ResNet-10t + exits"}[r["model"]]
        for ax in axes:
            ax.plot([e["mmacs"] for e in r["anytime"]], [e["accuracy"] for e in r["anytime"]], "o--",
                    color=colour, label=f"{label}, each exit")
        axes[1].plot([p["mmacs"] for p in r["budgeted"]], [p["accuracy"] for p in r["budgeted"]], "-",
                     color=colour, label=f"{label}, budgeted")
    axes[0].set_title("anytime: every exit")
    axes[1].set_title("budgeted batch (real early exit)")
    for ax in axes:
        ax.set_xlabel("MACs per image (millions)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=2)
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ranet,resnet10t")
    parser.add_argument("--epochs-ranet", type=int, default=12)
    parser.add_argument("--epochs-timm", type=int, default=12)
    parser.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write both curves to this PNG (needs matplotlib)")
    parser.add_argument("--from-json", metavar="FILE", help="only draw --plot from a saved output of this script")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            saved = json.loads(f.read().strip().splitlines()[-1])
        plot(saved["results"], args.plot)
        return
    torch.set_num_threads(args.threads)
    data = [digit_images(split) for split in ("train", "calib", "test")]
    results = [run_model(name, args, data) for name in args.models.split(",")]
    if args.plot:
        plot(results, args.plot)
    print(json.dumps({"benchmark": "digits_anytime", "machine": machine_info(), "train_images": len(data[0][0]),
                      "calib_images": len(data[1][0]), "test_images": len(data[2][0]), "results": results}))


if __name__ == "__main__":
    main()
