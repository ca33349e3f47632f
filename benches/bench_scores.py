"""attention_centroids and color_scores vs their eager references.

Work unit: one call on the batch below (maps 8 x 77 x 64 x 64; patch features and colors). Targets
(benches/report.py): attention_centroids >= 2.0x and color_scores >= 1.0x the eager reference's speed.
Each output is checked against the reference before timing."""
from __future__ import annotations

import pytest
import torch

import xlard.ops as ops
import xlard.reference as ref
from helpers import blobs


@pytest.mark.parametrize("provider", ["xlard", "reference"])
def test_attention_centroids(benchmark, provider):
    maps = blobs(8 * 77, 64, 64, seed=1).view(8, 77, 64, 64)
    fn = {"xlard": ops.attention_centroids, "reference": ref.attention_centroids}[provider]
    torch.testing.assert_close(fn(maps), ref.attention_centroids(maps), rtol=1e-5, atol=1e-5)
    benchmark.group = "attention_centroids float32 8x77x64x64"
    benchmark.extra_info.update(provider=provider, op="attention_centroids", bytes=maps.numel() * 4)
    benchmark(fn, maps)


@pytest.mark.parametrize("provider", ["xlard", "reference"])
def test_color_scores(benchmark, provider):
    g = torch.Generator().manual_seed(0)
    feats, colors = torch.randn(8, 1024, 768, generator=g), torch.randn(10, 768, generator=g)
    fn = {"xlard": ops.color_scores, "reference": ref.color_scores}[provider]
    got, want = fn(feats, colors), ref.color_scores(feats, colors)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    benchmark.group = "color_scores float32 8x1024x768 x 10x768"
    benchmark.extra_info.update(provider=provider, op="color_scores", bytes=feats.numel() * 4)
    benchmark(fn, feats, colors)
