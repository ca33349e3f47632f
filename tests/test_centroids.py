"""attention_centroids and position_scores: reference parity, gradients, sign
conventions, bad input, opcheck, compile."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import xlard.ops as ops
import xlard.reference as ref
from helpers import FLOAT_DTYPES, TOLERANCES, assert_close, blobs, nan_inf_sprinkle


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (3, 1, 13), (2, 4, 16, 16), (2, 0, 8, 8), (0, 4, 4)])
def test_attention_centroids_match_reference(dtype, shape):
    maps = (torch.rand(shape) - 0.2).to(dtype)
    got = ops.attention_centroids(maps)
    want = ref.attention_centroids(maps)
    assert got.shape == (*shape[:-2], 2)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want, dtype=torch.float32 if dtype != torch.float64 else dtype)


def test_attention_centroids_semantics_and_scipy():
    m = torch.zeros(4, 10, 20)
    m[0, 2, 5] = 3.0  # one pixel: its centre
    m[2] = -1.0  # all negative: weights 0 -> (0.5, 0.5)
    m[3, 0, 0] = math.nan
    m[3, 9, 19] = math.inf
    m[3, 5, 10] = 1.0
    out = ops.attention_centroids(m)
    torch.testing.assert_close(out[0], torch.tensor([5.5 / 20, 2.5 / 10]))
    torch.testing.assert_close(out[1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out[2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out[3], torch.tensor([10.5 / 20, 5.5 / 10]))
    maps = blobs(5, 24, 31, seed=4)
    got = ops.attention_centroids(maps)
    for k in range(5):
        cy, cx = ndi.center_of_mass(maps[k].numpy())  # an independent oracle (pixel indices)
        assert got[k, 0].item() == pytest.approx((cx + 0.5) / 31, abs=1e-5)
        assert got[k, 1].item() == pytest.approx((cy + 0.5) / 24, abs=1e-5)


def test_attention_centroids_non_finite_and_strided():
    maps = nan_inf_sprinkle(torch.rand(3, 12, 12), frac=0.2)
    assert_close(ops.attention_centroids(maps), ref.attention_centroids(maps))
    strided = torch.rand(3, 20, 30).transpose(1, 2)[:, ::2]
    assert_close(ops.attention_centroids(strided), ref.attention_centroids(strided))
    expanded = torch.rand(1, 9, 9).expand(4, 9, 9)
    assert_close(ops.attention_centroids(expanded), ref.attention_centroids(expanded))


def test_attention_centroids_gradients():
    maps = (torch.rand(2, 3, 6, 7, dtype=torch.float64) - 0.3).requires_grad_()
    torch.autograd.gradcheck(ops.attention_centroids, (maps,))
    got = torch.autograd.grad(ops.attention_centroids(maps).sum() * 1.0, maps)[0]
    want = torch.autograd.grad(ref.attention_centroids(maps).sum() * 1.0, maps)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    m32 = torch.rand(2, 5, 5, requires_grad=True)
    w = torch.randn(2, 2)
    g32 = torch.autograd.grad((ops.attention_centroids(m32) * w).sum(), m32)[0]
    r32 = torch.autograd.grad((ref.attention_centroids(m32) * w).sum(), m32)[0]
    assert_close(g32, r32, dtype=torch.float32)


def _rel(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_position_sign_conventions_pinned():
    # token 0 at the left/top, token 1 at the right/bottom (y grows downward)
    cen = torch.tensor([[[0.2, 0.2], [0.8, 0.8]]])
    rows = _rel([[0, 1, ops.LEFT_OF], [0, 1, ops.RIGHT_OF], [0, 1, ops.ABOVE], [0, 1, ops.BELOW], [1, 0, ops.BELOW]])
    s = ops.position_scores(cen, rows, tau=10.0)[0]
    assert s[0] > 0.99 and s[1] < 0.01  # 0 is left of 1, not right of it
    assert s[2] > 0.99 and s[3] < 0.01  # 0 is above 1 (smaller y), not below
    assert s[4] > 0.99
    assert s[0].item() == pytest.approx(1 / (1 + math.exp(-10 * 0.6)), rel=1e-6)
    assert (ops.LEFT_OF, ops.RIGHT_OF, ops.ABOVE, ops.BELOW) == (0, 1, 2, 3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_position_scores_match_reference(dtype):
    g = torch.Generator().manual_seed(1)
    cen = torch.rand(3, 5, 2, generator=g).to(dtype)
    shared = torch.stack([torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (7,), generator=g),
                          torch.randint(0, 4, (7,), generator=g)], 1)
    per_batch = torch.stack([shared.roll(k, 0) for k in range(3)])
    for rel in (shared, per_batch, shared[:0]):
        got = ops.position_scores(cen, rel, tau=7.5)
        assert got.shape == (3, rel.shape[-2])
        assert_close(got, ref.position_scores(cen, rel, tau=7.5), dtype=torch.float32 if dtype != torch.float64 else dtype)


def test_position_scores_gradients():
    cen = torch.rand(2, 4, 2, dtype=torch.float64, requires_grad=True)
    rel = _rel([[0, 1, 0], [2, 3, 2], [1, 1, 3], [3, 0, 1]])
    torch.autograd.gradcheck(lambda c: ops.position_scores(c, rel, 3.0), (cen,))
    w = torch.randn(2, 4, dtype=torch.float64)
    got = torch.autograd.grad((ops.position_scores(cen, rel, 3.0) * w).sum(), cen)[0]
    want = torch.autograd.grad((ref.position_scores(cen, rel, 3.0) * w).sum(), cen)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "cen, rel, words",
    [
        (torch.rand(2, 3, 2), _rel([[0, 3, 0]]), "token indices"),
        (torch.rand(2, 3, 2), _rel([[-1, 0, 0]]), "token indices"),
        (torch.rand(2, 3, 2), _rel([[0, 1, 4]]), "codes"),
        (torch.rand(2, 3, 3), _rel([[0, 1, 0]]), "centroids"),
        (torch.rand(3, 2), _rel([[0, 1, 0]]), "centroids"),
        (torch.rand(2, 3, 2), _rel([[0, 1]]), "relations"),
        (torch.rand(2, 3, 2), torch.zeros(3, 1, 3, dtype=torch.int64), "relations"),
        (torch.rand(2, 3, 2), torch.zeros(1, 3, dtype=torch.int32), "relations"),
    ],
)
def test_position_scores_bad_input(cen, rel, words):
    with pytest.raises((ValueError, TypeError), match=words):
        ops.position_scores(cen, rel)


@pytest.mark.parametrize("tau", [0.0, -10.0, float("nan"), float("inf")])
def test_position_scores_refuses_a_tau_that_is_not_a_positive_number(tau):
    # A negative tau would silently turn every relation around (left scored as right).
    with pytest.raises(ValueError, match="tau must be a finite float > 0"):
        ops.position_scores(torch.rand(1, 2, 2), _rel([[0, 1, 0]]), tau=tau)


@pytest.mark.parametrize("tau", [True, "10", torch.tensor(10.0)])
def test_position_scores_refuses_a_tau_that_is_not_a_number(tau):
    with pytest.raises(TypeError, match="tau must be a real number"):
        ops.position_scores(torch.rand(1, 2, 2), _rel([[0, 1, 0]]), tau=tau)


def test_position_scores_takes_numpy_scalars_for_tau():
    import numpy as np

    cen, rel = torch.rand(1, 2, 2), _rel([[0, 1, 0]])
    want = ops.position_scores(cen, rel, tau=10.0)
    for tau in (np.float32(10.0), np.int64(10), np.float64(10.0)):
        assert torch.equal(ops.position_scores(cen, rel, tau=tau), want)


def test_position_scores_tau_beyond_float32_and_odd_inputs():
    cen = torch.tensor([[[0.2, 0.5], [0.8, 0.5]]])
    rel = _rel([[0, 1, 0], [0, 0, 0]])
    # 1e39 is inf in float32: the zero displacement of relation (0, 0) scored NaN
    with pytest.raises(ValueError, match="tau must lie within float32's range"):
        ops.position_scores(cen, rel, 1e39)
    torch.testing.assert_close(ops.position_scores(cen.double(), rel, 1e39),
                               torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"tau must be a finite float > 0.*got 1000.*\(401 characters\)"):
        ops.position_scores(cen, rel, 10**400)
    # meta tensors: shapes only, from the fake kernel (the host-side range check called .item() on them)
    out = ops.position_scores(torch.rand(2, 3, 2, device="meta"), _rel([[0, 1, 0]]).to("meta"))
    assert out.is_meta and out.shape == (2, 1)


def test_position_scores_under_vmap_with_batched_relations():
    """The host-side range check was data-dependent control flow on vmap's batched relations."""
    from torch.func import vmap

    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 2, 3, 2, generator=g)
    rel = _rel([[0, 1, 0], [2, 1, 3]])
    rels = torch.stack([rel, rel.flip(0)])[None].expand(4, 2, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to one call per vmapped sample (tests/test_vmap.py)
        got = vmap(lambda c, r: ops.position_scores(c, r, 3.0))(x, rels)
        want = torch.stack([ops.position_scores(x[i], rels[i], 3.0) for i in range(4)])
        torch.testing.assert_close(got, want)
        bad = rels.clone()
        bad[2, 1, 0, 1] = 7
        with pytest.raises(ValueError, match=r"token indices outside \[0, 3\): min 0, max 7"):
            vmap(lambda c, r: ops.position_scores(c, r, 3.0))(x, bad)


def test_attention_centroids_bad_input():
    with pytest.raises(TypeError, match="maps"):
        ops.attention_centroids(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="maps"):
        ops.attention_centroids(torch.ones(4))
    with pytest.raises(RuntimeError, match="out of range|T = 3"):
        torch.ops.xlard.position_scores(torch.rand(1, 3, 2), _rel([[0, 5, 0]]), 1.0)


def test_opcheck_and_compile():
    maps = torch.rand(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.xlard.attention_centroids.default, (maps,))
    cen = torch.rand(2, 4, 2, dtype=torch.float64, requires_grad=True)
    rel = _rel([[0, 1, 0], [2, 3, 3]])
    torch.library.opcheck(torch.ops.xlard.position_scores.default, (cen, rel, 2.0))

    def fn(m, r):
        return ops.position_scores(ops.attention_centroids(m).flatten(1, 1).view(2, 3, 2), r)

    m = torch.rand(2, 3, 8, 8)
    r = _rel([[0, 1, 0], [1, 2, 2]])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(m, r), fn(m, r))


