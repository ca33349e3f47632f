"""The CUDA C++ provider (TORCH_LIBRARY_IMPL(xlard, CUDA, m), csrc/cuda) against the CPU one.

``torch.ops.xlard.<op>`` on CPU tensors is the ground truth: labels and counts must
match bit for bit (component_stats' centroids too: both sides divide exact float64
sums), floats within the per-dtype table of tests/helpers.py. Maps are random,
adversarial (spirals, checkerboards, one-pixel diagonals, full/empty, 1xN, Nx1, odd
sizes, subnormals, NaN/inf) and big (1024x1024, the global-memory path). Also: the
forced global-memory path on small maps, one kernel launch per connected-components
call, CUDA-graph capture and replay of count_components and sample_correction.

Every test is marked ``cuda``; tests/conftest.py skips them without a GPU, and nothing
here touches CUDA at import or collection time.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import FLOAT_DTYPES, TOLERANCES, assert_close, assert_component_argument_errors, blobs, checkerboard, diagonals, nan_inf_sprinkle, spiral

pytestmark = pytest.mark.cuda

MODES = ("absolute", "relative", "otsu")
MASK_DTYPES = (torch.bool, torch.uint8)
ALL_DTYPES = FLOAT_DTYPES + MASK_DTYPES
# Results accumulated in float32 (float64 for float64 inputs) over many terms in a
# different order than the CPU: a few float32 ulps of the sum, whatever the input dtype.
ACC_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(scope="module", autouse=True)
def cuda_provider():
    """Skips (naming the fix) when _C has no CUDA kernels; the op namespace otherwise."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from xlard import _extension

    if not _extension.has_kernel("count_components", "CUDA"):
        pytest.skip("xlard._C was built without CUDA kernels: "
                    "XLARD_WITH_CUDA=1 pip install --no-build-isolation -e .")
    return torch.ops.xlard


# ---------------------------------------------------------------- connected components

def check_components(maps: torch.Tensor, threshold: float = 0.5, mode: str = "absolute", min_area: int = 1,
                     connectivity: int = 4, max_components: int = 5) -> None:
    """All three ops on CUDA equal the CPU ops bit for bit (maps given on the CPU)."""
    ops = torch.ops.xlard
    gpu = maps.cuda()
    args = (threshold, mode, min_area, connectivity)
    want_labels, want_counts = ops.label_components(maps, *args)
    labels, counts = ops.label_components(gpu, *args)
    assert labels.dtype == torch.int32 and counts.dtype == torch.int32
    assert labels.shape == want_labels.shape and counts.shape == want_counts.shape
    assert torch.equal(labels.cpu(), want_labels), "labels differ"
    assert torch.equal(counts.cpu(), want_counts), "counts differ"
    assert torch.equal(ops.count_components(gpu, *args).cpu(), want_counts), "count_components differs"
    want = ops.component_stats(maps, *args, max_components)
    got = ops.component_stats(gpu, *args, max_components)
    assert torch.equal(got[0].cpu(), want[0]), "component_stats counts differ"
    assert torch.equal(got[1].cpu(), want[1]), "component_stats areas differ"
    torch.testing.assert_close(got[2].cpu(), want[2], equal_nan=True, atol=0, rtol=0)


