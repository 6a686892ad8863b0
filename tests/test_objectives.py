import math

import pytest
import torch

from erw.config import ModelConfig, ObjectiveConfig
from erw.draws import GeneratorDraws
from erw.objectives import (
    DiffusionObjective,
    ObjectiveError,
    WarmupObjective,
    align_weight,
    alignment_loss,
    denoising_loss,
    interpolate,
    path_coefficients,
    resample_tokens,
    sample_time,
)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_coefficient_derivatives_match_finite_differences(path):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    alpha, sigma, d_alpha, d_sigma = path_coefficients(path, t)
    a_plus, s_plus, _, _ = path_coefficients(path, t + h)
    a_minus, s_minus, _, _ = path_coefficients(path, t - h)
    torch.testing.assert_close(d_alpha, (a_plus - a_minus) / (2 * h), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_sigma, (s_plus - s_minus) / (2 * h), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_paths_go_from_data_to_noise(path):
    alpha, sigma, _, _ = path_coefficients(path, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(sigma, torch.tensor([0.0, 1.0]), atol=1e-7, rtol=0)


def test_cosine_path_preserves_variance():
    alpha, sigma, _, _ = path_coefficients("cosine", torch.rand(100))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(100))


def test_linear_velocity_target_is_noise_minus_data():
    x, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    x_t, v = interpolate("linear", x, eps, t)
    torch.testing.assert_close(v, eps - x)
    torch.testing.assert_close(x_t, (1 - t).view(4, 1, 1, 1) * x + t.view(4, 1, 1, 1) * eps)


def test_unknown_path_is_refused():
    with pytest.raises(ObjectiveError, match="linear, cosine"):
        path_coefficients("sqrt", torch.rand(2))


def test_lognormal_time_statistics():
    g = torch.Generator().manual_seed(0)
    t = sample_time(GeneratorDraws(200_000, "cpu", g), "lognormal", mean=-0.4, std=1.3)
    assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item() - (-0.4)) < 0.02
    assert abs(logit.std().item() - 1.3) < 0.02


def test_uniform_time_statistics_and_generator_reproducibility():
    t = sample_time(GeneratorDraws(200_000, "cpu", torch.Generator().manual_seed(1)), "uniform")
    assert abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002
    again = sample_time(GeneratorDraws(200_000, "cpu", torch.Generator().manual_seed(1)), "uniform")
    assert torch.equal(t, again)


def test_denoising_loss_averages_per_sample_then_batch():
    pred, target = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 2.0  # sample 0: mean of (4, 0, 0, 0) = 1; sample 1: 0
    assert denoising_loss(pred, target).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Alignment loss.


def test_alignment_loss_is_minus_one_for_identical_tokens():
    tokens = torch.randn(3, 16, 8)
    assert alignment_loss([tokens * 2.5], tokens).item() == pytest.approx(-1.0, abs=1e-6)


def test_alignment_loss_depends_on_every_sample_and_token():
    torch.manual_seed(0)
    z, target = torch.randn(4, 9, 6), torch.randn(4, 9, 6)
    base = alignment_loss([z], target)
    for i in range(4):
        for j in range(9):
            changed = target.clone()
            changed[i, j] = torch.randn(6)
            assert alignment_loss([z], changed).item() != pytest.approx(base.item(), abs=1e-7), (i, j)
    # the gradient reaches every sample and token of the projection
    z.requires_grad_(True)
    alignment_loss([z], target).backward()
    assert bool((z.grad.abs().sum(-1) > 0).all())


def test_alignment_loss_averages_projectors():
    target = torch.randn(2, 4, 5)
    z1, z2 = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    both = alignment_loss([z1, z2], target)
    torch.testing.assert_close(both, (alignment_loss([z1], target) + alignment_loss([z2], target)) / 2)


def test_alignment_loss_in_fp32_from_bf16_inputs():
    tokens = torch.randn(2, 16, 768).bfloat16()
    loss = alignment_loss([tokens], tokens)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(-1.0, abs=1e-6)


def test_alignment_loss_refuses_mismatched_width():
    with pytest.raises(ObjectiveError, match="token width"):
        alignment_loss([torch.randn(2, 4, 5)], torch.randn(2, 4, 6))


def test_resampling_is_identity_on_equal_grids():
    tokens = torch.randn(2, 16, 3)
    assert resample_tokens(tokens, 16) is tokens


@pytest.mark.parametrize("size_in,size_out", [(256, 64), (64, 256), (196, 256), (1024, 256)])
def test_resampling_preserves_constant_fields(size_in, size_out):
    tokens = torch.randn(2, 1, 7).expand(2, size_in, 7)
    out = resample_tokens(tokens, size_out)
    assert out.shape == (2, size_out, 7)
    torch.testing.assert_close(out, tokens[:, :1].expand(2, size_out, 7))


def test_resampling_keeps_row_major_layout():
    """A field that varies only along x keeps varying only along x after resampling."""
    side = 16
    cols = torch.arange(side, dtype=torch.float32).repeat(side)  # token r * side + c holds c
    out = resample_tokens(cols.view(1, -1, 1), 64).view(8, 8)
    assert torch.allclose(out, out[:1].expand(8, 8))  # constant down each column
    assert bool((out[0, 1:] > out[0, :-1]).all())  # increasing along a row


def test_alignment_across_grids_uses_resampled_target():
    target = torch.randn(2, 256, 4)
    z = torch.randn(2, 64, 4)
    expected = alignment_loss([z], resample_tokens(target, 64))
    torch.testing.assert_close(alignment_loss([z], target), expected)


