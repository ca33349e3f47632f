"""The public ops under torch.compile with changing float arguments, compiled torch.func transforms, and fake
tensors (make_fx, FakeTensorMode): what a codebase that compiles its training step does with xlard.ops."""
from __future__ import annotations

import math

import pytest
import torch

import xlard.ops as ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_compile_with_a_float_argument_that_changes():
    """torch.compile traces a float that changes between calls as a symbol; the scalar checks called math.isfinite
    on it, which fullgraph refused ("torch.* op returned non-Tensor"). Annealing alpha or tau in a compiled loop hit
    it. The values must match eager mode, and a NaN given later must still be refused."""
    maps = torch.rand(2, 5, 6)
    count = torch.compile(lambda m, t: ops.count_components(m, t, mode="absolute"), fullgraph=True)
    for t in (0.1, 0.2, 0.7):
        assert torch.equal(count(maps, t), ops.count_components(maps, t, mode="absolute"))
    z, d = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    correct = torch.compile(lambda z, d, a: ops.residual_correction(z, d, a), fullgraph=True)
    for a in (0.1, 0.3, 2.5):
        for got, want in zip(correct(z, d, a), ops.residual_correction(z, d, a)):
            torch.testing.assert_close(got, want)
    c, rel = torch.rand(2, 3, 2), torch.tensor([[0, 1, 0]])
    position = torch.compile(lambda c, tau: ops.position_scores(c, rel, tau), fullgraph=True)
    for tau in (1.0, 5.0, 10.0):
        torch.testing.assert_close(position(c, tau), ops.position_scores(c, rel, tau))
    x, mu = torch.randn(2, 4), torch.randn(2, 4)
    log_prob = torch.compile(lambda x, s: ops.gaussian_log_prob(x, mu, s), fullgraph=True)
    for s in (0.1, -0.5, 1.3):
        torch.testing.assert_close(log_prob(x, s), ops.gaussian_log_prob(x, mu, s))
    lenient = torch.compile(lambda m, t: ops.count_components(m, t, mode="absolute"))
    lenient(maps, 0.1), lenient(maps, 0.2)
    with pytest.raises(ValueError, match=r"xlard\.count_components: threshold must be a finite real number"):
        lenient(maps, math.nan)
    # fullgraph: Dynamo's error carries the message (its repr of a traced float failed: "repr_impl not implemented")
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"threshold must be a finite real number"):
        count(maps, math.nan)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"position_scores: tau must be a finite float > 0"):
        position(c, -2.0)
    with pytest.raises(ValueError, match=r"xlard\.position_scores: tau must be"):
        torch.compile(lambda c, tau: ops.position_scores(c, rel, tau))(c, -2.0)


def test_compiled_torch_func_transforms_over_the_differentiable_ops():
    """compile(grad(f)) reached the torch.ops operator, whose autograd kernel refuses transforms ("supported
    through xlard.ops..."): the user was calling xlard.ops. (fullgraph=True is not supported here: the
    autograd.Function's forward dispatches below autograd with a guard Dynamo cannot trace; docs/ops.md.)"""
    m = torch.rand(2, 4, 5, dtype=torch.float64)

    def centroid_loss(m):
        return ops.attention_centroids(m).pow(2).sum()

    torch.testing.assert_close(torch.compile(torch.func.grad(centroid_loss))(m), torch.func.grad(centroid_loss)(m))
    jac = torch.compile(torch.func.jacrev(ops.attention_centroids))(m)
    torch.testing.assert_close(jac, torch.func.jacrev(ops.attention_centroids)(m))
    z, d = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)

    def correction_loss(z, d):
        return ops.residual_correction(z, d, 0.5)[0].pow(2).sum()

    got = torch.compile(torch.func.grad(correction_loss, argnums=(0, 1)))(z, d)
    for a, b in zip(got, torch.func.grad(correction_loss, argnums=(0, 1))(z, d)):
        torch.testing.assert_close(a, b)
    x, mu, log_std = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))

    def log_prob_loss(mu, log_std):
        return ops.gaussian_log_prob(x, mu, log_std[0]).sum()

    got = torch.compile(torch.func.grad(log_prob_loss, argnums=(0, 1)))(mu, log_std)
    for a, b in zip(got, torch.func.grad(log_prob_loss, argnums=(0, 1))(mu, log_std)):
        torch.testing.assert_close(a, b)


