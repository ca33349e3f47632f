"""xlard.train.ppo: the pure PPO arithmetic against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xlard.train import ppo


def test_reduce_log_prob_sum_and_mean():
    lp = torch.tensor([-1024.0, -512.0])
    assert torch.equal(ppo.reduce_log_prob(lp, 1024, "sum"), lp)
    assert torch.allclose(ppo.reduce_log_prob(lp, 1024, "mean"), torch.tensor([-1.0, -0.5]))
    with pytest.raises(ValueError, match="reduction"):
        ppo.reduce_log_prob(lp, 4, "max")
    with pytest.raises(ValueError, match="numel"):
        ppo.reduce_log_prob(lp, 0, "mean")
    with pytest.raises(ValueError, match="action_block must be a positive int"):
        ppo.reduce_log_prob(lp, 4, "sum", 0)


def test_the_sum_ratio_of_a_block_action_is_the_exact_likelihood_ratio():
    """With action_block k the action has C*(H/k)*(W/k) free dimensions; the sum over C*H*W counted each block
    k^2 times, so the 'sum' log ratio was k^2 times the true one."""
    from xlard.models import CorrectorConfig, ResidualCorrector

    k, (b, c, h, w) = 4, (2, 4, 16, 16)
    corrector = ResidualCorrector(CorrectorConfig.tiny(latent_channels=c, text_dim=8, pooled_dim=8, action_block=k,
                                                       patch=2)).eval()
    g = torch.Generator().manual_seed(0)

    def blocky(x):
        return x[..., ::k, ::k].repeat_interleave(k, -2).repeat_interleave(k, -1)

    old_mean = blocky(torch.randn(b, c, h, w, generator=g) * 0.1)
    new_mean = old_mean + blocky(torch.randn(b, c, h, w, generator=g) * 0.01)
    std = corrector.log_std.exp().detach().view(1, -1, 1, 1)
    delta = old_mean + std * corrector.action_noise(torch.randn(b, c, h, w, generator=g))
    assert torch.equal(delta, blocky(delta))

    def exact(mean):  # the density of the free (block) variables
        d, mu = delta[..., ::k, ::k], mean[..., ::k, ::k]
        return (-0.5 * ((d - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))

    numel = c * h * w
    got = (ppo.reduce_log_prob(corrector.log_prob(delta, new_mean).detach(), numel, "sum", k)
           - ppo.reduce_log_prob(corrector.log_prob(delta, old_mean).detach(), numel, "sum", k))
    torch.testing.assert_close(got, exact(new_mean) - exact(old_mean), rtol=1e-4, atol=1e-5)
    mean_ratio = (ppo.reduce_log_prob(corrector.log_prob(delta, new_mean).detach(), numel, "mean", k)
                  - ppo.reduce_log_prob(corrector.log_prob(delta, old_mean).detach(), numel, "mean", k))
    torch.testing.assert_close(mean_ratio, (exact(new_mean) - exact(old_mean)) / (numel // k ** 2),
                               rtol=1e-4, atol=1e-6)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 4.0, 2.0, 2.0])
    assert torch.equal(ppo.group_advantages(r, 2), torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0]))
    # Groups of three: means 4/3 and 8/3.
    expect = torch.tensor([1 - 4 / 3, 3 - 4 / 3, 0 - 4 / 3, 4 - 8 / 3, 2 - 8 / 3, 2 - 8 / 3])
    assert torch.allclose(ppo.group_advantages(r, 3), expect)
    with pytest.raises(ValueError, match="multiple"):
        ppo.group_advantages(r, 4)


def test_whiten_from_global_sums_matches_split():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3, population var (4 + 1 + 0 + 9) / 4 = 3.5
    out = ppo.whiten(v, v.sum(), v.square().sum(), 4.0, eps=0.0)
    assert torch.allclose(out, (v - 3.0) / math.sqrt(3.5))
    # A process holding half the batch, with the global sums, gets its half of the same answer.
    half = ppo.whiten(v[2:], v.sum(), v.square().sum(), 4.0, eps=0.0)
    assert torch.allclose(half, out[2:])


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    new.requires_grad_(True)
    loss, ratio, st = ppo.clipped_surrogate(new, old, adv, clip=0.2)
    # Row by row: max(-A r, -A clip(r)):
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped: pessimistic side)
    # A=-1, r=1.1: max(1.1, 1.1) = 1.1
    # A=-1, r=0.9: max(0.9, 0.9) = 0.9
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.9) / 4)
    loss.backward()
    # d/d new of -A r / 4 = -A r / 4 where unclipped, 0 where the clipped branch wins.
    assert torch.allclose(new.grad, torch.tensor([0.0, -0.5 / 4, 1.1 / 4, 0.9 / 4]))
    assert st.clip_fraction.item() == pytest.approx(0.5)  # 1.5 and 0.5 are outside [0.8, 1.2]
    lr = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9]))
    assert st.approx_kl.item() == pytest.approx(((torch.exp(lr) - 1) - lr).mean().item(), rel=1e-6)
    assert st.ratio_max.item() == pytest.approx(1.5) and st.ratio_min.item() == pytest.approx(0.5)
    assert st.log_ratio_abs_max.item() == pytest.approx(math.log(2.0))
    assert torch.allclose(ratio, torch.tensor([1.5, 0.5, 1.1, 0.9]))


def test_clipped_surrogate_at_ratio_one_is_minus_mean_advantage():
    lp = torch.tensor([-3.0, -2.0, -5.0])
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, ratio, st = ppo.clipped_surrogate(lp.clone(), lp, adv, 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert torch.equal(ratio, torch.ones(3)) and st.approx_kl.item() == 0.0 and st.clip_fraction.item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        ppo.clipped_surrogate(lp, lp[:2], adv, 0.2)


def test_value_loss_anchor_weighted_reward():
    assert ppo.value_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(0.5 * 2.5)
    zc = torch.ones(2, 1, 2, 2)
    z0 = torch.zeros(2, 1, 2, 2)
    z0[0, 0, 0, 0] = 1.0  # 7 of 8 entries differ by 1
    assert ppo.anchor_penalty(zc, z0, 0.5).item() == pytest.approx(0.5 * 7 / 8)
    scores = torch.tensor([[0.5, float("nan"), 1.0], [0.2, 0.4, float("nan")]])
    weights = torch.tensor([[0.25, 0.0, 0.75], [0.5, 0.5, 0.0]])
    assert torch.allclose(ppo.weighted_reward(scores, weights), torch.tensor([0.125 + 0.75, 0.3]))


def test_running_stats_merge_equals_one_pass():
    data = torch.tensor([1.0, 2.0, 4.0, 7.0, 11.0])
    rs = ppo.RunningStats()
    rs.update(2, float(data[:2].sum()), float(data[:2].square().sum()))
    rs.update(3, float(data[2:].sum()), float(data[2:].square().sum()))
    assert rs.mean == pytest.approx(5.0)
    assert rs.std == pytest.approx(float(data.std(unbiased=False)))
    copy = ppo.RunningStats()
    copy.load_state_dict(rs.state_dict())
    assert copy.state_dict() == rs.state_dict()


def test_lr_factor_warmup_and_cosine():
    assert ppo.lr_factor(0, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert ppo.lr_factor(1, 10, 2, "cosine", 0.0) == pytest.approx(1.0)
    assert ppo.lr_factor(2, 10, 2, "cosine", 0.0) == pytest.approx(1.0)
    assert ppo.lr_factor(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)  # half way through the cosine
    assert ppo.lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert ppo.lr_factor(7, 10, 0, "constant", 0.1) == 1.0


def test_minibatch_layout_is_world_size_independent():
    n, k = 12, 3
    keys = torch.rand(n, generator=torch.Generator().manual_seed(0))
    whole = ppo.minibatch_layout(torch.arange(n), k, keys)
    assert sorted(torch.cat(whole).tolist()) == list(range(n))
    assert all(len(m) == n // k for m in whole)
    # Each block of k consecutive rows gives one row to each minibatch.
    for m in whole:
        assert sorted((m // k).tolist()) == list(range(n // k))
    # Two processes holding rows 0-5 and 6-11: the union of their minibatch k is the single-process minibatch k.
    first = ppo.minibatch_layout(torch.arange(6), k, keys)
    second = ppo.minibatch_layout(torch.arange(6, 12), k, keys)
    for j in range(k):
        assert sorted(first[j].tolist() + (second[j] + 6).tolist()) == sorted(whole[j].tolist())
    # The fixed first-epoch layout: row i -> minibatch i mod k.
    fixed = ppo.minibatch_layout(torch.arange(n), k, None)
    assert fixed[1].tolist() == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="do not split"):
        ppo.minibatch_layout(torch.arange(5), 2, None)


def test_pearson():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ppo.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert ppo.pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(ppo.pearson(x[:2], x[:2]))
    assert math.isnan(ppo.pearson(x, torch.ones(4)))
    assert ppo.pearson(torch.tensor([1.0, float("nan"), 2.0, 3.0]), torch.tensor([2.0, 5.0, 4.0, 6.0])) == \
        pytest.approx(1.0)


# --- numerics and argument checks found by a fresh-eyes probe of the training layer -------------------------------


def _advantages_stub(advantage="value", reward_norm=False, n=8):
    from types import SimpleNamespace as NS

    from xlard.train.trainer import Trainer

    stub = NS(cfg=NS(ppo=NS(reward_norm=reward_norm, advantage=advantage, group_size=2, whiten=True)),
              arith={"rollouts_per_step": n}, reward_stats=ppo.RunningStats(),
              _all_sum=lambda t: t.detach().double().clone())
    return lambda rewards, values: Trainer._advantages(stub, rewards, values)


def test_whiten_equal_values_are_exactly_zero_with_float64_sums():
    v = torch.full((8,), 0.1)
    v64 = v.double()
    assert torch.equal(ppo.whiten(v, v64.sum(), v64.square().sum(), 8.0), torch.zeros(8))


@pytest.mark.parametrize("reward_norm", [False, True])
def test_value_advantages_of_equal_rewards_are_zero(reward_norm):
    # float32 sums gave -0.745 (whiten) and -5.96 (the trainer) for eight equal rewards: a step on rounding noise
    advantages = _advantages_stub(reward_norm=reward_norm)
    adv, targets = advantages(torch.full((8,), 0.9), torch.zeros(8))
    assert torch.equal(adv, torch.zeros(8))
    if reward_norm:
        assert torch.equal(targets, torch.zeros(8))


def test_advantages_keep_their_scale_when_the_spread_is_far_below_the_mean():
    torch.manual_seed(0)
    r = 0.9 + 3e-4 * torch.randn(32)
    adv, _ = _advantages_stub(n=32)(r, torch.zeros(32))
    ref = (r.double() - r.double().mean()) / r.double().std(unbiased=False)
    assert float((adv.double() - ref).abs().max()) < 1e-3  # was 0.50 (23% too large plus an offset)


def test_ppo_helpers_name_bad_arguments():
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        ppo.group_advantages(torch.ones(2), 0)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        ppo.group_advantages(torch.ones(2), -1)
    with pytest.raises(ValueError, match="minibatches must be a positive int"):
        ppo.minibatch_layout(torch.arange(4), 0, None)
    x = torch.zeros(3)
    for clip in (-0.5, 0.0, float("nan"), float("inf"), True, "0.2"):
        with pytest.raises(ValueError, match="clip must be a finite number > 0"):
            ppo.clipped_surrogate(x, x, x, clip)
    with pytest.raises(ValueError, match="no rows"):
        ppo.clipped_surrogate(torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.2)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant'"):
        ppo.lr_factor(3, 5, 0, "linear", 0.1)
    with pytest.raises(ValueError, match="numel must be a positive int"):
        ppo.reduce_log_prob(torch.zeros(2), True, "sum")
    out = ppo.reduce_log_prob(torch.full((2,), 8.0), np.int64(4), "mean")  # numpy integers are integers
    assert torch.equal(out, torch.full((2,), 2.0))


def test_lr_factor_cosine_reaches_the_floor_one_past_the_last_step():
    # documented: the floor is reached at step total_steps (one past a run's last step)
    assert ppo.lr_factor(5, 5, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert 0.1 < ppo.lr_factor(4, 5, 0, "cosine", 0.1) < 0.2


def test_data_and_cache_arguments_are_checked():
    from xlard.train.data import EncodeCache, PromptData

    records = [{"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}]
    with pytest.raises(ValueError, match="items_per_step must be a positive int"):
        PromptData(records, 1, 0, 0)
    with pytest.raises(ValueError, match="items_per_step must be a positive int"):
        PromptData(records, 1, -1, 0)
    with pytest.raises(ValueError, match="seeds_per_prompt must be a positive int"):
        PromptData(records, 0, 1, 0)
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        EncodeCache(-1)
    assert EncodeCache(0).capacity == 0


def test_derived_generator_names_a_bad_seed():
    from xlard.train.rollout import derived_generator

    with pytest.raises(ValueError, match="seed must be an int, got 'abc'"):
        derived_generator("abc")
    a = torch.rand(3, generator=derived_generator(np.int64(5), "x"))
    assert torch.equal(a, torch.rand(3, generator=derived_generator(5, "x")))


def test_sample_rollouts_refuses_a_layout_that_leaves_rows_out():
    from xlard.models import CorrectorConfig, ResidualCorrector
    from xlard.train.rollout import PolicyStep, PromptInputs, sample_rollouts

    torch.manual_seed(0)
    c = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8, patch=2))
    n = 4
    tok, pooled, mask = torch.randn(n, 5, 8), torch.randn(n, 8), torch.ones(n, 5, dtype=torch.bool)
    inp = PromptInputs(torch.randn(n, 4, 8, 8), tok, pooled, mask, torch.ones(n, 3, dtype=torch.bool), tok, pooled, mask)
    noise = torch.randn(n, 4, 8, 8)
    with pytest.raises(ValueError, match="cover each of the 4 rows exactly once"):
        sample_rollouts(PolicyStep(c), inp, noise, [torch.tensor([0, 1])])  # rows 2, 3 were uninitialised memory
    with pytest.raises(ValueError, match="cover each of the 4 rows exactly once"):
        sample_rollouts(PolicyStep(c), inp, noise, [torch.tensor([0, 1]), torch.tensor([1, 2, 3])])
    assert c.training  # a refused layout left the corrector in eval mode
    r = sample_rollouts(PolicyStep(c), inp, noise, [torch.tensor([0, 2]), torch.tensor([1, 3])])
    assert torch.isfinite(r.log_prob).all() and torch.isfinite(r.zc).all()
    assert all(m.training for m in c.modules())
    c.head.eval()  # each submodule's own mode comes back, also after a pass that raises
    handle = c.head.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            sample_rollouts(PolicyStep(c), inp, noise, [torch.tensor([0, 1, 2, 3])])
    finally:
        handle.remove()
    assert [m for m in c.modules() if not m.training] == [c.head]


def test_group_advantages_of_tied_groups_are_exactly_zero():
    """A float32 mean of G equal rewards was one ulp off (G = 6, 8): whitened, a batch of tied groups (no signal)
    got advantages of unit size and the policy stepped toward its own noise."""
    for g in (2, 4, 6, 8, 16):
        for value in (math.exp(-1.0), math.exp(-0.5), 0.1, 0.7, 1.0 / 3.0):
            rewards = torch.full((4 * g,), value, dtype=torch.float32)
            adv = ppo.group_advantages(rewards, g)
            assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros(4 * g)), (g, value)
    adv = ppo.group_advantages(torch.tensor([0.1, 0.3, 0.2, 0.2], dtype=torch.float16), 2)
    assert adv.dtype == torch.float16


def test_clipped_surrogate_gradient_stays_finite_for_a_huge_log_ratio():
    """exp(90) overflowed float32: the clipped row's infinite ratio made the minibatch's gradient NaN (inf for a
    negative advantage), and one such row stopped the run."""
    for advantage in (1.0, -1.0):
        new = torch.tensor([90.0, 0.1], requires_grad=True)
        loss, ratio, stats = ppo.clipped_surrogate(new, torch.zeros(2), torch.tensor([advantage, 1.0]), 0.2)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(new.grad).all(), (advantage, loss, new.grad)
        assert new.grad[0] == 0 and new.grad[1] != 0
        assert float(stats.log_ratio_abs_max) == 90.0 and torch.isfinite(ratio).all()
    # inside the hold nothing changed: PPO's gradient for a negative advantage outside the clip range
    new = torch.tensor([3.0], requires_grad=True)
    loss, _, _ = ppo.clipped_surrogate(new, torch.zeros(1), torch.tensor([-1.0]), 0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.exp(3.0)) and float(new.grad) == pytest.approx(math.exp(3.0))


def test_rollout_lam_is_the_corrector_s_own_delta_not_the_sampled_noise():
    """lam/* metrics read sum_c |delta| of the sampled action: a zero corrector logged lam/mean 1.3."""
    from xlard.explain import latent_activation_map
    from xlard.models import CorrectorConfig, ResidualCorrector
    from xlard.train.rollout import PolicyStep, PromptInputs, sample_rollouts

    torch.manual_seed(0)
    c = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8, patch=2))
    n = 4
    tok, pooled, mask = torch.randn(n, 5, 8), torch.randn(n, 8), torch.ones(n, 5, dtype=torch.bool)
    inp = PromptInputs(torch.randn(n, 4, 8, 8), tok, pooled, mask, torch.ones(n, 3, dtype=torch.bool), tok, pooled,
                       mask)
    noise = torch.randn(n, 4, 8, 8)
    policy = PolicyStep(c)
    r = sample_rollouts(policy, inp, noise, [torch.arange(n)])
    with torch.no_grad():
        mean = policy(inp.z0, *inp.for_corrector(torch.arange(n)))[0]
    assert float(r.delta.abs().max()) > 0
    torch.testing.assert_close(r.lam, latent_activation_map(mean))
    with torch.no_grad():
        for p in c.head.parameters():
            p.zero_()
    r = sample_rollouts(policy, inp, noise, [torch.arange(n)])
    assert float(r.delta.abs().max()) > 0.1 and torch.equal(r.lam, torch.zeros_like(r.lam))
