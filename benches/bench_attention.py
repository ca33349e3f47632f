"""Attention capture overhead: a tiny StableDiffusionPipeline call (random UNet, VAE, CLIP text
model; DDIM; classifier-free guidance on; latents returned) with and without
``xlard.attention.AttentionCapture`` recording two entity tokens on every cross-attention
layer. Providers: "plain" (no capture) and "xlard" (capture, including installing the
processors and reading ``maps()``), in the same group, so the report prints the ratio
plain / xlard measured in one run (information only). The target (capture costs at most
1.15x an uncaptured call) is judged on the paired variant, which interleaves the two calls
and records the median per-round ratio (extra_info "overhead_ratio"), robust to load
drifting on a shared machine. Work unit: denoiser calls (steps) per pipeline call."""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from test_attention import tiny_sd_pipeline
from xlard.attention import AttentionCapture, CaptureConfig

STEPS = 4
SIZES = {"latent32 ch32-64": dict(channels=(32, 64), size=32), "latent16 ch8-16": dict(channels=(8, 16), size=16)}
PROMPT = "a photo of two red dogs left of a blue cube"
TOKENS = (6, 11)  # "dogs" and "cube" under the word-level tokenizer (BOS first)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Stable timings on a shared machine; both providers run under the same setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes():
    return {name: tiny_sd_pipeline(channels=spec["channels"]) for name, spec in SIZES.items()}


def _call(pipe, size):
    return pipe(PROMPT, num_inference_steps=STEPS, height=size, width=size, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _captured(pipe, size, config):
    with AttentionCapture(pipe, config) as capture:
        latents = _call(pipe, size)
    return latents, capture.maps()


@pytest.mark.parametrize("provider", ["plain", "xlard"])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_attention_capture_overhead(benchmark, check_once, pipes, size_name, provider):
    pipe, size = pipes[size_name], SIZES[size_name]["size"]
    config = CaptureConfig(tokens=TOKENS)

    def check():
        plain = _call(pipe, size)
        latents, maps = _captured(pipe, size, config)
        assert torch.equal(plain, latents), "capture changed the pipeline output"
        assert maps.shape == (1, len(TOKENS), size, size) and torch.isfinite(maps).all()

    if provider == "xlard":  # the check runs both; once per size is enough
        check_once(check)
    fn = (lambda: _call(pipe, size)) if provider == "plain" else (lambda: _captured(pipe, size, config))
    layers = len(AttentionCapture(pipe, config).layers)
    benchmark.group = f"attention_capture tiny SD {size_name} {STEPS} steps"
    benchmark.extra_info.update(provider=provider, op="attention_capture", steps=STEPS, latent=size,
                                unet_channels=list(SIZES[size_name]["channels"]), tokens=len(TOKENS),
                                layers=layers, cfg=True, torch_threads=torch.get_num_threads())
    benchmark(fn)


@pytest.mark.parametrize("size_name", list(SIZES))
def test_attention_capture_overhead_paired(benchmark, pipes, size_name):
    """The overhead as the median of per-round ratios, plain and captured calls interleaved,
    so that load drifting on a shared machine hits both alike (extra_info: overhead_ratio)."""
    pipe, size = pipes[size_name], SIZES[size_name]["size"]
    config = CaptureConfig(tokens=TOKENS)
    rounds = 2 if benchmark.disabled else 15

    def paired():
        ratios, plain, captured = [], [], []
        _call(pipe, size), _captured(pipe, size, config)  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            _call(pipe, size)
            middle = time.perf_counter()
            _captured(pipe, size, config)
            end = time.perf_counter()
            plain.append(middle - start)
            captured.append(end - middle)
            ratios.append((end - middle) / (middle - start))
        return statistics.median(ratios), min(captured) / min(plain), statistics.median(plain)

    benchmark.group = f"attention_capture paired tiny SD {size_name} {STEPS} steps"
    ratio, ratio_of_mins, plain_median = benchmark.pedantic(paired, rounds=1, iterations=1)
    benchmark.extra_info.update(provider="paired", op="attention_capture", steps=STEPS, latent=size,
                                rounds=rounds, overhead_ratio=ratio, overhead_ratio_of_mins=ratio_of_mins,
                                plain_median_s=plain_median, target_ratio=1.15)
