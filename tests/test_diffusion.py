"""Truncated diffusion and distillation against closed forms (docs/algorithms.md §3, §4, §10)."""

from __future__ import annotations

import math

import pytest
import torch

from hdebm_ray.core import diffusion as D


def test_schedule_matches_closed_form_cosine():
    T, s = 1000, 0.008
    sched = D.CosineSchedule(T, s)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2
    closed = f / f[0]
    # Clipping betas at 0.999 only touches the last few steps; everywhere else the product telescopes exactly.
    assert torch.allclose(sched.alpha_bar[:990], closed[:990], rtol=1e-10, atol=1e-12)
    assert sched.alpha_bar[0] == 1.0
    alpha, sigma = sched.alpha_sigma(torch.tensor([0, 256, 512]))
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(3))
    assert torch.allclose(alpha**2, closed[[0, 256, 512]].float(), rtol=1e-6)
    betas = 1 - sched.alpha_bar[1:] / sched.alpha_bar[:-1]
    assert betas.max() <= 0.999 + 1e-12 and (betas > 0).all()


def test_training_samples_only_truncated_times():
    sched, t_trunc, seen = D.CosineSchedule(1000), 7, []

    def denoiser(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x0 = torch.randn(64, 3)
    for _ in range(200):
        D.diffusion_loss(denoiser, sched, x0, t_trunc)
    times = torch.cat(seen)
    assert times.min() == 1 and times.max() == t_trunc  # both ends reached, nothing outside
    assert set(times.long().tolist()) == set(range(1, t_trunc + 1))


def test_loss_weight_is_exp_half_logsnr():
    sched = D.CosineSchedule(1000)
    x0 = torch.randn(8, 2)
    torch.manual_seed(0)
    t = D.sample_train_times(8, 100, "cpu")
    torch.manual_seed(0)
    loss = D.diffusion_loss(lambda x, tt: x0 + 1.0, sched, x0, 100)  # error 1 per coordinate
    alpha, sigma = sched.alpha_sigma(t)
    assert torch.allclose(loss, (alpha / sigma).mean(), rtol=1e-5)


def test_edm_weight_is_inverse_c_out_squared_up_to_one_constant():
    sched = D.CosineSchedule(1000)
    t = torch.arange(1, 1001)
    alpha, sigma = sched.alpha_sigma(t)
    sd = 0.5
    c_out_sq = (sigma * sd) ** 2 / (alpha**2 * sd**2 + sigma**2)
    w = D.loss_weight(sched, t, "edm", sigma_data=sd)
    ratio = w * c_out_sq  # constant across t, and the weights average to 1 over {1..T}
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert abs(w.double().mean().item() - 1.0) < 1e-5
    with pytest.raises(ValueError, match="weighting"):
        D.loss_weight(sched, t, "snr")


def test_ddim_with_oracle_denoiser_recovers_data_exactly():
    sched = D.CosineSchedule(1000)
    torch.manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    oracle = lambda x, t: x0  # noqa: E731
    for n_steps in (1, 2, 8, 256):
        z = D.noise_to_truncation(sched, x0, torch.randn_like(x0), 256)
        out = D.ddim_sample(oracle, z, sched, 256, n_steps)
        assert torch.allclose(out, x0, atol=1e-5), n_steps


def test_distillation_target_makes_one_student_step_equal_two_teacher_steps():
    sched = D.CosineSchedule(1000)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    net = lambda x, t: teacher(x) * (1 + t[:, None] / 1000)  # noqa: E731  depends on t, not an oracle
    z_t = torch.randn(32, 4, dtype=torch.float64)
    for t_val, s_val in [(256, 128), (64, 32), (32, 0), (17 * 2, 0)]:
        t = torch.full((32,), t_val)
        s = torch.full((32,), s_val)
        z_s_teacher, x0_last = D.teacher_two_steps(net, sched, z_t, t, s)
        a_t, s_t = (v.double() for v in sched.alpha_sigma(t))
        a_s, s_s = (v.double() for v in sched.alpha_sigma(s))
        target = D.distill_target(z_t, z_s_teacher, a_t, s_t, a_s, s_s)
        one_step = D.ddim_step(z_t, target, a_t, s_t, a_s, s_s)
        assert torch.allclose(one_step, z_s_teacher, atol=1e-9), (t_val, s_val)
        if s_val == 0:  # on the last step the target is the teacher's own x0 estimate
            assert torch.allclose(target, x0_last, atol=1e-9)


def test_perfect_student_has_zero_distill_loss_and_gap():
    sched = D.CosineSchedule(1000)
    x0 = torch.randn(8, 2)
    oracle = lambda x, t: x0  # noqa: E731  an oracle teacher is its own perfect one-step student
    assert D.distill_loss(oracle, oracle, sched, x0, 64, 4).item() < 1e-8
    assert D.distill_gap(oracle, oracle, sched, x0, 64, 4) < 1e-10