def test_non_square_token_count_is_refused():
    with pytest.raises(ObjectiveError, match="not a square"):
        resample_tokens(torch.randn(1, 257, 4), 64)  # a class token left in


# ---------------------------------------------------------------------------------------------
# Schedule.


def test_xl_schedule_halves_every_fifty_thousand_steps():
    cfg, model = ObjectiveConfig(), ModelConfig(arch="SiT-XL/2")
    c0 = cfg.resolved_align_coeff(model)
    w = 100_000
    assert align_weight(w, w, c0) == pytest.approx(6.0)
    assert align_weight(w + 50_000, w, c0) == pytest.approx(3.0)
    assert align_weight(w + 100_000, w, c0) == pytest.approx(1.5)
    assert align_weight(w, w, c0, schedule="constant") == align_weight(w + 10**6, w, c0, schedule="constant") == 6.0


@pytest.mark.parametrize("arch,c0", [("SiT-L/2", 3.0), ("SiT-B/2", 1.0), ("SiT-S/2", 1.0)])
def test_coefficient_by_model_size(arch, c0):
    assert ObjectiveConfig().resolved_align_coeff(ModelConfig(arch=arch)) == c0


def test_objective_counts_phase_two_steps_after_the_warmup():
    objective = DiffusionObjective(ObjectiveConfig(), ModelConfig(arch="SiT-XL/2"), warmup_steps=100_000)
    assert objective.align_weight(0) == pytest.approx(6.0)
    assert objective.align_weight(50_000) == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# Objectives with small stand-in models.


class RecordingModel(torch.nn.Module):
    """Linear velocity head + a projection of the flattened input; records the times it saw."""

    def __init__(self, channels=3, side=4, dim=5, prediction=True):
        super().__init__()
        self.head = torch.nn.Conv2d(channels, channels, 1)
        self.proj = torch.nn.Linear(channels, dim)
        self.prediction = prediction
        self.times = []

    def forward(self, x, t, y, label_drop_draws=None):
        self.times.append(t.clone())
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return (self.head(x) if self.prediction else None), [tokens]


def test_warmup_objective_uses_clean_latents_at_t_zero():
    model = RecordingModel(prediction=False)
    x, targets = torch.randn(3, 3, 4, 4), torch.randn(3, 16, 5)
    loss, logs = WarmupObjective()(model, x, torch.tensor([0, 1, 2]), targets, step=7)
    assert torch.equal(model.times[0], torch.zeros(3))
    _, projected = model(x, torch.zeros(3), None)
    torch.testing.assert_close(loss, alignment_loss(projected, targets))
    assert set(logs) == {"loss_align"}


def test_warmup_objective_needs_targets():
    with pytest.raises(ObjectiveError, match="encoder"):
        WarmupObjective()(RecordingModel(), torch.randn(1, 3, 4, 4), torch.tensor([0]), None, step=0)


def test_zero_align_weight_gives_pure_denoising_loss():
    model = RecordingModel()
    x, y, targets = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3]), torch.randn(4, 16, 5)
    objective = DiffusionObjective(ObjectiveConfig(align_coeff=0.0), ModelConfig(arch="SiT-B/2"))
    loss, logs = objective(
        model, x, y, targets, step=0, draws=GeneratorDraws(4, "cpu", torch.Generator().manual_seed(3))
    )
    # same draws, computed by hand
    g = torch.Generator().manual_seed(3)
    t = torch.rand(4, generator=g)
    eps = torch.randn(x.shape, generator=g)
    x_t, v = interpolate("linear", x, eps, t)
    pred, projected = model(x_t, t, y)
    torch.testing.assert_close(model.times[0], t)
    torch.testing.assert_close(loss, denoising_loss(pred, v))
    torch.testing.assert_close(logs["loss_denoise"], loss.detach())
    torch.testing.assert_close(logs["loss_align"], alignment_loss(projected, targets))
    assert logs["align_weight"].item() == 0.0
    # still connected to the projector (DDP needs every parameter in the graph)
    loss.backward()
    assert model.proj.weight.grad is not None


def test_diffusion_objective_adds_weighted_alignment():
    model = RecordingModel()
    x, y, targets = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), torch.randn(2, 16, 5)
    objective = DiffusionObjective(ObjectiveConfig(), ModelConfig(arch="SiT-L/2"), warmup_steps=10)
    loss, logs = objective(
        model, x, y, targets, step=50_000, draws=GeneratorDraws(2, "cpu", torch.Generator().manual_seed(0))
    )
    assert logs["align_weight"].item() == pytest.approx(1.5)
    torch.testing.assert_close(loss.detach(), logs["loss_denoise"] + 1.5 * logs["loss_align"])


def test_diffusion_objective_without_targets_is_plain_denoising():
    model = RecordingModel()
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    loss, logs = DiffusionObjective(ObjectiveConfig(), ModelConfig())(model, x, y, None, step=0)
    torch.testing.assert_close(loss.detach(), logs["loss_denoise"])
    assert logs["align_weight"].item() == 0.0 and logs["loss_align"].item() == 0.0


def test_diffusion_objective_under_bf16_autocast_returns_fp32():
    model = RecordingModel()
    x, y, targets = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), torch.randn(2, 16, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = DiffusionObjective(ObjectiveConfig(path="cosine", time_sampling="lognormal"), ModelConfig())(
            model, x, y, targets, step=0
        )
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(v.dtype == torch.float32 for v in logs.values())