def test_position_scores_under_fake_tensors_and_make_fx():
    """The host-side relation check read values of fake tensors (DataDependentOutputException under
    FakeTensorMode, GuardOnDataDependentSymNode under make_fx); every other op already ran there."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode() as mode:
        out = ops.position_scores(mode.from_tensor(torch.rand(2, 4, 2)), mode.from_tensor(torch.tensor([[0, 1, 0]])))
    assert out.shape == (2, 1)
    graph = make_fx(lambda c, r: ops.position_scores(c, r), tracing_mode="fake")(torch.rand(2, 4, 2),
                                                                                 torch.tensor([[0, 1, 0]]))
    c, rel = torch.rand(3, 4, 2), torch.tensor([[2, 3, 1], [0, 1, 3]])
    torch.testing.assert_close(graph(c, rel), ops.position_scores(c, rel))
    with pytest.raises(ValueError, match=r"xlard\.position_scores: relations name token indices outside"):
        ops.position_scores(torch.rand(2, 4, 2), torch.tensor([[0, 9, 0]]))  # real tensors: still checked


def _every_op_once(maps, feats, emb, z, d, noise):
    """Each public op once (no grad), as a codebase under autocast would call them."""
    rel = torch.tensor([[0, 1, 0], [1, 0, 2]])
    with torch.no_grad():
        return {
            "label_components": ops.label_components(maps, 0.5),
            "count_components": ops.count_components(maps, 0.5),
            "component_stats": ops.component_stats(maps, 0.5, max_components=3),
            "attention_centroids": ops.attention_centroids(maps),
            "position_scores": ops.position_scores(ops.attention_centroids(maps), rel),
            "color_scores": ops.color_scores(feats, emb),
            "color_scores, mask": ops.color_scores(feats, emb, torch.arange(feats.shape[1]).expand(2, 3, -1) % 2 == 0),
            "residual_correction": ops.residual_correction(z, d, 0.5),
            "gaussian_log_prob": ops.gaussian_log_prob(z, d, torch.zeros(z.shape[1])),
            "sample_correction": ops.sample_correction(z, d, -0.5, noise, 0.5),
        }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_ops_compute_alike_under_the_callers_autocast(dtype):
    """A training step under torch.autocast("cpu") calling xlard.ops: color_scores' kernel ran its GEMM under the
    caller's autocast, got bfloat16/float16 back and failed ("expected scalar type Float but found BFloat16"); the
    reference's matmul was cast too. Every op (and the color reference) must give what it gives without autocast."""
    import xlard.reference as reference

    g = torch.Generator().manual_seed(0)
    maps, feats, emb = torch.rand(2, 2, 7, 8, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(3, 16)
    z, d, noise = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    want = _every_op_once(maps, feats, emb, z, d, noise)
    with torch.autocast("cpu", dtype=dtype):
        got = _every_op_once(maps, feats, emb, z, d, noise)
        ref = reference.color_scores(feats, emb)
        # a case where a bfloat16 GEMM ranks another patch first (found by search over seeds; the reference
        # re-scores near-best patches exactly, so most cases came out right even when its matmul was cast)
        g11 = torch.Generator().manual_seed(11)
        hard = torch.randn(2, 300, 64, generator=g11), torch.randn(3, 64, generator=g11)
        hard_ref = reference.color_scores(*hard)
        # features straight from an autocast Linear (low dtype) beside float32 embeddings: scored in float32
        low = torch.nn.Linear(16, 16)(feats)
        assert low.dtype == dtype
        mixed = ops.color_scores(low, emb)
    for name in want:
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (got[name], want[name]))):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)  # dtype included
    for a, b in zip((*ref, *hard_ref), (*reference.color_scores(feats, emb), *reference.color_scores(*hard))):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(mixed, ops.color_scores(low, emb)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_out_forms_under_fake_tensors_and_make_fx():
    """The out= forms' eager buffer-overlap check read data_ptr(): 0 for every fake tensor (a false "shares memory"
    under FakeTensorMode), refused under make_fx. Fake tensors hold no memory to compare; real ones are still
    checked."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    z0, d = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    mode = FakeTensorMode()
    fz0, fd, fzc, flam = (mode.from_tensor(t) for t in (z0, d, torch.empty_like(z0), torch.empty(2, 4, 5)))
    outs = tuple(mode.from_tensor(t) for t in (torch.empty_like(z0), torch.empty_like(z0), torch.empty(2),
                                                 torch.empty(2, 4, 5)))
    with mode:
        zc, lam = ops.residual_correction(fz0, fd, 0.3, out=(fzc, flam))
        assert zc is fzc and lam.shape == (2, 4, 5)
        with torch.no_grad():
            assert ops.sample_correction(fz0, fd, -0.5, fd, 0.5, out=outs)[2].shape == (2,)

    def step(z0, d, zc, lam):
        ops.residual_correction(z0, d, 0.3, out=(zc, lam))
        return zc, lam

    graph = make_fx(step, tracing_mode="fake")(z0, d, torch.empty_like(z0), torch.empty(2, 4, 5))
    got = graph(z0, d, torch.empty_like(z0), torch.empty(2, 4, 5))
    for a, b in zip(got, ops.residual_correction(z0, d, 0.3)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="shares memory"):  # real tensors: still checked
        ops.residual_correction(z0, d, 0.3, out=(z0, torch.empty(2, 4, 5)))


def test_a_frozen_delta_from_inference_mode_with_only_z0_requiring_grad():
    """residual_correction saved delta for backward whatever needed a gradient: a delta made under
    torch.inference_mode() (a frozen corrector's output) with z0 requiring grad was refused ("Inference tensors
    cannot be saved for backward"), where torch's z0 + alpha * delta works."""
    with torch.inference_mode():
        delta, alpha = torch.randn(2, 4, 3, 3), torch.rand(2)
    for a in (0.5, alpha):
        z0 = torch.randn(2, 4, 3, 3, requires_grad=True)
        zc, lam = ops.residual_correction(z0, delta, a)
        zc.sum().backward()
        assert torch.equal(z0.grad, torch.ones_like(z0))
    # the gradients that do read delta and alpha still get them
    d = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    al = torch.rand(2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    for inputs in ((z, d, al), (z.detach(), d, al), (z.detach(), d.detach(), al), (z.detach(), d, al.detach())):
        assert torch.autograd.gradcheck(lambda *t: ops.residual_correction(*t), inputs)


def test_no_graph_inside_inference_mode_even_with_enable_grad():
    """inference_mode() records no graph even where enable_grad() turns grad mode on: sample_correction and the
    out= forms refused grad-requiring inputs there ("not differentiable"), as if a graph were being recorded."""
    z0 = torch.randn(2, 3, 4, 5, requires_grad=True)
    d, noise = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with torch.inference_mode(), torch.enable_grad():
        assert torch.is_grad_enabled()
        zc, delta, logp, lam = ops.sample_correction(z0, d, -0.5, noise, 0.5)
        out = (torch.empty(2, 3, 4, 5), torch.empty(2, 4, 5))
        ops.residual_correction(z0, d, 0.5, out=out)
    with torch.no_grad():
        want = ops.sample_correction(z0, d, -0.5, noise, 0.5)
    for a, b in zip((zc, delta, logp, lam), want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="not differentiable"):  # outside inference mode: still refused
        ops.sample_correction(z0, d, -0.5, noise, 0.5)
