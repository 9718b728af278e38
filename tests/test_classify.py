"""Anytime classification: exits on timm classifiers, multi-exit networks (from_exits), real
per-sample early exit (predict) and the budgeted-batch protocol (calibrate, evaluate_budgets)."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import anytimeify
from anytimeify.budget import ExitScores, exit_scores, geometric_shares, thresholds_for_shares
from anytimeify.model import confidence_scores


def _first_confident(outs, thresholds):
    """Reference semantics: every exit computed, each sample takes the first confident one."""
    scores = torch.stack([confidence_scores(o) for o in outs], dim=1)
    taken = torch.full((scores.shape[0],), len(outs) - 1)
    for k in range(len(outs) - 2, -1, -1):
        taken = torch.where(scores[:, k] >= thresholds[k], k, taken)
    return taken, scores


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    return net, anytimeify.convert(net, task="classification", input_size=(32, 32)).eval()


@pytest.mark.parametrize("name,kwargs,expected", [
    ("resnet18", {}, ["layer1", "layer2", "layer3", "output"]),
    ("convnext_atto", {}, ["stages.0", "stages.1", "stages.2", "output"]),
    ("efficientnet_b0", {}, ["blocks.1", "blocks.2", "blocks.4", "output"]),
    ("vit_tiny_patch16_224", {"img_size": 64}, ["blocks.2", "blocks.5", "blocks.8", "output"]),
])
def test_timm_classifiers_get_pooled_linear_exits_at_their_stages(name, kwargs, expected):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    model = anytimeify.convert(net, task="classification", input_size=(64, 64)).eval()
    assert [e["name"] for e in model.exit_info] == expected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        assert all(o.shape == (2, 7) for o in outs)
        torch.testing.assert_close(outs[-1], net(x), rtol=1e-4, atol=1e-5)  # the last exit is the classifier
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in net.parameters())
    # the exits are trained with everything else: every one gets a gradient
    model.train()
    sum(o.sum() for o in model(x)).backward()
    assert all(e.linear.weight.grad is not None and e.linear.weight.grad.abs().sum() > 0 for e in model.exits)


def test_a_transformers_own_tensors_belong_to_the_converted_model():
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32).eval()
    model = anytimeify.convert(net, task="classification", input_size=(32, 32)).eval()
    assert {"cls_token", "pos_embed"} <= set(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    before = model(x)[-1]
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))
    assert not torch.allclose(model(x)[-1], before)


def test_classification_misuse_is_refused_with_the_fix():
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match="predict"):
        anytimeify.convert(net, task="classification", confidence=anytimeify.Confidence())
    with pytest.raises(TypeError, match="task='classification'"):
        anytimeify.convert(net, input_size=(32, 32))
    with pytest.raises(ValueError, match="task must be"):
        anytimeify.convert(net, task="detection")


def test_per_sample_early_exit_equals_the_first_confident_exit_and_computes_less(resnet):
    _, model = resnet
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = model(x)
    scores = torch.stack([confidence_scores(o) for o in outs], dim=1)
    thresholds = [float(scores[:, k].quantile(0.6)) for k in range(3)]
    taken, _ = _first_confident(outs, thresholds)
    assert len(set(taken.tolist())) == 4  # every exit takes some samples
    pred = model.predict(x, thresholds)
    assert torch.equal(pred.exits, taken + 1)
    chosen = torch.stack([outs[k][i] for i, k in enumerate(taken.tolist())])
    torch.testing.assert_close(pred.logits, chosen, rtol=1e-4, atol=1e-5)
    assert torch.equal(pred.labels, chosen.argmax(1))
    # MACs: each sample is charged the cumulative per-sample cost of the exit it took
    costs = [o.macs // len(x) for o in model.anytime(x)]
    assert pred.macs.tolist() == [costs[k] for k in taken.tolist()]
    assert pred.total_macs < costs[-1] * len(x)


def test_predict_on_a_dense_model_lets_whole_images_leave(w18_rh):
    # images of different contrast, so that the untrained model's mean confidences differ
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.2, 4, 6)[:, None, None, None]
    with torch.no_grad():
        outs = w18_rh(x)
    scores = torch.stack([confidence_scores(o) for o in outs], dim=1)
    assert scores.shape == (6, 4)
    # each threshold in the middle of the widest gap between two samples' scores, so that no
    # sample sits on it (an untrained model's scores can be close; a tie would hang on rounding)
    thresholds = []
    for k in range(3):
        ordered = scores[:, k].sort().values
        gaps = ordered[1:] - ordered[:-1]
        widest = int(gaps.argmax())
        thresholds.append(float(ordered[widest:widest + 2].mean()) if gaps[widest] > 1e-4 else math.inf)
    taken, _ = _first_confident(outs, thresholds)
    assert len(set(taken.tolist())) >= 2
    pred = w18_rh.predict(x, thresholds)
    assert torch.equal(pred.exits, taken + 1)
    chosen = torch.stack([outs[k][i] for i, k in enumerate(taken.tolist())])
    torch.testing.assert_close(pred.logits, chosen, rtol=1e-4, atol=1e-4)


def test_predict_refuses_what_it_cannot_do(resnet, w18):
    _, model = resnet
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="3 values"):
        model.predict(x, [0.5])
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            model.predict(x, [0.5, 0.5, 0.5])
    finally:
        model.eval()
    ca = anytimeify.convert(w18, confidence=anytimeify.Confidence(threshold=0.5)).eval()
    with pytest.raises(ValueError, match="set_confidence"):
        ca.predict(torch.randn(1, 3, 64, 64), [0.5, 0.5, 0.5])


# --- the budgeted-batch protocol ----------------------------------------------------------------

def test_geometric_shares_and_thresholds_follow_the_protocol():
    assert geometric_shares(1.0, 4).tolist() == [0.25] * 4
    shares = geometric_shares(0.5, 3)
    assert shares.tolist() == pytest.approx([0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875])
    # 8 samples, shares 1/2, 1/4, 1/4: exit 1 lets the 4 most confident leave, exit 2 the 2 most
    # confident of the other four, the last exit takes the rest
    scores = torch.tensor([[0.9, 0.1, 0], [0.8, 0.2, 0], [0.7, 0.9, 0], [0.6, 0.3, 0], [0.5, 0.95, 0],
                           [0.4, 0.5, 0], [0.3, 0.6, 0], [0.2, 0.7, 0]], dtype=torch.float64)
    t = thresholds_for_shares(scores, [0.5, 0.25, 0.25])
    assert t[0] == 0.6 and t[1] == 0.7 and t[2] == -math.inf
    # a share that lets nobody leave puts the threshold out of reach
    assert thresholds_for_shares(scores, [0.1, 0.45, 0.45])[0] == math.inf


def test_calibration_hits_the_budget_within_one_samples_cost():
    g = torch.Generator().manual_seed(0)
    n, k = 400, 5
    costs = torch.tensor([10.0, 25.0, 45.0, 70.0, 100.0], dtype=torch.float64)
    val = ExitScores(torch.rand(n, k, generator=g), None, costs)
    for budget in (12.0, 30.0, 50.0, 80.0, 99.0):
        cal = anytimeify.calibrate(None, None, budget, scores=val)
        assert abs(cal.expected_macs - budget) <= float(costs[-1]) / n, (budget, cal.expected_macs)
        assert sum(cal.exit_fractions) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        anytimeify.calibrate(None, None, 5.0, scores=val)


def test_budgets_on_a_real_model_spend_what_they_report(resnet):
    _, model = resnet
    g = torch.Generator().manual_seed(5)
    val = (torch.randn(60, 3, 32, 32, generator=g), torch.randint(0, 10, (60,), generator=g))
    test = (torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g))
    scores = exit_scores(model, val, batch_size=32)
    assert scores.correct.shape == (60, 4)
    budget = float(0.5 * scores.costs[0] + 0.5 * scores.costs[-1])
    cal = anytimeify.calibrate(model, val, budget, batch_size=32)
    assert abs(cal.expected_macs - budget) <= float(scores.costs[-1]) / 60
    (result,) = anytimeify.evaluate_budgets(model, test, [budget], val_data=val, batch_size=16)
    # the reported cost is what the exits taken cost, and the accuracy that of those exits' predictions
    with torch.no_grad():
        outs = model(test[0])
    taken, _ = _first_confident(outs, cal.thresholds)
    assert result.mean_macs == pytest.approx(float(scores.costs[taken].mean()), rel=1e-9)
    right = torch.stack([outs[k][i] for i, k in enumerate(taken.tolist())]).argmax(1) == test[1]
    assert result.accuracy == pytest.approx(100 * float(right.double().mean()))
    assert result.exit_fractions == pytest.approx(torch.bincount(taken, minlength=4).double().div(40).tolist())
    with pytest.raises(ValueError, match="val_data"):
        anytimeify.evaluate_budgets(model, test, [budget])


# --- networks that already have exits -----------------------------------------------------------

class ThreeExits(nn.Module):
    def __init__(self, reverse=False):
        super().__init__()
        self.reverse = reverse
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.heads = nn.ModuleList(nn.Linear(8, 4) for _ in range(3))

    def forward(self, x):
        outs = []
        for conv, head in zip((self.a, self.b, self.c), self.heads):
            x = torch.relu(conv(x))
            outs.append(head(x.mean(dim=(2, 3))))
        return outs[::-1] if self.reverse else outs


def test_from_exits_splits_a_multi_exit_network_between_its_exits():
    torch.manual_seed(0)
    net = ThreeExits().eval()
    model = anytimeify.from_exits(net, input_size=(16, 16)).eval()
    x = torch.randn(3, 3, 16, 16)
    for got, want in zip(model(x), net(x)):
        torch.testing.assert_close(got, want)
    # exit k's segment holds what exit k needs and nothing of the later convolutions
    macs = [o.macs for o in model.anytime(x)]
    conv_a, conv_b, conv_c = 3 * 16 * 16 * 8 * 27, 3 * 8 * 8 * 8 * 72, 3 * 4 * 4 * 8 * 72
    head = 3 * 8 * 4
    assert macs == [conv_a + head, conv_a + conv_b + 2 * head, conv_a + conv_b + conv_c + 3 * head]
    with pytest.raises(ValueError, match="order"):
        anytimeify.from_exits(ThreeExits(reverse=True), input_size=(16, 16))
    with pytest.raises(TypeError, match="convert"):
        anytimeify.from_exits(nn.Conv2d(3, 4, 3), input_size=(16, 16))


def test_ranet_from_the_registry_is_an_anytime_model_split_at_its_classifiers():
    """Each exit of the registered RANet costs what the eager network runs before that classifier
    returns (conv and linear MACs, counted here with hooks in execution order): the split computes
    nothing a later exit needs before an earlier exit is returned."""
    from anytimeify.models import RANet, RANetConfig, create_model

    model = create_model("ranet_cifar10").eval()
    assert isinstance(model, anytimeify.AnytimeModel) and model.num_exits == 8
    net = RANet(RANetConfig.cifar()).eval()
    net.load_state_dict(model.state_dict())
    total, marks = [0], []

    def count(module, args, out):
        w = module.weight
        total[0] += out.numel() * (w[0].numel() if isinstance(module, nn.Conv2d) else w.shape[1])

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [c.register_forward_hook(lambda *a: marks.append(total[0])) for c in net.classifier]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eager = net(x)
    for h in hooks:
        h.remove()
    outs = list(model.anytime(x))
    assert [o.macs for o in outs] == marks
    for o, e in zip(outs, eager):
        torch.testing.assert_close(o.logits, e)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_ranet_per_sample_early_exit(tmp_path):
    from anytimeify.models import RANet, RANetConfig

    torch.manual_seed(1)
    model = anytimeify.from_exits(RANet(RANetConfig.digits())).eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 32)[:, None, None, None]
    with torch.no_grad():
        outs = model(x)
    scores = torch.stack([confidence_scores(o) for o in outs], dim=1)
    thresholds = [float(scores[:, k].quantile(0.7)) for k in range(7)]
    taken, _ = _first_confident(outs, thresholds)
    pred = model.predict(x, thresholds)
    assert torch.equal(pred.exits, taken + 1) and len(set(taken.tolist())) >= 4
    costs = [o.macs // len(x) for o in model.anytime(x)]
    assert pred.macs.tolist() == [costs[k] for k in taken.tolist()]
    assert pred.total_macs < costs[-1] * len(x)


def test_budgets_on_a_dense_model_leave_per_image_and_score_with_the_metric(w18_rh):
    from anytimeify.metrics import SegmentationMetrics

    g = torch.Generator().manual_seed(8)
    contrast = torch.linspace(0.2, 4, 8)[:, None, None, None]
    val = (torch.randn(8, 3, 64, 64, generator=g) * contrast, torch.randint(0, 5, (8, 64, 64), generator=g))
    test = (torch.randn(8, 3, 64, 64, generator=g) * contrast, torch.randint(0, 5, (8, 64, 64), generator=g))
    scores = exit_scores(w18_rh, val, batch_size=4)
    assert scores.correct is None and scores.scores.shape == (8, 4)
    budget = float(scores.costs.mean())
    (result,) = anytimeify.evaluate_budgets(w18_rh, test, [budget], val_scores=scores, batch_size=4,
                                            metric=lambda: SegmentationMetrics(5))
    with torch.no_grad():
        outs = w18_rh(test[0])
    taken, _ = _first_confident(outs, result.calibration.thresholds)
    expected = SegmentationMetrics(5)
    expected.update(torch.stack([outs[k][i] for i, k in enumerate(taken.tolist())]), test[1])
    assert result.metrics["miou"] == pytest.approx(expected.compute()["miou"], abs=1e-6)
    assert result.mean_macs == pytest.approx(float(scores.costs[taken].mean()), rel=1e-9)
    assert result.accuracy is None