def as_dtype(mask: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as maps of `dtype`: 1.0 / 0.0 for floats (foreground with threshold 0.5)."""
    t = torch.from_numpy(np.ascontiguousarray(mask))
    return t.to(dtype) if dtype in MASK_DTYPES else t.to(torch.float32).to(dtype)


def adversarial_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    wide = np.zeros((5, 300), dtype=bool)
    wide[2, :] = True  # one run across many 32-bit words
    wide[0, ::2] = True
    stripes = np.zeros((64, 70), dtype=bool)
    stripes[:, ::2] = True  # long vertical chains
    comb = np.zeros((40, 41), dtype=bool)
    comb[0, :] = True
    comb[:, ::2] = True  # teeth joined late, at row 0 (roots must move to the first pixel)
    u_shape = np.zeros((30, 30), dtype=bool)
    u_shape[5:25, 5] = True
    u_shape[5:25, 24] = True
    u_shape[24, 5:25] = True  # two arms merged only at the bottom
    return {
        "spiral33": spiral(33),
        "spiral64": spiral(64),
        "spiral_odd": spiral(45)[:44, :45],
        "checker": checkerboard(17, 31),
        "checker_big": checkerboard(128, 128),
        "diagonals": diagonals(40),
        "diagonals_odd": diagonals(37, step=4)[:, :35],
        "full": np.ones((16, 16), dtype=bool),
        "empty": np.zeros((16, 16), dtype=bool),
        "row": rng.random((1, 257)) > 0.4,
        "col": rng.random((257, 1)) > 0.4,
        "pixel_on": np.ones((1, 1), dtype=bool),
        "pixel_off": np.zeros((1, 1), dtype=bool),
        "noise_odd": rng.random((7, 129)) > 0.45,
        "noise_square": rng.random((97, 97)) > 0.41,
        "wide_run": wide,
        "stripes": stripes,
        "comb": comb,
        "u_shape": u_shape,
        "w33": rng.random((20, 33)) > 0.5,  # a word boundary one column before the edge
    }


@pytest.mark.parametrize("name", sorted(adversarial_masks()))
@pytest.mark.parametrize("connectivity", (4, 8))
@pytest.mark.parametrize("min_area", (1, 3))
def test_components_adversarial_masks(name, connectivity, min_area):
    mask = adversarial_masks()[name]
    for dtype in (torch.bool, torch.uint8, torch.float32):
        check_components(as_dtype(mask, dtype), min_area=min_area, connectivity=connectivity)


@pytest.mark.parametrize("name", ("spiral64", "checker_big", "comb", "noise_square", "stripes", "row", "col"))
@pytest.mark.parametrize("connectivity", (4, 8))
def test_components_global_path_on_small_maps(name, connectivity, monkeypatch):
    """The global-memory path (normally only for big maps) run on the adversarial maps."""
    monkeypatch.setenv("XLARD_CUDA_COMPONENTS_PATH", "global")
    mask = adversarial_masks()[name]
    check_components(as_dtype(mask, torch.bool), min_area=2, connectivity=connectivity)
    check_components(as_dtype(mask, torch.float16), connectivity=connectivity)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("connectivity", (4, 8))
@pytest.mark.parametrize("shape", ((3, 37, 53), (2, 2, 32, 32), (1, 64, 96)), ids=str)
def test_components_random_maps(dtype, mode, connectivity, shape):
    maps = blobs(math.prod(shape[:-2]), shape[-2], shape[-1], k=6, seed=sum(shape)).reshape(shape)
    if dtype in MASK_DTYPES:
        maps = (maps > 0.6).to(dtype)
    else:
        maps = nan_inf_sprinkle(maps - 0.1, seed=1, frac=0.02).to(dtype)
    threshold = {"absolute": 0.45, "relative": 0.5, "otsu": 0.0}[mode]
    check_components(maps, threshold, mode, min_area=1, connectivity=connectivity)
    check_components(maps, threshold, mode, min_area=4, connectivity=connectivity, max_components=3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_components_threshold_edge_cases(dtype, mode):
    cases = [
        torch.tensor([[0.25, 0.5, 0.75], [0.5, 0.5, 0.25]]),  # values equal to the cut
        torch.full((4, 5), -1.0),  # max <= 0
        torch.zeros(4, 5),
        torch.full((4, 5), math.nan),  # no finite value
        torch.tensor([[math.inf, 1.0, -math.inf], [math.nan, 2.0, 0.5]]),
        torch.full((3, 3), 7.0),  # hi == lo for Otsu
        torch.tensor([[1.0, 1.0, 2.0, 2.0, 1.0, 2.0]]),  # two Otsu bins only
    ]
    for maps in cases:
        check_components(maps.to(dtype), 0.5, mode, connectivity=8)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_components_subnormal_values(dtype, mode):
    """Decisions on subnormals match the CPU: the build keeps them (no fast math, no .ftz; setup.py)."""
    tiny = 1e-40 if dtype != torch.float64 else 1e-310
    values = [[tiny, 0.0, 2 * tiny, 0.0], [0.0, 3 * tiny, 0.0, tiny], [-tiny, 0.0, 4 * tiny, 0.0]]
    maps = torch.tensor(values, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(dtype)
    assert (maps != 0).sum() == 6  # really subnormal, not flushed
    for threshold in (0.0, 0.3, tiny):
        check_components(maps, threshold, mode, connectivity=4)


@pytest.mark.parametrize("shape", ((0, 5, 5), (3, 0, 4), (2, 4, 0), (2, 0, 3, 3)), ids=str)
def test_components_empty_shapes(shape):
    check_components(torch.rand(shape), 0.5, "absolute")


def test_components_non_contiguous():
    maps = blobs(4, 40, 30, seed=3).transpose(-1, -2)
    assert not maps.is_contiguous()
    check_components(maps, 0.5, "relative", connectivity=8)


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_components_big_maps(dtype, mode):
    """1024x1024 (and 300x300) maps take the global-memory path."""
    rng = np.random.default_rng(7)
    noise = torch.from_numpy(rng.random((2, 1024, 1024))).float()
    smooth = blobs(1, 1024, 1024, k=12, seed=5)
    maps = torch.cat([noise, smooth]).to(dtype)
    threshold = {"absolute": 0.45, "relative": 0.5, "otsu": 0.0}[mode]
    for connectivity in (4, 8):
        check_components(maps, threshold, mode, min_area=2, connectivity=connectivity, max_components=8)
    check_components(blobs(3, 300, 300, seed=9).to(dtype), 0.3, mode, connectivity=8)


def test_components_big_adversarial():
    for mask in (spiral(1024), checkerboard(1024, 1024), diagonals(1024)):
        for connectivity in (4, 8):
            check_components(as_dtype(mask, torch.bool), connectivity=connectivity, min_area=1)


def test_components_stats_many_slots():
    """More slots than components (NaN / 0 tail) and ties broken by the smaller label."""
    mask = np.zeros((20, 20), dtype=bool)
    mask[1, 1:4] = mask[5, 5:8] = mask[9, 1:4] = True  # three equal areas
    mask[15:18, 15:18] = True
    check_components(as_dtype(mask, torch.bool), max_components=10)
    check_components(as_dtype(mask, torch.bool), max_components=1)


def _kernel_launches(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: allocator and lazy initialisation outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]


@pytest.mark.parametrize("op", ("count_components", "label_components", "component_stats"))
@pytest.mark.parametrize("size", (32, 700), ids=("shared", "global"))
def test_components_one_launch_per_batch(op, size):
    maps = blobs(2 * 7, size, size, seed=2).reshape(2, 7, size, size).cuda()
    extra = (4,) if op == "component_stats" else ()
    kernels = _kernel_launches(lambda: getattr(torch.ops.xlard, op)(maps, 0.5, "otsu", 2, 8, *extra))
    if not kernels:
        pytest.skip("the profiler recorded no CUDA kernels (CUPTI unavailable)")
    assert len(kernels) == 1 and "components_kernel" in kernels[0], kernels


def test_count_components_cuda_graph():
    maps = blobs(2 * 77, 32, 32, seed=11).reshape(2, 77, 32, 32).cuda()
    big = blobs(2, 600, 600, seed=12).cuda()  # global path: scratch allocated inside the capture

    def run():
        return (torch.ops.xlard.count_components(maps, 0.5, "otsu", 2, 8),
                torch.ops.xlard.count_components(big, 0.4, "relative", 1, 4))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_small, out_big = run()
    for seed in (21, 22):
        maps.copy_(blobs(2 * 77, 32, 32, seed=seed).reshape(2, 77, 32, 32))
        big.copy_(blobs(2, 600, 600, seed=seed + 100))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_small.cpu(), torch.ops.xlard.count_components(maps.cpu(), 0.5, "otsu", 2, 8))
        assert torch.equal(out_big.cpu(), torch.ops.xlard.count_components(big.cpu(), 0.4, "relative", 1, 4))


# ---------------------------------------------------------------- attention_centroids

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((2, 3, 17, 31), (4, 64, 64), (1, 1, 1), (3, 8, 40)), ids=str)
def test_attention_centroids(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    maps = nan_inf_sprinkle(torch.randn(shape, generator=g), seed=2, frac=0.03).to(dtype)
    maps[0].fill_(-1.0)  # no positive weight: (0.5, 0.5), zero gradient
    got = torch.ops.xlard.attention_centroids(maps.cuda())
    want = torch.ops.xlard.attention_centroids(maps)
    assert got.dtype == want.dtype == acc_dtype(dtype)
    assert_close(got.cpu(), want, **ACC_TOL[acc_dtype(dtype)])
    grad = torch.randn(want.shape, generator=g, dtype=want.dtype)
    got_grad = torch.ops.xlard._attention_centroids_backward(grad.cuda(), maps.cuda(), want.cuda())
    want_grad = torch.ops.xlard._attention_centroids_backward(grad, maps, want)
    assert got_grad.dtype == dtype
    assert_close(got_grad.cpu(), want_grad, dtype)


def test_attention_centroids_empty_and_strided():
    ops = torch.ops.xlard
    for shape in ((0, 4, 4), (2, 0, 3)):
        maps = torch.rand(shape)
        assert_close(ops.attention_centroids(maps.cuda()).cpu(), ops.attention_centroids(maps))
    maps = torch.rand(3, 20, 24).transpose(-1, -2)
    assert_close(ops.attention_centroids(maps.cuda()).cpu(), ops.attention_centroids(maps), **ACC_TOL[torch.float32])


# ---------------------------------------------------------------- position_scores

def _relations(batch, tokens, rows, per_batch, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, rows) if per_batch else (rows,)
    a = torch.randint(0, tokens, shape, generator=g)
    b = torch.randint(0, tokens, shape, generator=g)
    code = torch.randint(0, 4, shape, generator=g)
    return torch.stack([a, b, code], dim=-1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", (False, True))
def test_position_scores(dtype, per_batch):
    g = torch.Generator().manual_seed(5)
    centroids = torch.rand(3, 7, 2, generator=g).to(dtype)
    relations = _relations(3, 7, 9, per_batch, seed=6)
    tau = 7.5
    got = torch.ops.xlard.position_scores(centroids.cuda(), relations.cuda(), tau)
    want = torch.ops.xlard.position_scores(centroids, relations, tau)
    assert got.dtype == want.dtype
    assert_close(got.cpu(), want, **ACC_TOL[acc_dtype(dtype)])
    grad = torch.randn(want.shape, generator=g, dtype=want.dtype)
    got_grad = torch.ops.xlard._position_scores_backward(grad.cuda(), centroids.cuda(), relations.cuda(), tau)
    want_grad = torch.ops.xlard._position_scores_backward(grad, centroids, relations, tau)
    assert got_grad.dtype == dtype
    assert_close(got_grad.cpu(), want_grad, dtype)



def test_position_scores_cuda_graph():
    """Captured through xlard.ops (its eager check reads the relations on the host: skipped while capturing)."""
    import xlard.ops as ops

    centroids = torch.rand(3, 7, 2).cuda()
    relations = _relations(3, 7, 9, True, seed=6).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.position_scores(centroids, relations, 4.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.position_scores(centroids, relations, 4.0)
    for seed in (1, 2):
        centroids.copy_(torch.rand(3, 7, 2, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out.cpu(), torch.ops.xlard.position_scores(centroids.cpu(), relations.cpu(), 4.0),
                     **ACC_TOL[torch.float32])

def test_position_scores_empty():
    centroids = torch.rand(2, 4, 2)
    relations = torch.zeros(0, 3, dtype=torch.long)
    assert torch.ops.xlard.position_scores(centroids.cuda(), relations.cuda(), 1.0).shape == (2, 0)
    grad = torch.ops.xlard._position_scores_backward(torch.zeros(2, 0).cuda(), centroids.cuda(), relations.cuda(), 1.0)
    assert torch.equal(grad.cpu(), torch.zeros(2, 4, 2))


def test_position_scores_bad_index_is_a_device_error():
    """An out-of-range token trips a device-side assertion (in a subprocess: it poisons the context)."""
    code = textwrap.dedent("""
        import torch, xlard._extension
        c = torch.rand(1, 3, 2, device="cuda")
        r = torch.tensor([[0, 5, 1]], device="cuda")
        torch.ops.xlard.position_scores(c, r, 1.0)
        torch.cuda.synchronize()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "assert" in (proc.stderr + proc.stdout).lower()


# ---------------------------------------------------------------- color_scores

def _check_color(features, colors, mask):
    ops = torch.ops.xlard
    want_s, want_i = ops.color_scores(features, colors, mask)
    got_s, got_i = ops.color_scores(features.cuda(), colors.cuda(), None if mask is None else mask.cuda())
    assert got_s.dtype == want_s.dtype and got_i.dtype == torch.int64
    assert_close(got_s.cpu(), want_s, **ACC_TOL[want_s.dtype])
    got_i = got_i.cpu()
    assert torch.equal(got_i < 0, want_i < 0)
    differ = got_i != want_i
    if differ.any():  # only a float near-tie may pick another patch: its CPU score must reach the max
        f = features.double()
        e = colors.double() if colors.dim() == 3 else colors.double().expand(features.shape[0], -1, -1)
        sims = torch.nn.functional.cosine_similarity(e[:, :, None, :], f[:, None, :, :], dim=-1)
        picked = sims.gather(2, got_i.clamp(min=0)[..., None])[..., 0]
        assert torch.allclose(picked[differ], want_s.double()[differ], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shared_colors", (True, False))
@pytest.mark.parametrize("masked", (False, True))
def test_color_scores(dtype, shared_colors, masked):
    g = torch.Generator().manual_seed(8)
    b, n, d, c = 3, 50, 33, 5
    features = torch.randn(b, n, d, generator=g)
    features[0, 3] = 0.0  # zero-norm patch: similarity 0
    colors = torch.randn(c, d, generator=g) if shared_colors else torch.randn(b, c, d, generator=g)
    colors[..., 1, :] = 0.0  # zero-norm color: every similarity 0, index 0 (first allowed)
    mask = None
    if masked:
        mask = torch.rand(b, c, n, generator=g) > 0.5
        mask[1, 2] = False  # no allowed patch: score 0, index -1
    _check_color(features.to(dtype), colors.to(dtype), mask)


def test_color_scores_shapes():
    _check_color(torch.randn(2, 0, 8), torch.randn(3, 8), None)
    _check_color(torch.randn(1, 700, 300), torch.randn(4, 300), None)  # several patches per warp, D > 256


# ---------------------------------------------------------------- residual_correction

LATENT_SHAPES = ((2, 3, 5, 7), (2, 4, 16, 16), (1, 1, 1), (3, 2, 33))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=str)
@pytest.mark.parametrize("per_batch_alpha", (False, True))
def test_residual_correction(dtype, shape, per_batch_alpha):
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(shape, generator=g).to(dtype)
    delta = torch.randn(shape, generator=g).to(dtype)
    delta.view(-1)[::5] = 0.0  # sign(0) = 0 in the backward
    alpha = torch.rand(shape[0], generator=g) if per_batch_alpha else None
    ops = torch.ops.xlard
    want_zc, want_lam = ops.residual_correction(z0, delta, alpha, 0.7)
    got_zc, got_lam = ops.residual_correction(z0.cuda(), delta.cuda(), None if alpha is None else alpha.cuda(), 0.7)
    assert got_zc.dtype == dtype and got_lam.dtype == acc_dtype(dtype)
    assert_close(got_zc.cpu(), want_zc, dtype)
    assert_close(got_lam.cpu(), want_lam, **ACC_TOL[acc_dtype(dtype)])
    grad_zc = torch.randn(shape, generator=g).to(dtype)
    grad_lam = torch.randn(want_lam.shape, generator=g, dtype=want_lam.dtype)
    want = ops._residual_correction_backward(grad_zc, grad_lam, delta, alpha, 0.7)
    got = ops._residual_correction_backward(grad_zc.cuda(), grad_lam.cuda(), delta.cuda(),
                                            None if alpha is None else alpha.cuda(), 0.7)
    assert got.dtype == dtype
    assert_close(got.cpu(), want, dtype)


def test_residual_correction_strided_and_empty():
    ops = torch.ops.xlard
    z0 = torch.randn(2, 16, 3, 8).transpose(1, 3)
    delta = torch.randn(2, 16, 3, 8).transpose(1, 3)
    want = ops.residual_correction(z0, delta, None, 0.5)
    got = ops.residual_correction(z0.cuda(), delta.cuda(), None, 0.5)
    assert_close(got[0].cpu(), want[0])
    assert_close(got[1].cpu(), want[1], **ACC_TOL[torch.float32])
    z0 = torch.randn(2, 0, 4)
    got = ops.residual_correction(z0.cuda(), z0.cuda(), None, 0.5)
    assert got[0].shape == (2, 0, 4) and torch.equal(got[1].cpu(), torch.zeros(2, 4))


# ---------------------------------------------------------------- gaussian_log_prob

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("form", ("shared", "full"))
@pytest.mark.parametrize("shape", ((3, 4, 8, 8), (2, 70001), (5, 1)), ids=str)
def test_gaussian_log_prob(dtype, form, shape):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).to(dtype)
    mean = torch.randn(shape, generator=g).to(dtype)
    ls_shape = shape[1:] if form == "shared" else shape
    log_std = (0.3 * torch.randn(ls_shape, generator=g)).to(dtype)
    ops = torch.ops.xlard
    want = ops.gaussian_log_prob(x, mean, log_std)
    got = ops.gaussian_log_prob(x.cuda(), mean.cuda(), log_std.cuda())
    assert got.dtype == want.dtype == acc_dtype(dtype)
    assert_close(got.cpu(), want, **ACC_TOL[acc_dtype(dtype)])
    grad = torch.randn(shape[0], generator=g, dtype=want.dtype)
    want_g = ops._gaussian_log_prob_backward(grad, x, mean, log_std)
    got_g = ops._gaussian_log_prob_backward(grad.cuda(), x.cuda(), mean.cuda(), log_std.cuda())
    for name, a, b in zip(("grad_x", "grad_mean", "grad_log_std"), got_g, want_g):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tol = dict(TOLERANCES[b.dtype])
        if form == "shared" and name == "grad_log_std":  # a sum over the batch
            tol = {k: 4 * v for k, v in tol.items()}
        assert_close(a.cpu(), b, msg=name, **tol)


