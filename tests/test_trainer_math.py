"""The trainer's step math, advantages, losses, EMA and discriminator schedule, each checked alone:
against torch.distributions, hand-computed values and known properties of the flow."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

from advgrpo.trainer.ema import EMA
from advgrpo.trainer.grpo import group_advantages, grpo_loss, ppo_clipped_loss
from advgrpo.trainer.schedule import DiscriminatorSchedule
from advgrpo.trainer.sde import (
    check_trainable_steps,
    cps_step,
    kl_to_reference,
    ode_step,
    sde_step,
    sde_window,
    step_kind,
    step_std,
    trained_steps,
)

SHAPES = [(2, 4, 8, 8), (3, 1, 5, 7), (1, 16, 3, 3)]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _normal_logp(x_next, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------- sde / cps / ode


@pytest.mark.parametrize("shape", SHAPES)
def test_sde_log_prob_is_the_gaussian_density_averaged_over_chw(shape):
    x, v = _inputs(shape)
    b = shape[0]
    sigma = torch.linspace(0.9, 0.3, b)  # batch-varying sigma
    sigma_next = sigma - 0.1
    out = sde_step(x, v, sigma, sigma_next, generator=torch.Generator().manual_seed(1))
    assert out.log_prob.shape == (b,) and out.std.shape == (b, 1, 1, 1)
    torch.testing.assert_close(out.log_prob, _normal_logp(out.prev_sample, out.mean, out.std))
    # std of x' is std_t * sqrt(-dt) with std_t = a * sqrt(sigma / (1 - sigma)).
    expected_std = 0.7 * torch.sqrt(sigma / (1 - sigma)) * math.sqrt(0.1)
    torch.testing.assert_close(out.std.flatten(), expected_std)
    torch.testing.assert_close(out.std_t.flatten(), 0.7 * torch.sqrt(sigma / (1 - sigma)))


def test_sde_mean_and_std_by_hand():
    x, v = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5)
    out = sde_step(x, v, 0.6, 0.4, noise_level=0.7, noise=torch.zeros(1, 1, 1, 1))
    # std_t^2 = 0.49 * 0.6/0.4 = 0.735; dt = -0.2
    # mean = 2 * (1 + 0.735/1.2 * -0.2) + 0.5 * (1 + 0.735*0.4/1.2) * -0.2 = 1.755 - 0.1245
    assert out.mean.item() == pytest.approx(1.6305, abs=1e-6)
    assert out.std.item() ** 2 == pytest.approx(0.735 * 0.2, abs=1e-6)
    assert out.prev_sample.item() == pytest.approx(1.6305, abs=1e-6)  # zero noise: x' = mean
    assert out.log_prob.item() == pytest.approx(-math.log(math.sqrt(0.147)) - 0.5 * math.log(2 * math.pi), abs=1e-5)


def test_sde_sigma_one_uses_sigma_max_and_needs_it():
    x, v = _inputs((2, 3, 5, 5))
    sigma = torch.tensor([1.0, 0.8])
    out = sde_step(x, v, sigma, sigma - 0.2, sigma_max=0.9, generator=torch.Generator().manual_seed(0))
    std_t = torch.tensor([0.7 * math.sqrt(1 / (1 - 0.9)), 0.7 * math.sqrt(0.8 / 0.2)])
    torch.testing.assert_close(out.std.flatten(), std_t * math.sqrt(0.2))
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.prev_sample).all()
    torch.testing.assert_close(out.log_prob, _normal_logp(out.prev_sample, out.mean, out.std))
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(x, v, 1.0, 0.8)


@pytest.mark.parametrize("step", [sde_step, cps_step])
def test_recomputing_with_prev_sample_gives_the_sampled_log_prob(step):
    x, v = _inputs((3, 4, 6, 5), seed=2)
    sampled = step(x, v, 0.7, 0.55, sigma_max=0.9, generator=torch.Generator().manual_seed(3))
    again = step(x, v, 0.7, 0.55, sigma_max=0.9, prev_sample=sampled.prev_sample)
    torch.testing.assert_close(again.log_prob, sampled.log_prob)
    torch.testing.assert_close(again.mean, sampled.mean)
    assert again.prev_sample is not None and torch.equal(again.prev_sample, sampled.prev_sample)


@pytest.mark.parametrize("step", [sde_step, cps_step])
def test_noise_and_generator_are_honoured(step):
    x, v = _inputs((2, 2, 4, 4))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out = step(x, v, 0.5, 0.4, noise=eps)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * eps)
    a = step(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(4))
    b = step(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.prev_sample, b.prev_sample)
    with pytest.raises(ValueError, match="noise"):
        step(x, v, 0.5, 0.4, noise=eps[:1])


@pytest.mark.parametrize("step", [sde_step, cps_step])
def test_log_prob_gradient_flows_through_the_mean_only(step):
    x, v = _inputs((2, 2, 4, 4))
    v.requires_grad_(True)
    target = torch.randn_like(x).requires_grad_(True)
    out = step(x, v, 0.5, 0.4, prev_sample=target)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert target.grad is None  # x' is a fixed sample: no gradient into the stored latent


@pytest.mark.parametrize("shape", SHAPES)
def test_cps_mean_std_and_log_prob_follow_the_formulas(shape):
    x, v = _inputs(shape, seed=5)
    s, s_next, a = 0.6, 0.4, 0.8
    out = cps_step(x, v, s, s_next, generator=torch.Generator().manual_seed(6))
    std = s_next * math.sin(a * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    mean = (1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((shape[0], 1, 1, 1), std))
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - mean) ** 2).mean(dim=(1, 2, 3)))


def test_cps_by_hand_and_at_the_last_step():
    x, v = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5)
    out = cps_step(x, v, 0.6, 0.4, noise=torch.zeros(1, 1, 1, 1))
    # x0 = 1.7, x1 = 2.2, mean = 0.6*1.7 + 0.4*cos(0.4 pi)*2.2
    assert out.mean.item() == pytest.approx(1.02 + 0.4 * math.cos(0.4 * math.pi) * 2.2, abs=1e-6)
    assert out.std.item() == pytest.approx(0.4 * math.sin(0.4 * math.pi), abs=1e-6)
    last = cps_step(x, v, 0.1, 0.0, generator=torch.Generator().manual_seed(0))  # sigma' = 0: std 0
    torch.testing.assert_close(last.prev_sample, x - 0.1 * v)
    assert last.log_prob.item() == 0.0


def test_steps_preserve_the_flow_marginals_of_a_point_mass():
    # Data = point mass at c: x_t = (1-t)c + t*eps ~ N((1-t)c, t^2) and the exact velocity is
    # (x - c)/t. A correct reverse step from sigma must land on N((1-sigma')c, sigma'^2).
    c, n = 1.5, 400_000
    g = torch.Generator().manual_seed(0)
    for step, s, s_next, tol in [(cps_step, 0.8, 0.5, 4e-3), (sde_step, 0.5, 0.49, 4e-3)]:
        x = (1 - s) * c + s * torch.randn((1, 1, 1, n), generator=g)
        out = step(x, (x - c) / s, s, s_next, generator=g)
        assert out.prev_sample.mean().item() == pytest.approx((1 - s_next) * c, abs=tol)
        assert out.prev_sample.std().item() == pytest.approx(s_next, abs=tol)
    # The deterministic Euler step is exact here too (straight paths).
    x = (1 - 0.8) * c + 0.8 * torch.randn((1, 1, 1, 1000), generator=g)
    torch.testing.assert_close(ode_step(x, (x - c) / 0.8, 0.8, 0.3), c + (x - c) * 0.3 / 0.8)


def test_ode_step_is_euler():
    x, v = _inputs((2, 3, 4, 4))
    torch.testing.assert_close(ode_step(x, v, 0.7, 0.6), x + v * (0.6 - 0.7))
    sig = torch.tensor([0.9, 0.5])
    torch.testing.assert_close(ode_step(x, v, sig, sig - 0.2), x - 0.2 * v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", [sde_step, cps_step])
def test_half_precision_inputs_are_computed_in_fp32(step, dtype):
    x, v = _inputs((2, 4, 8, 8), seed=7)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    sig = torch.tensor([1.0, 0.5])
    half = step(x.to(dtype), v.to(dtype), sig, sig - 0.1, sigma_max=0.95, noise=eps.to(dtype))
    for t in (half.prev_sample, half.log_prob, half.mean, half.std):
        assert t.dtype == torch.float32
    # Identical to the fp32 path on the same (rounded) values: nothing is computed in half.
    up = step(x.to(dtype).float(), v.to(dtype).float(), sig, sig - 0.1, sigma_max=0.95, noise=eps.to(dtype).float())
    torch.testing.assert_close(half.log_prob, up.log_prob, rtol=0, atol=0)
    # And close to the full-fp32 inputs (only input rounding differs).
    ref = step(x, v, sig, sig - 0.1, sigma_max=0.95, noise=eps)
    torch.testing.assert_close(half.mean, ref.mean, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(half.log_prob, ref.log_prob, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = step(x, v, sig, sig - 0.1, sigma_max=0.95, noise=eps)
    assert auto.log_prob.dtype == torch.float32
    torch.testing.assert_close(auto.log_prob, ref.log_prob)
    assert ode_step(x.to(dtype), v.to(dtype), 0.5, 0.4).dtype == torch.float32


def test_kl_to_reference():
    mean = torch.zeros(2, 3, 4, 4)
    ref = torch.full_like(mean, 0.2)
    kl = kl_to_reference(mean, ref, torch.tensor([0.1, 0.2]).view(2, 1, 1, 1))
    torch.testing.assert_close(kl, torch.tensor([0.04 / (2 * 0.01), 0.04 / (2 * 0.04)]))
    torch.testing.assert_close(kl_to_reference(mean, ref, 0.1), torch.tensor([2.0, 2.0]))
    # It is the exact KL between the two Gaussian steps when given StepOutput.std.
    x, v = _inputs((1, 2, 3, 3))
    p = sde_step(x, v, 0.6, 0.5, noise=torch.zeros_like(x))
    q = sde_step(x, v + 0.3, 0.6, 0.5, noise=torch.zeros_like(x))
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(p.mean, p.std), torch.distributions.Normal(q.mean, q.std)
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl_to_reference(p.mean, q.mean, p.std), exact)
    # Flow-GRPO's scale (std_t) is the exact KL times -dt.
    torch.testing.assert_close(kl_to_reference(p.mean, q.mean, p.std_t), exact * 0.1)


# --------------------------------------------------------------------------- window


def test_sde_window_size_and_placement_over_many_seeds():
    # Flow-GRPO-Fast draws the start from 0..num_steps//2, both ends included.
    starts = set()
    for seed in range(300):
        w = sde_window(10, 3, generator=torch.Generator().manual_seed(seed))
        assert len(w) == 3 and w.step == 1
        assert 0 <= w.start <= 10 // 2
        starts.add(w.start)
        assert [step_kind(i, w) for i in range(10)].count("sde") == 3
    assert starts == {0, 1, 2, 3, 4, 5}  # every allowed start occurs
    for seed in range(50):
        w = sde_window(10, 2, generator=torch.Generator().manual_seed(seed), start_range=(2, 6))
        assert 2 <= w.start <= 6 and w.stop <= 8


def test_sde_window_fixed_start_is_adv_grpos_window():
    # Adv-GRPO: train_num_steps = 2, random_timestep = 0 -> the SDE on steps 0 and 1, every epoch.
    assert all(sde_window(10, 2, start=0, generator=torch.Generator().manual_seed(s)) == range(0, 2) for s in range(20))
    assert sde_window(10, 2, start=4) == range(4, 6)
    assert sde_window(10, 3, start=9) == range(7, 10)  # moved back to end at the last step
    assert sde_window(10, 2, start_range=(3, 3)) == range(3, 5)  # a one-value range is fixed
    for bad in (dict(start=10), dict(start=-1), dict(start_range=(4, 2)), dict(start_range=(0, 10))):
        with pytest.raises(ValueError):
            sde_window(10, 2, **bad)


def test_sde_window_is_deterministic_and_degenerates_cleanly():
    a = [sde_window(40, 2, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    b = [sde_window(40, 2, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b
    assert sde_window(10, 10) == range(10) and sde_window(10, 12) == range(10)  # plain Flow-GRPO
    assert sde_window(4, 3, start=0) == range(0, 3)
    assert sde_window(10, 3, start_range=(9, 9)) == range(7, 10)  # kept inside the trajectory
    assert step_kind(0, range(1, 3)) == "ode" and step_kind(1, range(1, 3)) == "sde"
    with pytest.raises(ValueError):
        sde_window(10, 0)


# --------------------------------------------------------------------------- timestep selection


def test_trained_steps_are_flow_grpos_prefix():
    # Flow-GRPO: the first int(T * fraction) steps; 0.99 of 10 is 9, so the last step never trains.
    assert trained_steps(range(10), 10, 0.99) == list(range(9))
    assert trained_steps(range(10), 10, 1.0) == list(range(10))
    assert trained_steps(range(10), 10, 0.5) == list(range(5))
    # Positions inside the stored window: Adv-GRPO's window at step 0 trains both its steps.
    assert trained_steps(range(0, 2), 10, 0.99) == [0, 1]
    assert trained_steps(range(8, 10), 10, 0.99) == [0]  # step 9 is cut, step 8 stays
    assert trained_steps((2, 3), 4, 0.99) == [0]  # any sequence of step indices


def test_degenerate_steps_are_a_clear_error_never_a_division_by_zero():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25])
    sigmas_next = torch.tensor([0.75, 0.5, 0.25, 0.0])
    # 'cps' at the last step: std = sigma' * sin(a*pi/2) = 0.
    assert step_std("cps", 0.25, 0.0, 0.8) == 0.0 and step_std("cps", 0.5, 0.25, 0.8) > 0
    assert step_std("sde", 0.25, 0.0, 0.7) > 0  # the SDE step still has noise there
    with pytest.raises(ValueError, match=r"step 3 .*deterministic.*timestep_fraction"):
        check_trainable_steps([0, 3], range(4), sigmas, sigmas_next, step="cps", noise_level=0.8)
    check_trainable_steps([0, 1, 2], range(4), sigmas, sigmas_next, step="cps", noise_level=0.8)
    check_trainable_steps([3], range(4), sigmas, sigmas_next, step="sde", noise_level=0.7, sigma_max=0.75)
    with pytest.raises(ValueError, match="no step to train"):
        check_trainable_steps([], range(3, 4), sigmas, sigmas_next, step="cps", noise_level=0.8)
    # The KL refuses a zero std instead of returning inf/NaN.
    mean = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="std is 0"):
        kl_to_reference(mean, mean + 1, torch.zeros(2, 1, 1, 1))
    # The sampled step itself: a zero std makes a log-prob that carries no gradient.
    out = cps_step(mean, torch.ones_like(mean), 0.25, 0.0, noise_level=0.8, prev_sample=mean)
    assert float(out.std.max()) == 0.0


# --------------------------------------------------------------------------- advantages, losses


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    groups = ["a", "a", "b", "b"]  # means 2 and 4
    centered = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    global_std = math.sqrt(3.5)  # population std of [1, 3, 2, 6]
    torch.testing.assert_close(group_advantages(rewards, groups), centered / (global_std + 1e-4))
    per_group = torch.tensor([-1 / 1.0001, 1 / 1.0001, -2 / 2.0001, 2 / 2.0001])
    torch.testing.assert_close(group_advantages(rewards, groups, global_std=False), per_group)
    # Tensor labels (prompt ids, any order) give the same result.
    torch.testing.assert_close(group_advantages(rewards, torch.tensor([7, 7, 3, 3])), centered / (global_std + 1e-4))
    # A lone image and a constant group get 0.
    adv = group_advantages(torch.tensor([5.0, 1.0, 1.0]), [0, 1, 1], global_std=False)
    torch.testing.assert_close(adv, torch.zeros(3))


def test_group_advantages_clip_an_outlier():
    # One group of 50: 49 zeros and one 100. Per-group: outlier sqrt(49) = 7 -> clipped to 5,
    # the others -2/14 = -1/7.
    rewards = torch.zeros(50)
    rewards[10] = 100.0
    adv = group_advantages(rewards, [0] * 50, global_std=False, eps=0.0)
    assert adv[10].item() == pytest.approx(5.0)
    torch.testing.assert_close(adv[torch.arange(50) != 10], torch.full((49,), -1 / 7))
    assert group_advantages(rewards, [0] * 50, global_std=False, eps=0.0, clip=None)[10].item() == pytest.approx(7.0)
    # Global std with a second, all-zero group: std over 100 rewards = sqrt(99); outlier 98/9.95 -> 5.
    rewards2 = torch.cat([rewards, torch.zeros(50)])
    adv2 = group_advantages(rewards2, [0] * 50 + [1] * 50)
    assert adv2[10].item() == pytest.approx(5.0)
    assert adv2[0].item() == pytest.approx(-2 / (math.sqrt(99) + 1e-4), rel=1e-6)
    assert (adv2[50:] == 0).all()


def test_ppo_clipped_loss_by_hand():
    ratios = torch.tensor([1.1, 1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0, 1.0])
    old = torch.tensor([-1.0, 0.3, 2.0, -0.5, 0.0])
    logp = (old + ratios.log()).requires_grad_(True)
    loss, st = ppo_clipped_loss(logp, old, adv, clip_range=0.2)
    # max(-A r, -A clamp(r)) per sample: inside -2.2; A>0 r>1+c: -1.2 (clipped); A<0 r<1-c: 0.8
    # (clipped); A<0 r>1+c: 1.5 (unclipped, pessimistic); A>0 r<1-c: -0.5 (unclipped).
    assert loss.item() == pytest.approx((-2.2 - 1.2 + 0.8 + 1.5 - 0.5) / 5, abs=1e-6)
    assert st["clip_frac"].item() == pytest.approx(0.8)
    assert st["approx_kl"].item() == pytest.approx(0.5 * (ratios.log() ** 2).mean().item(), rel=1e-6)
    assert st["ratio_mean"].item() == pytest.approx(1.02, abs=1e-6)
    loss.backward()
    # Clipped samples get no gradient; the others get -A * r / B.
    expected = torch.tensor([-2.0 * 1.1, 0.0, 0.0, 1.0 * 1.5, -1.0 * 0.5]) / 5
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_at_the_sampling_policy_is_the_policy_gradient():
    logp = torch.tensor([-0.3, 0.2, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = ppo_clipped_loss(logp, logp.detach(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert st["clip_frac"].item() == 0.0 and st["approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)
    with pytest.raises(ValueError, match="shape"):
        ppo_clipped_loss(logp, logp.detach(), adv[:, None], 0.1)


def test_grpo_loss_adds_beta_times_kl():
    logp, old, adv = torch.tensor([0.1, -0.1]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    policy, _ = ppo_clipped_loss(logp, old, adv, 0.2)
    kl = torch.tensor([0.1, 0.3])
    loss, st = grpo_loss(logp, old, adv, 0.2, kl=kl, beta=0.5)
    assert loss.item() == pytest.approx(policy.item() + 0.5 * 0.2, abs=1e-6)
    assert st["policy_loss"].item() == pytest.approx(policy.item())
    assert st["kl"].item() == pytest.approx(0.2)
    assert {"clip_frac", "approx_kl", "ratio_mean"} <= st.keys()
    loss0, st0 = grpo_loss(logp, old, adv, 0.2)
    assert loss0.item() == pytest.approx(policy.item()) and "kl" not in st0
    loss_logged, _ = grpo_loss(logp, old, adv, 0.2, kl=kl, beta=0.0)  # logged, not added
    assert loss_logged.item() == pytest.approx(policy.item())
    with pytest.raises(ValueError, match="kl"):
        grpo_loss(logp, old, adv, 0.2, beta=0.1)


# --------------------------------------------------------------------------- EMA


def test_ema_by_hand_respects_update_every():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    ema = EMA([p], decay=0.9, update_every=2, warmup=False)
    with torch.no_grad():
        p.fill_(3.0)
    assert ema.step(1) is False
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.0, -1.0]))
    assert ema.step(2) is True
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * -1 + 0.1 * 3]))
    with torch.no_grad():
        p.fill_(5.0)
    ema.step(3)
    ema.step(4)
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9 * 1.2 + 0.5, 0.9 * -0.6 + 0.5]))
    assert ema.num_updates == 2


def test_ema_warmup_follows_flow_grpo():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA([p], decay=0.9, update_every=8)
    with torch.no_grad():
        p.fill_(3.0)
    ema.step(8)  # decay min(0.9, 9/18) = 0.5
    torch.testing.assert_close(ema.shadow[0], torch.tensor([2.0]))
    assert ema.current_decay(8) == pytest.approx(0.5)
    assert ema.current_decay(80) == pytest.approx(0.9) and ema.current_decay(800) == pytest.approx(0.9)


def test_ema_keeps_fp32_shadows_and_swap_in_restores():
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    named = dict(lin.named_parameters())
    ema = EMA(named, decay=0.5, update_every=1, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    live = {k: v.detach().clone() for k, v in named.items()}
    with torch.no_grad():
        for v in named.values():
            v.add_(1.0)
    ema.step(1)
    after = {k: v.detach().clone() for k, v in named.items()}
    with ema.swap_in():
        for name, shadow in zip(ema.names, ema.shadow, strict=True):
            torch.testing.assert_close(named[name].float(), shadow.to(torch.bfloat16).float())
            torch.testing.assert_close(shadow, live[name].float() + 0.5, atol=2e-2, rtol=0)
    for k, v in named.items():
        assert torch.equal(v, after[k])
    with pytest.raises(RuntimeError), ema.swap_in(list(named.values())):
        raise RuntimeError("eval failed")
    for k, v in named.items():
        assert torch.equal(v, after[k])  # restored on error too


def test_ema_state_dict_round_trips_through_safetensors():
    params = [torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(3))]
    ema = EMA(params, decay=0.9, update_every=1)
    with torch.no_grad():
        params[0].add_(1.0)
    ema.step(1)
    state = ema.state_dict()
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    meta = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    assert meta == {"num_updates": 1, "decay": 0.9, "update_every": 1}
    restored = EMA(
        [torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))], decay=0.9, update_every=1
    )
    restored.load_state_dict({**load(save(tensors)), **meta})
    for a, b in zip(ema.shadow, restored.shadow, strict=True):
        assert torch.equal(a, b)
    assert restored.num_updates == 1
    with pytest.raises(KeyError):
        restored.load_state_dict({"shadow.0": tensors["shadow.0"]})


# --------------------------------------------------------------------------- schedule


def test_ratio_schedule_k10_over_30_epochs():
    sched = DiscriminatorSchedule(mode="ratio", ratio_k=10)
    d = [e for e in range(30) if sched.trains_discriminator(e)]
    g = [e for e in range(30) if sched.trains_generator(e)]
    assert len(d) == 27 and g == [9, 19, 29]
    assert not set(d) & set(g)
    one = DiscriminatorSchedule(mode="ratio", ratio_k=1)
    assert all(one.trains_generator(e) and not one.trains_discriminator(e) for e in range(5))


def test_trigger_and_off_schedules():
    trig = DiscriminatorSchedule(mode="trigger")
    assert trig.trains_discriminator(0, 0.6, 0.5) and not trig.trains_discriminator(0, 0.5, 0.5)
    assert not trig.trains_discriminator(3, 0.4, 0.5)
    assert not trig.trains_discriminator(0, None, 0.5) and not trig.trains_discriminator(0, 0.6, None)
    # The discriminator trains *instead of* the generator: exactly one of them per epoch.
    for means in [(0.6, 0.5), (0.5, 0.5), (0.4, 0.5), (None, 0.5), (0.6, None)]:
        assert trig.trains_generator(0, *means) != trig.trains_discriminator(0, *means)
    assert not trig.trains_generator(0, 0.6, 0.5) and trig.trains_generator(0, 0.4, 0.5) and trig.trains_generator(0)
    off = DiscriminatorSchedule(mode="off")
    assert all(off.trains_generator(e) and not off.trains_discriminator(e, 1.0, 0.0) for e in range(5))
    with pytest.raises(ValueError):
        DiscriminatorSchedule(mode="sometimes")
    with pytest.raises(ValueError):
        DiscriminatorSchedule(mode="ratio", ratio_k=0)
