"""Samplers against a Gaussian data distribution, whose velocity and score are known in closed form."""

from __future__ import annotations

import pytest
import torch

from erw.sampling import (
    Guidance,
    SamplingError,
    guided_velocity,
    coefficients_at,
    sample,
    score_from_velocity,
)

MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
# A full-rank covariance with correlations and distinct variances (eigenvalues ~0.1 .. ~2.5).
_A = torch.tensor([[1.2, 0.3, 0.0], [0.4, 0.8, 0.2], [0.0, -0.5, 0.5]], dtype=torch.float64)
COV = _A @ _A.T + 0.05 * torch.eye(3, dtype=torch.float64)


def _marginal(path: str, t: torch.Tensor, mean: torch.Tensor):
    """Coefficients and the marginal of x_t: N(alpha m, alpha^2 C + sigma^2 I). The samplers run
    a whole batch at one time, which keeps this closed form a single small solve."""
    assert torch.all(t == t[0])
    alpha, sigma, d_alpha, d_sigma = coefficients_at(path, float(t[0]))
    var = alpha**2 * COV + sigma**2 * torch.eye(3, dtype=torch.float64)
    return alpha, sigma, d_alpha, d_sigma, var, alpha * mean


def gaussian_velocity(path: str, class_means: torch.Tensor | None = None):
    """Exact v(x, t) = d_alpha E[x0 | x_t] + d_sigma E[eps | x_t] for x0 ~ N(mean_y, COV)."""

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean = MEAN.expand_as(x) if class_means is None else class_means[y]
        alpha, sigma, d_alpha, d_sigma, var, centre = _marginal(path, t, mean)
        whitened = torch.linalg.solve(var, (x - centre).T).T
        x0 = mean + alpha * (whitened @ COV)  # COV is symmetric
        eps = sigma * whitened
        return d_alpha * x0 + d_sigma * eps

    return velocity