# ----------------------------------------------------------------------------------
# Higher-order and functional derivatives, overflow edges, fake-kernel checks


def test_second_derivatives_match_the_reference():
    g = torch.Generator().manual_seed(5)
    maps = (torch.rand(2, 4, 5, dtype=torch.float64, generator=g) - 0.2).requires_grad_()
    assert torch.autograd.gradgradcheck(ops.attention_centroids, (maps,))
    cen = torch.rand(2, 4, 2, dtype=torch.float64, generator=g).requires_grad_()
    rel = torch.tensor([[0, 1, ops.LEFT_OF], [2, 3, ops.BELOW], [1, 2, ops.ABOVE]])
    assert torch.autograd.gradgradcheck(lambda c: ops.position_scores(c, rel, 3.0), (cen,))
    # The Hessian-vector product equals the reference's (not zero, as an opaque backward gives).
    for fn, rfn, x in ((ops.attention_centroids, ref.attention_centroids, maps),
                       (lambda c: ops.position_scores(c, rel, 3.0), lambda c: ref.position_scores(c, rel, 3.0), cen)):
        v = torch.rand_like(x)
        hv = []
        for f in (fn, rfn):
            (gx,) = torch.autograd.grad(f(x).pow(2).sum(), x, create_graph=True)
            hv.append(torch.autograd.grad((gx * v).sum(), x)[0])
        assert hv[1].abs().max() > 0
        assert_close(hv[0], hv[1], dtype=torch.float64)


