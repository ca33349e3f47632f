"""Shared test helpers: the one per-dtype tolerance table and map generators."""
from __future__ import annotations

import math

import numpy as np
import torch

# Tolerances by dtype of the compared result (habit 7: one table). Low-precision
# results are computed in float32 and rounded once, so one ulp-scale step of the
# dtype (torch's own error there) is what is allowed.
TOLERANCES = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def assert_close(actual, expected, dtype=None, msg="", **override):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's)."""
    tol = dict(TOLERANCES[dtype or expected.dtype])
    tol.update(override)
    # A message names the compared quantity and keeps torch's mismatch report after it.
    report = (lambda m: f"{msg}: {m}") if msg else None
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=report, **tol)


def assert_component_argument_errors(device: str) -> None:
    """The components ops refuse bad arguments with messages that carry the values.

    The numbers matter: a _C linked with a second, static libstdc++ crashed (GPU machine)
    or dropped the number (a -static-libstdc++ build here) exactly when formatting them."""
    import pytest

    ops = torch.ops.xlard
    maps = torch.rand(2, 8, 8).to(device)
    with pytest.raises(RuntimeError, match="mode must be 'absolute', 'relative' or 'otsu', got 'bogus'"):
        ops.count_components(maps, 0.5, "bogus", 1, 4)
    with pytest.raises(RuntimeError, match="connectivity must be 4 or 8, got 6"):
        ops.count_components(maps, 0.5, "otsu", 1, 6)
    with pytest.raises(RuntimeError, match="min_area must be >= 1, got 0"):
        ops.label_components(maps, 0.5, "otsu", 0, 4)
    with pytest.raises(RuntimeError, match="max_components must be >= 1, got 0"):
        ops.component_stats(maps, 0.5, "otsu", 1, 4, 0)


# ---------------------------------------------------------------- adversarial maps


def spiral(n: int) -> np.ndarray:
    """A one-pixel-wide square spiral on an n x n grid: one long 4-connected path, rings a pixel apart."""
    grid = np.zeros((n, n), dtype=bool)
    i = j = 0
    grid[0, 0] = True
    lengths = [n - 1, n - 1, n - 1]
    k = n - 3
    while k > 0:
        lengths += [k, k]
        k -= 2
    moves = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    for step, length in enumerate(lengths):
        di, dj = moves[step % 4]
        for _ in range(length):
            i, j = i + di, j + dj
            grid[i, j] = True
    return grid


def checkerboard(h: int, w: int) -> np.ndarray:
    """Pixel checkerboard: 8-connected it is one component, 4-connected every pixel is its own."""
    return (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0


def diagonals(n: int, step: int = 3) -> np.ndarray:
    """One-pixel anti/diagonal lines, where 4 and 8 connectivity differ."""
    i, j = np.indices((n, n))
    return ((i - j) % step == 0) | ((i + j) % (step + 2) == 0)


def blobs(batch: int, h: int, w: int, k: int = 4, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Smooth attention-like maps: sums of k random Gaussian bumps per map, [batch, h, w]."""
    g = torch.Generator().manual_seed(seed)
    cy = torch.rand(batch, k, 1, 1, generator=g) * h
    cx = torch.rand(batch, k, 1, 1, generator=g) * w
    sig = (0.04 + 0.08 * torch.rand(batch, k, 1, 1, generator=g)) * min(h, w)
    amp = 0.3 + torch.rand(batch, k, 1, 1, generator=g)
    ii = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    jj = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    maps = (amp * torch.exp(-((ii - cy) ** 2 + (jj - cx) ** 2) / (2 * sig**2))).sum(1)
    return maps.to(dtype)


def partitions_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images describe the same components (up to renumbering)."""
    if a.shape != b.shape or ((a == 0) != (b == 0)).any():
        return False
    fa, fb = a[a > 0], b[b > 0]
    pairs = set(zip(fa.tolist(), fb.tolist()))
    return len(pairs) == len(set(fa.tolist())) == len(set(fb.tolist()))


def nan_inf_sprinkle(x: torch.Tensor, seed: int = 0, frac: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(x.shape, generator=g)
    y = x.clone()
    y[r < frac / 3] = math.nan
    y[(r >= frac / 3) & (r < 2 * frac / 3)] = math.inf
    y[(r >= 2 * frac / 3) & (r < frac)] = -math.inf
    return y


def word_level_tokenizer(words):
    """A tiny word-level fast tokenizer (``<s> text </s>``, ids 0-3 special) over ``words``, for tiny text encoders."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=16)


#: The tiny CLIP/SigLIP towers of the tests: 2 layers of width 32, 16 text tokens, 32x32 images in 8x8 patches.
_TINY_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16)
_TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4)


def tiny_clip_model(vocab_size: int):
    """A randomly initialised CLIPModel small enough for unit tests (32x32 images, 8x8 patches)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, **_TINY_TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(_TINY_VISION), projection_dim=16)
    return transformers.CLIPModel(config).eval()


def tiny_siglip_model(vocab_size: int, **vision):
    """A randomly initialised SiglipModel small enough for unit tests (32x32 images, 8x8 patches, 16 text tokens)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab_size, **_TINY_TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(_TINY_VISION, **vision))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # norms other than the identity of a fresh init: a norm applied twice shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0.0, 0.2)
    return model


def hold_folder_in_subprocess(folder):
    """A second process that holds ``folder``'s lock until its stdin closes (stands in for another run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from xlard import _io\n"
            f"with _io.folder_lock({str(folder)!r}, 'other'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def record_progress_bars(monkeypatch) -> list:
    """Every tqdm bar made from now on (this test), in a list the caller checks: a closed bar is
    ``disable``d. Used to check that an interrupted job closes its bars (the Ctrl-C line was glued to one)."""
    from tqdm import tqdm

    opened = []
    real_init = tqdm.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(tqdm, "__init__", spy)
    return opened


def raise_keyboard_interrupt(*args, **kwargs):
    """A stand-in for any function: Ctrl-C at that point."""
    raise KeyboardInterrupt


def sigterm_once(cmd, ready, env=None, timeout: float = 120.0) -> tuple[int, str]:
    """Start ``cmd``, send it SIGTERM as soon as ``ready()`` is true, and return (exit code, stderr)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the script ended before it was stopped"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def fake_corrector_folder(path):
    """A folder that looks like an exported corrector (its three files, empty JSON), for folder-claim checks."""
    path.mkdir()
    for name in ("xlard_corrector.json", "config.json", "model.safetensors"):
        (path / name).write_text("{}")
    return path