def fixed_noise(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(n, 3, generator=gen, dtype=torch.float64)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def _labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_velocity_matches_closed_form_score(path):
    x = torch.randn(5, 3, dtype=torch.float64)
    for t in (0.9, 0.5, 0.1):
        times = torch.full((5,), t, dtype=torch.float64)
        *_, var, centre = _marginal(path, times, MEAN.expand_as(x))
        expected = -torch.linalg.solve(var, (x - centre).T).T
        v = gaussian_velocity(path)(x, times, _labels(5))
        torch.testing.assert_close(score_from_velocity(v, x, t, path), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "path,mode,solver,steps",
    [
        ("linear", "sde", "euler", 250),
        ("linear", "ode", "euler", 100),
        ("linear", "ode", "heun", 30),
        ("cosine", "sde", "euler", 250),
        ("cosine", "ode", "heun", 30),
    ],
)
def test_samples_match_the_gaussian_target(path, mode, solver, steps):
    n = 6000
    x = sample(gaussian_velocity(path), fixed_noise(n), _labels(n), mode=mode, steps=steps, solver=solver, path=path)
    mean, cov = _moments(x)
    # Sampling error of the moments with 6000 draws is ~0.02 for the mean and ~0.05 for the covariance.
    torch.testing.assert_close(mean, MEAN, atol=0.08, rtol=0)
    torch.testing.assert_close(cov, COV, atol=0.15, rtol=0.08)


def test_sde_is_not_the_ode():
    """The SDE injects noise along the way: same start, different end (guards against a silent ODE)."""
    n = 64
    sde = sample(gaussian_velocity("linear"), fixed_noise(n), _labels(n), mode="sde", steps=50)
    ode = sample(gaussian_velocity("linear"), fixed_noise(n), _labels(n), mode="ode", steps=50)
    assert (sde - ode).abs().mean() > 0.1


def _ode_error(solver: str, steps: int) -> float:
    """Max deviation from the exact flow map of the linear path, x0 = mean + COV^(1/2) x1."""
    n = 64
    noise = fixed_noise(n, seed=1)
    x1 = fixed_noise(n, seed=1)()
    evals, evecs = torch.linalg.eigh(COV)
    exact = MEAN + x1 @ (evecs @ torch.diag(evals.sqrt()) @ evecs.T)
    x0 = sample(gaussian_velocity("linear"), noise, _labels(n), mode="ode", steps=steps, solver=solver)
    return float((x0 - exact).abs().max())


def test_ode_converges_to_the_exact_transport_and_heun_needs_fewer_steps():
    tolerance = 0.05
    grid = [4, 8, 16, 32, 64, 128, 256]
    euler = {k: _ode_error("euler", k) for k in grid}
    heun = {k: _ode_error("heun", k) for k in grid}

    def first_within(errors: dict[int, float]) -> int:
        return min(k for k, e in errors.items() if e < tolerance)

    assert first_within(heun) < first_within(euler)
    # Even at equal cost (Heun spends two evaluations per step) Heun is far more accurate.
    assert heun[16] < 0.1 * euler[32]
    # Orders of convergence: halving the step halves Euler's error and quarters Heun's.
    assert 1.7 < euler[32] / euler[64] < 2.3
    assert 3.4 < heun[32] / heun[64] < 4.6


def test_sampling_is_deterministic_for_a_seed():
    a = sample(gaussian_velocity("linear"), fixed_noise(32, seed=7), _labels(32), mode="sde", steps=20)
    b = sample(gaussian_velocity("linear"), fixed_noise(32, seed=7), _labels(32), mode="sde", steps=20)
    c = sample(gaussian_velocity("linear"), fixed_noise(32, seed=8), _labels(32), mode="sde", steps=20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance on an interval.

NULL = 3


def _class_velocity(calls: list[tuple[float, list[int]]]):
    """v = 1 for real classes, 0 for the null class, recording every call's time and labels."""

    def velocity(x, t, y):
        calls.append((float(t[0]), y.tolist()))
        return (y != NULL).to(x.dtype)[:, None].expand_as(x).clone()

    return velocity


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_guidance_is_applied_exactly_inside_the_interval(mode):
    scale, low, high, steps = 4.0, 0.3, 0.7, 10
    calls: list[tuple[float, list[int]]] = []

    def zeros() -> torch.Tensor:
        return torch.zeros(2, 3, dtype=torch.float64)

    y = torch.tensor([0, 2])
    guidance = Guidance(scale=scale, low=low, high=high, null_class=NULL)
    x0 = sample(_class_velocity(calls), zeros, y, mode=mode, steps=steps, solver="euler", guidance=guidance)

    assert len(calls) == steps  # one batched forward per step, guided or not
    for t, labels in calls:
        if low <= t <= high:
            assert labels == [0, 2, NULL, NULL], f"t={t}: expected a conditional+unconditional batch"
        else:
            assert labels == [0, 2], f"t={t}: guidance outside [{low}, {high}]"
    assert any(low <= t <= high for t, _ in calls) and any(not low <= t <= high for t, _ in calls)

    if mode == "ode":
        # x0 = x1 - sum_i v_i |dt|, with v = scale inside the interval and 1 outside it.
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        expected = -sum((scale if low <= t <= high else 1.0) * (t - t_next) for t, t_next in zip(times, times[1:]))
        torch.testing.assert_close(x0, torch.full_like(x0, expected))


def test_guidance_interval_bounds_are_inclusive_and_scale_one_is_off():
    g = Guidance(scale=2.0, low=0.25, high=0.5, null_class=NULL)
    assert g.active(0.25) and g.active(0.5) and g.active(0.4)
    assert not g.active(0.2499) and not g.active(0.5001)
    assert not Guidance(scale=1.0, low=0.0, high=1.0, null_class=NULL).active(0.5)


def test_guided_velocity_combines_branches():
    class_means = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # class 0, null (=1)
    velocity = gaussian_velocity("linear", class_means)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    v_cond, v_null = velocity(x, t, y), velocity(x, t, torch.ones_like(y))
    guided = guided_velocity(velocity, x, 0.5, y, Guidance(scale=1.5, null_class=1))
    torch.testing.assert_close(guided, v_null + 1.5 * (v_cond - v_null))


def test_bad_sampler_settings_are_refused():
    noise = fixed_noise(2)
    with pytest.raises(SamplingError, match="mode"):
        sample(gaussian_velocity("linear"), noise, _labels(2), mode="ddim", steps=10)
    with pytest.raises(SamplingError, match="solver"):
        sample(gaussian_velocity("linear"), noise, _labels(2), mode="ode", steps=10, solver="rk4")
    with pytest.raises(SamplingError, match="at least 1"):
        sample(gaussian_velocity("linear"), noise, _labels(2), mode="ode", steps=0)


# ---------------------------------------------------------------------------------------------
# Distributed generation: the slice a rank generates.


def _tiny_sit():
    from erw.models.sit import build_sit

    torch.manual_seed(0)
    model = build_sit("SiT-S/2", input_size=8, in_channels=3, depth=2, hidden_size=32, num_heads=2, num_classes=5)
    with torch.no_grad():  # leave the zero (adaLN-Zero) initialisation: the output must depend on x, t, y
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _job(num_samples=7, batch_size=3, mode="sde", cfg_scale=1.5, classes=(0, 1, 2, 3, 4), seed=11):
    from erw.config import SampleConfig
    from erw.evaluation.generate import SampleJob

    settings = SampleConfig(
        mode=mode,
        steps=4,
        cfg_scale=cfg_scale,
        guidance_low=0.0,
        guidance_high=0.7,
        num_samples=num_samples,
        batch_size=batch_size,
    )
    return SampleJob(settings, classes, seed, "linear", (3, 8, 8), null_class=5)


def _run_ranks(job, world_size):
    from erw.evaluation.generate import generate_slice
    from erw.data.codec import to_uint8
    from erw.sampling import model_velocity

    velocity = model_velocity(_tiny_sit())
    found = {}
    for rank in range(world_size):
        for _batch, indices, labels, images in generate_slice(job, velocity, to_uint8, rank, world_size, "cpu"):
            for i, label, image in zip(indices, labels.tolist(), images):
                assert i not in found, f"sample {i} generated twice"
                found[i] = (label, image)
    return found


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_generation_is_identical_for_one_and_two_ranks(mode):
    job = _job(mode=mode)
    one, two = _run_ranks(job, 1), _run_ranks(job, 2)
    assert sorted(one) == sorted(two) == list(range(7))
    for i in range(7):
        assert one[i][0] == two[i][0] == i % 5  # balanced labels
        assert torch.equal(one[i][1], two[i][1]), f"sample {i} differs between 1 and 2 ranks"
    assert len({bytes(image.numpy()) for _, image in one.values()}) == 7  # every sample its own noise


def test_ranks_take_disjoint_balanced_batches():
    job = _job(num_samples=10, batch_size=3)
    slices = [list(job.batches_for(r, 3)) for r in range(3)]
    assert slices == [[0, 3], [1], [2]]
    assert [list(job.indices(b)) for b in range(job.num_batches)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_samples_do_not_depend_on_the_batch_size():
    """Per-sample seeds: regrouping samples into other batches changes only float rounding."""
    small, large = _run_ranks(_job(batch_size=2), 1), _run_ranks(_job(batch_size=7), 1)
    for i in range(7):
        assert (small[i][1].int() - large[i][1].int()).abs().max() <= 1


def test_another_seed_gives_other_samples():
    a, b = _run_ranks(_job(seed=1, num_samples=2), 1), _run_ranks(_job(seed=2, num_samples=2), 1)
    assert not torch.equal(a[0][1], b[0][1])


# ---------------------------------------------------------------------------------------------
# Heun conventions: ours (trapezoid) and REPA's, for like-for-like FIDs.


def _repa_heun_reference(velocity, x1, y, steps, scale, low, high, null):
    """REPA's Euler-Heun ODE sampler (samplers.py, euler_sampler with heun=True), written here from
    its equations: on the grid t_i = 1 - i / N,
        d_i  = v_g(x_i, t_i),  x_{i+1} = x_i + (t_{i+1} - t_i) d_i                       (predictor)
        for i < N - 1:  d'_i = v_g'(x_{i+1}, t_{i+1}),  x_{i+1} = x_i + (t_{i+1} - t_i)(d_i + d'_i) / 2
    where v_g mixes v(., ., null) + s (v(., ., y) - v(., ., null)) when scale > 1 and t_i lies in
    [low, high], and the corrector's v_g' is guided by that same test on t_i (not t_{i+1})."""
    t_grid = [1.0 - i / steps for i in range(steps + 1)]
    guided = lambda x, t, t_test: (
        velocity(x, torch.full((len(x),), t, dtype=x.dtype), torch.full_like(y, null))
        + scale
        * (
            velocity(x, torch.full((len(x),), t, dtype=x.dtype), y)
            - velocity(x, torch.full((len(x),), t, dtype=x.dtype), torch.full_like(y, null))
        )
        if scale > 1 and low <= t_test <= high
        else velocity(x, torch.full((len(x),), t, dtype=x.dtype), y)
    )
    x = x1
    for i in range(steps):
        t, t_next = t_grid[i], t_grid[i + 1]
        d = guided(x, t, t)
        x_pred = x + (t_next - t) * d
        if i < steps - 1:
            d_prime = guided(x_pred, t_next, t)
            x = x + (t_next - t) * (0.5 * d + 0.5 * d_prime)
        else:
            x = x_pred
    return x


def _two_class_gaussian_velocity():
    """Exact velocities of two Gaussian classes and their mixture as the null class: guidance changes the path."""
    means = torch.stack([MEAN, -MEAN, torch.zeros(3, dtype=torch.float64)])
    return gaussian_velocity("linear", class_means=means)


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.65), (0.0, 0.7)])
def test_repa_heun_convention_matches_repas_sampler(interval):
    low, high = interval
    steps, scale, null = 10, 2.5, 2
    velocity = _two_class_gaussian_velocity()
    y = torch.tensor([0, 1, 0, 1])
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    guidance = Guidance(scale=scale, low=low, high=high, null_class=null)
    ours = sample(
        velocity,
        lambda: x1.clone(),
        y,
        mode="ode",
        steps=steps,
        solver="heun",
        guidance=guidance,
        heun_convention="repa",
    )
    reference = _repa_heun_reference(velocity, x1.clone(), y, steps, scale, low, high, null)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    trapezoid = sample(velocity, lambda: x1.clone(), y, mode="ode", steps=steps, solver="heun", guidance=guidance)
    assert (ours - trapezoid).abs().max() > 1e-4  # the conventions differ where this test looks