def test_gaussian_log_prob_empty():
    ops = torch.ops.xlard
    x = torch.randn(3, 0)
    assert torch.equal(ops.gaussian_log_prob(x.cuda(), x.cuda(), torch.zeros(0).cuda()).cpu(), torch.zeros(3))
    x = torch.randn(0, 4)
    assert ops.gaussian_log_prob(x.cuda(), x.cuda(), torch.zeros(4).cuda()).shape == (0,)


# ---------------------------------------------------------------- sample_correction

def _sample_inputs(shape, dtype, form, seed, device="cpu"):
    """z0, mean, log_std, noise on `device`; log_std per element (shared or not) or per
    channel (shared or per item), the per-channel forms as expanded views made on `device`."""
    g = torch.Generator().manual_seed(seed)
    z0, mean, noise = (torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(3))
    ones = (1,) * (len(shape) - 2)
    ls_shape = {"shared": shape[1:], "full": shape, "channel": (shape[1], *ones),
                "item_channel": (shape[0], shape[1], *ones)}[form]
    log_std = (0.3 * torch.randn(ls_shape, generator=g)).to(dtype).to(device)
    if form == "channel":
        log_std = log_std.expand(shape[1:])
    elif form == "item_channel":
        log_std = log_std.expand(shape)
    return z0, mean, log_std, noise


