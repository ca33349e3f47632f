"""torch.func.vmap through xlard.ops: each op folds vmap's dimension into its own batch and runs once
(batching rules in xlard/_registration.py), with the results of a Python loop over the vmapped samples and
without torch's per-sample fallback (which warned that it ran the op once per sample)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

import xlard.ops as ops

N = 3
G = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.rand(*shape, generator=G)


def _n(*shape):
    return torch.randn(*shape, generator=G)


REL = torch.tensor([[0, 1, 0], [2, 1, 3]])
CASES = {
    "count_components": (lambda m: ops.count_components(m, 0.5, "absolute"), (_r(N, 2, 5, 6),), (0,)),
    "count_components, vmap dim 1": (lambda m: ops.count_components(m, 0.5, "absolute"), (_r(2, N, 5, 6),), (1,)),
    "label_components": (lambda m: ops.label_components(m, 0.4, "absolute", connectivity=4), (_r(N, 5, 6),), (0,)),
    "component_stats": (lambda m: ops.component_stats(m, 0.5, "absolute", max_components=3), (_r(N, 2, 5, 6),),
                        (0,)),
    "attention_centroids": (ops.attention_centroids, (_r(N, 2, 5, 6),), (0,)),
    "position_scores, shared relations": (lambda c, r: ops.position_scores(c, r), (_r(N, 2, 3, 2), REL), (0, None)),
    "position_scores, vmapped relations": (lambda c, r: ops.position_scores(c, r),
                                           (_r(N, 2, 3, 2), torch.stack([REL, REL.flip(0), REL])), (0, 0)),
    "position_scores, per-item relations": (lambda c, r: ops.position_scores(c, r),
                                            (_r(N, 2, 3, 2), torch.stack([REL, REL.flip(0)])), (0, None)),
    "position_scores, only relations vmapped": (lambda c, r: ops.position_scores(c, r),
                                                (_r(2, 3, 2), torch.stack([REL, REL.flip(0), REL])), (None, 0)),
    # the value check of the relations reads their (a, b, code) columns wherever in_dims put vmap's dimension
    "position_scores, relations vmapped on their last dim": (lambda c, r: ops.position_scores(c, r),
                                                             (_r(N, 2, 3, 2), torch.stack([REL, REL.flip(0), REL], -1)),
                                                             (0, 2)),
    "position_scores, per-item relations vmapped on their last dim": (
        lambda c, r: ops.position_scores(c, r),
        (_r(N, 2, 3, 2), torch.stack([torch.stack([REL, REL.flip(0)])] * N, -1)), (0, 3)),
    "color_scores, shared embeddings": (lambda p, e: ops.color_scores(p, e), (_n(N, 2, 7, 4), _n(5, 4)), (0, None)),
    "color_scores, vmapped embeddings": (lambda p, e: ops.color_scores(p, e), (_n(N, 2, 7, 4), _n(N, 5, 4)), (0, 0)),
    "color_scores, per-item embeddings": (lambda p, e: ops.color_scores(p, e), (_n(N, 2, 7, 4), _n(2, 5, 4)),
                                          (0, None)),
    "color_scores, mask": (lambda p, e, m: ops.color_scores(p, e, m), (_n(N, 2, 7, 4), _n(5, 4), _r(N, 2, 5, 7) > 0.3),
                           (0, None, 0)),
    "color_scores, only the mask vmapped": (lambda p, e, m: ops.color_scores(p, e, m),
                                            (_n(2, 7, 4), _n(5, 4), _r(N, 2, 5, 7) > 0.3), (None, None, 0)),
    "residual_correction": (lambda z, d: ops.residual_correction(z, d, 0.7), (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4)),
                            (0, 0)),
    "residual_correction, empty batch": (lambda z, d: ops.residual_correction(z, d, 0.7),
                                         (_n(N, 0, 3, 4, 4), _n(N, 0, 3, 4, 4)), (0, 0)),
    "position_scores, empty batch": (lambda c, r: ops.position_scores(c, r), (_r(N, 0, 3, 2), REL), (0, None)),
    "residual_correction, tensor alpha": (lambda z, d, a: ops.residual_correction(z, d, a),
                                          (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4), _r(N, 2)), (0, 0, 0)),
    "residual_correction, shared delta and alpha": (lambda z, d, a: ops.residual_correction(z, d, a),
                                                    (_n(N, 2, 3, 4, 4), _n(2, 3, 4, 4), _r(2)), (0, None, None)),
    "gaussian_log_prob, shared log_std": (lambda x, m, s: ops.gaussian_log_prob(x, m, s),
                                          (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4), _n(3, 4, 4)), (0, 0, None)),
    "gaussian_log_prob, vmapped log_std": (lambda x, m, s: ops.gaussian_log_prob(x, m, s),
                                           (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4), _n(N, 3, 4, 4)), (0, 0, 0)),
    "gaussian_log_prob, per-item log_std": (lambda x, m, s: ops.gaussian_log_prob(x, m, s),
                                            (_n(N, 2, 3, 4, 4), _n(2, 3, 4, 4), _n(N, 2, 3, 4, 4)), (0, None, 0)),
    "gaussian_log_prob, per-channel log_std": (lambda x, m, s: ops.gaussian_log_prob(x, m, s),
                                               (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4), _n(N, 3)), (0, 0, 0)),
    "gaussian_log_prob, float log_std": (lambda x, m: ops.gaussian_log_prob(x, m, -0.5),
                                         (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4)), (0, 0)),
    "sample_correction": (lambda z, m, s, e: ops.sample_correction(z, m, s, e, 0.5),
                          (_n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4), _n(3, 4, 4), _n(N, 2, 3, 4, 4)), (0, 0, None, 0)),
    "sample_correction, shared z0 and noise": (lambda z, m, s, e, a: ops.sample_correction(z, m, s, e, a),
                                               (_n(2, 3, 4, 4), _n(N, 2, 3, 4, 4), _n(N, 2, 3, 4, 4),
                                                _n(2, 3, 4, 4), _r(N, 2)), (None, 0, 0, None, 0)),
}


def _take(arg, dim, i):
    return arg if dim is None else arg.select(dim, i)


class _KernelCalls(TorchDispatchMode):
    """The xlard kernels that ran (below vmap: one call per vmapped sample without a batching rule)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # xlard._set_cpu_env: the CPU settings passed to _C on a process's first CPU call, no kernel of the op
        if str(func).startswith("xlard") and not str(func).startswith("xlard._set_cpu_env"):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_matches_a_loop_and_runs_the_op_once(case):
    fn, args, in_dims = CASES[case]
    with warnings.catch_warnings(), _KernelCalls() as kernels:
        warnings.simplefilter("error")  # torch's per-sample fallback warns ("performance drop"), once per op
        got = vmap(fn, in_dims=in_dims)(*args)
    assert len(kernels.calls) == 1, kernels.calls
    want = [fn(*(_take(a, d, i) for a, d in zip(args, in_dims))) for i in range(N)]
    if isinstance(got, tuple):
        for k, part in enumerate(got):
            torch.testing.assert_close(part, torch.stack([w[k] for w in want]), equal_nan=True)
    else:
        torch.testing.assert_close(got, torch.stack(want), equal_nan=True)


