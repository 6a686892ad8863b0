"""Samplers for flow-matching models: Euler-Maruyama SDE and Euler/Heun ODE, with guidance on an interval.

Time runs backwards from t = 1 (pure noise) to t = 0 (data) along x_t = alpha_t x + sigma_t eps.
The model predicts the velocity v(x_t, t) = E[d_alpha x + d_sigma eps | x_t]; that alone defines

    the probability-flow ODE   dx = v dt
    the reverse-time SDE       dx = (v - w(t)/2 * score) dt + sqrt(w(t)) dW,   w(t) = 2t

whose marginals are those of the data path for any w >= 0 (w = 2t is REPA/SiT's choice). The score
follows from the velocity because both are linear in (x, eps) given x_t, see `score_from_velocity`.

Classifier-free guidance mixes a conditional and an unconditional velocity, only for t inside
[guidance_low, guidance_high] (REPA's guidance interval); outside it the model runs once, conditional.
The state is float64 so that hundreds of small steps do not accumulate rounding error; the model
itself runs in its own dtype (see `model_velocity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from erw.errors import ErwError
from erw.config import HeunConvention, InterpolantPath, OdeSolver, SamplerMode, choices
from erw.objectives import path_coefficients

# (x [B, ...], t [B], y [B]) -> velocity shaped like x.
VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# () -> a fresh standard normal draw shaped like the state (float64, on the state's device).
NoiseFn = Callable[[], Tensor]

SDE_LAST_T = 0.04  # the SDE stops here and takes one deterministic mean step to t = 0 (SiT/REPA)
MODES, SOLVERS, PATHS = choices(SamplerMode), choices(OdeSolver), choices(InterpolantPath)
HEUN_CONVENTIONS = choices(HeunConvention)


class SamplingError(ErwError):
    pass


def coefficients_at(path: str, t: float) -> tuple[float, float, float, float]:
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) of the training interpolant at one time."""
    return tuple(float(c) for c in path_coefficients(path, torch.tensor(t, dtype=torch.float64)))


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: v = v_uncond + scale * (v_cond - v_uncond) for t in [low, high]."""

    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0
    null_class: int = 0  # the label the model was trained to treat as "no class"

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.low <= t <= self.high


NO_GUIDANCE = Guidance()


def guided_velocity(
    velocity: VelocityFn,
    x: Tensor,
    t: float,
    y: Tensor,
    guidance: Guidance,
    guided_at: float | None = None,
) -> Tensor:
    """The (possibly guided) velocity at time t; both branches share one batched forward. Whether
    to guide is decided at `guided_at` (default: t itself)."""
    times = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    if not guidance.active(t if guided_at is None else guided_at):
        return velocity(x, times, y)
    null = torch.full_like(y, guidance.null_class)
    v_cond, v_uncond = velocity(torch.cat([x, x]), torch.cat([times, times]), torch.cat([y, null])).chunk(2)
    return v_uncond + guidance.scale * (v_cond - v_uncond)


def score_from_velocity(v: Tensor, x: Tensor, t: float, path: str) -> Tensor:
    """grad log p_t(x) from the velocity.

    Given x_t = alpha x0 + sigma eps and v = d_alpha x0 + d_sigma eps (both conditional means),
    eliminating x0 gives eps_hat = (alpha v - d_alpha x_t) / (alpha d_sigma - d_alpha sigma), and
    the score of a Gaussian perturbation is -eps_hat / sigma. Undefined at t = 0 (sigma = 0), which
    the SDE never visits.
    """
    alpha, sigma, d_alpha, d_sigma = coefficients_at(path, t)
    eps_hat = (alpha * v - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)
    return -eps_hat / sigma


def sde_diffusion(t: float) -> float:
    """w(t) = 2t: the noise the reverse SDE injects (and removes again through the score)."""
    return 2.0 * t


def euler_maruyama(
    velocity: VelocityFn,
    noise: NoiseFn,
    y: Tensor,
    *,
    steps: int = 250,
    path: str = "linear",
    guidance: Guidance = NO_GUIDANCE,
    t_last: float = SDE_LAST_T,
) -> Tensor:
    """Reverse SDE from t = 1 to t_last on a uniform grid of `steps` times, then a mean step to 0.

    Uses exactly `steps` (guided) velocity evaluations: steps - 1 stochastic steps plus the final
    deterministic one, whose noise would otherwise remain in the samples.
    """
    times = torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist() + [0.0]
    x = noise()
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = guided_velocity(velocity, x, t, y, guidance)
        w = sde_diffusion(t)
        drift = v - 0.5 * w * score_from_velocity(v, x, t, path)
        dt = t_next - t  # negative: time runs backwards
        x = x + drift * dt
        if i < steps - 1:
            x = x + math.sqrt(w * -dt) * noise()
    return x


def ode(
    velocity: VelocityFn,
    noise: NoiseFn,
    y: Tensor,
    *,
    steps: int = 50,
    solver: str = "heun",
    guidance: Guidance = NO_GUIDANCE,
    heun_convention: HeunConvention = "trapezoid",
) -> Tensor:
    """Probability-flow ODE from t = 1 to t = 0 on a uniform grid of `steps` intervals.

    Euler uses `steps` velocity evaluations. Heun (trapezoidal predictor-corrector) comes in two
    conventions, which give different FIDs at few steps or with a guidance interval:

    trapezoid  a corrector on every step (2 * steps evaluations, the last one at t = 0), guided
               when its own time t_next lies in the guidance interval;
    repa       REPA's samplers.py (`euler_sampler(heun=True)`): the last step is a plain Euler step
               (2 * steps - 1 evaluations: the model is never asked for t = 0), and the corrector
               is guided when the predictor's time t lies in the interval.
    """
    repa = heun_convention == "repa"
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise()
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t
        v = guided_velocity(velocity, x, t, y, guidance)
        if solver == "heun" and not (repa and i == steps - 1):
            v_next = guided_velocity(velocity, x + v * dt, t_next, y, guidance, guided_at=t if repa else t_next)
            v = 0.5 * (v + v_next)
        x = x + v * dt
    return x


def sample(
    velocity: VelocityFn,
    noise: NoiseFn,
    y: Tensor,
    *,
    mode: SamplerMode,
    steps: int,
    solver: OdeSolver = "euler",
    path: InterpolantPath = "linear",
    guidance: Guidance = NO_GUIDANCE,
    heun_convention: HeunConvention = "trapezoid",
) -> Tensor:
    """Draw one batch of samples (float64, shaped like noise()) for labels y."""
    if mode not in MODES:
        raise SamplingError(f"sampling mode {mode!r} is not one of {', '.join(MODES)}")
    if solver not in SOLVERS:
        raise SamplingError(f"ODE solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if path not in PATHS:
        raise SamplingError(f"interpolant path {path!r} is not one of {', '.join(PATHS)}")
    if heun_convention not in HEUN_CONVENTIONS:
        raise SamplingError(f"Heun convention {heun_convention!r} is not one of {', '.join(HEUN_CONVENTIONS)}")
    if steps < 1:
        raise SamplingError(f"the number of sampling steps must be at least 1, got {steps}")
    if mode == "sde":
        return euler_maruyama(velocity, noise, y, steps=steps, path=path, guidance=guidance)
    return ode(velocity, noise, y, steps=steps, solver=solver, guidance=guidance, heun_convention=heun_convention)


def model_velocity(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> VelocityFn:
    """Adapt a SiT, whose forward returns (prediction, projected tokens), to a VelocityFn.

    The float64 sampler state is cast to the model's parameter dtype for the forward pass (under
    autocast when asked, e.g. bf16 on GPU) and the prediction back to float64.
    """
    param_dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def velocity(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction, _ = model(x.to(param_dtype), t.to(param_dtype), y)
        return prediction.to(x.dtype)

    return velocity