LOG_STD_FORMS = ("shared", "full", "channel", "item_channel")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("form", LOG_STD_FORMS)
@pytest.mark.parametrize("shape", ((2, 4, 16, 16), (2, 3, 5, 7), (1, 2, 3000), (2, 1)), ids=str)
@pytest.mark.parametrize("per_batch_alpha", (False, True))
def test_sample_correction(dtype, form, shape, per_batch_alpha):
    cpu_inputs = _sample_inputs(shape, dtype, form, seed=9)
    gpu_inputs = _sample_inputs(shape, dtype, form, seed=9, device="cuda")
    alpha = torch.rand(shape[0]) if per_batch_alpha else None
    ops = torch.ops.xlard
    want = ops.sample_correction(*cpu_inputs, alpha, 0.3)
    got = ops.sample_correction(*gpu_inputs, None if alpha is None else alpha.cuda(), 0.3)
    names = ("zc", "delta", "log_prob", "lam")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tol = TOLERANCES[b.dtype] if name in ("zc", "delta") else ACC_TOL[b.dtype]
        if name == "lam":
            _check_lam(a, got[1], b, dtype)
        else:
            assert_close(a.cpu(), b, msg=name, **tol)


def _check_lam(lam, delta, want_lam, dtype):
    """lam is sum_c |delta| with delta rounded to the input dtype. The GPU's exp
    (__expf) and the CPU's differ by float32 ulps, which moves a float16/bfloat16 delta
    by one step of that dtype now and then (the first GPU run, an H200, saw it on 1 of
    6000 elements): so lam must equal the channel sum of the GPU's own delta to the
    accumulator's tolerance, and the CPU's lam to one step of the input dtype."""
    own = delta.cpu().to(want_lam.dtype).abs().sum(dim=1)
    assert_close(lam.cpu(), own, msg="lam vs the GPU's own delta", **ACC_TOL[want_lam.dtype])
    tol = TOLERANCES[dtype] if dtype in (torch.float16, torch.bfloat16) else ACC_TOL[want_lam.dtype]
    assert_close(lam.cpu(), want_lam, msg="lam", **tol)


