"""Truncated diffusion (docs/algorithms.md §3) and progressive distillation (§4), pure torch.

The discrete cosine schedule of Improved DDPM with x0-prediction; training draws t only from {1, ..., T'};
deterministic DDIM runs from T' down to 0. A "denoiser" is any callable ``D(x_t, t) -> x0_hat`` with t a
float tensor of shape (B,) in timestep units. Tensors may be images (B, C, H, W) or vectors (B, D).
"""

from __future__ import annotations

import math

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) -> shape that broadcasts against ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class CosineSchedule:
    """ᾱ_t for t = 0..T: betas from f(t) = cos²(((t/T)+s)/(1+s)·π/2), clipped at 0.999, as Improved DDPM."""

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        self.T = T
        t = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) with α_t² = ᾱ_t, σ_t² = 1 − ᾱ_t, as float32 on t's device; t holds integer times."""
        ab = self.alpha_bar.to(t.device)[t.long()]
        return ab.sqrt().float(), (1 - ab).sqrt().float()

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar.to(t.device)[t.long()]
        return torch.log(ab / (1 - ab)).float()


def q_sample(schedule: CosineSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    alpha, sigma = schedule.alpha_sigma(t)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise


def ddim_step(z_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    """Deterministic DDIM (η = 0) from time t to s < t given the x0 estimate; σ_s = 0 returns x0_hat."""
    eps_hat = (z_t - _bcast(alpha_t, z_t) * x0_hat) / _bcast(sigma_t, z_t)
    return _bcast(alpha_s, z_t) * x0_hat + _bcast(sigma_s, z_t) * eps_hat


def ddim_timesteps(t_trunc: int, n_steps: int) -> list[int]:
    """The n_steps + 1 integer times T', ..., 0 of an n_steps DDIM sampler; n_steps must divide T'."""
    if t_trunc % n_steps:
        raise ValueError(f"n_steps = {n_steps} must divide T' = {t_trunc}")
    return [t_trunc * i // n_steps for i in range(n_steps, -1, -1)]


def _times(value: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), value, device=like.device, dtype=torch.long)


def ddim_sample(denoiser, z: torch.Tensor, schedule: CosineSchedule, t_trunc: int, n_steps: int) -> torch.Tensor:
    """Run the deterministic DDIM sampler from x_{T'} = z down to x_0 in n_steps network calls."""
    times = ddim_timesteps(t_trunc, n_steps)
    for t, s in zip(times[:-1], times[1:], strict=True):
        tt, ss = _times(t, z), _times(s, z)
        x0_hat = denoiser(z, tt.float())
        z = ddim_step(z, x0_hat, *schedule.alpha_sigma(tt), *schedule.alpha_sigma(ss))
    return z


def noise_to_truncation(schedule: CosineSchedule, x: torch.Tensor, noise: torch.Tensor, t_trunc: int):
    """x_{T'} = α_{T'}·x + σ_{T'}·noise: the forward half of G2."""
    return q_sample(schedule, x, _times(t_trunc, x), noise)


def one_step_denoise(denoiser, schedule: CosineSchedule, x: torch.Tensor, z2: torch.Tensor, t_trunc: int):
    """G2(x, z2) = D(α_{T'}·x + σ_{T'}·z2, T') for the distilled one-step D (docs/algorithms.md §2)."""
    x_t = noise_to_truncation(schedule, x, z2, t_trunc)
    return denoiser(x_t, _times(t_trunc, x).float())


# ----------------------------------------------------------------------------------------------------------------
# Training losses


def sample_train_times(batch: int, t_trunc: int, device, generator=None) -> torch.Tensor:
    """Truncated training: t uniform in {1, ..., T'} (never 0, never above T')."""
    return torch.randint(1, t_trunc + 1, (batch,), device=device, generator=generator)


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def loss_weight(schedule: CosineSchedule, t: torch.Tensor, weighting: str = "sqrt_snr", sigma_data: float = 0.5):
    """Per-sample weight of the x0 MSE at integer times t.

    - ``sqrt_snr``: w = exp(λ_t / 2) = α_t / σ_t, HDEBM's weighting (docs/algorithms.md §3).
    - ``edm``: w = 1 / c_out(t)² = (α_t²σ_d² + σ_t²) / (σ_t²σ_d²) (Karras et al. 2022), for EDM-preconditioned
      denoisers (the toy MLP): it makes the network's own target unit-variance at every t. Divided by its mean
      over t ∈ {1..T} so the LR keeps the scale it has under ``sqrt_snr``.
    """
    if weighting == "sqrt_snr":
        return torch.exp(schedule.log_snr(t) / 2)
    if weighting == "edm":
        ab = schedule.alpha_bar[1:]
        table = (ab * sigma_data**2 + 1 - ab) / ((1 - ab) * sigma_data**2)
        return (table / table.mean()).float().to(t.device)[t.long() - 1]
    raise ValueError(f"unknown diffusion loss weighting {weighting!r} (expected 'sqrt_snr' or 'edm')")


def diffusion_loss(
    denoiser, schedule: CosineSchedule, x0: torch.Tensor, t_trunc: int, weighting: str = "sqrt_snr"
) -> torch.Tensor:
    """mean_t w(t)·‖D(x_t, t) − x0‖², t uniform in {1..T'}; w from ``loss_weight`` (paper: exp(λ_t / 2))."""
    t = sample_train_times(x0.shape[0], t_trunc, x0.device)
    x_t = q_sample(schedule, x0, t, torch.randn_like(x0))
    return (loss_weight(schedule, t, weighting) * per_sample_mse(denoiser(x_t, t.float()), x0)).mean()


def distill_target(z_t, z_s_teacher, alpha_t, sigma_t, alpha_s, sigma_s):
    """x̃ such that one DDIM step t → s from z_t with x0 = x̃ lands exactly on the teacher's z_s''."""
    ratio = _bcast(sigma_s / sigma_t, z_t)
    return (z_s_teacher - ratio * z_t) / (_bcast(alpha_s, z_t) - ratio * _bcast(alpha_t, z_t))


@torch.no_grad()
def teacher_two_steps(teacher, schedule: CosineSchedule, z_t, t: torch.Tensor, s: torch.Tensor):
    """Two teacher DDIM steps t → (t+s)/2 → s; returns (z_s'', the teacher's last x0 estimate)."""
    mid = (t + s) // 2
    a_t, s_t = schedule.alpha_sigma(t)
    a_m, s_m = schedule.alpha_sigma(mid)
    a_s, s_s = schedule.alpha_sigma(s)
    z_mid = ddim_step(z_t, teacher(z_t, t.float()), a_t, s_t, a_m, s_m)
    x0_mid = teacher(z_mid, mid.float())
    return ddim_step(z_mid, x0_mid, a_m, s_m, a_s, s_s), x0_mid


def distill_times(batch: int, t_trunc: int, n_student: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random student step t → s on the n_student-step grid over [0, T']."""
    j = torch.randint(1, n_student + 1, (batch,), device=device)
    return t_trunc * j // n_student, t_trunc * (j - 1) // n_student


def distill_loss(student, teacher, schedule: CosineSchedule, x0: torch.Tensor, t_trunc: int, n_student: int):
    """Progressive distillation (Salimans & Ho): one student step must match two teacher steps.

    Weighted by max(SNR_t, 1) ("SNR truncation"); the target on the final step to 0 is the teacher's x̂0.
    """
    t, s = distill_times(x0.shape[0], t_trunc, n_student, x0.device)
    z_t = q_sample(schedule, x0, t, torch.randn_like(x0))
    z_s_teacher, x0_teacher = teacher_two_steps(teacher, schedule, z_t, t, s)
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    target = distill_target(z_t, z_s_teacher, a_t, s_t, a_s, s_s)
    last = _bcast(s == 0, x0)
    target = torch.where(last, x0_teacher, target)
    weight = torch.clamp((a_t / s_t) ** 2, min=1.0)
    return (weight * per_sample_mse(student(z_t, t.float()), target)).mean()


@torch.no_grad()
def distill_gap(student, teacher, schedule: CosineSchedule, x0: torch.Tensor, t_trunc: int, n_student: int):
    """Mean squared difference between one student step and the teacher's two steps, over every grid step."""
    gaps = []
    for j in range(1, n_student + 1):
        t = torch.full((x0.shape[0],), t_trunc * j // n_student, device=x0.device, dtype=torch.long)
        s = torch.full_like(t, t_trunc * (j - 1) // n_student)
        z_t = q_sample(schedule, x0, t, torch.randn_like(x0))
        z_s_teacher, _ = teacher_two_steps(teacher, schedule, z_t, t, s)
        a_t, s_t = schedule.alpha_sigma(t)
        a_s, s_s = schedule.alpha_sigma(s)
        z_s_student = ddim_step(z_t, student(z_t, t.float()), a_t, s_t, a_s, s_s)
        gaps.append(per_sample_mse(z_s_student, z_s_teacher).mean())
    return torch.stack(gaps).mean().item()
