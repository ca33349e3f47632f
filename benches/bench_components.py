"""count_components vs the natural peers: a vectorised threshold followed by a per-map
loop of cv2.connectedComponentsWithStats (or scipy.ndimage.label) with the area filter.
Work unit: pixels of the input (report derives G pixels/s). Targets (benches/report.py): >= 10x the OpenCV
and scipy loops, and >= 1 G pixels/s on 8 x 77 x 64 x 64 float32 maps. Before timing, every provider's counts (xlard's
too) are checked against OpenCV's, which are first checked against scipy's."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import xlard.ops as ops
import xlard.reference as ref
from helpers import blobs

THRESHOLD, MIN_AREA, CONNECTIVITY = 0.5, 4, 8
SHAPES = {"8x77x64x64": (8, 77, 64, 64), "2x77x16x16": (2, 77, 16, 16), "8x77x32x32": (8, 77, 32, 32)}
_EIGHT = np.ones((3, 3), dtype=np.uint8)


def opencv_loop(maps: torch.Tensor) -> torch.Tensor:
    mx = maps.flatten(-2).amax(-1)
    fg = (maps > THRESHOLD * mx[..., None, None]).to(torch.uint8).reshape(-1, *maps.shape[-2:]).numpy()
    counts = np.empty(fg.shape[0], dtype=np.int32)
    for k in range(fg.shape[0]):
        n, _, stats, _ = cv2.connectedComponentsWithStats(fg[k], connectivity=CONNECTIVITY)
        counts[k] = int((stats[1:, cv2.CC_STAT_AREA] >= MIN_AREA).sum())
    return torch.from_numpy(counts).view(maps.shape[:-2])


def scipy_loop(maps: torch.Tensor) -> torch.Tensor:
    mx = maps.flatten(-2).amax(-1)
    fg = (maps > THRESHOLD * mx[..., None, None]).reshape(-1, *maps.shape[-2:]).numpy()
    counts = np.empty(fg.shape[0], dtype=np.int32)
    for k in range(fg.shape[0]):
        lab, n = ndi.label(fg[k], structure=_EIGHT)
        counts[k] = int((np.bincount(lab.ravel(), minlength=n + 1)[1:] >= MIN_AREA).sum())
    return torch.from_numpy(counts).view(maps.shape[:-2])


PROVIDERS = {
    "xlard": lambda m: ops.count_components(m, THRESHOLD, "relative", MIN_AREA, CONNECTIVITY),
    "opencv_loop": opencv_loop,
    "scipy_loop": scipy_loop,
    "reference": lambda m: ref.count_components(m, THRESHOLD, "relative", MIN_AREA, CONNECTIVITY),
}


def make_maps(shape):
    b = int(np.prod(shape[:-2]))
    return blobs(b, *shape[-2:], k=5, seed=0).view(shape).contiguous()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_count_components(benchmark, shape_name, provider):
    shape = SHAPES[shape_name]
    if provider == "reference" and shape_name == "8x77x64x64":
        pytest.skip("the iterative reference is minutes-slow at this size")
    maps = make_maps(shape)
    fn = PROVIDERS[provider]
    want = opencv_loop(maps)  # correctness, outside the timing: two outside libraries, then the provider
    assert torch.equal(scipy_loop(maps), want), "OpenCV and scipy disagree"
    assert torch.equal(fn(maps).to(torch.int32), want), provider
    benchmark.group = f"count_components float32 {shape_name}"
    benchmark.extra_info.update(provider=provider, op="count_components", shape=shape_name,
                                pixels=maps.numel(), bytes=maps.numel() * maps.element_size())
    benchmark(fn, maps)
