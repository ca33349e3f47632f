"""The Triton provider (xlard_triton::, kernels/) compiled for a real GPU, on CUDA tensors.

tests/test_triton_ops.py checks the same kernels under ``TRITON_INTERPRET=1`` on
CPU tensors; this file checks what the interpreter cannot: the kernels compiled by
Triton for the GPU. Judges: the C++ CPU op ``torch.ops.xlard.<op>`` on CPU copies
(always) and the CUDA C++ op (when ``_C`` was built with CUDA). Labels and counts
must match bit for bit, component centroids exactly, floats within the per-dtype
table of tests/helpers.py. Also: the public API under ``xlard.ops.provider("triton")``
and CUDA-graph capture and replay through the public API (``count_components``, ``sample_correction``,
``position_scores``, ``component_stats``, a float ``log_std``).

Every test is marked ``cuda`` (tests/conftest.py skips them without a GPU); nothing
here touches CUDA or imports Triton at import or collection time. Run this file in
its own pytest process, apart from test_triton_ops.py: that module sets
``TRITON_INTERPRET=1`` when imported, after which Triton kernels are interpreted.
Parametrisations are kept small because every (dtype, mode, connectivity) variant
of the components kernel is a separate Triton compilation.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from helpers import FLOAT_DTYPES, TOLERANCES, assert_close, blobs, checkerboard, diagonals, nan_inf_sprinkle, spiral

pytestmark = [pytest.mark.cuda, pytest.mark.triton]

MODES = ("absolute", "relative", "otsu")
MASK_DTYPES = (torch.bool, torch.uint8)
# Sums in float32 (float64 for float64 inputs) in another order than the CPU: a few ulps of the sum.
ACC_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}
THRESHOLDS = {"absolute": 0.45, "relative": 0.5, "otsu": 0.0}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(scope="module", autouse=True)
def triton_ns():
    """The xlard_triton:: namespace, or a skip that names what is missing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set (test_triton_ops.py sets it at import): run "
                    "tests/test_triton_gpu.py in its own pytest process to test compiled Triton kernels")
    from xlard import _extension, _triton_ops

    if not _extension.has_ops():
        pytest.skip("xlard._C is not built (it holds the op schemas): pip install --no-build-isolation -e .")
    _triton_ops.ensure_registered()
    return torch.ops.xlard_triton


def has_cuda_provider() -> bool:
    from xlard import _extension

    return _extension.has_kernel("count_components", "CUDA")


def judges_on(op: str):
    """(name, fn) pairs: the CPU op on CPU copies, and the CUDA C++ op when it was built."""
    cpu = getattr(torch.ops.xlard, op)

    def on_cpu(*args):
        return cpu(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))

    found = [("cpu", on_cpu)]
    if has_cuda_provider():
        found.append(("cuda", cpu))  # the same op on CUDA tensors dispatches to the CUDA kernel
    return found


def to_cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


# ---------------------------------------------------------------- connected components

def check_components(maps: torch.Tensor, threshold: float, mode: str, min_area: int, connectivity: int,
                     max_components: int = 4, count_too: bool = True) -> None:
    """Triton on CUDA equals every judge bit for bit (maps given on the CPU)."""
    tri = torch.ops.xlard_triton
    gpu = maps.cuda()
    args = (threshold, mode, min_area, connectivity)
    labels, counts = tri.label_components(gpu, *args)
    stats = tri.component_stats(gpu, *args, max_components)
    count_only = tri.count_components(gpu, *args) if count_too else None
    assert labels.is_cuda and labels.dtype == torch.int32 and counts.dtype == torch.int32
    for name, judge in judges_on("label_components"):
        want_labels, want_counts = judge(gpu, *args)
        assert torch.equal(labels.cpu(), want_labels.cpu()), f"labels differ from {name}"
        assert torch.equal(counts.cpu(), want_counts.cpu()), f"counts differ from {name}"
        if count_only is not None:
            assert torch.equal(count_only.cpu(), want_counts.cpu()), f"count_components differs from {name}"
    for name, judge in judges_on("component_stats"):
        want = judge(gpu, *args, max_components)
        assert torch.equal(stats[0].cpu(), want[0].cpu()), f"stats counts differ from {name}"
        assert torch.equal(stats[1].cpu(), want[1].cpu()), f"areas differ from {name}"
        torch.testing.assert_close(stats[2].cpu(), want[2].cpu(), equal_nan=True, atol=0, rtol=0,
                                   msg=lambda m, n=name: f"centroids differ from {n}: {m}")


