"""Tests of xlard.models: the residual corrector (policy + value), the latent reward projector, save/load.

Everything runs the tiny presets on the CPU; the paper presets are built only on
the meta device, to count their parameters.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import xlard.ops
from helpers import assert_close
from xlard.models import (
    ASPECTS, CorrectorConfig, LatentRewardProjector, ProjectorConfig, ProjectorOutput, ResidualCorrector,
    aspect_weights, count_parameters, patchify, sincos_position_encoding, unpatchify,
)

C, TEXT, POOLED = 4, 32, 24


def corrector_config(**kw):
    return CorrectorConfig.tiny(latent_channels=C, text_dim=TEXT, pooled_dim=POOLED, **kw)


def projector_config(**kw):
    return ProjectorConfig.tiny(latent_channels=C, text_dim=TEXT, pooled_dim=POOLED, **kw)


def make_corrector(seed=0, nonzero_head=False, **kw):
    torch.manual_seed(seed)
    model = ResidualCorrector(corrector_config(**kw))
    if nonzero_head:
        with torch.no_grad():
            model.head.weight.normal_(0, 0.1)
            model.head.bias.normal_(0, 0.1)
    return model


def inputs(b=2, h=6, w=10, t=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, C, h, w, generator=g).to(dtype)
    text = torch.randn(b, t, TEXT, generator=g)
    pooled = torch.randn(b, POOLED, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, t - 2:] = False
    return z0, text, pooled, mask


# ---------------------------------------------------------------- corrector: identity at init, shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_init_is_exact_identity(dtype):
    model = make_corrector()
    z0, text, pooled, mask = inputs(dtype=dtype)
    delta = model(z0, text, pooled, mask)
    assert delta.dtype == dtype and torch.count_nonzero(delta) == 0
    zc, lam = model.correct(z0, text, pooled, mask)
    assert zc.dtype == dtype and torch.equal(zc, z0)
    assert torch.count_nonzero(lam) == 0 and lam.shape == (2, 6, 10)
    zc, _ = model.correct(z0, text, pooled, mask, alpha=torch.tensor([0.3, 2.0], dtype=dtype))
    assert torch.equal(zc, z0)


@pytest.mark.parametrize("h,w,patch", [(1, 1, 1), (7, 5, 1), (6, 10, 2), (9, 15, 3), (8, 12, 4)])
def test_shapes_for_odd_sizes_and_patch_factors(h, w, patch):
    z0, text, pooled, mask = inputs(b=3, h=h, w=w)
    model = make_corrector(patch=patch, nonzero_head=True)
    delta = model(z0, text, pooled, mask)
    assert delta.shape == z0.shape and torch.isfinite(delta).all()
    zc, delta_s, log_prob, lam = model.sample(z0, text, pooled, mask)
    assert zc.shape == delta_s.shape == z0.shape and log_prob.shape == (3,) and lam.shape == (3, h, w)
    assert model.value(z0, text, pooled, mask).shape == (3,)
    projector = LatentRewardProjector(projector_config(patch=patch))
    out = projector(z0, text, pooled, mask)
    assert out.scores.shape == out.log_var.shape == out.weights.shape == (3, 3)
    assert ((out.scores > 0) & (out.scores < 1)).all()
    tokens = patchify(z0, patch)
    assert tokens.shape == (3, (h // patch) * (w // patch), C * patch * patch)
    assert torch.equal(unpatchify(tokens, C, h, w, patch), z0)


def test_patch_must_divide_the_latent():
    model = make_corrector(patch=2)
    z0, text, pooled, mask = inputs(h=7, w=10)
    with pytest.raises(ValueError, match=r"z0 height and width must be divisible by patch=2, got 7 x 10"):
        model(z0, text, pooled, mask)
    projector = LatentRewardProjector(projector_config(patch=3))
    with pytest.raises(ValueError, match=r"zc height and width must be divisible by patch=3"):
        projector(z0, text, pooled, mask)


def test_patchify_is_spatially_local():
    # Token (i, j) must hold exactly the p x p block at rows i*p.., cols j*p.. of every channel.
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(z, 2)
    block = z[1, :, 2:4, 4:6].reshape(-1)
    assert torch.equal(tokens[1, 1 * 3 + 2], block)


def test_patchify_and_unpatchify_name_bad_arguments():
    """Were an AttributeError ('shape'), "not enough values to unpack", ZeroDivisionError, torch's reshape errors, a
    bool patch read as 1, and tokens of another layout silently reshaped into a latent."""
    z = torch.zeros(2, 4, 8, 8)
    for args, error, pattern in (
            ((None, 2), TypeError, r"patchify: z must be a torch.Tensor \[B, C, H, W\], got NoneType"),
            ((torch.zeros(4, 8, 8), 2), ValueError, r"patchify: z must be a tensor \[B, C, H, W\] \(4 dimensions\), "
                                                    r"got shape \(4, 8, 8\)"),
            ((z, 0), ValueError, "patchify: patch must be an integer >= 1, got 0"),
            ((z, -2), ValueError, "patchify: patch must be an integer >= 1, got -2"),
            ((z, True), TypeError, r"patchify: patch must be an integer >= 1, got True \(bool\)"),
            ((z, 2.0), TypeError, r"patchify: patch must be an integer >= 1, got 2.0 \(float\)")):
        with pytest.raises(error, match=pattern):
            patchify(*args)
    tokens = patchify(z, 2)  # [2, 16, 16]
    for args, error, pattern in (
            ((None, 4, 8, 8, 2), TypeError, r"unpatchify: tokens must be a torch.Tensor \[B, N, C\*patch\*patch\]"),
            ((tokens[..., None], 4, 8, 8, 2), ValueError, r"unpatchify: tokens must be a tensor .*\(3 dimensions\), "
                                                          r"got shape \(2, 16, 16, 1\)"),
            ((tokens, 3, 8, 8, 2), ValueError, r"unpatchify: tokens must have shape \[B, \(H/p\)\(W/p\), C\*p\*p\] = "
                                               r"\[B, 16, 12\] for channels=3, height=8, width=8, patch=2, got "
                                               r"\(2, 16, 16\)"),
            ((tokens, 4, 7, 8, 2), ValueError, "unpatchify: height and width must be divisible by patch=2, got 7 x 8"),
            ((tokens, 4, 8, 8, 0), ValueError, "unpatchify: patch must be an integer >= 1, got 0"),
            ((tokens, 4, -8, -8, 2), ValueError, "unpatchify: height must be an integer >= 0, got -8"),
            ((tokens, 4, 8.0, 8, 2), TypeError, r"unpatchify: height must be an integer >= 0, got 8.0 \(float\)"),
            ((tokens, True, 8, 8, 2), TypeError, r"unpatchify: channels must be an integer >= 0, got True \(bool\)")):
        with pytest.raises(error, match=pattern):
            unpatchify(*args)
    # integers of other types still work
    numpy = pytest.importorskip("numpy")
    assert torch.equal(unpatchify(patchify(z, torch.tensor(2)), 4, 8, 8, numpy.int64(2)), z)


def test_sincos_position_encoding_names_bad_arguments():
    """Were torch's arange/repeat errors, a float width accepted, an int dtype casting the sines to 0 and 1, and a
    dtype string read as a device ("Invalid device string: 'float32'")."""
    for args, kwargs, error, pattern in (
            ((2, 3, -4), {}, ValueError, "width must be an integer >= 0, got -4"),
            ((2, 3, 8.0), {}, TypeError, r"width must be an integer >= 0, got 8.0 \(float\)"),
            ((2, 3, 6), {}, ValueError, "width must be a multiple of 4, got 6"),
            ((-1, 3, 8), {}, ValueError, "grid_h must be an integer >= 0, got -1"),
            ((2.0, 3, 8), {}, TypeError, r"grid_h must be an integer >= 0, got 2.0 \(float\)"),
            ((2, True, 8), {}, TypeError, r"grid_w must be an integer >= 0, got True \(bool\)"),
            ((2, None, 8), {}, TypeError, r"grid_w must be an integer >= 0, got None"),
            ((2, 3, 8), {"dtype": torch.long}, TypeError, "dtype must be a floating torch dtype .*got torch.int64"),
            ((2, 3, 8), {"dtype": "float32"}, TypeError, "dtype must be a floating torch dtype .*got 'float32'"),
            ((2, 3, 8), {"device": "nope"}, ValueError, "device must be a torch device or its name, got 'nope'")):
        with pytest.raises(error, match=f"xlard.models.sincos_position_encoding: {pattern}"):
            sincos_position_encoding(*args, **kwargs)
    pe = sincos_position_encoding(2, 3, 8, device="cpu", dtype=torch.float64)
    assert pe.shape == (6, 8) and torch.equal(pe[0], torch.tensor([0.0, 0.0, 1.0, 1.0] * 2, dtype=torch.float64))


# ---------------------------------------------------------------- parameter counts


def test_parameter_counts_of_presets():
    corrector = count_parameters(CorrectorConfig.paper(latent_channels=16, text_dim=4096, pooled_dim=4096))
    projector = count_parameters(ProjectorConfig.paper(latent_channels=16, text_dim=4096, pooled_dim=4096))
    assert abs(corrector - 15e6) <= 1.5e6, corrector
    assert corrector + projector < 50e6, (corrector, projector)
    paper = CorrectorConfig.paper()
    assert (paper.depth, paper.heads, paper.width, paper.ffn_mult) == (6, 8, 384, 4.0)
    assert 2 <= ProjectorConfig.paper().depth <= 4
    assert count_parameters(corrector_config()) < 100_000
    assert count_parameters(projector_config()) < 100_000
    # The count does not depend on the latent's size (only on C and the patch factor).
    assert make_corrector().num_parameters() == count_parameters(corrector_config())


# ---------------------------------------------------------------- gradients


def test_gradient_reaches_every_trainable_parameter():
    model = make_corrector(nonzero_head=True)
    z0, text, pooled, mask = inputs()
    _, delta, old_log_prob, _ = model.sample(z0, text, pooled, mask, generator=torch.Generator().manual_seed(3))
    dist, value = model.policy_and_value(z0, text, pooled, mask)
    ratio = torch.exp(dist.log_prob(delta) - old_log_prob)
    # The PPO sanity check: before any update the ratio is 1.
    assert_close(ratio.detach(), torch.ones(2), atol=1e-4, rtol=0)
    loss = -(ratio * torch.tensor([1.0, -0.5])).mean() + (value - 1.0).square().mean() - 1e-3 * dist.entropy().mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or torch.count_nonzero(p.grad) == 0]
    assert not dead, dead


def test_value_head_gradient_reaches_trunk_only_when_shared():
    z0, text, pooled, mask = inputs()
    for shared in (False, True):
        model = make_corrector(value_shares_trunk=shared)
        model.value(z0, text, pooled, mask).sum().backward()
        trunk_grad = model.trunk.blocks[0].ffn[0].weight.grad
        assert (trunk_grad is not None and torch.count_nonzero(trunk_grad) > 0) == shared
        assert torch.count_nonzero(model.value_head[1].weight.grad) > 0


def test_projector_gradient_reaches_every_parameter_and_the_latent():
    torch.manual_seed(0)
    projector = LatentRewardProjector(projector_config())
    z0, text, pooled, mask = inputs()
    z0.requires_grad_(True)
    aspect_mask = torch.tensor([[True, False, True], [True, True, True]])
    out = projector(z0, text, pooled, mask, aspect_mask)
    projector.loss(out, torch.rand(2, 3), aspect_mask).loss.backward()
    dead = [n for n, p in projector.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not dead, dead
    assert torch.count_nonzero(z0.grad) > 0


# ---------------------------------------------------------------- policy


def test_sample_and_log_prob_agree():
    model = make_corrector(nonzero_head=True, log_std_init=-1.0)
    with torch.no_grad():
        model.log_std.copy_(torch.tensor([-1.0, -0.5, 0.0, -2.0]))
    model.eval()
    z0, text, pooled, mask = inputs()
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    zc, delta, log_prob, lam = model.sample(z0, text, pooled, mask, noise=noise, alpha=0.5)
    assert not any(t.requires_grad for t in (zc, delta, log_prob, lam))
    assert delta.dtype == log_prob.dtype == lam.dtype == torch.float32
    dist = model.distribution(z0, text, pooled, mask)
    std = model.log_std.detach().exp().reshape(1, C, 1, 1)
    assert_close(delta, dist.mean.detach() + std * noise)
    assert_close(zc, z0 + 0.5 * delta)
    assert_close(lam, delta.abs().sum(1))
    log_std = model.log_std.detach()
    assert_close(log_prob, xlard.ops.gaussian_log_prob(delta, dist.mean.detach(), log_std), rtol=1e-5, atol=1e-3)
    assert_close(log_prob, model.log_prob(delta, dist.mean).detach(), rtol=1e-5, atol=1e-3)
    assert_close(log_prob, dist.log_prob(delta).detach(), rtol=1e-5, atol=1e-3)
    by_hand = torch.distributions.Normal(dist.mean.detach().double(), std.double()).log_prob(delta.double())
    assert_close(log_prob.double(), by_hand.flatten(1).sum(1), rtol=1e-5, atol=1e-3)
    entropy = torch.distributions.Normal(dist.mean.detach().double(), std.double().expand_as(delta)).entropy()
    assert_close(dist.entropy().detach().double(), entropy.flatten(1).sum(1), rtol=1e-6, atol=1e-4)


def _block_constant(x, k):
    up = x[..., ::k, ::k].repeat_interleave(k, -2).repeat_interleave(k, -1)
    return torch.equal(x, up)


@pytest.mark.parametrize("k", [2, 3])
def test_action_block_makes_mean_noise_and_action_block_constant(k):
    model = make_corrector(nonzero_head=True, action_block=k, log_std_init=-1.0)
    model.eval()
    z0, text, pooled, mask = inputs(h=6, w=12)
    mean = model(z0, text, pooled, mask)
    assert _block_constant(mean, k)
    # the mean is the block average of what the same weights give without blocks
    free = ResidualCorrector(corrector_config(action_block=1, log_std_init=-1.0))
    free.load_state_dict(model.state_dict())
    fine = free(z0, text, pooled, mask)
    assert_close(mean[..., ::k, ::k], torch.nn.functional.avg_pool2d(fine, k), rtol=1e-5, atol=1e-6)
    noise = torch.randn((4000,) + tuple(z0.shape[1:]), generator=torch.Generator().manual_seed(3))
    blocked = model.action_noise(noise)
    assert _block_constant(blocked, k)
    assert abs(float(blocked[..., ::k, ::k].std()) - 1.0) < 0.02  # still standard normal per block
    zc, delta, log_prob, _ = model.sample(z0, text, pooled, mask, noise=noise[:2])
    assert _block_constant(delta, k)
    std = model.log_std.detach().exp().reshape(1, C, 1, 1)
    assert_close(delta, mean.detach() + std * blocked[:2])
    # the mean-reduced full-resolution log-density equals the block one
    block_lp = torch.distributions.Normal(mean.detach()[..., ::k, ::k].double(), std.double()).log_prob(
        delta[..., ::k, ::k].double()).flatten(1).mean(1)
    assert_close(log_prob.double() / delta[0].numel(), block_lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(make_corrector(action_block=1).action_noise(noise[:1]), noise[:1])
    with pytest.raises(ValueError, match="divisible by action_block=4"):
        make_corrector(action_block=4)(*inputs(h=6, w=12))


def test_bfloat16_latent_keeps_its_dtype_and_float32_log_probs():
    model = make_corrector(nonzero_head=True)
    z0, text, pooled, mask = inputs(dtype=torch.bfloat16)
    zc, delta, log_prob, lam = model.sample(z0, text, pooled, mask, generator=torch.Generator().manual_seed(0))
    assert zc.dtype == torch.bfloat16 and delta.dtype == log_prob.dtype == torch.float32
    assert model.distribution(z0, text, pooled, mask).mean.dtype == torch.float32


def test_determinism_with_a_seed():
    a, b = make_corrector(seed=7, nonzero_head=True), make_corrector(seed=7, nonzero_head=True)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    z0, text, pooled, mask = inputs()
    first = a.sample(z0, text, pooled, mask, generator=torch.Generator().manual_seed(11))
    second = b.sample(z0, text, pooled, mask, generator=torch.Generator().manual_seed(11))
    other = a.sample(z0, text, pooled, mask, generator=torch.Generator().manual_seed(12))
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(make_corrector(seed=8).trunk.patch_embed.weight, a.trunk.patch_embed.weight)


# ---------------------------------------------------------------- the text padding mask


def test_padded_text_tokens_do_not_change_any_output():
    model = make_corrector(nonzero_head=True)
    projector = LatentRewardProjector(projector_config())
    z0, text, pooled, mask = inputs(t=6)
    garbage = text.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), TEXT) * 100
    garbage[0, -1, 0] = float("nan")
    assert torch.equal(model(z0, text, pooled, mask), model(z0, garbage, pooled, mask))
    assert torch.equal(model.value(z0, text, pooled, mask), model.value(z0, garbage, pooled, mask))
    assert torch.equal(projector(z0, text, pooled, mask).scores, projector(z0, garbage, pooled, mask).scores)
    # Same as giving the first prompt only its real tokens.
    kept = int(mask[0].sum())
    short = model(z0[:1], text[:1, :kept], pooled[:1])
    assert_close(model(z0, garbage, pooled, mask)[:1], short)
    # 0/1 integer masks (Hugging Face attention_mask) mean the same.
    assert torch.equal(model(z0, text, pooled, mask.long()), model(z0, text, pooled, mask))
    # The mask matters, and a prompt with no real token stays finite.
    assert not torch.equal(model(z0, garbage.nan_to_num(), pooled), model(z0, garbage.nan_to_num(), pooled, mask))
    none = torch.zeros_like(mask)
    assert torch.isfinite(model(z0, text, pooled, none)).all()
    assert torch.isfinite(projector(z0, text, pooled, none).scores).all()


# ---------------------------------------------------------------- projector and confidence head


def test_aspect_weights_are_a_softmax_over_present_aspects():
    log_var = torch.tensor([[0.0, 1.0, -1.0], [0.3, 0.2, 0.1], [2.0, 0.0, 0.0]])
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    w = aspect_weights(log_var, present)
    assert_close(w[0], torch.softmax(-log_var[0], 0))
    assert_close(w[1], torch.tensor([math.exp(-0.3), 0.0, math.exp(-0.1)]) / (math.exp(-0.3) + math.exp(-0.1)))
    assert torch.equal(w[2], torch.zeros(3))
    assert_close(aspect_weights(torch.zeros(2, 3), present[:2]), torch.tensor([[1 / 3] * 3, [0.5, 0.0, 0.5]]))


def test_aspect_weights_name_bad_arguments():
    """Were "bad operand type for unary -", softmax's and masked_fill's dtype errors, size mismatches from inside,
    and a [B, 4] log_var or a [1, 3] mask silently accepted."""
    log_var, present = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for args, error, pattern in (
            ((None,), TypeError, "log_var must be a torch.Tensor, got NoneType"),
            (([[0.0, 0.0, 0.0]],), TypeError, "log_var must be a torch.Tensor, got list"),
            ((torch.zeros(2, 3, dtype=torch.long), present), TypeError, "log_var must have dtype float16, .*got int64"),
            ((torch.zeros(2, 4),), ValueError, r"log_var must have shape \[B, 3\] .*got \(2, 4\)"),
            ((torch.zeros(3),), ValueError, r"log_var must have shape \[B, 3\] .*got \(3,\)"),
            ((log_var, present.long()), TypeError, "aspect_mask must have dtype bool; got int64"),
            ((log_var, [[True] * 3] * 2), TypeError, "aspect_mask must be a torch.Tensor, got list"),
            ((log_var, present[:1]), ValueError, r"aspect_mask must have shape \[B, 3\] = \[2, 3\] .*got \(1, 3\)"),
            ((log_var, present[:, :2]), ValueError, r"aspect_mask must have shape \[B, 3\] = \[2, 3\] .*got \(2, 2\)"),
            ((log_var, present.to("meta")), ValueError, "aspect_mask is on meta, expected cpu")):
        with pytest.raises(error, match=f"xlard.models.aspect_weights: {pattern}"):
            aspect_weights(*args)


def test_projector_loss_is_uncertainty_weighted_and_ignores_absent_aspects():
    projector = LatentRewardProjector(projector_config())
    scores = torch.tensor([[0.2, 0.5, 0.9], [0.4, 0.6, 0.1]], requires_grad=True)
    log_var = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.5]], requires_grad=True)
    present = torch.tensor([[True, False, True], [True, True, False]])
    target = torch.tensor([[0.0, float("nan"), 1.0], [1.0, 0.5, float("nan")]])
    pred = ProjectorOutput(scores, log_var, aspect_weights(log_var, present))
    result = projector.loss(pred, target, present)
    entries = [(0.2, 0.0, 0.0), (0.9, 1.0, -1.0), (0.4, 1.0, 0.5), (0.6, 0.5, 0.5)]
    expected = sum(0.5 * math.exp(-s) * (p - t) ** 2 + 0.5 * s for p, t, s in entries) / 4
    assert_close(result.loss.detach(), torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert_close(result.mse, torch.tensor([(0.04 + 0.36) / 2, 0.01, 0.01]), atol=1e-6, rtol=1e-6)
    assert torch.equal(result.weights, aspect_weights(log_var, present).detach())
    result.loss.backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(log_var.grad).all()
    assert scores.grad[0, 1] == 0 and scores.grad[1, 2] == 0 and log_var.grad[0, 1] == 0
    # At the optimum the log-variance equals the log of the squared error: zero gradient there.
    s = torch.tensor([[math.log(0.25)] * 3], requires_grad=True)
    one = ProjectorOutput(torch.tensor([[0.5] * 3]), s, aspect_weights(s))
    projector.loss(one, torch.tensor([[0.0] * 3]), torch.ones(1, 3, dtype=torch.bool)).loss.backward()
    assert_close(s.grad, torch.zeros(1, 3), atol=1e-6, rtol=0)
    # Nothing present: a zero loss, not NaN.
    empty = projector.loss(pred, target, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.loss.item() == 0.0


def test_confidence_matches_forward_and_starts_uniform():
    torch.manual_seed(0)
    projector = LatentRewardProjector(projector_config())
    z0, text, pooled, mask = inputs()
    aspect_mask = torch.tensor([[True, True, False], [True, True, True]])
    out = projector(z0, text, pooled, mask, aspect_mask)
    assert torch.equal(projector.confidence(pooled, aspect_mask), out.weights)
    assert_close(out.weights.sum(-1), torch.ones(2))
    assert (out.weights[0, 2] == 0) and (out.weights - torch.tensor([[0.5, 0.5, 0], [1 / 3] * 3])).abs().max() < 0.1
    assert len(ASPECTS) == 3 and ASPECTS[0] == "count"
    # A pooled embedding far beyond any text encoder's (or NaN) gave NaN weights without a word; now named.
    with pytest.raises(ValueError, match=r"LatentRewardProjector.confidence: the confidence head's weights overflowed "
                                         r"\(pooled's largest magnitude is 1e\+30"):
        projector.confidence(torch.full_like(pooled, 1e30), aspect_mask)
    with pytest.raises(ValueError, match="LatentRewardProjector.confidence: pooled holds NaN or infinite values"):
        projector.confidence(torch.full_like(pooled, float("nan")), aspect_mask)
    with pytest.raises(ValueError, match=r"LatentRewardProjector: .*pooled's 1e\+30"):  # the forward names pooled too
        projector(z0, text, torch.full_like(pooled, 1e30), mask, aspect_mask)


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = make_corrector(nonzero_head=True, patch=2)
    with torch.no_grad():
        model.log_std.add_(0.123)
    projector = LatentRewardProjector(projector_config())
    z0, text, pooled, mask = inputs()
    for m, folder in ((model, tmp_path / "corrector"), (projector, tmp_path / "nested" / "projector")):
        assert m.save_pretrained(folder) == folder
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        loaded = type(m).from_pretrained(folder)
        assert loaded.config == m.config and not loaded.training
        assert loaded.state_dict().keys() == m.state_dict().keys()
        for (name, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert all(p.requires_grad for p in loaded.parameters())
    m2 = ResidualCorrector.from_pretrained(tmp_path / "corrector")
    model.eval()
    assert torch.equal(model(z0, text, pooled, mask), m2(z0, text, pooled, mask))
    # Saving over an existing folder replaces both files and leaves no temporary folder behind.
    make_corrector(seed=3).save_pretrained(tmp_path / "corrector")
    assert not torch.equal(ResidualCorrector.from_pretrained(tmp_path / "corrector").trunk.patch_embed.weight,
                           model.trunk.patch_embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrector", "nested"]
    assert ResidualCorrector.from_pretrained(tmp_path / "corrector", dtype=torch.float64).head.weight.dtype \
        == torch.float64


def test_load_errors_are_clear(tmp_path):
    folder = tmp_path / "c"
    make_corrector().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())

    with pytest.raises(FileNotFoundError, match="no folder"):
        ResidualCorrector.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="describes a 'ResidualCorrector', not a LatentRewardProjector"):
        LatentRewardProjector.from_pretrained(folder)

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        ResidualCorrector.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ResidualCorrector.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*model.safetensors"):
        ResidualCorrector.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(weights)
    import builtins

    import xlard.models as models_module

    def denied(path, *args, **kwargs):  # chmod 000 as a user that is not root
        if str(path).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # a permission problem, not "No such file or directory"
        mp.setattr(models_module, "open", denied, raising=False)
        with pytest.raises(PermissionError, match="cannot read .*model.safetensors: Permission denied"):
            ResidualCorrector.from_pretrained(folder)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"holds non-finite values in 1 tensor\(s\) \(e.g. '{name}'\)"):
        ResidualCorrector.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(weights)
    huge = dict(config, config={**config["config"], "alpha": 10**400})
    (folder / "config.json").write_text(json.dumps(huge))
    with pytest.raises(ValueError, match="alpha must be a finite number, got") as refused:
        ResidualCorrector.from_pretrained(folder)
    assert "[-inf, inf]" not in str(refused.value)  # "a finite number in [-inf, inf]" contradicted itself
    (folder / "config.json").write_text(json.dumps(config))

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ResidualCorrector.from_pretrained(folder)
    for change, pattern in (({"width": 64}, "do not match the config"),
                            ({"heads": 3}, "width .* must be divisible by heads"),
                            ({"colour": 1}, "unknown fields")):
        (folder / "config.json").write_text(json.dumps({**config, "config": {**config["config"], **change}}))
        with pytest.raises(ValueError, match=pattern):
            ResidualCorrector.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*config.json"):
        ResidualCorrector.from_pretrained(folder)


def _no_large_allocation(monkeypatch):
    """Fail the test if the model is built off the meta device or the weights are read."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the config was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    real_init = ResidualCorrector.__init__

    def meta_only(self, *args, **kwargs):
        assert torch.empty(0).device.type == "meta", "the model was built for real before the checks"
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ResidualCorrector, "__init__", meta_only)