def test_sample_correction_cuda_graph():
    shape = (4, 16, 32, 32)
    z0, mean, log_std, noise = _sample_inputs(shape, torch.float32, "shared", seed=1, device="cuda")
    alpha = torch.rand(shape[0]).cuda()

    def run():
        return torch.ops.xlard.sample_correction(z0, mean, log_std, noise, alpha, 0.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for seed in (2, 3):
        fresh = _sample_inputs(shape, torch.float32, "shared", seed=seed)
        for dst, src in zip((z0, mean, log_std, noise), fresh):
            dst.copy_(src)
        alpha.copy_(torch.rand(shape[0]))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.ops.xlard.sample_correction(*(t.cpu() for t in (z0, mean, log_std, noise)), alpha.cpu(), 0.0)
        for name, a, b in zip(("zc", "delta", "log_prob", "lam"), outs, want):
            tol = TOLERANCES[b.dtype] if name in ("zc", "delta") else ACC_TOL[b.dtype]
            assert_close(a.cpu(), b, msg=name, **tol)


# ---------------------------------------------------------------- bad input

def test_bad_input_messages():
    ops = torch.ops.xlard
    assert_component_argument_errors("cuda")  # segfaulted on the first GPU run (static libstdc++ in _C)
    with pytest.raises(RuntimeError, match=r"\[\.\.\., H, W\]"):
        ops.count_components(torch.rand(5).cuda(), 0.5, "otsu", 1, 4)
    with pytest.raises(RuntimeError, match="must be float16"):
        ops.attention_centroids(torch.ones(2, 3, 3, dtype=torch.int32).cuda())
    with pytest.raises(RuntimeError, match="must have the shape of"):
        ops.residual_correction(torch.rand(2, 3, 4).cuda(), torch.rand(2, 3, 5).cuda(), None, 1.0)
    with pytest.raises(RuntimeError, match="log_std must have shape"):
        ops.gaussian_log_prob(torch.rand(2, 3).cuda(), torch.rand(2, 3).cuda(), torch.rand(4).cuda())


# ---------------------------------------------------------------- issue 14 (review before the first GPU run)

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_attention_centroids_subnormal_weights(dtype):
    """A map whose positive values are all subnormal still has weight (not (0.5, 0.5))."""
    tiny = {torch.float64: 1e-310, torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 1e-7}[dtype]
    maps = torch.zeros(2, 6, 8, dtype=torch.float64)
    maps[0, 1, 6] = tiny
    maps[1, 4, 1] = 2 * tiny
    maps[1, 5, 2] = tiny
    maps = maps.to(dtype)
    assert (maps != 0).sum() == 3  # really subnormal, not flushed on the host
    got = torch.ops.xlard.attention_centroids(maps.cuda()).cpu()
    want = torch.ops.xlard.attention_centroids(maps)
    assert_close(got, want, **ACC_TOL[acc_dtype(dtype)])
    assert_close(got[0], torch.tensor([6.5 / 8, 1.5 / 6], dtype=got.dtype), **ACC_TOL[acc_dtype(dtype)])


def test_attention_centroids_huge_weights():
    """Weights are divided by the map's max before summing: 3e38 maps give finite, right centroids."""
    maps = torch.zeros(3, 5, 7)
    maps[0] = 3e38
    maps[1, 2, 3] = 3e38
    maps[1, 4, 6] = 3e38
    maps[2, 0, 0] = 3.4e38
    maps[2, 4, 6] = 1.7e38
    got = torch.ops.xlard.attention_centroids(maps.cuda()).cpu()
    want = torch.tensor([[0.5, 0.5], [(3.5 + 6.5) / 2 / 7, (2.5 + 4.5) / 2 / 5],
                         [(0.5 * 2 + 6.5) / 3 / 7, (0.5 * 2 + 4.5) / 3 / 5]])
    assert torch.isfinite(got).all(), got
    assert_close(got, want, **ACC_TOL[torch.float32])
    gg = torch.ops.xlard._attention_centroids_backward(torch.ones(3, 2).cuda(), maps.cuda(), got.cuda()).cpu()
    assert torch.isfinite(gg).all()


def test_color_scores_huge_features():
    """Rows are divided by their own max-abs first: features of magnitude 1e30 (float32) score cos = 1."""
    g = torch.Generator().manual_seed(14)
    colors = torch.randn(3, 64, generator=g)
    features = torch.randn(2, 40, 64, generator=g)
    features[0, 17] = colors[1] * 1e30
    features[1, 5] = colors[2] * 3e37
    features[1, 9] = colors[0] * 1e-41  # subnormal-scaled copy: still the same direction
    scores, index = torch.ops.xlard.color_scores(features.cuda(), colors.cuda(), None)
    scores, index = scores.cpu(), index.cpu()
    assert torch.isfinite(scores).all()
    assert index[0, 1] == 17 and index[1, 2] == 5 and index[1, 0] == 9, index
    assert_close(scores[0, 1], torch.tensor(1.0), atol=1e-5, rtol=0)
    assert_close(scores[1, 2], torch.tensor(1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_color_scores_non_finite_rows_score_zero_as_the_reference(dtype):
    """A feature or color row holding inf has a NaN norm in the reference, so its similarities are 0 and the
    patch stays a candidate. The CUDA kernel stored an inf norm: the score became NaN, the patch was dropped
    (another index), and an inf color lost every patch (index -1)."""
    from xlard import reference

    cases = [
        (torch.tensor([[[-1.0, 0.0], [math.inf, 0.0]]]), torch.tensor([[1.0, 0.0]])),  # want (0, index 1)
        (torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[math.inf, 1.0]])),   # want (0, index 0)
        (torch.tensor([[[-1.0, 0.0], [math.nan, 0.0], [-math.inf, 2.0]]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])),
    ]
    for features, colors in cases:
        want_s, want_i = reference.color_scores(features.to(dtype), colors.to(dtype))
        got_s, got_i = torch.ops.xlard.color_scores(features.to(dtype).cuda(), colors.to(dtype).cuda(), None)
        assert torch.equal(got_i.cpu(), want_i), (features, colors, got_i, want_i)
        assert torch.equal(got_s.cpu(), want_s.to(got_s.dtype)), (got_s, want_s)
        cpu_s, cpu_i = torch.ops.xlard.color_scores(features.to(dtype), colors.to(dtype), None)
        assert torch.equal(cpu_i, want_i) and torch.equal(cpu_s, want_s.to(cpu_s.dtype))

@pytest.mark.parametrize("colors_count", (1, 4, 5, 9))
def test_color_scores_groups_and_splits(colors_count):
    """Colors in groups of 4 (partial last group) and patches split across blocks (first max wins)."""
    g = torch.Generator().manual_seed(colors_count)
    features = torch.randn(2, 1500, 48, generator=g)
    features[:, 1000:] = features[:, :500]  # exact ties across splits: the smaller index must win
    colors = torch.randn(2, colors_count, 48, generator=g)
    mask = torch.rand(2, colors_count, 1500, generator=g) > 0.3
    mask[..., 1000:] = mask[..., :500]
    _check_color(features, colors, None)
    _check_color(features, colors, mask)
    _, index = torch.ops.xlard.color_scores(features.cuda(), colors.cuda(), None)
    assert (index.cpu() < 1000).all()


@pytest.mark.parametrize("k", (1, 16, 1000))
def test_component_stats_topk_many_components(k):
    """Radix-select top-K on maps with more components than slots (checkerboards, random blobs)."""
    for mask in (checkerboard(256, 256), checkerboard(31, 77)):
        check_components(as_dtype(mask, torch.bool), connectivity=4, max_components=k)
    maps = blobs(3, 97, 131, k=40, seed=k)
    for mode in MODES:
        check_components(maps, {"absolute": 0.45, "relative": 0.5, "otsu": 0.0}[mode], mode, connectivity=4,
                         max_components=k)


def test_component_stats_wide_map_index_sums():
    """W > 2^27: the per-warp column sums of a component would overflow 32 bits; they are widened."""
    w = (1 << 27) + (1 << 16)
    maps = torch.zeros(1, 1, w, dtype=torch.bool)
    maps[0, 0, w - 4096:] = True  # one component of 4096 pixels at the far end
    maps[0, 0, 10:20] = True
    counts, areas, centroids = torch.ops.xlard.component_stats(maps.cuda(), 0.5, "absolute", 1, 4, 2)
    assert counts.item() == 2 and areas.cpu().tolist() == [[4096, 10]]
    cols = torch.arange(w - 4096, w, dtype=torch.float64)
    want_x = ((cols + 0.5).sum() / 4096 / w).float()
    assert centroids[0, 0, 0].cpu() == want_x and centroids[0, 0, 1].cpu() == 0.5
    assert centroids[0, 1, 0].cpu() == torch.tensor((15.0 / w)).float()


def test_components_global_path_in_waves(monkeypatch):
    """A scratch budget of 0 MiB: one map per wave (one launch each), same results."""
    monkeypatch.setenv("XLARD_CUDA_COMPONENTS_PATH", "global")
    monkeypatch.setenv("XLARD_CUDA_COMPONENTS_SCRATCH_MB", "0")
    maps = blobs(5, 40, 36, seed=4).reshape(5, 40, 36)
    for mode in MODES:
        check_components(maps, {"absolute": 0.45, "relative": 0.5, "otsu": 0.0}[mode], mode, connectivity=8)
    kernels = _kernel_launches(lambda: torch.ops.xlard.count_components(maps.cuda(), 0.5, "otsu", 1, 8))
    if kernels:
        assert len(kernels) == 5 and all("components_kernel" in k for k in kernels), kernels
    monkeypatch.setenv("XLARD_CUDA_COMPONENTS_SCRATCH_MB", "lots")
    with pytest.raises(RuntimeError, match="XLARD_CUDA_COMPONENTS_SCRATCH_MB"):
        torch.ops.xlard.count_components(maps.cuda(), 0.5, "otsu", 1, 8)


def test_components_concurrent_map_sizes():
    """Two host threads launching with different shared-memory sizes (both over 48 KiB) never fail."""
    import threading

    small = blobs(4, 120, 120, seed=1).cuda()  # ~60 KB of shared memory per block
    large = blobs(4, 200, 220, seed=2).cuda()  # ~180 KB
    want = {id(m): torch.ops.xlard.count_components(m.cpu(), 0.5, "relative", 1, 8) for m in (small, large)}
    errors = []

    def worker(maps):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for _ in range(200):
                    out = torch.ops.xlard.count_components(maps, 0.5, "relative", 1, 8)
                stream.synchronize()
                assert torch.equal(out.cpu(), want[id(maps)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(m,)) for m in (small, large, small, large)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_otsu_near_constant_maps():
    """The warp-aggregated histogram: near-constant maps (one bin takes almost every pixel)."""
    maps = torch.full((3, 64, 64), 0.25)
    maps[0, 10:13, 20:30] = 0.75
    maps[1, ::7, ::5] = 1.0
    maps[2, 0, 0] = -1.0
    for dtype in FLOAT_DTYPES:
        check_components(maps.to(dtype), 0.0, "otsu", connectivity=8)


def test_gaussian_log_prob_backward_small_inner_size():
    """A shared log_std over a large batch and a tiny inner size: the batch is chunked."""
    g = torch.Generator().manual_seed(6)
    ops = torch.ops.xlard
    for b, m in ((20000, 3), (300, 1), (70, 200)):
        x, mean = torch.randn(b, m, generator=g), torch.randn(b, m, generator=g)
        log_std = 0.3 * torch.randn(m, generator=g)
        grad = torch.randn(b, generator=g)
        want = ops._gaussian_log_prob_backward(grad, x, mean, log_std)
        got = ops._gaussian_log_prob_backward(grad.cuda(), x.cuda(), mean.cuda(), log_std.cuda())
        for name, a, w in zip(("grad_x", "grad_mean", "grad_log_std"), got, want):
            tol = dict(ACC_TOL[torch.float32])
            if name == "grad_log_std":  # a sum over the batch: error grows with its terms
                tol = dict(atol=1e-5 * b ** 0.5 * float(w.abs().max()), rtol=1e-4)
            assert_close(a.cpu(), w, msg=name, **tol)
        again = ops._gaussian_log_prob_backward(grad.cuda(), x.cuda(), mean.cuda(), log_std.cuda())
        assert torch.equal(again[2], got[2])  # deterministic


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_position_scores_backward_many_rows(dtype):
    """R >= 32: a warp per (b, token) over the rows; same gradients, deterministic."""
    g = torch.Generator().manual_seed(9)
    centroids = torch.rand(2, 5, 2, generator=g).to(dtype)
    relations = _relations(2, 5, 300, True, seed=10)
    grad = torch.randn(2, 300, generator=g, dtype=dtype)
    want = torch.ops.xlard._position_scores_backward(grad, centroids, relations, 4.0)
    got = torch.ops.xlard._position_scores_backward(grad.cuda(), centroids.cuda(), relations.cuda(), 4.0)
    assert_close(got.cpu(), want, **ACC_TOL[dtype])
    again = torch.ops.xlard._position_scores_backward(grad.cuda(), centroids.cuda(), relations.cuda(), 4.0)
    assert torch.equal(again, got)