def as_dtype(mask: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(mask))
    return t.to(dtype) if dtype in MASK_DTYPES else t.to(torch.float32).to(dtype)


def random_maps(dtype: torch.dtype, shape=(2, 3, 37, 53), seed: int = 0) -> torch.Tensor:
    """Blob maps with NaN/inf sprinkled in (thresholded for mask dtypes); >= 1024 pixels per map."""
    maps = blobs(math.prod(shape[:-2]), shape[-2], shape[-1], k=6, seed=seed).reshape(shape)
    if dtype in MASK_DTYPES:
        return (maps > 0.6).to(dtype)
    return nan_inf_sprinkle(maps - 0.1, seed=seed + 1, frac=0.02).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + MASK_DTYPES, ids=str)
def test_components_dtypes(dtype):
    check_components(random_maps(dtype, seed=1), 0.5, "relative", min_area=3, connectivity=8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("connectivity", (4, 8))
def test_components_modes(mode, connectivity):
    maps = random_maps(torch.float32, shape=(3, 2, 48, 40), seed=2)
    check_components(maps, THRESHOLDS[mode], mode, min_area=1, connectivity=connectivity, count_too=False)


@pytest.mark.parametrize("connectivity", (4, 8))
def test_components_adversarial(connectivity):
    rng = np.random.default_rng(0)
    comb = np.zeros((40, 41), dtype=bool)
    comb[0, :] = True
    comb[:, ::2] = True
    masks = {
        "spiral": spiral(64), "checker": checkerboard(48, 50), "diagonals": diagonals(40),
        "comb": comb, "noise": rng.random((97, 97)) > 0.41, "row": rng.random((1, 1500)) > 0.4,
        "full": np.ones((40, 40), dtype=bool), "empty": np.zeros((40, 40), dtype=bool),
    }
    for name, mask in masks.items():
        try:
            check_components(as_dtype(mask, torch.bool), 0.5, "relative", min_area=1,
                             connectivity=connectivity, count_too=False)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


def test_components_big_maps():
    """1024x1024 maps: many tiles per program, long union-find chains."""
    smooth = blobs(1, 1024, 1024, k=12, seed=5).to(torch.float16)
    check_components(smooth, 0.5, "relative", min_area=2, connectivity=8)
    check_components(as_dtype(spiral(1024), torch.bool), 0.5, "relative", min_area=1, connectivity=4,
                     count_too=False)


def test_components_empty_and_strided():
    for shape in ((0, 40, 40), (2, 0, 33), (3, 33, 0)):
        check_components(torch.rand(shape), 0.5, "absolute", 1, 8, count_too=False)
    maps = blobs(4, 40, 36, seed=3).transpose(-1, -2)
    assert not maps.is_contiguous()
    check_components(maps, 0.5, "relative", 1, 8, count_too=False)


# ---------------------------------------------------------------- float ops

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_attention_centroids(dtype):
    g = torch.Generator().manual_seed(4)
    maps = nan_inf_sprinkle(torch.randn(3, 7, 40, 50, generator=g), seed=2, frac=0.03).to(dtype)
    maps[0, 0].fill_(-1.0)  # no positive weight: (0.5, 0.5)
    (gpu,) = to_cuda(maps)
    got = torch.ops.xlard_triton.attention_centroids(gpu)
    assert got.is_cuda and got.dtype == acc_dtype(dtype)
    grad = torch.randn(got.shape, generator=g, dtype=got.dtype)
    got_grad = torch.ops.xlard_triton._attention_centroids_backward(grad.cuda(), gpu, got)
    assert got_grad.dtype == dtype
    for name, judge in judges_on("attention_centroids"):
        assert_close(got.cpu(), judge(gpu).cpu(), msg=name, **ACC_TOL[acc_dtype(dtype)])
    for name, judge in judges_on("_attention_centroids_backward"):
        assert_close(got_grad.cpu(), judge(grad.cuda(), gpu, got).cpu(), dtype, msg=name)


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
def test_position_scores(dtype):
    g = torch.Generator().manual_seed(5)
    centroids = torch.rand(3, 7, 2, generator=g).to(dtype)
    relations = torch.stack([torch.randint(0, 7, (3, 9), generator=g), torch.randint(0, 7, (3, 9), generator=g),
                             torch.randint(0, 4, (3, 9), generator=g)], dim=-1)
    c, r = to_cuda(centroids, relations)
    got = torch.ops.xlard_triton.position_scores(c, r, 7.5)
    grad = torch.randn(got.shape, generator=g, dtype=got.dtype).cuda()
    got_grad = torch.ops.xlard_triton._position_scores_backward(grad, c, r, 7.5)
    for name, judge in judges_on("position_scores"):
        assert_close(got.cpu(), judge(c, r, 7.5).cpu(), msg=name, **ACC_TOL[acc_dtype(dtype)])
    for name, judge in judges_on("_position_scores_backward"):
        assert_close(got_grad.cpu(), judge(grad, c, r, 7.5).cpu(), dtype, msg=name)


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("masked", (False, True))
def test_color_scores(dtype, masked):
    g = torch.Generator().manual_seed(8)
    b, n, d, c = 3, 300, 70, 5
    features = torch.randn(b, n, d, generator=g)
    features[0, 3] = 0.0
    colors = torch.randn(c, d, generator=g)
    mask = None
    if masked:
        mask = torch.rand(b, c, n, generator=g) > 0.5
        mask[1, 2] = False  # no allowed patch: score 0, index -1
    f, e, m = to_cuda(features.to(dtype), colors.to(dtype), mask)
    scores, index = torch.ops.xlard_triton.color_scores(f, e, m)
    for name, judge in judges_on("color_scores"):
        want_s, want_i = judge(f, e, m)
        assert_close(scores.cpu(), want_s.cpu(), msg=name, **ACC_TOL[want_s.dtype])
        check_index(index.cpu(), want_i.cpu(), want_s.cpu(), features.to(dtype), colors.to(dtype), name)


def check_index(got_i, want_i, want_s, features, colors, name):
    """Same argmax patch, except at a float near-tie, where the picked patch must also reach the max."""
    assert torch.equal(got_i < 0, want_i < 0), name
    differ = got_i != want_i
    if differ.any():
        f, e = features.double(), colors.double().expand(features.shape[0], -1, -1)
        sims = torch.nn.functional.cosine_similarity(e[:, :, None, :], f[:, None, :, :], dim=-1)
        picked = sims.gather(2, got_i.clamp(min=0)[..., None])[..., 0]
        assert torch.allclose(picked[differ], want_s.double()[differ], atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("per_batch_alpha", (False, True))
def test_residual_correction(dtype, per_batch_alpha):
    g = torch.Generator().manual_seed(3)
    shape = (3, 16, 20, 24)
    z0, delta = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    delta.view(-1)[::5] = 0.0
    alpha = torch.rand(shape[0], generator=g) if per_batch_alpha else None
    z0g, dg, ag = to_cuda(z0, delta, alpha)
    zc, lam = torch.ops.xlard_triton.residual_correction(z0g, dg, ag, 0.7)
    grad_zc = torch.randn(shape, generator=g).to(dtype).cuda()
    grad_lam = torch.randn(lam.shape, generator=g, dtype=lam.dtype).cuda()
    got_grad = torch.ops.xlard_triton._residual_correction_backward(grad_zc, grad_lam, dg, ag, 0.7)
    for name, judge in judges_on("residual_correction"):
        want_zc, want_lam = judge(z0g, dg, ag, 0.7)
        assert_close(zc.cpu(), want_zc.cpu(), dtype, msg=name)
        assert_close(lam.cpu(), want_lam.cpu(), msg=name, **ACC_TOL[acc_dtype(dtype)])
    for name, judge in judges_on("_residual_correction_backward"):
        assert_close(got_grad.cpu(), judge(grad_zc, grad_lam, dg, ag, 0.7).cpu(), dtype, msg=name)


def _sample_inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z0, mean, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    log_std = (0.3 * torch.randn(shape[1:], generator=g)).to(dtype)
    return z0, mean, log_std, noise


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_gaussian_log_prob(dtype):
    x, mean, log_std, _ = _sample_inputs((3, 4, 30, 30), dtype, seed=6)
    xg, mg, lg = to_cuda(x, mean, log_std)
    got = torch.ops.xlard_triton.gaussian_log_prob(xg, mg, lg)
    grad = torch.randn(3).to(got.dtype).cuda()
    got_grads = torch.ops.xlard_triton._gaussian_log_prob_backward(grad, xg, mg, lg)
    for name, judge in judges_on("gaussian_log_prob"):
        assert_close(got.cpu(), judge(xg, mg, lg).cpu(), msg=name, **ACC_TOL[acc_dtype(dtype)])
    for name, judge in judges_on("_gaussian_log_prob_backward"):
        for what, a, b in zip(("grad_x", "grad_mean", "grad_log_std"), got_grads, judge(grad, xg, mg, lg)):
            tol = {k: 4 * v for k, v in TOLERANCES[b.dtype].items()} if what == "grad_log_std" else TOLERANCES[b.dtype]
            assert_close(a.cpu(), b.cpu(), msg=f"{what} vs {name}", **tol)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("per_batch_alpha", (False, True))
def test_sample_correction(dtype, per_batch_alpha):
    z0, mean, log_std, noise = _sample_inputs((2, 16, 24, 24), dtype, seed=9)
    alpha = torch.rand(2) if per_batch_alpha else None
    args = to_cuda(z0, mean, log_std, noise, alpha)
    got = torch.ops.xlard_triton.sample_correction(*args, 0.3)
    for name, judge in judges_on("sample_correction"):
        for what, a, b in zip(("zc", "delta", "log_prob", "lam"), got, judge(*args, 0.3)):
            # lam sums |delta| as rounded to the input dtype, where one rounding may differ (fma or not).
            tol = ACC_TOL[b.dtype] if what == "log_prob" else TOLERANCES[dtype]
            assert_close(a.cpu(), b.cpu(), msg=f"{what} vs {name}", **tol)


# ---------------------------------------------------------------- public API and CUDA graphs

def test_public_api_uses_the_triton_provider():
    import xlard.ops as ops
    from xlard import _backends

    maps = blobs(2 * 5, 32, 32, seed=7).reshape(2, 5, 32, 32).cuda()
    with ops.provider("triton"):
        assert _backends.resolve("count_components", maps.device) is torch.ops.xlard_triton.count_components
        counts = ops.count_components(maps, 0.5, "otsu", min_area=2)
        centroids = ops.attention_centroids(maps)
    assert torch.equal(counts.cpu(), ops.count_components(maps.cpu(), 0.5, "otsu", min_area=2))
    assert_close(centroids.cpu(), ops.attention_centroids(maps.cpu()), **ACC_TOL[torch.float32])


def _capture(run):
    """Warm up on a side stream (Triton compiles there, outside the capture), then capture ``run``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    return graph, outs


def test_count_components_cuda_graph():
    import xlard.ops as ops

    maps = blobs(2 * 77, 32, 32, seed=11).reshape(2, 77, 32, 32).cuda()

    def run():
        with ops.provider("triton"):
            return ops.count_components(maps, 0.5, "otsu", min_area=2, connectivity=8)

    graph, out = _capture(run)
    for seed in (21, 22):
        maps.copy_(blobs(2 * 77, 32, 32, seed=seed).reshape(2, 77, 32, 32))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), torch.ops.xlard.count_components(maps.cpu(), 0.5, "otsu", 2, 8))


def test_sample_correction_cuda_graph():
    import xlard.ops as ops

    shape = (4, 16, 32, 32)
    z0, mean, log_std, noise = (t.cuda() for t in _sample_inputs(shape, torch.float32, seed=1))
    alpha = torch.rand(shape[0]).cuda()

    def run():
        with torch.no_grad(), ops.provider("triton"):
            return ops.sample_correction(z0, mean, log_std, noise, alpha)

    graph, outs = _capture(run)
    for seed in (2, 3):
        for dst, src in zip((z0, mean, log_std, noise), _sample_inputs(shape, torch.float32, seed=seed)):
            dst.copy_(src)
        alpha.copy_(torch.rand(shape[0]))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.ops.xlard.sample_correction(*(t.cpu() for t in (z0, mean, log_std, noise)), alpha.cpu(), 0.0)
        for what, a, b in zip(("zc", "delta", "log_prob", "lam"), outs, want):
            tol = TOLERANCES[b.dtype] if what in ("zc", "delta") else ACC_TOL[b.dtype]
            assert_close(a.cpu(), b, msg=what, **tol)



def test_more_ops_cuda_graph():
    """CUDA-graph capture through the public API of the ops that read a value on the host or made a tensor from a
    Python number: position_scores (its relations check), component_stats (its NaN fill), a float log_std."""
    import xlard.ops as ops

    g = torch.Generator().manual_seed(8)
    maps = blobs(6, 24, 24, seed=9).reshape(2, 3, 24, 24).cuda()
    cen = torch.rand(2, 5, 2, generator=g).cuda()
    rel = torch.stack([torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (7,), generator=g),
                       torch.randint(0, 4, (7,), generator=g)], -1).cuda()
    z0, mean, _, noise = (t.cuda() for t in _sample_inputs((2, 4, 8, 8), torch.float32, seed=4))

    def run():
        with torch.no_grad(), ops.provider("triton"):
            return (ops.position_scores(cen, rel, 5.0), *ops.component_stats(maps, 0.5, max_components=4),
                    *ops.sample_correction(z0, mean, -1.0, noise, 0.5))

    graph, outs = _capture(run)
    for seed in (10, 11):
        cen.copy_(torch.rand(2, 5, 2))
        maps.copy_(blobs(6, 24, 24, seed=seed).reshape(2, 3, 24, 24))
        graph.replay()
        torch.cuda.synchronize()
        with ops.provider("triton"):
            want = run()
        for i, (a, b) in enumerate(zip(outs, want)):
            assert torch.equal(a.cpu().isnan(), b.cpu().isnan()), i
            assert torch.equal(a.nan_to_num().cpu(), b.nan_to_num().cpu()), i


# ---------------------------------------------------------------- compiled graphs on CUDA

def test_compiled_step_on_cuda_reaches_a_kernel_and_matches_eager(triton_ns):
    """issue 13: without CUDA kernels in _C the Triton launchers are the xlard:: CUDA kernels,
    so a compiled function (inductor) on CUDA tensors runs, and the raw op runs too."""
    import xlard.ops as ops

    maps = blobs(2 * 3, 16, 16, seed=5).reshape(2, 3, 16, 16).cuda()
    z0, delta = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 4, 8, 8, device="cuda")

    def step(maps, z0, delta):
        zc, lam = ops.residual_correction(z0, delta, 0.5)
        return ops.count_components(maps, 0.5), ops.attention_centroids(maps), zc, lam

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(maps, z0, delta)
    want = step(maps, z0, delta)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        assert_close(a, b, **ACC_TOL[torch.float32])
    assert torch.equal(torch.ops.xlard.count_components(maps, 0.5, "relative", 1, 8), want[0])
    if not has_cuda_provider():
        with ops.provider("cuda"), pytest.raises(Exception, match="built without CUDA kernels"):
            torch._dynamo.reset()
            torch.compile(step, fullgraph=True)(maps, z0, delta)