def test_heun_conventions_differ_in_the_last_step_and_the_correctors_guidance():
    steps, low, high = 4, 0.3, 0.55  # grid 1, .75, .5, .25, 0: t = 0.5 is inside, the corrector's 0.25 is not
    calls: dict[str, list[tuple[float, list[int]]]] = {"trapezoid": [], "repa": []}
    zeros = lambda: torch.zeros(2, 3, dtype=torch.float64)
    guidance = Guidance(scale=3.0, low=low, high=high, null_class=NULL)
    for convention, seen in calls.items():
        sample(
            _class_velocity(seen),
            zeros,
            torch.tensor([0, 2]),
            mode="ode",
            steps=steps,
            solver="heun",
            guidance=guidance,
            heun_convention=convention,
        )
    guided = lambda seen: [t for t, labels in seen if NULL in labels]
    assert [t for t, _ in calls["trapezoid"]] == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0]
    assert [t for t, _ in calls["repa"]] == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]  # no corrector on the last step
    assert guided(calls["trapezoid"]) == [0.5, 0.5]  # the corrector at 0.5 (from 0.75) is guided by its own time
    assert guided(calls["repa"]) == [0.5, 0.25]  # the predictor at 0.5 is inside, so its corrector at 0.25 is guided


def test_unknown_heun_convention_is_refused():
    with pytest.raises(SamplingError, match="Heun convention"):
        sample(
            gaussian_velocity("linear"),
            fixed_noise(2),
            _labels(2),
            mode="ode",
            steps=4,
            solver="heun",
            heun_convention="edm",
        )
