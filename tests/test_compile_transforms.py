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
