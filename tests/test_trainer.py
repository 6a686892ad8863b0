"""The training loop through its Python API, on a tiny SiT and an in-memory batch source."""

from pathlib import Path

import pytest
import torch
from torch import nn

from erw.config import load_config
from erw.models.sit import HandoffError
from erw.training import checkpoint as ckpt
from erw.training.distributed import Dist
from erw.training.trainer import TrainingDiverged, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class TinyEncoder(nn.Module):
    """A fixed random patchifier standing in for DINOv2: uint8 images -> [N, T, dim] tokens."""

    dim = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.dim, kernel_size=8, stride=8)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.conv.bias)
        self.requires_grad_(False)

    def forward(self, images):
        return self.conv(images.float() / 127.5 - 1).flatten(2).transpose(1, 2)


class Batches:
    """Deterministic batches; the position is checkpointed like the shard loader's."""

    def __init__(self, batch_size=8, nan_from=None):
        self.batch_size, self.nan_from, self.position = batch_size, nan_from, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.position)
            image = torch.randint(0, 256, (self.batch_size, 3, 32, 32), generator=g, dtype=torch.uint8)
            latent = image.float() / 127.5 - 1
            if self.nan_from is not None and self.position >= self.nan_from:
                latent[0, 0, 0, 0] = float("nan")
            self.position += 1
            yield {"latent": latent, "label": torch.randint(0, 10, (self.batch_size,), generator=g), "image": image}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def tiny_config(tmp_path, *overrides):
    return load_config(
        CONFIGS / "demo.yaml",
        [
            "model.depth=4",
            "model.hidden_size=64",
            "model.num_heads=2",
            "model.projector_dim=32",
            "model.l2r_depth=2",
            "model.align_depth=3",
            "encoder.dim=null",
            "model.arch=SiT-S/4",
            "data.resolution=32",  # the 32x32 Batches below: 64 tokens
            "encoder.name=dinov2-vit-s",
            "encoder.weights=random",  # the tests pass TinyEncoder; this names it
            f"warmup.out={tmp_path}/warmup",
            f"train.out={tmp_path}/train",
            "warmup.batch_size=8",
            "train.batch_size=8",
            "warmup.log_every=1",
            "train.log_every=1",
            *overrides,
        ],
    )


def test_warmup_learns_the_representation_then_hands_off(tmp_path):
    cfg = tiny_config(tmp_path, "warmup.steps=30", "warmup.ckpt_every=30", "warmup.lr=1e-3")
    warm = run(cfg, "warmup", Batches(), CPU, encoder=TinyEncoder())
    losses = [h["loss_align"] for h in warm.history]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.05
    saved = ckpt.load_checkpoint(warm.checkpoint)
    assert saved.phase == "warmup" and not any(k.startswith("final_layer") for k in saved.model_state)

    cfg = tiny_config(tmp_path, "train.steps=2", "train.ckpt_every=2")
    result = run(cfg, "train", Batches(), CPU, encoder=TinyEncoder(), init_from=str(tmp_path / "warmup"))
    assert "blocks.1.attn.qkv.weight" in result.handoff and "x_embedder.proj.weight" in result.handoff
    assert not any(name.startswith(("blocks.2.", "projectors", "final_layer")) for name in result.handoff)
    assert result.history[0]["align_weight"] == pytest.approx(1.0)  # c0 = 1 for S at s = W