def test_vmap_of_gradients():
    cen = torch.rand(N, 2, 3, 2, dtype=torch.float64, generator=G)
    maps = torch.rand(N, 2, 5, 6, dtype=torch.float64, generator=G)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = vmap(torch.func.grad(lambda c: ops.position_scores(c, REL).sum()))(cen)
        jac = vmap(torch.func.jacrev(ops.attention_centroids))(maps)
    for i in range(N):
        torch.testing.assert_close(grads[i], torch.func.grad(lambda c: ops.position_scores(c, REL).sum())(cen[i]))
        torch.testing.assert_close(jac[i], torch.func.jacrev(ops.attention_centroids)(maps[i]))


def test_nested_vmap_checks_the_relations_wherever_their_dims_are():
    # [R, 3] relations under two vmaps, their dimensions at 2 (outer) and 1 (inner): the columns stay the columns
    base = torch.stack([torch.stack([[REL, REL.flip(0)][(i + j) % 2] for j in range(2)]) for i in range(N)])
    rel = base.permute(2, 1, 3, 0).contiguous()  # [R, 2 (inner), 3, N (outer)]
    cen = _r(N, 2, 4, 3, 2)
    got = vmap(vmap(lambda c, r: ops.position_scores(c, r), in_dims=(0, 1)), in_dims=(0, 3))(cen, rel)
    for i in range(N):
        for j in range(2):
            torch.testing.assert_close(got[i, j], ops.position_scores(cen[i, j], rel[:, j, :, i]))
    bad = rel.clone()
    bad[0, 1, 1, 2] = 3  # token 3 of 3 tokens, in the inner sample 1 of the outer sample 2
    with pytest.raises(ValueError, match="outside"):
        vmap(vmap(lambda c, r: ops.position_scores(c, r), in_dims=(0, 1)), in_dims=(0, 3))(cen, bad)


def test_vmap_over_the_raw_op_runs_the_batching_rule():
    # docs/ops.md: the raw torch.ops.xlard.<op> refuses grad-like transforms but vmaps like the wrapper
    maps = _r(N, 2, 5, 6)
    with _KernelCalls() as kernels:
        got = vmap(lambda m: torch.ops.xlard.count_components(m, 0.5, "absolute", 1, 8))(maps)
    assert len(kernels.calls) == 1, kernels.calls
    assert torch.equal(got, torch.stack([ops.count_components(m, 0.5, "absolute") for m in maps]))
    with pytest.raises(RuntimeError, match="through xlard.ops.attention_centroids"):
        torch.func.grad(lambda m: torch.ops.xlard.attention_centroids(m).sum())(maps[0])
