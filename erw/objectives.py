"""Training objectives of both ERW phases: interpolants, time sampling, losses, alignment schedule.

Conventions (shared with the model and the samplers): t in [0, 1], t = 0 is data and t = 1 is
noise, x_t = alpha_t x + sigma_t eps, and the network predicts the velocity
v = d(alpha_t)/dt x + d(sigma_t)/dt eps (eps - x on the linear path).

Phase 1 (warmup): the L2R blocks see clean latents at t = 0 and are trained to reproduce the
frozen encoder's tokens (alignment loss only). Phase 2: denoising loss plus the alignment loss
weighted by c(s) = c0 * 2^(-(s - W) / half_life), s the global step and W the warmup length.

Every random number is drawn per sample from `draws`, by stream ("time", "noise", "label_drop"):
the trainer passes rows of tables keyed by (seed, step, position in the global batch), so they
do not depend on the world size (erw.draws); without draws the global RNG is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from erw.config import InterpolantPath, ModelConfig, ObjectiveConfig, TimeSampling, choices
from erw.errors import ErwError
from erw.draws import GeneratorDraws, SampleDraws


class ObjectiveError(ErwError):
    """Inputs the objective cannot use (shapes, grids, unknown options)."""


# ---------------------------------------------------------------------------------------------
# Interpolant.


def path_coefficients(path: InterpolantPath, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), each shaped like t."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        angle = t * (math.pi / 2)
        return angle.cos(), angle.sin(), -(math.pi / 2) * angle.sin(), (math.pi / 2) * angle.cos()
    raise ObjectiveError(f"unknown interpolant path {path!r}: choose one of {', '.join(choices(InterpolantPath))}")


def interpolate(path: InterpolantPath, x: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Noisy input x_t and velocity target v for clean x, noise eps and times t [N]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    alpha, sigma, d_alpha, d_sigma = (c.view(shape) for c in path_coefficients(path, t))
    return alpha * x + sigma * eps, d_alpha * x + d_sigma * eps


def sample_time(draws: SampleDraws, kind: str = "uniform", *, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """A float32 time in (0, 1) per sample of `draws` (stream "time"): uniform, or lognormal =
    sigmoid of N(mean, std) (logit-normal)."""
    if kind == "uniform":
        return draws.uniform("time")
    if kind == "lognormal":
        return torch.sigmoid(mean + std * draws.normal("time"))
    raise ObjectiveError(f"unknown time sampling {kind!r}: choose one of {', '.join(choices(TimeSampling))}")


# ---------------------------------------------------------------------------------------------
# Losses. Both are computed in fp32 whatever autocast produced.


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error averaged over C, H, W per sample, then over the batch."""
    if pred.shape != target.shape:
        raise ObjectiveError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return mean_flat((pred.float() - target.float()) ** 2).mean()


def _grid_side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ObjectiveError(
            f"{what} has {num_tokens} tokens, which is not a square grid: alignment needs patch tokens "
            "only (drop the class and register tokens) from a square image"
        )
    return side


def resample_tokens(tokens: Tensor, num_tokens: int) -> Tensor:
    """Resample a square token grid [N, T, D] to num_tokens (a square) tokens.

    Shrinking averages the covered area, growing interpolates bilinearly; equal grids pass
    through untouched."""
    if tokens.shape[1] == num_tokens:
        return tokens
    side_in = _grid_side(tokens.shape[1], "the encoder token sequence")
    side_out = _grid_side(num_tokens, "the model token sequence")
    n, _, d = tokens.shape
    grid = tokens.float().transpose(1, 2).reshape(n, d, side_in, side_in)
    if side_out < side_in:
        grid = F.interpolate(grid, size=(side_out, side_out), mode="area")
    else:
        grid = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def alignment_loss(projected: Sequence[Tensor], target: Tensor) -> Tensor:
    """Negative cosine similarity between each projector's tokens [N, T, D] and the encoder's
    tokens [N, T', D], averaged over every sample and token, then over projectors.

    The encoder grid is resampled to the model grid when they differ. Both sides are normalised
    in fp32: bf16 norms of 768+ wide vectors lose the precision the loss is made of."""
    if len(projected) == 0:
        raise ObjectiveError("alignment needs at least one projector: build the model with the encoder's dim")
    target = target.float()
    losses = []
    for z in projected:
        if z.shape[0] != target.shape[0] or z.shape[-1] != target.shape[-1]:
            raise ObjectiveError(
                f"projected tokens {tuple(z.shape)} cannot align with encoder tokens {tuple(target.shape)}: "
                "batch size and token width (the projector's output = the encoder's dim) must match"
            )
        z = F.normalize(z.float(), dim=-1)
        t = F.normalize(resample_tokens(target, z.shape[1]), dim=-1)
        losses.append(-(z * t).sum(dim=-1).mean())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Alignment weight of phase 2.


