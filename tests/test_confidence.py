"""Confidence adaptivity in the converted model: masks, copy aggregation, executions, criteria."""

import pytest
import torch

import anytimeify
from anytimeify import Confidence
from anytimeify.checkpoint import reference_key
from anytimeify.masking import MaskedConv2d
from anytimeify.masking.conv import EngineConv2d
from anytimeify.masking.engine import MaskPlan, executed_interp_macs, fuse_sum
from anytimeify.models import hrnet_pose, hrnet_seg


def _rel_err(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return hrnet_seg("w18_small_v2", num_classes=5).eval()


def _ca(net, **kwargs):
    return anytimeify.convert(net, confidence=Confidence(**kwargs)).eval()


def _median_threshold(model, x):
    """Set the max-prob threshold to the median confidence of exit 1, so masks are partial."""
    with torch.no_grad():
        first = next(model.anytime(x)).logits
    model.confidence.threshold = first.softmax(1).amax(1).median().item()
    return model


def _top_left_skipped(logits):
    """A criterion whose mask is partial at every resolution: the top-left position is confident."""
    computed = torch.ones(logits.shape[0], 1, *logits.shape[-2:], dtype=torch.bool)
    computed[..., : max(1, logits.shape[-2] // 4), : max(1, logits.shape[-1] // 4)] = False
    return computed


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("execution", ["dense", "sparse"])
def test_threshold_above_one_changes_nothing(net, x, execution):
    plain = anytimeify.convert(net).eval()
    model = _ca(net, threshold=1.5, execution=execution)
    model.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for a, b in zip(model(x), plain(x)):
            assert torch.equal(a, b)
        assert [o.skipped for o in model.anytime(x)] == [0.0, 0.0, 0.0, 0.0]


def test_skip_everything_after_exit_one(net, x):
    def after_exit_one(logits):  # a user criterion: every position confident
        return torch.zeros(logits.shape[0], 1, *logits.shape[-2:], dtype=torch.bool)

    model = _ca(net, criterion=after_exit_one, execution="sparse")
    plain = anytimeify.convert(net).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        outs = list(model.anytime(x))
        first = next(plain.anytime(x))
    assert [o.skipped for o in outs[:3]] == [1.0, 1.0, 1.0]
    for o in outs:
        assert torch.equal(o.logits, first.logits)
    # nothing after exit 1 is computed: the counted MACs stop growing
    assert outs[0].macs == first.macs
    assert [o.macs for o in outs] == [first.macs] * 4
    assert [o.paper_macs for o in outs] == [first.macs] * 4


def test_masked_convs_are_exactly_the_references(net):
    """Every conv the reference masks (it carries a Lambda) is masked here, and nothing else."""
    model = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=19), confidence=Confidence())
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {}
    with open("tests/data/hrnet_w18_small_v2_adpc_state_dict.tsv") as f:
        for line in f:
            key, shape, _ = line.rstrip("\n").split("\t")
            mapped = reference_key(key)
            if mapped:
                ref[mapped] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert own == ref
    masked = [n for n, m in model.named_modules() if isinstance(m, MaskedConv2d)]
    assert len(masked) == sum(1 for k in ref if k.endswith("interp_lambda"))
    assert not any(n.startswith(("conv1", "conv2", "layer1", "exits.0")) for n in masked)
    assert all(model.get_submodule(n).interp_lambda.item() == 3.0 for n in masked)


def test_sparse_equals_dense_end_to_end(net, x):
    model = _median_threshold(_ca(net, execution="dense"), x)
    with torch.no_grad():
        dense = model(x)
        dense_stream = list(model.anytime(x))
        model.set_execution("sparse")
        sparse = model(x)
        sparse_stream = list(model.anytime(x))
    skipped = [o.skipped for o in sparse_stream[:3]]
    assert any(0.0 < s < 1.0 for s in skipped), skipped  # the check must see partial masks
    for a, b in zip(sparse, dense):
        assert _rel_err(a, b) <= 1e-4
    for a, b in zip(sparse_stream, dense_stream):
        assert (a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask)
        assert a.paper_macs == pytest.approx(b.paper_macs)
        assert a.macs <= b.macs


def test_copy_aggregation_keeps_confident_predictions(net, x):
    model = _median_threshold(_ca(net, execution="sparse"), x)
    with torch.no_grad():
        outs = list(model.anytime(x))
    assert 0.4 < outs[0].skipped < 0.6
    for prev, cur in zip(outs, outs[1:]):
        keep = ~prev.mask.expand_as(cur.logits)
        assert torch.equal(cur.logits[keep], prev.logits[keep])
    # a confident pixel stays confident: masks only shrink
    for prev, cur in zip(outs[:2], outs[1:3]):
        assert not (cur.mask & ~prev.mask).any()


def test_interleaved_generators_and_sizes_with_masks(net):
    a = torch.randn(1, 3, 64, 64)
    model = _median_threshold(_ca(net, execution="sparse"), a)
    b = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref_a = [o.logits for o in model.anytime(a)]
        ref_b = [o.logits for o in model.anytime(b)]
        pairs = list(zip(model.anytime(a), model.anytime(b)))
        after = [o.logits for o in model.anytime(a)]
    for (oa, ob), ra, rb, aa in zip(pairs, ref_a, ref_b, after):
        assert torch.equal(oa.logits, ra) and torch.equal(ob.logits, rb) and torch.equal(aa, ra)


def test_training_through_masks_reaches_every_parameter(net):
    model = anytimeify.convert(net, confidence=Confidence(criterion=_top_left_skipped, execution="dense")).train()
    x = torch.randn(2, 3, 64, 64)
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()
    lambdas = {n: p for n, p in model.named_parameters() if n.endswith("interp_lambda")}
    assert all(p.grad is not None for p in model.parameters())
    # A classifier's interpolated positions are exactly the ones copy aggregation replaces by the
    # previous exit's prediction, so its lambda gets a zero gradient; every other lambda learns.
    classifiers = {"last_layer.3.interp_lambda", "exits.1.13.interp_lambda", "exits.2.5.interp_lambda"}
    assert classifiers <= set(lambdas)
    assert all(lambdas[n].grad.item() == 0.0 for n in classifiers)
    zero = [n for n, p in lambdas.items() if n not in classifiers and p.grad.abs().item() == 0.0]
    assert zero == []


def test_sparse_execution_refuses_gradients(net):
    model = _ca(net, criterion=_top_left_skipped, execution="sparse").train()
    with pytest.raises(RuntimeError, match="dense"):
        model(torch.randn(1, 3, 64, 64))


def test_auto_execution_is_dense_under_autograd_and_sparse_without(net, x):
    """The default execution trains (gradients reach the lambdas) and serves sparsely (fewer
    executed MACs), with the same outputs either way."""
    assert Confidence().execution == "auto"
    model = _ca(net, criterion=_top_left_skipped)
    model.train()  # autograd records: the differentiable dense blend
    outs = model(x)
    sum(o.float().mean() for o in outs).backward()
    lambdas = [m.interp_lambda for m in model.modules() if isinstance(m, MaskedConv2d)]
    assert lambdas and any(p.grad is not None and p.grad.abs().item() > 0 for p in lambdas)
    model.eval()
    with torch.no_grad():
        sparse = list(model.anytime(x))
    with torch.enable_grad():
        dense = list(model.anytime(x))
    assert any(o.skipped > 0 for o in sparse)
    for s, d in zip(sparse, dense):
        assert _rel_err(s.logits, d.logits.detach()) < 1e-4
        assert s.paper_macs == d.paper_macs
    # the sparse run computed fewer positions than the dense one did (full conv + 7x7 blend)
    assert sparse[-1].macs < dense[-1].macs


def test_switching_confidence_on_after_some_epochs(net, x):
    model = _median_threshold(_ca(net, execution="dense"), x)
    plain = anytimeify.convert(net).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    model.set_confidence(False)
    with torch.no_grad():
        for a, b in zip(model(x), plain(x)):
            assert torch.equal(a, b)
        model.set_confidence(True)
        assert any(o.skipped > 0 for o in model.anytime(x))


def test_conversion_copies_the_settings(net):
    settings = Confidence(execution="dense")
    model = anytimeify.convert(net, confidence=settings)
    model.set_execution("sparse")
    assert settings.execution == "dense"
    assert all(m.execution == "sparse" for m in model.modules() if isinstance(m, MaskedConv2d))


@pytest.mark.parametrize("criterion, kwargs", [
    ("entropy", {"threshold": 1.0}),
    ("topk", {"fraction": 0.25}),
    ("random", {"fraction": [0.2, 0.4, 0.6], "seed": 0}),
])
def test_criteria(net, x, criterion, kwargs):
    model = _ca(net, criterion=criterion, execution="sparse", **kwargs)
    with torch.no_grad():
        outs = list(model.anytime(x))
    if criterion == "topk":
        # 25% of positions skipped per exit (exactly, per sample, at 16x24)
        assert all(abs(o.skipped - round(0.25 * 384) / 384) < 1e-9 for o in outs[:3])
    elif criterion == "random":
        assert [round(o.skipped, 3) for o in outs[:3]] == [round(round(f * 384) / 384, 3) for f in (0.2, 0.4, 0.6)]
    else:
        logits = outs[0].logits
        logp = logits.log_softmax(1)
        entropy = -(logp.exp() * logp).sum(1, keepdim=True)
        assert torch.equal(outs[0].mask, entropy >= 1.0)


def test_heatmap_criterion_for_pose():
    net = hrnet_pose("w32", num_joints=16).eval()
    model = anytimeify.convert(net, input_size=(64, 64),
                               confidence=Confidence(criterion="heatmap", threshold=0.002, execution="sparse")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = list(model.anytime(x))
    heat = outs[0].logits
    assert torch.equal(outs[0].mask, heat.amax(1, keepdim=True) >= 0.002)


def test_bad_settings_are_rejected(net):
    with pytest.raises(ValueError, match="criterion must be one of"):
        Confidence(criterion="vibes")
    with pytest.raises(ValueError, match="execution must be"):
        Confidence(execution="fast")
    with pytest.raises(ValueError, match="fraction must lie in"):
        Confidence(criterion="topk", fraction=1.5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 4, 4\)"):
        model = _ca(net, criterion=lambda logits: torch.ones(2, 1, 4, 4, dtype=torch.bool))
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="no confidence adaptivity"):
        anytimeify.convert(net).set_execution("dense")


def test_mask_aware_flops(net, x):
    plain = anytimeify.convert(net).eval()
    unmasked = _ca(net, threshold=1.5, execution="sparse")
    report, ref = anytimeify.flops(unmasked, x), anytimeify.flops(plain, x)
    # nothing skipped: the counts are fvcore's
    assert [e.macs for e in report.exits] == [e.macs for e in ref.exits]
    assert [e.paper_gflops for e in report.exits] == pytest.approx([e.paper_gflops for e in ref.exits], rel=1e-12)
    model = _median_threshold(_ca(net, execution="sparse"), x)
    masked = anytimeify.flops(model, x)
    assert masked.exits[0].macs == ref.exits[0].macs  # exit 1 is never masked
    with torch.no_grad():  # half the positions, less those tied with the median (bilinear borders repeat values)
        confidence = next(model.anytime(x)).logits.softmax(1).amax(1)
    confident = float((confidence > model.confidence.threshold).float().mean())
    assert 0.45 <= confident <= 0.5 and masked.exits[0].skipped == pytest.approx(confident, abs=1e-6)
    for m, r in zip(masked.exits[1:], ref.exits[1:]):
        assert m.paper_gflops < r.paper_gflops


def test_frozen_model_reads_only_what_it_wrote(net, x):
    """Every output of the compiled kernels taken from a buffer pool filled with NaN: rows left
    unwritten (nobody reads them) keep NaN, so a kernel that reads one would spoil the result."""
    from anytimeify.masking import _ext, engine

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    ext = _ext.load()
    model = anytimeify.convert(net, confidence=Confidence(criterion=_top_left_skipped, execution="sparse")).eval()
    frozen = model.freeze()
    previous_limit = engine.set_buffer_pool_limit(256 << 20)
    previous_min = ext.set_pool_min_bytes(0)
    try:
        engine.release_buffers()
        poisoned = [ext.pooled_empty([1 << 19]) for _ in range(48)]  # 48 unused 2 MiB buffers ...
        for buffer in poisoned:
            buffer.fill_(float("nan"))
        del poisoned, buffer  # ... back in the pool, holding NaN
        assert engine.buffer_pool_stats()["unused_buffers"] == 48
        with torch.no_grad():
            ref = list(model.anytime(x))
            hits = engine.buffer_pool_stats()["hits"]
            runs = [list(frozen.anytime(x)) for _ in range(2)]  # the second reuses the first's buffers
        assert engine.buffer_pool_stats()["hits"] > hits
    finally:
        ext.set_pool_min_bytes(previous_min)
        engine.set_buffer_pool_limit(previous_limit)
        engine.release_buffers()
    for got in runs:
        for r, g in zip(ref, got):
            assert torch.isfinite(g.logits).all()
            assert _rel_err(g.logits, r.logits) <= 1e-4


@pytest.mark.parametrize("with_confidence", [False, True])
def test_frozen_model_computes_the_same(net, x, with_confidence):
    conf = Confidence(criterion=_top_left_skipped, execution="sparse") if with_confidence else None
    model = anytimeify.convert(net, confidence=conf).eval()
    for p in model.parameters():  # non-trivial BN statistics and lambdas
        if p.dim() == 0:
            p.data.fill_(1.7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    frozen = model.freeze()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    if with_confidence:  # BN shifts and ReLUs after masked convs are fused into the engine's output pass
        masked = [m for m in frozen.modules() if isinstance(m, MaskedConv2d)]
        assert sum(m.shift is not None for m in masked) >= len(masked) // 2
        assert sum(m.activation == "relu" for m in masked) >= len(masked) // 4
        # residual additions after masked convs run inside them (and the program was re-split)
        graph = frozen._programs[False].graph_module.graph
        assert any("residual" in node.kwargs for node in graph.nodes)
        # HRNet's fuse layers (upsampled branches summed, ReLU) run as one pass each
        assert any(node.target is fuse_sum for node in graph.nodes)
        # a masked conv read only by the next masked conv (block conv1 -> conv2) knows how far it looks
        assert any(m.reader_radius == 1 for m in masked)
        # where a mask keeps everything, the engine's dense kernels run, as for the unmasked convs
        assert masked and all(m.engine_dense for m in masked)
        assert len(frozen._programs[False].segments) == len(model._programs[False].segments)
    # the unmasked convs are the engine's, with the ReLUs after them fused
    engine_convs = [m for m in frozen.modules() if isinstance(m, EngineConv2d)]
    assert engine_convs and any(m.activation == "relu" for m in engine_convs)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    # a masked conv whose only reader is a 1x1 conv of the same mask runs no halo stencil
    unread = []

    def stencil_macs(module, args, out):
        plan = args[2] if len(args) > 2 and args[2] is not None else MaskPlan(args[1])
        unread.append(executed_interp_macs(plan, module.interp_lambda, module.out_channels))

    hooks = [m.register_forward_hook(stencil_macs) for m in frozen.modules()
             if isinstance(m, MaskedConv2d) and m.reader_radius == 0]
    with torch.no_grad():
        ref = list(model.anytime(x))
        got = list(frozen.anytime(x))
        for h in hooks:
            h.remove()
        whole = frozen(x)
    for r, g, w in zip(ref, got, whole):
        assert _rel_err(g.logits, r.logits) <= 1e-4
        assert torch.equal(g.logits, w)
        assert g.paper_macs == r.paper_macs and g.macs <= r.macs
    assert ref[-1].macs - got[-1].macs == sum(unread)
    assert sum(unread) > 0 if with_confidence else not unread
    with pytest.raises(RuntimeError, match="inference only"):
        frozen.train()


def test_paper_convention_matches_the_formula(net, x):
    """Per-exit paper counts equal REFERENCE.md §4's formula, evaluated here from each conv's mask."""
    model = _ca(net, criterion=_top_left_skipped, execution="sparse")
    calls = []

    def record(module, args, output):
        b, c_in, _, _ = args[0].shape
        _, c_out, h, w = output.shape
        kh, kw = module.kernel_size
        dense = c_out * (c_in // module.groups) * kh * kw * h * w  # per sample
        mask = args[1] if len(args) > 1 else None
        if not isinstance(module, MaskedConv2d) or mask is None:
            calls.append(float(b * dense))
            return
        total = 0.0
        for p in mask.float().flatten(1).mean(1).tolist():
            total += dense * p + (1 - p) * p * c_out * 49 * h * w
        calls.append(total)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = []
    try:
        with torch.no_grad():
            for out in model.anytime(x):
                expected.append(sum(calls))
                assert out.paper_macs == pytest.approx(expected[-1], rel=1e-6)
    finally:
        for h in handles:
            h.remove()
    assert len(expected) == 4 and expected[0] < expected[1] < expected[2] < expected[3]