def test_torch_func_grad_and_jacrev_match_the_reference():
    g = torch.Generator().manual_seed(6)
    maps = torch.rand(2, 3, 4, dtype=torch.float64, generator=g)
    got = torch.func.jacrev(ops.attention_centroids)(maps)
    assert_close(got, torch.func.jacrev(ref.attention_centroids)(maps), dtype=torch.float64)
    got = torch.func.grad(lambda m: ops.attention_centroids(m)[..., 0].sum())(maps)
    assert_close(got, torch.func.grad(lambda m: ref.attention_centroids(m)[..., 0].sum())(maps), dtype=torch.float64)
    cen = torch.rand(1, 3, 2, dtype=torch.float64, generator=g)
    rel = torch.tensor([[0, 1, ops.RIGHT_OF], [1, 2, ops.ABOVE]])
    two = torch.func.jacrev(torch.func.jacrev(lambda c: ops.position_scores(c, rel)))(cen)
    assert_close(two, torch.func.jacrev(torch.func.jacrev(lambda c: ref.position_scores(c, rel)))(cen),
                 dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(ops.attention_centroids)(maps)
    with pytest.raises(RuntimeError, match="through xlard.ops.attention_centroids"):
        torch.func.grad(lambda m: torch.ops.xlard.attention_centroids(m).sum())(maps)


@pytest.mark.parametrize("top", [3e38, 1e-40, 1e-45])
def test_centroids_of_maps_near_the_float_range_are_finite_and_right(top):
    # Two pixels, weights top and top / 2 (subnormal tops included): the sums overflow
    # (or the reciprocal of the max would) unless weights are scaled by division first.
    maps = torch.zeros(2, 3, 4)
    maps[0, 0, 0], maps[0, 2, 3] = top, top / 2
    maps[1] = top
    got = ops.attention_centroids(maps)
    small = maps.double() / maps.double().amax((-2, -1), keepdim=True)
    want = ref.attention_centroids(small)
    assert torch.isfinite(got).all()
    assert_close(got, want.float(), dtype=torch.float32)
    assert_close(ref.attention_centroids(maps), want.float(), dtype=torch.float32)
    maps.requires_grad_()
    (grad,) = torch.autograd.grad(ops.attention_centroids(maps).sum(), maps)
    wide = maps.detach().double().requires_grad_()            # float64 holds these sums exactly enough
    (want_grad,) = torch.autograd.grad(ref.attention_centroids(wide).sum(), wide)
    assert not torch.isnan(grad).any()
    if top >= 1e-38:  # for subnormal maps the true gradient exceeds the float32 range
        assert grad.abs().max() > 0
        assert torch.allclose(grad.double(), want_grad, rtol=1e-3, atol=1e-44), (grad, want_grad)


@pytest.mark.parametrize("dtype,top", [(torch.float32, 1e-40), (torch.bfloat16, 1e-39), (torch.float64, 1e-310)])
def test_a_subnormal_largest_weight_keeps_a_finite_gradient_finite(dtype, top):
    """200 equal subnormal weights: the gradient d / (top * 200) fits the dtype, but d / top alone does not; the
    CPU kernel and the double-backward composite divided by the max first and gave -inf / +inf (the CUDA kernel
    divided by the sum first)."""
    maps = torch.full((1, 200), top, dtype=dtype)
    g = torch.tensor([1.0, 0.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = torch.tensor([(j + 0.5) / 200 - 0.5 for j in range(200)], dtype=torch.float64)
    want = want / (maps[0, 0].double() * 200)
    for create_graph in (False, True):
        m = maps.clone().requires_grad_()
        (grad,) = torch.autograd.grad(ops.attention_centroids(m), m, g, create_graph=create_graph)
        assert torch.isfinite(grad).all(), (create_graph, grad[0, :2])
        assert torch.allclose(grad[0].double(), want, rtol=1e-2), (create_graph, grad[0, :2], want[:2])


def test_a_second_derivative_of_a_small_map_under_a_large_gradient_is_finite():
    """The double-backward composite chose between two quotients with a where: the unused d / scale overflowed and
    its 0 * inf came back as NaN in every cell of the Hessian-vector product (the float64 one is finite)."""
    g = torch.Generator().manual_seed(0)
    maps = 0.005 + 0.005 * torch.rand(1, 32, 32, generator=g)   # largest weight about 0.01
    up, u = torch.tensor([[1e37, 0.0]]), torch.full((1, 32, 32), 1e-3)
    hvps = []
    for dtype in (torch.float32, torch.float64):
        m = maps.to(dtype).requires_grad_()
        (gm,) = torch.autograd.grad(ops.attention_centroids(m), m, up.to(dtype), create_graph=True)
        (h,) = torch.autograd.grad((gm * u.to(dtype)).sum(), m)
        hvps.append(h)
    assert torch.isfinite(hvps[1]).all() and torch.isfinite(hvps[0]).all()
    assert ((hvps[0].double() - hvps[1]).abs() / hvps[1].abs()).max() < 1e-3


def test_a_tiny_gradient_of_a_small_map_keeps_its_digits():
    """d / (scale * sum): dividing d by the sum first (the first fix of the subnormal case above) sent a tiny
    upstream gradient into the subnormals (relative error 0.16 for a gradient of 1e-37 on a map of 1e-25)."""
    maps = torch.full((1, 4096), 1e-25)
    maps[0, :1365] *= 2
    g = torch.tensor([1e-37, 0.0])
    m64 = maps.double()[0]
    xs = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
    want = g[0].double() * (xs - (m64 * xs).sum() / m64.sum()) / m64.sum()
    for create_graph in (False, True):
        m = maps.clone().requires_grad_()
        (grad,) = torch.autograd.grad(ops.attention_centroids(m), m, g, create_graph=create_graph)
        assert ((grad[0].double() - want).abs() / want.abs()).max() < 1e-2, create_graph


def test_fake_kernels_check_like_the_cpu_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    bad = [
        (torch.ops.xlard.attention_centroids, (torch.rand(4),)),
        (torch.ops.xlard.attention_centroids, (torch.ones(3, 3, dtype=torch.int32),)),
        (torch.ops.xlard.position_scores, (torch.rand(2, 3, 3), torch.zeros(1, 3, dtype=torch.int64), 1.0)),
        (torch.ops.xlard.position_scores, (torch.rand(2, 3, 2), torch.zeros(1, 3, dtype=torch.int32), 1.0)),
        (torch.ops.xlard.position_scores, (torch.rand(2, 3, 2), torch.zeros(1, 3, dtype=torch.int64), -1.0)),
        (torch.ops.xlard.position_scores, (torch.rand(2, 3, 2), torch.zeros(1, 3, dtype=torch.int64), 0.0)),
        (torch.ops.xlard._attention_centroids_backward, (torch.rand(3, 2), torch.rand(2, 4, 4), torch.rand(2, 2))),
    ]
    for op, args in bad:
        with pytest.raises(RuntimeError) as eager:
            op(*args)
        with FakeTensorMode() as mode, pytest.raises(RuntimeError) as traced:
            op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert str(traced.value).splitlines()[0] == str(eager.value).splitlines()[0]