def test_handoff_refuses_a_mismatched_warmup(tmp_path):
    cfg = tiny_config(tmp_path, "warmup.steps=1")
    run(cfg, "warmup", Batches(), CPU, encoder=TinyEncoder())
    wider = tiny_config(tmp_path, "model.qk_norm=true", "train.steps=1")
    with pytest.raises(HandoffError, match="qk_norm: warmup False, now True"):
        run(wider, "train", Batches(), CPU, encoder=TinyEncoder(), init_from=str(tmp_path / "warmup"))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_equals_an_uninterrupted_run(tmp_path, grad_accum):
    common = [f"train.grad_accum={grad_accum}", "train.ckpt_every=3", "train.ema_decay=0.9"]
    straight = run(
        tiny_config(tmp_path / "a", "train.steps=6", *common),
        "train",
        Batches(8 // grad_accum),
        CPU,
        encoder=TinyEncoder(),
    )
    run(
        tiny_config(tmp_path / "b", "train.steps=3", *common),
        "train",
        Batches(8 // grad_accum),
        CPU,
        encoder=TinyEncoder(),
    )
    resumed = run(
        tiny_config(tmp_path / "b", "train.steps=6", *common),
        "train",
        Batches(8 // grad_accum),
        CPU,
        encoder=TinyEncoder(),
        resume="auto",
    )
    assert resumed.step == 6
    a, b = ckpt.load_checkpoint(straight.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    for name, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in a.ema_state.items():
        torch.testing.assert_close(b.ema_state[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert b.train_state["data"] == a.train_state["data"]


def test_resume_mid_warmup(tmp_path):
    cfg = tiny_config(tmp_path, "warmup.steps=2", "warmup.ckpt_every=2")
    run(cfg, "warmup", Batches(), CPU, encoder=TinyEncoder())
    cfg = tiny_config(tmp_path, "warmup.steps=4", "warmup.ckpt_every=2")
    result = run(cfg, "warmup", Batches(), CPU, encoder=TinyEncoder(), resume="auto")
    assert result.step == 4 and [h["step"] for h in result.history] == [3, 4]


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.steps=20", "train.max_nonfinite=3", "train.ckpt_every=2")
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        run(cfg, "train", Batches(nan_from=4), CPU, encoder=TinyEncoder())
    out = capsys.readouterr().out
    assert out.count("non-finite loss or gradient, step skipped") == 3
    # The good steps before the bad data were kept and checkpointed; no NaN reached the weights.
    last = ckpt.load_checkpoint(str(tmp_path / "train"))
    assert last.step == 4 and all(torch.isfinite(t).all() for t in last.model_state.values())


def test_plain_sit_without_encoder(tmp_path):
    cfg = tiny_config(tmp_path, "encoder.name=none", "train.steps=2")
    result = run(cfg, "train", Batches(), CPU)
    saved = ckpt.load_checkpoint(result.checkpoint)
    assert not any(k.startswith("projectors") for k in saved.model_state)


def test_benchmarks_time_the_trainers_own_step(monkeypatch):
    """bench/gpu_check.py and bench/step_throughput.py call erw.training.step.train_step, not a copy."""
    import importlib.util
    import sys

    from erw.training import step as step_module

    calls = []
    real = step_module.train_step

    def counting(*args, **kwargs):
        calls.append(args[3])  # the phase config the benchmark passed
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "train_step", counting)
    tiny = [
        "model.depth=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.align_depth=1",
        "model.l2r_depth=1",
        "model.projector_dim=16",
        "model.num_classes=10",
        "train.grad_clip=0.5",
        "warmup.grad_clip=0.5",
    ]
    bench = Path(__file__).resolve().parents[1] / "bench"
    for name in ("gpu_check", "step_throughput"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)  # binds train_step at import: after the patch
        if name == "gpu_check":
            assert (
                module.main(["--cpu", "--batch", "2", "--steps", "1", "--warmup-steps", "1", "--modes", "eager", *tiny])
                == 0
            )
        else:
            cfg = load_config(
                CONFIGS / "demo.yaml",
                [*tiny, "encoder.name=dinov2-vit-s", "encoder.weights=random", "train.batch_size=2"],
            )
            module.make_step(cfg, "train", 2)()
    assert len(calls) >= 5 and all(p.grad_clip == 0.5 for p in calls)  # the preset's settings, overrides included


def _weights_equal(a_uri, b_uri):
    a, b = ckpt.load_checkpoint(a_uri), ckpt.load_checkpoint(b_uri)
    for part in ("model_state", "ema_state"):
        for name, tensor in getattr(a, part).items():
            assert torch.equal(getattr(b, part)[name], tensor), f"{part} {name}"
    assert a.train_state["data"] == b.train_state["data"]


def test_a_fresh_run_never_mixes_with_the_checkpoints_of_another(tmp_path):
    """D3: a fresh start into a used out used to exit 0 after pruning deleted its own checkpoints."""
    common = ["train.ckpt_every=2", "train.keep_last=1", "encoder.name=none"]
    run(tiny_config(tmp_path, "train.steps=6", *common), "train", Batches(), CPU)
    before = ckpt.list_checkpoints(str(tmp_path / "train"))
    with pytest.raises(ckpt.CheckpointError, match=r"already holds checkpoints \(steps 6\).*--resume auto"):
        run(tiny_config(tmp_path, "train.steps=4", *common), "train", Batches(), CPU)
    assert ckpt.list_checkpoints(str(tmp_path / "train")) == before  # nothing written, nothing deleted
    # A resume from an older checkpoint while newer ones exist would mix the same way.
    run(tiny_config(tmp_path / "x", "train.steps=2", *common), "train", Batches(), CPU)
    with pytest.raises(ckpt.CheckpointError, match=r"newer than .*step-00000002 \(steps 6\)"):
        run(tiny_config(tmp_path, "train.steps=8", *common), "train", Batches(), CPU, resume=str(tmp_path / "x/train"))
    # Resumed at or past the end: says so instead of exiting silently.
    said = []
    result = run(
        tiny_config(tmp_path, "train.steps=4", *common), "train", Batches(), CPU, resume="auto", log=said.append
    )
    assert result.step == 6 and any("at or past train.steps=4: nothing to train" in line for line in said)


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    common = ["train.ckpt_every=2", "train.ema_decay=0.9", "encoder.name=none"]
    straight = run(tiny_config(tmp_path / "a", "train.steps=6", *common), "train", Batches(), CPU)
    run(tiny_config(tmp_path / "b", "train.steps=4", *common), "train", Batches(), CPU)
    newest = tmp_path / "b/train/step-00000004/model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    said = []
    resumed = run(
        tiny_config(tmp_path / "b", "train.steps=6", *common), "train", Batches(), CPU, resume="auto", log=said.append
    )
    skipped = [line for line in said if line.startswith("--resume auto: skipped")]
    assert len(skipped) == 1 and "step-00000004" in skipped[0] and "does not match the checksum" in skipped[0]
    assert any("resumed train from" in line and "step-00000002 at step 2" in line for line in said)
    _weights_equal(straight.checkpoint, resumed.checkpoint)


def test_handoff_refuses_another_encoder_or_latent_space_with_the_differences(tmp_path):
    """A warmup trained against another encoder or latent normalisation used to load silently."""
    from erw.data.codec import LatentNorm

    digits = LatentNorm.uniform(3, 1.0)
    run(tiny_config(tmp_path, "warmup.steps=1"), "warmup", Batches(), CPU, encoder=TinyEncoder(), latent_norm=digits)
    other_encoder = TinyEncoder()
    torch.nn.init.normal_(other_encoder.conv.weight, generator=torch.Generator().manual_seed(1))
    rescaled = LatentNorm((0.1, 0.0, 0.0), (0.5, 1.0, 1.0))
    with pytest.raises(HandoffError) as err:
        run(
            tiny_config(tmp_path, "train.steps=1"),
            "train",
            Batches(),
            CPU,
            encoder=other_encoder,
            latent_norm=rescaled,
            init_from=str(tmp_path / "warmup"),
        )
    message = str(err.value)
    assert "encoder weights: warmup sha256" in message and "another checkpoint of dinov2-vit-s" in message
    assert "latent normalisation shift: warmup [0, 0, 0], now [0.1, 0, 0]" in message
    assert "latent normalisation scale: warmup [1, 1, 1], now [0.5, 1, 1]" in message
    with pytest.raises(
        HandoffError,
        match=r"encoder: warmup dinov2-vit-s, now dinov2-vit-b\n.*data.codec: warmup 'identity', now 'sd-vae",
    ):
        run(
            tiny_config(
                tmp_path,
                "train.steps=1",
                "encoder.name=dinov2-vit-b",
                "data.codec=sd-vae-ft-ema",
                "data.resolution=256",
            ),
            "train",
            Batches(),
            CPU,
            encoder=TinyEncoder(),
            init_from=str(tmp_path / "warmup"),
        )
    # The same encoder (another object, same weights) and latent space: accepted, not retrained.
    result = run(
        tiny_config(tmp_path, "train.steps=1"),
        "train",
        Batches(),
        CPU,
        encoder=TinyEncoder(),
        latent_norm=LatentNorm.uniform(3, 1.0),
        init_from=str(tmp_path / "warmup"),
    )
    assert result.handoff and ckpt.load_checkpoint(result.checkpoint).meta["lineage"]["latents"]["scale"] == [1.0] * 3


def test_rope_from_warmup_false_allows_exactly_the_rope_difference(tmp_path):
    run(tiny_config(tmp_path, "warmup.steps=1", "model.rope=false"), "warmup", Batches(), CPU, encoder=TinyEncoder())
    warm = str(tmp_path / "warmup")
    with pytest.raises(HandoffError, match="rope: warmup False, now True"):
        run(
            tiny_config(tmp_path, "train.steps=1", "model.rope=true"),
            "train",
            Batches(),
            CPU,
            encoder=TinyEncoder(),
            init_from=warm,
        )
    with pytest.raises(HandoffError) as err:  # still refuses every other mismatch, and only those
        run(
            tiny_config(
                tmp_path, "train.steps=1", "model.rope=true", "model.qk_norm=true", "train.rope_from_warmup=false"
            ),
            "train",
            Batches(),
            CPU,
            encoder=TinyEncoder(),
            init_from=warm,
        )
    assert "qk_norm: warmup False, now True" in str(err.value) and "rope:" not in str(err.value)
    said = []
    result = run(
        tiny_config(tmp_path, "train.steps=1", "model.rope=true", "train.rope_from_warmup=false"),
        "train",
        Batches(),
        CPU,
        encoder=TinyEncoder(),
        init_from=warm,
        log=said.append,
    )
    assert "blocks.1.attn.qkv.weight" in result.handoff
    assert any("RoPE warmup False, now True (allowed: train.rope_from_warmup=false)" in line for line in said)


def test_xl_preset_is_the_erw_reference_run():
    from erw.config import validate

    cfg = validate(load_config(CONFIGS / "imagenet256-sit-xl2.yaml"))
    assert cfg.model.rope and not cfg.train.rope_from_warmup and cfg.model.align_depth == 14
    assert (cfg.warmup.steps, cfg.train.steps) == (100_000, 200_000)
    assert (cfg.sample.mode, cfg.sample.steps, cfg.sample.cfg_scale) == ("sde", 250, 2.2)
    assert (cfg.sample.guidance_low, cfg.sample.guidance_high) == (0.0, 0.95)


def test_step_seeds_never_collide_across_ranks_and_steps():
    """The old seed*1000003 + rank*7919 + step gave rank r at step s the draws of rank r+1 at step s-7919."""
    from erw.draws import init_seed, step_seed

    assert (0 * 1_000_003 + 0 * 7_919 + 7_919) == (0 * 1_000_003 + 1 * 7_919 + 0)  # the old collision
    assert step_seed(0, 0, 7_919) != step_seed(0, 1, 0)
    seeds = {step_seed(seed, rank, step) for seed in (0, 1) for rank in range(32) for step in range(0, 100_000, 97)}
    assert len(seeds) == 2 * 32 * len(range(0, 100_000, 97))
    assert init_seed(0) not in seeds and init_seed(0) != init_seed(1)
    assert step_seed(3, 5, 1234) == step_seed(3, 5, 1234)  # a function of (seed, rank, step): resumable
    torch.manual_seed(step_seed(0, 0, 7_919))
    a = torch.randn(8)
    torch.manual_seed(step_seed(0, 1, 0))
    assert not torch.equal(a, torch.randn(8))


def test_resuming_a_checkpoint_with_other_draws_says_so(tmp_path, monkeypatch, capsys):
    """A checkpoint written before the draws were keyed by position (version 1) continues, and says
    that its noise is not what the erw that wrote it would have drawn; a current one says nothing."""
    from erw import draws

    monkeypatch.setattr(draws, "VERSION", 1)
    run(tiny_config(tmp_path, "train.steps=1", "train.ckpt_every=1"), "train", Batches(), CPU, encoder=TinyEncoder())
    monkeypatch.undo()
    result = run(
        tiny_config(tmp_path, "train.steps=2", "train.ckpt_every=1"),
        "train",
        Batches(),
        CPU,
        encoder=TinyEncoder(),
        resume="auto",
    )
    assert result.step == 2
    assert "written with draws version 1" in capsys.readouterr().out
    run(
        tiny_config(tmp_path, "train.steps=3", "train.ckpt_every=1"),
        "train",
        Batches(),
        CPU,
        encoder=TinyEncoder(),
        resume="auto",
    )
    assert "draws version" not in capsys.readouterr().out