def align_weight(step: int, warmup_steps: int, coeff: float, schedule: str = "decay", half_life: int = 50_000) -> float:
    """c(s) at global step s (counted from the start of the warmup).

    decay: c0 * 2^(-(s - W) / half_life) for s >= W, c0 before; constant: c0 (REPA)."""
    if schedule == "constant":
        return float(coeff)
    if schedule == "decay":
        return float(coeff) * 2.0 ** (-max(step - warmup_steps, 0) / half_life)
    raise ObjectiveError(f"unknown alignment schedule {schedule!r}: choose 'decay' or 'constant'")


# ---------------------------------------------------------------------------------------------
# The two objectives the trainer calls.


class DiffusionObjective:
    """Phase 2 (and plain SiT/REPA): denoising loss + c(s) * alignment loss.

    `step` in __call__ is the phase-2 optimizer step (0 at the start of phase 2); the global step
    of the schedule is warmup_steps + step."""

    def __init__(self, cfg: ObjectiveConfig, model_cfg: ModelConfig, warmup_steps: int = 0):
        self.cfg = cfg
        self.coeff = cfg.resolved_align_coeff(model_cfg)
        self.warmup_steps = warmup_steps

    def align_weight(self, step: int) -> float:
        c = self.cfg
        return align_weight(
            self.warmup_steps + step, self.warmup_steps, self.coeff, c.align_schedule, c.align_half_life
        )

    def __call__(
        self,
        model: torch.nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Tensor | None,
        step: int,
        draws: SampleDraws | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        x = x.float()
        draws = draws if draws is not None else GeneratorDraws(x.shape[0], x.device)
        t = sample_time(draws, c.time_sampling, mean=c.lognormal_mean, std=c.lognormal_std)
        x_t, v = interpolate(c.path, x, draws.normal("noise", tuple(x.shape[1:])), t)
        pred, projected = model(x_t, t, y, label_drop_draws=draws.uniform("label_drop"))
        loss_denoise = denoising_loss(pred, v)
        weight = self.align_weight(step) if targets is not None else 0.0
        if targets is None:
            loss_align = torch.zeros((), device=x.device)
            loss = loss_denoise
        else:
            # Kept in the graph even at weight 0 so every projector parameter gets a gradient
            # (DDP expects all parameters used) and the alignment stays visible in the logs.
            loss_align = alignment_loss(projected, targets)
            loss = loss_denoise + weight * loss_align
        logs = {
            "loss_denoise": loss_denoise.detach(),
            "loss_align": loss_align.detach(),
            "align_weight": torch.tensor(weight, device=x.device),
        }
        return loss, logs


class WarmupObjective:
    """Phase 1: the L2R model sees clean latents at t = 0 with their labels; alignment loss only."""

    def __call__(
        self,
        model: torch.nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Tensor | None,
        step: int,
        draws: SampleDraws | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if targets is None:
            raise ObjectiveError("the ERW warmup needs encoder tokens as targets: configure encoder.name")
        draws = draws if draws is not None else GeneratorDraws(x.shape[0], x.device)
        t = torch.zeros(x.shape[0], device=x.device)
        _, projected = model(x.float(), t, y, label_drop_draws=draws.uniform("label_drop"))
        loss = alignment_loss(projected, targets)
        return loss, {"loss_align": loss.detach()}
