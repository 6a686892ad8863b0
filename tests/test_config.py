from pathlib import Path

import pytest

from erw.config import ConfigError, PhaseConfig, config_from_dict, load_config, problems, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo", "imagenet256-sit-b2", "imagenet256-sit-xl2"])
def test_presets_load_and_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    validate(cfg, world_size=1)


def test_xl_preset_carries_the_papers_numbers():
    cfg = load_config(CONFIGS / "imagenet256-sit-xl2.yaml")
    assert cfg.model.dims() == (28, 1152, 16) and cfg.model.patch_size == 2
    assert (cfg.model.l2r_depth, cfg.model.align_depth) == (4, 14)
    assert cfg.objective.resolved_align_coeff(cfg.model) == 6.0
    assert (cfg.train.lr, cfg.train.betas, cfg.train.weight_decay) == (1e-4, (0.9, 0.999), 0.0)
    assert (cfg.train.batch_size, cfg.train.grad_clip, cfg.train.ema_decay) == (256, 1.0, 0.9999)
    assert cfg.data.latent_size == 32 and cfg.data.latent_channels == 4


def test_dotted_overrides_are_typed():
    cfg = load_config(
        CONFIGS / "demo.yaml", ["train.lr=2e-4", "model.qk_norm=true", "train.betas=[0.9, 0.95]", "seed=7"]
    )
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.qk_norm is True
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.seed == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("trian.lr=1", "did you mean 'train'"),
        ("train.lrr=1", "did you mean 'lr'"),
        ("train.steps=many", "train.steps: expected an integer"),
        ("model.qk_norm=3", "expected true or false"),
        ("train.lr", "section.key=value"),
        ("train.precision=fp8", "train.precision='fp8' is not one of fp32, bf16, fp16"),
        ("objective.path=vp", "objective.path='vp' is not one of linear, cosine"),
        ("sample.mode=odee", "did you mean 'ode'"),
        ("data.codec=sd-vae", "data.codec='sd-vae' is not one of identity, sd-vae-ft-ema, sd-vae-ft-mse"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.l2r_depth=6"], "model.l2r_depth=6 must be at least 1 and less than the model depth 6"),
        (["model.align_depth=7"], "model.align_depth=7 is outside the model: choose 1..6"),
        (["model.align_depth=0"], "outside the model"),
        (["data.resolution=15"], "data.resolution=15 must be a positive multiple of 2"),
        (["data.codec=sd-vae-ft-ema", "data.resolution=40"], "multiple of 16 (codec downsampling 8 x patch size 2)"),
        (
            ["encoder.name=dinov2-vit-s", "encoder.weights=random", "encoder.dim=1024"],
            "encoder.dim=1024 does not match dinov2-vit-s, whose tokens are 384-dimensional",
        ),
        (["encoder.name=dinov3"], "not a known encoder"),
        (["model.arch=SiT-M/2"], "is not one of SiT"),
        (["model.num_heads=5"], "model.hidden_size=64 is not divisible by num_heads"),
        (["model.hidden_size=6", "model.num_heads=1"], "not divisible by 4 (the 2-D sin-cos"),
        (["sample.guidance_low=0.8", "sample.guidance_high=0.2"], "guidance interval"),
    ],
)
def test_each_config_error_has_its_message(overrides, message):
    cfg = load_config(CONFIGS / "demo.yaml", overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_batch_must_divide_over_world_size_and_accumulation():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.batch_size=30", "train.grad_accum=2"])
    found = problems(cfg, world_size=4, phase="train")
    assert found == [
        "train.batch_size=30 is not divisible by world size 4 x train.grad_accum=2: "
        "every rank needs the same whole micro-batch"
    ]
    assert problems(cfg, world_size=3, phase="train") == []


def test_problems_found_while_reading_are_reported_together():
    message = str(
        pytest.raises(
            ConfigError, load_config, CONFIGS / "demo.yaml", ["train.lr=abc", "sample.solver=rk4", "model.depht=3"]
        ).value
    )
    assert "train.lr: expected a number" in message and "sample.solver='rk4'" in message
    assert "did you mean 'depth'" in message


def test_the_codec_names_are_the_codecs_that_exist():
    from erw.config import Codec, ImageFormat, choices
    from erw.data.codec import CODECS
    from erw.data.shards import IMAGE_MEMBERS

    assert set(choices(Codec)) == set(CODECS)
    assert set(choices(ImageFormat)) == set(IMAGE_MEMBERS)


def test_all_problems_are_reported_together():
    cfg = load_config(CONFIGS / "demo.yaml", ["model.l2r_depth=9", "train.lr=-1", "warmup.steps=0"])
    message = str(pytest.raises(ConfigError, validate, cfg).value)
    assert "l2r_depth" in message and "train.lr must be positive" in message and "warmup.steps" in message


def test_warmup_needs_an_encoder():
    cfg = load_config(CONFIGS / "demo.yaml", ["encoder.name=none"])
    assert validate(cfg, phase="train") is cfg
    with pytest.raises(ConfigError, match="warmup aligns to a representation"):
        validate(cfg, phase="warmup")


def test_round_trip_through_dict():
    cfg = load_config(CONFIGS / "imagenet256-sit-xl2.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.train, PhaseConfig)