@pytest.mark.parametrize("hostile, pattern", [
    # deep nesting: the JSON parser's recursion limit, reported as a ValueError
    (lambda c: '{"config": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
    # absurd sizes: bounded per field before anything is built
    (lambda c: json.dumps({**c, "config": {**c["config"], "depth": 10**9}}), r"depth must be an integer in 1\.\.256"),
    (lambda c: json.dumps({**c, "config": {**c["config"], "width": 2**62}}), r"width must be an integer in"),
    (lambda c: json.dumps({**c, "config": {**c["config"], "text_dim": 10**400}}), r"text_dim must be an integer in"),
    (lambda c: json.dumps({**c, "config": {**c["config"], "heads": {"a": [1]}}}), "heads must be an integer"),
    (lambda c: json.dumps({**c, "config": {**c["config"], "width": 64.0}}), "width must be an integer"),
    # format_version of the wrong type: "1", 1.0 and true all equal 1 to a careless check
    (lambda c: json.dumps({**c, "format_version": "1"}), r"format_version '1' \(str\).*the integer 1"),
    (lambda c: json.dumps({**c, "format_version": 1.0}), r"format_version 1.0 \(float\)"),
    (lambda c: json.dumps({**c, "format_version": True}), r"format_version True \(bool\)"),
    (lambda c: json.dumps({**c, "format_version": [1]}), r"format_version \[1\] \(list\)"),
    (lambda c: json.dumps({**c, "dtypes": "float32"}), "'dtypes' must be a list"),
    # a model field edited in at the top level would be silently ignored
    (lambda c: json.dumps({**c, "width": 96}), r"unknown top-level keys \['width'\].*go under 'config'"),
    (lambda c: json.dumps({**c, "model": ["ResidualCorrector"] * 1000}), r"describes a \['ResidualCorrector'.*\.\.\."),
    (lambda c: json.dumps(c) + " " * (2 << 20), "bytes; a config written by save_pretrained"),
])
def test_hostile_configs_fail_with_one_value_error_before_allocating(tmp_path, monkeypatch, hostile, pattern):
    folder = tmp_path / "c"
    make_corrector().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(hostile(config))
    _no_large_allocation(monkeypatch)
    with pytest.raises(ValueError, match=pattern) as info:
        ResidualCorrector.from_pretrained(folder)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


def test_a_weight_in_another_dtype_is_refused_before_loading(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "c"
    make_corrector().save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    name = sorted(state)[3]
    save_file({**state, name: state[name].to(torch.float16)}, str(folder / "model.safetensors"))
    _no_large_allocation(monkeypatch)
    with pytest.raises(ValueError, match=f"mix dtypes \\(float16, float32; e.g. {name}: torch.float16"):
        ResidualCorrector.from_pretrained(folder)
    # every weight in float64 while config.json says float32: the files do not belong together
    save_file({k: v.to(torch.float64) for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"says the weights are \['float32'\].*holds \['float64'\]"):
        ResidualCorrector.from_pretrained(folder)
    # a floating weight stored as integers
    save_file({**state, name: state[name].to(torch.int64)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"mix dtypes.*{name}: torch.int64"):
        ResidualCorrector.from_pretrained(folder)
    # a model saved in bfloat16 (config and weights agree) still loads, in bfloat16
    monkeypatch.undo()
    model = make_corrector().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = ResidualCorrector.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_from_pretrained_checks_dtype_and_device_arguments(tmp_path):
    make_corrector().save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        ResidualCorrector.from_pretrained(tmp_path / "c", dtype="float16")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        ResidualCorrector.from_pretrained(tmp_path / "c", dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device"):
        ResidualCorrector.from_pretrained(tmp_path / "c", device="gpu")


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    model = make_corrector()
    projector = LatentRewardProjector(projector_config())
    z0, text, pooled, mask = inputs()
    cases = [
        ((z0[0], text, pooled, mask), ValueError, "z0 must have 4 dimensions"),
        ((z0[:, :3], text, pooled, mask), ValueError, r"z0 must have shape \[B, C, H, W\] with C = latent_channels"),
        ((z0.int(), text, pooled, mask), TypeError, "z0 must have dtype"),
        ((z0, text[..., :8], pooled, mask), ValueError, "text_tokens must have shape"),
        ((z0, text, pooled[:1], mask), ValueError, "pooled must have shape"),
        ((z0, text, pooled, mask[:, :3]), ValueError, "text_mask must have shape"),
        ((z0, text, pooled, mask.float()), TypeError, "text_mask must have dtype"),
        (("z0", text, pooled, mask), TypeError, "z0 must be a torch.Tensor"),
    ]
    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            model(*args)
    with pytest.raises(ValueError, match="noise must have the shape of z0"):
        model.sample(z0, text, pooled, mask, noise=torch.randn(1, C, 6, 10))
    with pytest.raises(ValueError, match="alpha must be"):
        model.correct(z0, text, pooled, mask, alpha=float("nan"))
    with pytest.raises(ValueError, match="zc must have shape"):
        projector(z0[:, :2], text, pooled, mask)
    with pytest.raises(ValueError, match=r"aspect_mask must have shape \[B, 3\]"):
        projector(z0, text, pooled, mask, torch.ones(2, 2, dtype=torch.bool))
    out = projector(z0, text, pooled, mask)
    with pytest.raises(ValueError, match="target must have shape"):
        projector.loss(out, torch.rand(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="aspect_mask must have dtype bool"):
        projector.loss(out, torch.rand(2, 3), torch.ones(2, 3))
    with pytest.raises(TypeError, match="pred must be the ProjectorOutput"):
        projector.loss(out.scores, torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("field,value,pattern", [
    ("heads", 3, "width .* must be divisible by heads"),
    ("width", 30, "width must be a multiple of 4"),
    ("depth", 0, r"depth must be an integer in 1\.\.256, got 0"),
    ("depth", 10**9, r"depth must be an integer in 1\.\.256, got 1000000000"),
    ("width", 2**40, r"width must be an integer in 1\.\.16384"),
    ("ffn_mult", 1e12, "ffn_mult must be a finite number in"),
    ("patch", 1.5, "patch must be an integer"),
    ("dropout", 1.0, "dropout must be a finite number in"),
    ("ffn_mult", 0, "ffn_mult must be"),
    ("alpha", float("inf"), "alpha must be"),
    ("value_shares_trunk", 1, "value_shares_trunk must be a bool"),
    ("action_block", 0, r"action_block must be an integer in 1\.\.64, got 0"),
])
def test_config_validation_names_the_field(field, value, pattern):
    with pytest.raises(ValueError, match=f"CorrectorConfig: {pattern}"):
        corrector_config(**{field: value})


def test_config_dict_round_trip_and_presets():
    cfg = corrector_config(patch=2)
    assert CorrectorConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown fields"):
        CorrectorConfig.from_dict({**cfg.to_dict(), "depht": 3})
    with pytest.raises(ValueError, match="latent_channels"):
        CorrectorConfig.from_dict({"text_dim": 8, "pooled_dim": 8})
    with pytest.raises(ValueError, match="log_var_min"):
        projector_config(log_var_min=5.0, log_var_max=1.0)
    assert CorrectorConfig.preset("tiny").width == 32 and ProjectorConfig.preset("paper").patch == 2
    with pytest.raises(ValueError, match="'paper' or 'tiny'"):
        CorrectorConfig.preset("huge")
    # A misspelled override is named with the known fields (was Python's "unexpected keyword argument").
    with pytest.raises(ValueError, match=r"CorrectorConfig.preset: unknown fields \['widht'\] \(known: .*'width'"):
        CorrectorConfig.preset("tiny", widht=8)
    with pytest.raises(ValueError, match=r"ProjectorConfig.preset: unknown fields \['dept'\]"):
        ProjectorConfig.preset("paper", dept=2)
    with pytest.raises(TypeError, match="config must be a CorrectorConfig"):
        ResidualCorrector(projector_config())


def test_inference_refuses_non_finite_inputs_and_an_overflowing_correction():
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    for call in (model.correct, model.actions):
        name = call.__name__
        bad = z0.clone()
        bad[1, 0, 2, 3] = float("nan")
        with pytest.raises(ValueError, match=rf"ResidualCorrector.{name}: z0 holds 1 NaN or infinite value"):
            call(bad, text, pooled, mask)
        bad = pooled.clone()
        bad[0, 0] = float("inf")
        with pytest.raises(ValueError, match="pooled holds 1 NaN"):
            call(z0, text, bad, mask)
        bad = text.clone()
        bad[0, 0, 0] = float("nan")  # a real token
        with pytest.raises(ValueError, match="text_tokens holds 1 NaN"):
            call(z0, bad, pooled, mask)
        bad[0, 0, 0] = 0.0
        bad[0, -1] = float("nan")  # padding (mask False there) may hold anything
        out = call(z0, bad, pooled, mask)[0]
        assert torch.isfinite(out).all()
        for ints in (torch.int64, torch.uint8):  # a 0/1 integer mask too (its padding was checked as real tokens)
            torch.testing.assert_close(call(z0, bad, pooled, mask.to(ints))[0], out)
        with torch.no_grad():
            model.head.bias.fill_(3e38)  # finite inputs, a correction beyond float32
        with pytest.raises(ValueError, match=rf"{name}: the correction of z0 overflowed"):
            call(z0 * 1e38, text, pooled, mask)
        with torch.no_grad():
            model.head.bias.normal_(0, 0.1)


def test_the_training_calls_refuse_an_overflowing_correction_too():
    """forward, distribution and policy_and_value returned an inf or NaN correction (and NaN log-probs) for finite
    latents far beyond float32's reach; correct, actions and sample already refused that."""
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    calls = {"ResidualCorrector": lambda *a: model(*a), "distribution": lambda *a: model.distribution(*a).mean,
             "policy_and_value": lambda *a: model.policy_and_value(*a)[0].mean}
    with torch.no_grad():
        model.head.bias.fill_(3e38)  # finite inputs, a correction beyond float32
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name}: the correction of z0 overflowed in torch.float32 \(z0's "
                                             r"largest magnitude is 3\.\d+e\+38; .*scaling_factor"):
            call(z0 * 1e38, text, pooled, mask)
    with torch.no_grad():
        model.head.bias.normal_(0, 0.1)
    for call in calls.values():  # ordinary latents pass
        assert torch.isfinite(call(z0, text, pooled, mask)).all()


def test_forward_and_sample_refuse_non_finite_inputs_too():
    """The rollout step (sample) and the plain call returned NaN corrections and log-probs without a word."""
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    calls = {"sample": lambda *a: model.sample(*a), "ResidualCorrector": lambda *a: model(*a)}
    for name, call in calls.items():
        bad = z0.clone()
        bad[0, 1, 1, 1] = float("nan")
        with pytest.raises(ValueError, match=rf"{name}: z0 holds 1 NaN or infinite value"):
            call(bad, text, pooled, mask)
        with pytest.raises(ValueError, match=rf"{name}: pooled holds {pooled.numel()} NaN"):
            call(z0, text, pooled * float("inf"), mask)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        model.sample(z0, text, pooled, mask, generator="x")
    # meta tensors: the device check names them (the finite check called .item() on them)
    with pytest.raises(ValueError, match="z0 is on meta but the model is on cpu"):
        model.correct(z0.to("meta"), text, pooled, mask)


def test_training_path_methods_refuse_non_finite_inputs():
    """distribution / policy_and_value / value returned NaN means and values, sample took NaN noise or a NaN
    tensor alpha, log_prob NaN actions, all without a word, where forward() and correct() refused."""
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    bad = z0.clone()
    bad[0, 0, 0, 0] = float("nan")
    for name in ("distribution", "policy_and_value", "value"):
        with pytest.raises(ValueError, match=rf"ResidualCorrector.{name}: z0 holds 1 NaN or infinite value"):
            getattr(model, name)(bad, text, pooled, mask)
        getattr(model, name)(z0, text, pooled, mask)  # finite inputs still run
    noise = torch.randn_like(z0)
    noise[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="ResidualCorrector.sample: noise holds 1 NaN or infinite"):
        model.sample(z0, text, pooled, mask, noise=noise)
    alpha = torch.tensor([float("nan"), 1.0])
    for call in (model.sample, model.correct):
        with pytest.raises(ValueError, match=rf"ResidualCorrector.{call.__name__}: alpha holds 1 NaN or infinite"):
            call(z0, text, pooled, mask, alpha=alpha)
        call(z0, text, pooled, mask, alpha=torch.tensor([0.5, 1.0]))
    mean = model.distribution(z0, text, pooled, mask).mean
    delta = mean.detach().clone()
    delta[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="ResidualCorrector.log_prob: delta holds 1 NaN"):
        model.log_prob(delta, mean)
    with pytest.raises(ValueError, match="ResidualCorrector.log_prob: mean holds 1 NaN"):
        model.log_prob(mean.detach(), delta)
    assert torch.isfinite(model.log_prob(mean.detach(), mean)).all()


def test_sample_refuses_an_overflowing_correction_as_correct_does():
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    with torch.no_grad():
        model.head.bias.fill_(3e38)
    noise = torch.zeros_like(z0)
    with pytest.raises(ValueError, match="ResidualCorrector.sample: the correction of z0 overflowed"):
        model.sample(z0 * 1e38, text, pooled, mask, noise=noise)
    with torch.no_grad():  # float16 latents: a correction finite in float32 overflows when cast back
        model.head.bias.fill_(1e5)
    with pytest.raises(ValueError, match="ResidualCorrector.sample: the correction of z0 overflowed in torch.float16"):
        model.sample(z0.half(), text, pooled, mask, noise=noise)
    with torch.no_grad():  # a huge step, not z0, is the cause: the message gives both
        model.head.bias.normal_(0, 0.1)
    with pytest.raises(ValueError, match=r"z0's largest magnitude is [0-9.]+, alpha's 1e\+05"):
        model.sample(z0.half(), text, pooled, mask, noise=noise, alpha=torch.tensor([1e5, 1e5]))


def test_projector_refuses_non_finite_inputs_and_bad_targets():
    projector = LatentRewardProjector(projector_config()).eval()
    z0, text, pooled, mask = inputs()
    bad = z0.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="LatentRewardProjector: zc holds 1 NaN or infinite value"):
        projector(bad, text, pooled, mask)
    with pytest.raises(ValueError, match="LatentRewardProjector: pooled holds"):
        projector(z0, text, pooled * float("inf"), mask)
    with pytest.raises(ValueError, match="LatentRewardProjector: the predicted scores are NaN for finite inputs"):
        projector(z0 * 1e30, text, pooled, mask)
    out = projector(z0, text, pooled, mask)
    present = torch.tensor([[True, False, True], [True, True, False]])
    target = torch.tensor([[0.5, float("nan"), 0.2], [0.1, 0.2, float("nan")]])  # NaN only where absent: fine
    assert torch.isfinite(projector.loss(out, target, present).loss)
    for value, shown in ((float("nan"), "nan"), (255.0, "255"), (-1.5, "-1.5")):
        t = target.clone()
        t[0, 0] = value
        with pytest.raises(ValueError, match=rf"target must hold finite sub-rewards in \[-1, 1\].*1 of 4 outside "
                                             rf"it \(e.g. {shown}"):
            projector.loss(out, t, present)
    t = target.clone()
    t[0, 2] = -0.3  # a CLIP-style source's color cosine may go below 0: still a target
    assert torch.isfinite(projector.loss(out, t, present).loss)
    with pytest.raises(ValueError, match="target must be on the scores' device cpu, got meta"):
        projector.loss(out, target.to("meta"), present)
    with torch.no_grad():  # diverged weights are named, not blamed on zc's scale
        projector.readout_bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"projector's weights hold NaN or infinite values \(readout_bias\): its "
                                         r"training diverged"):
        projector(z0, text, pooled, mask)


def test_corrector_and_projector_compile_without_graph_breaks():
    # backend="eager" checks that the whole forward traces as one graph (ops, masks, checks)
    # without paying for Inductor code generation on the CPU.
    model = make_corrector(nonzero_head=True, patch=2).eval()
    projector = LatentRewardProjector(projector_config()).eval()
    z0, text, pooled, mask = inputs(h=8, w=8)
    compiled = torch.compile(lambda: model.correct(z0, text, pooled, mask), fullgraph=True, backend="eager")
    for got, want in zip(compiled(), model.correct(z0, text, pooled, mask)):
        assert_close(got, want)
    compiled = torch.compile(lambda: projector(z0, text, pooled, mask).scores, fullgraph=True, backend="eager")
    assert_close(compiled(), projector(z0, text, pooled, mask).scores)


def test_the_move_head_copies_cells_and_is_the_identity_at_initialisation(tmp_path):
    """CorrectorConfig.move: Delta = copy_cells(z0, sources) - z0 + residual; zero at init; saved and loaded."""
    from xlard.models import copy_cells, largest_parts, move_sources

    torch.manual_seed(0)
    cfg = CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8, patch=2, width=16, depth=1, heads=2,
                               cond_dim=8, move=True, move_range=3)
    corrector = ResidualCorrector(cfg)
    z0, tokens, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(corrector(z0, tokens, pooled), torch.zeros_like(z0))
        assert torch.equal(corrector.sources(z0, tokens, pooled), torch.arange(64).expand(2, 64))
        corrector.move_label.weight.normal_(std=3.0)  # some cells become a subject's or an object's
        corrector.head.weight.normal_(std=0.1)
        src = corrector.sources(z0, tokens, pooled)
        assert (src != torch.arange(64)).any()
        residual, logits = corrector.distill_outputs(z0, tokens, pooled)
        labels, shifts, nouns = logits
        assert nouns is None  # no auxiliary noun head (move_nouns 0)
        assert labels.shape == (2, 64, 3) and shifts.shape == (2, 2, 2, 7)
        assert torch.equal(src, move_sources(largest_parts(labels.argmax(-1), 8, 8), shifts.argmax(-1) - 3, 8, 8))
        expected = copy_cells(z0, src) - z0 + residual
        torch.testing.assert_close(corrector(z0, tokens, pooled), expected)
        zc, _ = corrector.correct(z0, tokens, pooled, alpha=1.0)
        torch.testing.assert_close(zc, copy_cells(z0, src) + residual)
    corrector.save_pretrained(tmp_path / "c")
    again = ResidualCorrector.from_pretrained(tmp_path / "c")
    assert again.config.move and again.config.move_range == 3
    with torch.no_grad():
        torch.testing.assert_close(again(z0, tokens, pooled), corrector(z0, tokens, pooled))
    plain = ResidualCorrector(cfg.replace(move=False))
    assert torch.equal(plain.sources(z0, tokens, pooled), torch.arange(64).expand(2, 64))
    assert count_parameters(cfg) > count_parameters(cfg.replace(move=False))
    with pytest.raises(ValueError, match="move"):
        cfg.replace(move="yes")


def test_move_sources_shift_the_labelled_cells_and_fill_what_they_leave():
    from xlard.models import move_sources

    labels = torch.zeros(1, 16, dtype=torch.int64)
    labels[0, 5] = 1          # the subject at (1, 1)
    labels[0, 14] = 2         # the object at (3, 2)
    shifts = torch.tensor([[[0, 2], [-3, 0]]])  # subject two columns right, object three rows up
    src = move_sources(labels, shifts, 4, 4)[0].view(4, 4)
    assert src[1, 3] == 5 and src[0, 2] == 14              # the copies land at the shifted places
    assert src[1, 1] != 5 and labels[0, src[1, 1]] == 0    # the cells they left copy an unlabelled cell
    assert src[3, 2] != 14 and labels[0, src[3, 2]] == 0
    assert torch.equal(move_sources(torch.zeros(2, 16, dtype=torch.int64), torch.zeros(2, 2, 2, dtype=torch.int64),
                                    4, 4), torch.arange(16).repeat(2, 1))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        move_sources(labels.float(), shifts, 4, 4)
    with pytest.raises(ValueError, match="shifts must be an integer tensor"):
        move_sources(labels, shifts[:, :1], 4, 4)
    with pytest.raises(ValueError, match="labels must be 0"):
        move_sources(labels * 2, shifts, 4, 4)


def test_largest_parts_keeps_one_connected_part_per_label():
    from xlard.models import largest_parts

    labels = torch.zeros(2, 16, dtype=torch.int64)
    labels[0, [0, 1, 4, 15]] = 1   # a part of three cells and a stray cell
    labels[0, 10] = 2
    kept = largest_parts(labels, 4, 4)
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 4, 10] and kept[0, 10] == 2
    assert torch.equal(kept[1], labels[1])


def test_copy_cells_gathers_and_checks_its_source_map():
    from xlard.models import copy_cells

    z = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    out = copy_cells(z, torch.tensor([[3, 3, 0, 1], [0, 1, 2, 3]]))
    assert out[0, 0].flatten().tolist() == [3.0, 3.0, 0.0, 1.0] and torch.equal(out[1], z[1])
    with pytest.raises(ValueError, match="source must be an integer tensor of shape"):
        copy_cells(z, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="source must be an integer tensor of shape"):
        copy_cells(z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        copy_cells(z, torch.full((2, 4), 4))


SHAPES_NOUNS = ("circle", "square", "triangle", "diamond")
SHAPES_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


def _reader_config(**changes):
    base = dict(latent_channels=8, text_dim=64, pooled_dim=64, patch=2, conditioning="fields", reader=True,
                reader_nouns=SHAPES_NOUNS, reader_colors=SHAPES_COLORS, reader_width=8)
    base.update(changes)
    return CorrectorConfig.tiny(**base)


def test_slot_fields_read_the_first_two_entities_back_from_the_field_tokens():
    from xlard.models import field_inputs, slot_fields
    from xlard.prompts import parse

    cfg = _reader_config()
    prompts = ["a photo of a blue square left of a green triangle", "a photo of three red circles",
               "a photo of a dog", "a photo of a purple diamond and a white dog", "a photo of a circle below a cat"]
    inputs = field_inputs(cfg, [parse(p) for p in prompts])
    nouns, colors = slot_fields(cfg, inputs["text_tokens"], inputs["text_mask"])
    assert nouns.tolist() == [[1, 2], [0, -1], [-1, -1], [3, -1], [0, -1]]
    assert colors.tolist() == [[4, 3], [0, -1], [-1, -1], [5, 9], [-1, -1]]
    # Padded tokens match nothing, even when they hold a known field's vector.
    tokens, mask = inputs["text_tokens"].clone(), inputs["text_mask"].clone()
    tokens[1, -1], mask[1, -1] = inputs["text_tokens"][0, 0], False
    assert torch.equal(slot_fields(cfg, tokens, mask)[0][1], nouns[1])


def test_field_read_backs_resolve_several_matches_in_one_slot_as_a_scan_over_the_keys_would():
    """Hand-made token rows with several matching field tokens in one slot: a noun or color slot keeps the last
    word of the reader's list that matches, a count slot the largest count, and the relation the first of
    RELATIONS (the read-backs are vectorised; this pins what the scan over the keys they replaced did)."""
    from xlard.models import MAX_FIELD_COUNT, count_fields, relation_fields, slot_fields
    from xlard.prompts.fields import field_vector
    from xlard.vocab import RELATIONS

    cfg = _reader_config()
    dim = cfg.text_dim

    def token(kind, value, slot):
        return field_vector(kind, value, dim) + field_vector("slot", slot, dim)

    rows = [
        [token("noun", cfg.reader_nouns[2], "0:noun"), token("noun", cfg.reader_nouns[0], "0:noun"),
         token("color", cfg.reader_colors[1], "1:color"), token("color", cfg.reader_colors[4], "1:color"),
         token("count", 5, "0:count"), token("count", 2, "0:count"), token("count", MAX_FIELD_COUNT, "1:count"),
         token("relation", RELATIONS[2], "relation:1->0"), token("relation", RELATIONS[1], "relation:0->1")],
        [token("noun", cfg.reader_nouns[1], "1:noun"), token("relation", RELATIONS[3], "relation:1->0")],
    ]
    tokens = torch.zeros(2, max(map(len, rows)), dim)
    mask = torch.zeros(2, tokens.shape[1], dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = torch.stack(row), True
    nouns, colors = slot_fields(cfg, tokens, mask)
    assert nouns.tolist() == [[2, -1], [-1, 1]] and colors.tolist() == [[-1, 4], [-1, -1]]
    assert count_fields(cfg, tokens, mask).tolist() == [[5, MAX_FIELD_COUNT], [-1, -1]]
    assert relation_fields(cfg, tokens, mask).tolist() == [[1, 0, 1], [3, 1, 0]]


def test_the_reader_adds_its_maps_to_the_trunk_without_gradient_and_round_trips(tmp_path):
    from xlard.models import READER_CHANNELS, field_inputs
    from xlard.prompts import parse

    torch.manual_seed(0)
    corrector = ResidualCorrector(_reader_config())
    assert corrector.trunk.patch_embed.in_features == (8 + READER_CHANNELS) * 4
    assert not any(p.requires_grad for p in corrector.reader.parameters())
    assert corrector.num_parameters() == ResidualCorrector(_reader_config(reader=False)).num_parameters() \
        + READER_CHANNELS * 4 * corrector.config.width
    specs = [parse("a photo of a blue square left of a green triangle"), parse("a photo of a dog")]
    inputs = field_inputs(corrector.config, specs)
    z0 = torch.randn(2, 8, 16, 16, requires_grad=True)
    assert torch.equal(corrector(z0, **inputs), torch.zeros_like(z0))  # still exactly zero at initialisation
    evidence = corrector.read(z0, inputs["text_tokens"], inputs["text_mask"])
    assert evidence.shape == (2, READER_CHANNELS, 16, 16) and not evidence.requires_grad
    noun_p, color_p = corrector.reader.maps(z0.detach())
    assert torch.allclose(evidence[0, 0], noun_p[0, 1]) and torch.allclose(evidence[0, 1], color_p[0, 1 + 4])
    assert torch.allclose(evidence[0, 2], noun_p[0, 2]) and torch.allclose(evidence[0, 3], color_p[0, 1 + 3])
    assert torch.equal(evidence[1], torch.zeros_like(evidence[1]))  # an unknown noun, no color: nothing to read
    # The trunk sees the maps: changing the reader changes the features.
    torch.nn.init.normal_(corrector.head.weight)
    before = corrector(z0, **inputs).detach()
    with torch.no_grad():
        corrector.reader.out.bias.add_(3.0)
    assert not torch.allclose(corrector(z0, **inputs), before)
    corrector.save_pretrained(tmp_path / "c")
    again = ResidualCorrector.from_pretrained(tmp_path / "c")
    assert again.config == corrector.config and torch.equal(again(z0, **inputs), corrector(z0, **inputs))
    with pytest.raises(ValueError, match="has no reader"):
        ResidualCorrector(_reader_config(reader=False)).read(z0, inputs["text_tokens"], inputs["text_mask"])
    with pytest.raises(ValueError, match="text_tokens"):
        corrector.read(z0, inputs["text_tokens"][..., :5], inputs["text_mask"])
    with pytest.raises(ValueError, match="z0"):
        corrector.read(z0[:, :3], inputs["text_tokens"], inputs["text_mask"])


@pytest.mark.parametrize("changes, pattern", [
    ({"conditioning": "text"}, "reader needs conditioning 'fields'"),
    ({"reader_nouns": ()}, "reader needs reader_nouns"),
    ({"reader_nouns": ("circle", "circle")}, "reader_nouns lists a word twice"),
    ({"reader_colors": ("red", "")}, "reader_colors must be a list of non-empty words"),
    ({"reader_width": 12}, "reader_width must be a multiple of 8"),
    ({"reader": 1}, "reader must be a bool"),
])
def test_reader_config_checks_name_the_field(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        _reader_config(**changes)
    assert CorrectorConfig.from_dict(_reader_config().to_dict() | {"reader_nouns": list(SHAPES_NOUNS)}) \
        == _reader_config()


def test_relation_fields_read_the_relation_and_which_entity_is_its_subject():
    import dataclasses

    from xlard.models import field_inputs, relation_fields
    from xlard.prompts import parse
    from xlard.prompts.spec import Relation

    cfg = _reader_config()
    specs = [parse("a photo of a blue square left of a green triangle"), parse("a photo of a circle below a square"),
             parse("a photo of three red circles"), parse("a photo of a diamond above a dog")]
    # The same two entities, the relation pointing the other way: the slot names the subject.
    specs.append(dataclasses.replace(specs[0], relations=(Relation(1, "right_of", 0),)))
    inputs = field_inputs(cfg, specs)
    got = relation_fields(cfg, inputs["text_tokens"], inputs["text_mask"])
    assert got.tolist() == [[0, 0, 1], [3, 0, 1], [-1, -1, -1], [2, 0, 1], [1, 1, 0]]
    tokens, mask = inputs["text_tokens"].clone(), inputs["text_mask"].clone()
    last = int(mask[0].sum()) - 1  # the relation's token is the last real one
    mask[0, last] = False  # a padded token matches nothing, even holding a relation's vector
    assert relation_fields(cfg, tokens, mask)[0].tolist() == [-1, -1, -1]


def _blob(grid: torch.Tensor, rows: slice, cols: slice, p: float = 0.9) -> None:
    grid[rows, cols] = p


def test_reader_move_sources_carry_out_the_relation_on_the_noun_maps():
    from xlard.models import READER_MOVE_FACTOR, copy_cells, reader_move_sources
    from xlard.shapes.editor import move_plan

    h = w = 16
    probs = torch.zeros(4, 4, h, w)
    _blob(probs[0, 1], slice(6, 9), slice(11, 14))   # row 0: the square (subject) right of the triangle
    _blob(probs[0, 2], slice(6, 9), slice(2, 5))
    _blob(probs[1, 0], slice(2, 5), slice(6, 9))     # row 1: the circle above the diamond, by far
    _blob(probs[1, 3], slice(12, 15), slice(6, 9))
    probs[2] = probs[0]                              # row 2: as row 0, but the prompt has no relation
    probs[3] = probs[0]                              # row 3: the subject's noun is unknown to the reader
    nouns = torch.tensor([[1, 2], [0, 3], [1, 2], [-1, 2]])
    relations = torch.tensor([[0, 0, 1], [2, 0, 1], [-1, -1, -1], [0, 0, 1]])   # left_of, above
    identity = torch.arange(h * w).expand(4, -1)

    src = reader_move_sources(probs, nouns, relations, margin=1.0)
    assert torch.equal(src[2:], identity[2:]) and not torch.equal(src[0], identity[0])
    # Moved: the subject's mass now lies left of the object's, each about a quarter of the axis from the edge.
    moved = copy_cells(torch.stack([probs[0, 1], probs[0, 2]])[None], src[:1])[0]
    cols = torch.arange(w, dtype=torch.float32)
    centre = [(m.sum(0) * cols).sum() / m.sum() for m in moved]
    assert centre[0] < 0.4 * w and centre[1] > 0.6 * w
    assert moved[0].sum() == probs[0, 1].sum() and moved[1].sum() == probs[0, 2].sum()  # copied whole, not painted
    # Margin 1.0 moves a relation that already holds; a small margin leaves it alone.
    assert not torch.equal(src[1], identity[1])
    assert torch.equal(reader_move_sources(probs, nouns, relations, margin=0.1)[1], identity[1])
    # The same rule as the editor's move targets, given the same maps upsampled.
    from xlard.prompts import parse

    specs = [parse("a photo of a square left of a triangle"), parse("a photo of a circle above a diamond")]
    up = torch.nn.functional.interpolate(probs[:2], scale_factor=READER_MOVE_FACTOR, mode="bilinear",
                                         align_corners=False)
    plan = move_plan(torch.zeros(2, 1, h, w), up, up[:, :1], specs, SHAPES_NOUNS, margin=64)
    assert torch.equal(plan.sources, src[:2])


def test_reader_move_moves_the_corrected_latent_and_round_trips(tmp_path):
    from xlard.models import copy_cells, field_inputs, reader_move_sources, relation_fields, slot_fields
    from xlard.prompts import parse

    torch.manual_seed(0)
    corrector = ResidualCorrector(_reader_config(reader_move=True))
    plain = ResidualCorrector(_reader_config())
    plain.load_state_dict(corrector.state_dict())
    probs = torch.zeros(2, 4, 16, 16)
    _blob(probs[0, 1], slice(6, 9), slice(11, 14))
    _blob(probs[0, 2], slice(6, 9), slice(2, 5))
    probs[1] = probs[0]
    colors = torch.full((2, 11, 16, 16), 1 / 11)
    for c in (corrector, plain):
        c.reader.maps = lambda z, p=probs, q=colors: (p[:z.shape[0]], q[:z.shape[0]])
    specs = [parse("a photo of a square left of a triangle"), parse("a photo of a square and a triangle")]
    inputs = field_inputs(corrector.config, specs)
    z0 = torch.randn(2, 8, 16, 16)
    src = reader_move_sources(probs, slot_fields(corrector.config, inputs["text_tokens"], inputs["text_mask"])[0],
                              relation_fields(corrector.config, inputs["text_tokens"], inputs["text_mask"]))
    assert torch.equal(corrector.sources(z0, **inputs), src)
    assert torch.equal(src[1], torch.arange(256))  # no relation asked: nothing moves
    # At initialisation the correction is the move alone; with a residual, the residual travels with its cells.
    assert torch.allclose(corrector(z0, **inputs), copy_cells(z0, src) - z0)
    with torch.no_grad():
        torch.nn.init.normal_(corrector.head.weight, std=0.1)
        plain.head.weight.copy_(corrector.head.weight)
    residual = plain(z0, **inputs)
    delta = corrector(z0, **inputs)
    assert torch.allclose(delta, copy_cells(z0 + residual, src) - z0, atol=1e-6)
    assert torch.allclose(delta[1], residual[1], atol=1e-6)
    # The residual still learns through the move (a gather), the move itself has no parameters.
    corrector.distribution(z0, **inputs).mean.square().sum().backward()
    assert corrector.head.weight.grad is not None and corrector.head.weight.grad.abs().sum() > 0
    del corrector.reader.maps
    corrector.save_pretrained(tmp_path / "c")
    again = ResidualCorrector.from_pretrained(tmp_path / "c")
    assert again.config.reader_move and again.config == corrector.config
    assert torch.equal(again(z0, **inputs), corrector(z0, **inputs))


@pytest.mark.parametrize("changes, pattern", [
    ({"reader": False, "reader_move": True}, "reader_move needs reader: true"),
    ({"reader_move": True, "move": True}, "reader_move and move both move"),
    ({"reader_move": 1}, "reader_move must be a bool"),
    ({"reader_move_margin": 1.5}, r"reader_move_margin must be a finite number in \[0.0, 1.0\]"),
    ({"reader_move_margin": float("nan")}, "reader_move_margin must be a finite number"),
])
def test_reader_move_config_checks_name_the_field(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        _reader_config(**changes)


def test_count_fields_read_each_entitys_count():
    from xlard.models import count_fields, field_inputs
    from xlard.prompts import parse

    cfg = _reader_config()
    specs = [parse("a photo of three red circles"), parse("a photo of a square and two triangles"),
             parse("a photo of a diamond"), parse("a photo of eight squares")]
    inputs = field_inputs(cfg, specs)
    assert count_fields(cfg, inputs["text_tokens"], inputs["text_mask"]).tolist() == [[3, -1], [1, 2], [1, -1],
                                                                                    [8, -1]]
    mask = inputs["text_mask"].clone()
    mask[0] = False  # padding matches nothing
    assert count_fields(cfg, inputs["text_tokens"], mask)[0].tolist() == [-1, -1]
    # an entity asked absent reads 0 (it read -1, "no entity": the count edit then depended on word order)
    inputs = field_inputs(cfg, [parse("a photo of three circles and no squares"),
                                parse("a photo of no squares and three circles")])
    assert count_fields(cfg, inputs["text_tokens"], inputs["text_mask"]).tolist() == [[3, 0], [0, 3]]


def test_counting_rows_take_the_counted_entity_beside_one_asked_absent_in_either_order():
    """"three circles and no squares" was a counting row, "no squares and three circles" was not."""
    from xlard.models import field_inputs
    from xlard.prompts import parse

    corrector = ResidualCorrector(_reader_config())
    prompts = ["a photo of three circles and no squares", "a photo of no squares and three circles",
               "a photo of three circles", "a photo of three circles and twenty squares",
               "a photo of twenty squares and three circles", "a photo of a square and two triangles",
               "a photo of no circles"]
    inputs = field_inputs(corrector.config, [parse(p) for p in prompts])
    rows, nouns, counts, second = corrector._counting_rows(None, inputs["text_tokens"], inputs["text_mask"])
    assert rows.tolist() == [0, 1, 2, 3, 4]
    circle = SHAPES_NOUNS.index("circle")
    assert nouns[:5, 0].tolist() == [circle] * 5 and counts[:5, 0].tolist() == [3] * 5
    assert second.tolist() == [False, True, False, False, True, False, False]


def test_relation_cells_never_give_the_subjects_own_cells_to_the_object():
    """Each object's cells were grown by a latent cell and the object labelled last: where the two were close its
    ring took the subject's own cells, and part of the subject moved with the object."""
    from xlard.models import relation_cells

    subject = torch.zeros(64, 64, dtype=torch.bool)
    object_ = torch.zeros(64, 64, dtype=torch.bool)
    subject[24:36, 38:50] = True  # the subject right of the object, 3 px apart: "left of" is reversed
    object_[24:36, 23:35] = True
    labels, shifts = relation_cells(subject, object_, "left_of", (16, 16), 6)
    under = torch.nn.functional.max_pool2d(subject.float()[None, None], 4)[0, 0] > 0
    assert (labels[under] == 1).all()  # every cell under the subject moves with the subject
    under_object = torch.nn.functional.max_pool2d(object_.float()[None, None], 4)[0, 0] > 0
    assert (labels[under_object & ~under] == 2).all()
    assert shifts[0, 1] < 0 < shifts[1, 1]


def test_reader_move_leaves_a_relation_with_an_entity_asked_absent():
    """"a circle left of no squares" moved the forbidden square to the right ("moved 76 latent cells")."""
    from xlard.models import field_inputs
    from xlard.prompts import parse

    corrector = ResidualCorrector(_reader_config(reader_move=True))
    probs = torch.zeros(2, 4, 16, 16)
    _blob(probs[0, SHAPES_NOUNS.index("circle")], slice(6, 9), slice(11, 14))
    _blob(probs[0, SHAPES_NOUNS.index("square")], slice(6, 9), slice(2, 5))
    probs[1] = probs[0]
    colors = torch.full((2, 11, 16, 16), 1 / 11)
    corrector.reader.maps = lambda z, p=probs, q=colors: (p[:z.shape[0]], q[:z.shape[0]])
    inputs = field_inputs(corrector.config, [parse("a photo of a circle left of no squares"),
                                             parse("a photo of a circle left of a square")])
    src = corrector.sources(torch.randn(2, 8, 16, 16), **inputs)
    assert torch.equal(src[0], torch.arange(256))
    assert not torch.equal(src[1], torch.arange(256))


def _scene_maps(objects, size=64, nouns=4):
    """Eyes' maps of a scene: ``objects`` = [(noun index, y0, x0, y1, x1, probability)] -> (probs, foreground)."""
    probs, fg = torch.zeros(nouns, size, size), torch.zeros(size, size)
    for noun, y0, x0, y1, x1, p in objects:
        probs[noun, y0:y1, x0:x1] = p
        probs[:, y0:y1, x0:x1] += (1 - p) / nouns  # the rest spread over every noun
        fg[y0:y1, x0:x1] = 1.0
    return probs, fg


def test_count_move_sources_erase_add_and_replace_objects_by_copying_cells():
    from xlard.models import copy_cells, count_move_sources

    h = w = 16
    identity = torch.arange(h * w)
    scenes = [
        [(0, 4, 4, 12, 12, 0.95), (0, 4, 40, 12, 48, 0.9), (0, 40, 20, 48, 28, 0.8)],   # 3 circles, 2 asked
        [(0, 4, 4, 12, 12, 0.95)],                                                       # 1 circle, 2 asked
        [(0, 4, 4, 12, 12, 0.95), (1, 40, 40, 48, 48, 0.9)],                             # circle + square, 2 asked
        [(0, 4, 4, 12, 12, 0.95), (0, 40, 40, 48, 48, 0.9)],                             # right already
        [(1, 4, 4, 12, 12, 0.95), (1, 40, 40, 48, 48, 0.9)],                             # no circle at all
        [(0, 4, 4, 12, 12, 0.95)],                                                       # a count of 1
    ]
    maps = [_scene_maps(s) for s in scenes]
    probs, fg = torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps])
    nouns = torch.tensor([0, 0, 0, 0, 0, 0])
    counts = torch.tensor([2, 2, 2, 2, 2, 1])
    src = count_move_sources(probs, fg, nouns, counts, (h, w))
    for i in (3, 4, 5):
        assert torch.equal(src[i], identity), i
    # A marker latent: each object's cells hold its own value, so copies can be followed.
    z = torch.zeros(6, 1, h, w)
    for i, scene in enumerate(scenes):
        for k, (_, y0, x0, y1, x1, _) in enumerate(scene):
            z[i, 0, y0 // 4:(y1 - 1) // 4 + 1, x0 // 4:(x1 - 1) // 4 + 1] = k + 1
    out = copy_cells(z, src)[:, 0]
    # Surplus: the least confident circle is gone, the other two stay.
    assert (out[0] == 3).sum() == 0 and (out[0] == 1).sum() == 4 and (out[0] == 2).sum() == 4
    # Missing: a second copy of the circle, away from the first.
    assert (out[1] == 1).sum() == 8
    ys, xs = torch.nonzero(out[1] == 1, as_tuple=True)
    assert (ys.max() - ys.min() > 4) or (xs.max() - xs.min() > 4)
    # Another shape kept to make up the count: replaced by a copy of the circle where it was.
    assert (out[2] == 2).sum() == 0 and (out[2] == 1).sum() == 8 and out[2, 10:12, 10:12].eq(1).all()
    # The share: a circle whose circle probability is under it does not count as one.
    weak = _scene_maps([(0, 4, 4, 12, 12, 0.95), (0, 40, 40, 48, 48, 0.5)])
    strict = count_move_sources(weak[0][None], weak[1][None], nouns[:1], counts[:1], (h, w), share=0.9)
    assert not torch.equal(strict[0], identity)
    assert torch.equal(count_move_sources(weak[0][None], weak[1][None], nouns[:1], counts[:1], (h, w), share=0.5)[0],
                       identity)


@pytest.mark.parametrize("args, pattern", [
    ((torch.zeros(2, 4, 64, 64), torch.zeros(2, 32, 32), torch.zeros(2, dtype=torch.long),
      torch.zeros(2, dtype=torch.long), (16, 16)), "foreground"),
    ((torch.zeros(2, 4, 60, 64), torch.zeros(2, 60, 64), torch.zeros(2, dtype=torch.long),
      torch.zeros(2, dtype=torch.long), (16, 16)), "whole multiple"),
    ((torch.zeros(2, 4, 64, 64), torch.zeros(2, 64, 64), torch.zeros(3, dtype=torch.long),
      torch.zeros(2, dtype=torch.long), (16, 16)), "nouns must be an integer tensor \\[B\\]"),
])
def test_count_move_sources_refuse_inconsistent_maps(args, pattern):
    from xlard.models import count_move_sources

    with pytest.raises(ValueError, match=pattern):
        count_move_sources(*args)


def _with_and_without(**option):
    """A reader corrector with ``option`` on and the same one without it, sharing a nonzero head."""
    torch.manual_seed(0)
    corrector = ResidualCorrector(_reader_config(**option))
    plain = ResidualCorrector(_reader_config())
    plain.load_state_dict(corrector.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(corrector.head.weight, std=0.1)
        plain.head.weight.copy_(corrector.head.weight)
    return corrector, plain


def test_count_move_acts_on_counting_prompts_only_with_the_attached_eyes(tmp_path):
    from xlard.models import copy_cells, count_move_sources, field_inputs
    from xlard.prompts import parse

    corrector, plain = _with_and_without(count_move=True)
    probs, fg = _scene_maps([(0, 4, 4, 12, 12, 0.95)])
    seen = []

    def eyes(z):
        seen.append(z.shape[0])
        return probs.expand(z.shape[0], -1, -1, -1), fg.expand(z.shape[0], -1, -1)

    corrector.attach_eyes(eyes)
    specs = [parse("a photo of two circles"), parse("a photo of a circle"), parse("a photo of a red circle and a "
                                                                                  "square")]
    inputs = field_inputs(corrector.config, specs)
    z0 = torch.randn(3, 8, 16, 16)
    residual = plain(z0, **inputs)
    delta = corrector(z0, **inputs)
    assert seen == [1]  # only the counting prompt is looked at
    src = count_move_sources(probs[None], fg[None], torch.tensor([0]), torch.tensor([2]), (16, 16))
    assert not torch.equal(src[0], torch.arange(256))
    assert torch.allclose(delta[0], (copy_cells((z0 + residual)[:1], src) - z0[:1])[0], atol=1e-6)
    assert torch.allclose(delta[1:], residual[1:], atol=1e-6)
    assert torch.equal(corrector.sources(z0, **inputs)[0], src[0])
    assert torch.equal(corrector.sources(z0, **inputs)[1:], torch.arange(256).repeat(2, 1))
    # The eyes are not part of the saved corrector.
    corrector.save_pretrained(tmp_path / "c")
    again = ResidualCorrector.from_pretrained(tmp_path / "c").attach_eyes(eyes)
    assert again.config.count_move and torch.equal(again(z0, **inputs), delta)
    with pytest.raises(TypeError, match="eyes must be callable"):
        corrector.attach_eyes("shapes")


@pytest.mark.parametrize("changes, pattern", [
    ({"reader": False, "count_move": True}, "count_move needs reader: true"),
    ({"count_move": "yes"}, "count_move must be a bool"),
    ({"count_move": True, "move": True}, "choose count_move or move"),
    ({"count_move_share": -0.1}, r"count_move_share must be a finite number in \[0.0, 1.0\]"),
])
def test_count_move_config_checks_name_the_field(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        _reader_config(**changes)


class _EditEyes:
    """Eyes for count_edit: record what they are asked, 'encode' to a constant on a fixed block of cells."""

    def __init__(self):
        self.asked = []

    def __call__(self, z):  # count_move's interface: never used by count_edit
        raise AssertionError("count_edit must not count through __call__")

    def edit_counts(self, z, nouns, counts):
        self.asked.append((z.detach().clone(), list(nouns), list(counts)))
        touched = torch.zeros(z.shape[0], 1, *z.shape[-2:], dtype=torch.bool)
        touched[..., 2:6, 3:9] = True
        return torch.full_like(z, 7.0), touched, [["redrew"]] * z.shape[0]


def test_count_edit_replaces_the_touched_cells_of_counting_prompts_only(tmp_path):
    from xlard.models import field_inputs
    from xlard.prompts import parse

    corrector, plain = _with_and_without(count_edit=True)
    eyes = _EditEyes()
    corrector.attach_eyes(eyes)
    specs = [parse("a photo of a circle"), parse("a photo of three squares"),
             parse("a photo of a red circle and a square"), parse("a photo of four triangles")]
    inputs = field_inputs(corrector.config, specs)
    z0 = torch.randn(4, 8, 16, 16)
    residual = plain(z0, **inputs)
    delta = corrector(z0, **inputs)
    # Only the counting prompts are edited, from z0 + residual, with their noun and count.
    (z, nouns, counts), = eyes.asked
    assert nouns == ["square", "triangle"] and counts == [3, 4]
    assert torch.allclose(z, (z0 + residual)[[1, 3]], atol=1e-6)
    assert torch.allclose(delta[[0, 2]], residual[[0, 2]], atol=1e-6)
    block = torch.zeros(16, 16, dtype=torch.bool)
    block[2:6, 3:9] = True
    for i in (1, 3):
        assert torch.allclose(delta[i][:, block], 7.0 - z0[i][:, block], atol=1e-6)   # the edit's encoding
        assert torch.allclose(delta[i][:, ~block], residual[i][:, ~block], atol=1e-6)  # the residual elsewhere
    # The residual keeps its gradient where the edit did not write.
    z0.requires_grad_(False)
    corrector.zero_grad()
    out = corrector(z0, **inputs)
    out[1][:, ~block].sum().backward()
    assert corrector.head.weight.grad is not None and float(corrector.head.weight.grad.abs().sum()) > 0
    corrector.zero_grad()
    out = corrector(z0, **inputs)
    out[1][:, block].sum().backward()
    assert corrector.head.weight.grad is None or float(corrector.head.weight.grad.abs().sum()) == 0
    # Nothing is moved (sources() names the moves only), and the eyes are not saved.
    assert torch.equal(corrector.sources(z0, **inputs), plain.sources(z0, **inputs))
    corrector.save_pretrained(tmp_path / "c")
    again = ResidualCorrector.from_pretrained(tmp_path / "c").attach_eyes(_EditEyes())
    with torch.no_grad():
        assert again.config.count_edit and torch.allclose(again(z0, **inputs), delta.detach(), atol=1e-6)
    # Eyes that can only count are refused by name.
    corrector.attach_eyes(lambda z: None)
    with pytest.raises(TypeError, match="count_edit needs eyes with an edit_counts"):
        corrector(z0, **inputs)
    # Eyes whose edit comes back in the wrong shape are named, not broadcast.
    wrong = _EditEyes()
    wrong.edit_counts = lambda z, nouns, counts: (z[:, :4], torch.ones(z.shape[0], 1, 16, 16, dtype=torch.bool), [])
    corrector.attach_eyes(wrong)
    with pytest.raises(ValueError, match=r"edit_counts must return \(encoded \[2, 8, 16, 16\]"):
        corrector(z0, **inputs)


def test_actions_say_what_the_rules_did_per_latent():
    from xlard.models import field_inputs
    from xlard.prompts import parse

    corrector, plain = _with_and_without(count_edit=True)
    corrector.attach_eyes(_EditEyes())
    specs = [parse("a photo of a circle"), parse("a photo of three squares")]
    inputs = field_inputs(corrector.config, specs)
    z0 = torch.randn(2, 8, 16, 16)
    delta, actions = corrector.actions(z0, **inputs)
    with torch.no_grad():
        torch.testing.assert_close(delta, corrector(z0, **inputs))
    assert actions == [[], ["redrew"]] and not delta.requires_grad
    # A corrector without rules reports nothing; a bad input is named and leaves no log behind.
    assert plain.actions(z0, **inputs)[1] == [[], []]
    with pytest.raises(ValueError, match="z0"):
        corrector.actions(z0[:, :4], **inputs)
    assert corrector.actions(z0, **inputs)[1] == [[], ["redrew"]]  # nothing left over from the failed call


@pytest.mark.parametrize("nouns, counts", [(["circle"], [5, 5]), (["circle", "square"], [5]),
                                           (["circle", "square"], [5, 0])])
def test_count_eyes_edit_counts_refuse_mismatched_nouns_and_counts(nouns, counts):
    from xlard.shapes.understanding import CountEyes

    with pytest.raises(ValueError, match="edit_counts: need one noun and one count >= 1 per latent of z"):
        CountEyes(("circle", "square")).edit_counts(torch.zeros(2, 8, 16, 16), nouns, counts)


@pytest.mark.parametrize("changes, pattern", [
    ({"reader": False, "count_edit": True}, "count_edit needs reader: true"),
    ({"count_edit": 1}, "count_edit must be a bool"),
    ({"count_edit": True, "move": True}, "choose count_edit or move"),
    ({"count_edit": True, "count_move": True}, "choose count_edit or count_move"),
])
def test_count_edit_config_checks_name_the_field(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        _reader_config(**changes)


def test_autocast_runs_inference_in_the_low_dtype_and_leaves_training_alone(tmp_path):
    from xlard.models import field_inputs
    from xlard.prompts import parse

    corrector, _ = _with_and_without(count_edit=True, autocast="bfloat16")
    plain = ResidualCorrector(corrector.config.replace(autocast=None))
    plain.load_state_dict(corrector.state_dict())
    corrector.attach_eyes(_EditEyes())
    plain.attach_eyes(_EditEyes())
    seen = []
    corrector.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    specs = [parse("a photo of a blue square left of a green triangle"), parse("a photo of three squares")]
    inputs = field_inputs(corrector.config, specs)
    torch.manual_seed(1)
    z0 = torch.randn(2, 8, 16, 16)
    zc, lam = corrector.correct(z0, **inputs)
    delta, actions = corrector.actions(z0, **inputs)
    assert seen == [torch.bfloat16, torch.bfloat16] and zc.dtype == lam.dtype == delta.dtype == torch.float32
    assert actions[1] == ["redrew"]
    # The counting row's edit is asked on z0 + a bfloat16-computed residual kept in float32, and the edited cells
    # are exactly the encoding minus z0: z0's own cells are never rounded to bfloat16.
    block = torch.zeros(16, 16, dtype=torch.bool)
    block[2:6, 3:9] = True
    torch.testing.assert_close(zc[1][:, block], torch.full_like(zc[1][:, block], 7.0))
    # Close to the full-precision correction; training (forward) does not autocast.
    with torch.no_grad():
        full = plain(z0, **inputs)
    torch.testing.assert_close(delta, full, atol=0.05, rtol=0.05)
    assert not torch.equal(delta, full)
    seen.clear()
    out = corrector(z0, **inputs)
    assert seen == [torch.float32] and out.requires_grad
    # set_autocast(None) gives back the full-precision path exactly; a float64 corrector stays exact.
    corrector.set_autocast(None)
    assert torch.equal(corrector.actions(z0, **inputs)[0], plain.actions(z0, **inputs)[0])
    corrector.set_autocast("bfloat16")
    double, plain_double = corrector.double(), plain.double()
    assert torch.equal(double.correct(z0.double(), **{k: v.double() if v.is_floating_point() else v
                                                       for k, v in inputs.items()})[0],
                       plain_double.correct(z0.double(), **{k: v.double() if v.is_floating_point() else v
                                                            for k, v in inputs.items()})[0])
    # Saved with the corrector.
    corrector.float().save_pretrained(tmp_path / "c")
    assert ResidualCorrector.from_pretrained(tmp_path / "c").config.autocast == "bfloat16"


@pytest.mark.parametrize("value", ["int8", "bf16", 16, True])
def test_autocast_config_check_names_the_field(value):
    with pytest.raises(ValueError, match=r"autocast must be None or one of \['bfloat16', 'float16'\]"):
        _reader_config(autocast=value)
    corrector = ResidualCorrector(_reader_config())
    with pytest.raises(ValueError, match="autocast must be None"):
        corrector.set_autocast(value)
    assert corrector.config.autocast is None


def test_count_eyes_edit_counts_names_a_latent_of_another_size():
    """A 32 x 32 latent (128 x 128 images) failed deep in the editor without naming z."""
    from xlard.shapes import backbone as shapes_backbone
    from xlard.shapes.understanding import CountEyes, is_available

    if not (shapes_backbone.is_available() and is_available()):
        pytest.skip("shapes backbone or understanding model absent")
    with pytest.raises(ValueError, match=r"count_edit redraws 64x64 images .* z \[1, 8, 32, 32\] decodes to 128x128"):
        CountEyes(("circle", "square")).edit_counts(torch.zeros(1, 8, 32, 32), ["circle"], [2])


def test_cell_move_helpers_name_bad_arguments():
    from xlard.models import copy_cells, count_move_sources, largest_parts, move_sources, reader_move_sources

    z = torch.zeros(2, 4, 4, 4)
    src = torch.arange(16).repeat(2, 1)
    with pytest.raises(ValueError, match=r"copy_cells: z must be a latent tensor \[B, C, H, W\], got \[4, 4, 4\]"):
        copy_cells(z[0], src)
    with pytest.raises(ValueError, match="copy_cells: source must be an integer tensor"):
        copy_cells(z, src.bool())
    with pytest.raises(ValueError, match="move_sources: labels must be an integer tensor"):
        move_sources(torch.zeros(2, 16, dtype=torch.bool), torch.zeros(2, 2, 2, dtype=torch.long), 4, 4)
    with pytest.raises(ValueError, match=r"largest_parts: labels must be 0 \(none\), 1 \(subject\) or 2"):
        largest_parts(torch.full((1, 16), 3), 4, 4)  # label 3 was dropped without a word
    probs = torch.rand(2, 3, 4, 4)
    good_nouns, good_rel = torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 0, 1], [-1, -1, -1]])
    assert reader_move_sources(probs, good_nouns, good_rel).shape == (2, 16)
    for nouns, rel, pattern in ((torch.tensor([0, 1]), good_rel, r"nouns must be an integer tensor \[2, 2\]"),
                                (torch.tensor([[0, 7], [1, 2]]), good_rel, "nouns must be -1 .* the 3 noun maps"),
                                (good_nouns, torch.tensor([[9, 0, 1], [-1, -1, -1]]), "relations rows must be"),
                                (good_nouns, torch.tensor([[0, 0, 5], [-1, -1, -1]]), "relations rows must be")):
        with pytest.raises(ValueError, match=pattern):
            reader_move_sources(probs, nouns, rel)
    eyes, fg = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16)
    n, c = torch.tensor([0, 1]), torch.tensor([2, 3])
    assert count_move_sources(eyes, fg, n, c, (4, 4)).shape == (2, 16)
    for args, kwargs, pattern in (((eyes, fg, n, c, (0, 16)), {}, "latent_hw must be the latent's"),
                                  ((eyes, fg, n, c, (4, 4)), {"share": 5}, r"share must be a number in \[0, 1\]"),
                                  ((eyes, fg, torch.tensor([0, 9]), c, (4, 4)), {}, "nouns must be -1 .* 3 noun"),
                                  ((eyes, fg, [0, 1], c, (4, 4)), {}, r"nouns must be an integer tensor \[B\]")):
        with pytest.raises(ValueError, match=pattern):
            count_move_sources(*args, **kwargs)


# ---------------------------------------------------------------- numpy config fields, NaN latents, sample's log_prob


def test_configs_store_numpy_numbers_as_python_numbers_and_save(tmp_path):
    """np.int64 widths and np.float32 steps passed every check, built the model, then failed save_pretrained
    ("not JSON-serializable"); a numpy bool was refused where a bool was asked."""
    import numpy as np

    cfg = corrector_config(width=np.int64(64), alpha=np.float32(0.5), log_std_init=np.float32(-1.0),
                           dropout=np.float64(0.25), value_shares_trunk=np.True_)
    assert (type(cfg.width), type(cfg.alpha), type(cfg.log_std_init), type(cfg.dropout),
            type(cfg.value_shares_trunk)) == (int, float, float, float, bool)
    assert (cfg.width, cfg.alpha, cfg.log_std_init, cfg.value_shares_trunk) == (64, 0.5, -1.0, True)
    assert type(corrector_config(alpha=1).alpha) is int  # a Python int is kept as given (saved as before)
    ResidualCorrector(cfg).save_pretrained(tmp_path / "c")
    assert ResidualCorrector.from_pretrained(tmp_path / "c").config == cfg
    projector = LatentRewardProjector(projector_config(log_var_max=np.float32(5.0), confidence_hidden=np.int32(8)))
    assert type(projector.config.log_var_max) is float and type(projector.config.confidence_hidden) is int
    projector.save_pretrained(tmp_path / "p")
    assert LatentRewardProjector.from_pretrained(tmp_path / "p").config == projector.config
    with pytest.raises(ValueError, match=r"width must be an integer in 1\.\.16384, got np\.float64\(64\.0\)"):
        corrector_config(width=np.float64(64.0))  # a float is still no width
    with pytest.raises(ValueError, match=r"move must be a bool, got np\.int64\(1\)"):
        corrector_config(move=np.int64(1))
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        corrector_config(alpha=np.float32("nan"))


def test_reader_sources_distill_outputs_and_policy_log_prob_refuse_non_finite_latents():
    """read, sources and distill_outputs gave NaN evidence, NaN residuals and cells "moved" by NaN scores, and
    GaussianPolicy.log_prob a NaN log-probability, without a word, where correct() refused the same inputs."""
    from xlard.models import field_inputs
    from xlard.prompts import parse

    torch.manual_seed(0)
    reader = ResidualCorrector(_reader_config(reader_move=True)).eval()
    fields = field_inputs(reader.config, [parse("a photo of a red circle left of a blue square"),
                                          parse("a photo of three circles")])
    z0 = torch.randn(2, 8, 16, 16)
    bad = z0.clone()
    bad[0, :, 3, 3] = float("nan")
    calls = {"read": lambda z: reader.read(z, fields["text_tokens"], fields["text_mask"]),
             "sources": lambda z: reader.sources(z, **fields),
             "distill_outputs": lambda z: reader.distill_outputs(z, **fields)}
    for name, call in calls.items():
        call(z0)  # finite latents still run
        with pytest.raises(ValueError, match=rf"ResidualCorrector.{name}: z0 holds 8 NaN or infinite value"):
            call(bad)
    tokens = fields["text_tokens"].clone()
    tokens[1, 0, 0] = float("inf")  # a real token of row 1
    with pytest.raises(ValueError, match=r"ResidualCorrector.read: text_tokens holds 1 NaN or infinite"):
        reader.read(z0, tokens, fields["text_mask"])
    mover = make_corrector(nonzero_head=True, move=True).eval()  # the move head's sources
    z0, text, pooled, mask = inputs()
    with torch.no_grad():
        mover.move_label.weight.normal_(0, 1)
    bad = z0.clone()
    bad[1, 0, 2, 2] = float("-inf")
    for call in (mover.sources, mover.distill_outputs):
        call(z0, text, pooled, mask)
        with pytest.raises(ValueError, match=rf"ResidualCorrector.{call.__name__}: z0 holds 1 NaN or infinite"):
            call(bad, text, pooled, mask)
    dist = mover.distribution(z0, text, pooled, mask)
    delta = dist.mean.detach().clone()
    delta[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="GaussianPolicy.log_prob: delta holds 1 NaN or infinite value"):
        dist.log_prob(delta)
    assert torch.isfinite(dist.log_prob(dist.mean.detach())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw, size", [({}, 16), ({"patch": 2, "action_block": 2}, 32)])
def test_sample_log_prob_is_the_policys_own(dtype, kw, size):
    """sample() returned the fused op's log-density, summed in another order: it differed from log_prob() and
    distribution().log_prob(), which the PPO update recomputes (0.03 at 16x128x128, a ratio of 1.03)."""
    model = make_corrector(nonzero_head=True, log_std_init=-1.0, **kw).eval()
    z0, text, pooled, mask = inputs(h=size, w=size, dtype=dtype)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    zc, delta, log_prob, lam = model.sample(z0, text, pooled, mask, noise=noise, alpha=0.5)
    dist = model.distribution(z0, text, pooled, mask)
    with torch.no_grad():
        assert torch.equal(log_prob, model.log_prob(delta, dist.mean))
        assert torch.equal(log_prob, dist.log_prob(delta))
    assert log_prob.dtype == delta.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not log_prob.requires_grad
    # zc, delta and lam are the fused op's, as before
    want = xlard.ops.sample_correction(z0, dist.mean.detach(), model.log_std.detach().to(dtype),
                                       model.action_noise(noise), 0.5)
    for got, expected in zip((zc, delta, lam), (want[0], want[1], want[3])):
        assert torch.equal(got, expected)


def test_sample_refuses_noise_with_a_generator_and_an_integer_alpha_as_correct_does():
    """The generator was silently ignored beside noise; an int64 alpha tensor was cast to float by sample() where
    correct() refused it with a TypeError."""
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    with pytest.raises(ValueError, match="ResidualCorrector.sample: pass noise or generator, not both"):
        model.sample(z0, text, pooled, mask, noise=torch.randn_like(z0), generator=torch.Generator())
    for call in (model.sample, model.correct):
        for bad in (torch.tensor([1, 2]), torch.tensor([True, False])):
            with pytest.raises(TypeError, match=r"alpha must have dtype float16, bfloat16, float32, float64; "
                                                rf"got {str(bad.dtype).replace('torch.', '')}"):
                call(z0, text, pooled, mask, alpha=bad)
        call(z0, text, pooled, mask, alpha=torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_aspect_weights_refuse_infinite_log_variances_on_present_aspects():
    """All present aspects at log_var = +inf gave NaN weights, where the docstring promises no NaN."""
    inf = float("inf")
    for log_var, present in ((torch.tensor([[inf, inf, inf]]), None),
                             (torch.tensor([[0.0, 0.0, 0.0], [inf, 0.0, inf]]),
                              torch.tensor([[True, True, True], [True, False, True]]))):
        with pytest.raises(ValueError, match=r"aspect_weights: log_var is \+inf on every present aspect of 1 "
                                             r"row\(s\) \(rows \[\d\]\)"):
            aspect_weights(log_var, present)
    # +inf on an absent aspect, or beside a finite present one, is no weight (as before)
    w = aspect_weights(torch.tensor([[inf, 0.0, 0.0]]), torch.tensor([[False, True, True]]))
    assert torch.equal(w, torch.tensor([[0.0, 0.5, 0.5]]))
    assert torch.equal(aspect_weights(torch.tensor([[inf, 0.0, 0.0]])), torch.tensor([[0.0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"aspect_mask must have shape \[B, 3\] = \[1, 3\]"):
        aspect_weights(torch.tensor([[inf, 0.0, 0.0]]), torch.ones(2, 3, dtype=torch.bool))


def test_a_damaged_weights_file_is_not_called_only_a_diverged_run(tmp_path):
    """Bytes overwritten at the end of model.safetensors parse as NaN weights: the message said only "weights of
    a diverged run", never that the file itself may be damaged."""
    make_corrector().save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100:] = b"\xff" * 100
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"holds non-finite values in 3 tensor\(s\) .*: weights of a diverged run, "
                                         r"or a damaged file .*copy the file again"):
        ResidualCorrector.from_pretrained(tmp_path / "c")


def test_the_docs_say_what_autocast_and_torch_compile_do_to_the_checks():
    """The autocast docstring said "a float64 z0 stays float64 throughout": a float32 corrector computes a
    float64 z0 in bfloat16 under autocast. correct() did not say that under torch.compile it returns NaN for NaN
    inputs (its value checks are skipped while tracing)."""
    doc = " ".join(CorrectorConfig.__doc__.split())
    assert "a float64 z0 stays float64 throughout" not in doc
    assert "z0 is cast to the parameters' dtype first" in doc and "a float64 corrector" in doc
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs(dtype=torch.float64)
    full = model.correct(z0, text, pooled, mask)[0]
    model.set_autocast("bfloat16")
    low = model.correct(z0, text, pooled, mask)[0]  # a float32 corrector: computed in bfloat16, float64 out
    assert low.dtype == torch.float64 and not torch.equal(low, full)
    double = model.double()  # a float64 corrector is left in float64
    assert torch.equal(double.correct(z0, text.double(), pooled.double(), mask)[0],
                       double.set_autocast(None).correct(z0, text.double(), pooled.double(), mask)[0])
    raises = " ".join(ResidualCorrector.correct.__doc__.split("Raises:")[1].split())
    assert "torch.compile" in raises and "returns NaN for NaN inputs instead of raising" in raises
    model = make_corrector(nonzero_head=True).eval()
    z0, text, pooled, mask = inputs()
    z0[0, 0, 0, 0] = float("nan")
    compiled = torch.compile(lambda: model.correct(z0, text, pooled, mask)[0], fullgraph=True, backend="eager")
    assert torch.isnan(compiled()).any()  # as documented: no error while compiled
    with pytest.raises(ValueError, match="z0 holds 1 NaN"):
        model.correct(z0, text, pooled, mask)
