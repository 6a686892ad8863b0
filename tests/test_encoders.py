import pytest
import timm
import torch
from safetensors.torch import save_file

from erw.config import EncoderConfig
from erw.errors import ErwError
from erw.models import encoders
from erw.models.encoders import (
    CUSTOM,
    ENCODERS,
    EncoderError,
    build_encoder_model,
    load_encoder,
    resample_pos_embed,
    save_encoder_file,
)

RES = 32  # dinov2 reads 28px images: a 2x2 token grid, fast on CPU


@pytest.fixture(scope="module")
def random_dino():
    return load_encoder(EncoderConfig("dinov2-vit-s", weights="random"), RES)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(n for n in ENCODERS if n != CUSTOM))
def test_registry_entry_builds_with_its_dim(name):
    spec = ENCODERS[name]
    with torch.device("meta"):
        model = build_encoder_model(spec, 256)
    assert model.embed_dim == spec.dim
    assert model.num_prefix_tokens == spec.prefix_tokens
    assert model.patch_embed.patch_size == (spec.patch_size,) * 2
    assert model.patch_embed.grid_size == (16, 16)  # the SiT/2 grid at 256px, for every encoder
    if spec.hub:
        assert tuple(model.pretrained_cfg["mean"]) == spec.mean and tuple(model.pretrained_cfg["std"]) == spec.std
        assert spec.timm_name in timm.list_pretrained()  # the hub tag exists


def test_input_resolution_rule():
    dino, mae, clip = ENCODERS["dinov2-vit-b"], ENCODERS["mae-vit-l"], ENCODERS["clip-vit-l"]
    assert (dino.input_resolution(256), dino.input_resolution(512)) == (224, 448)
    assert (clip.input_resolution(256), mae.input_resolution(256), mae.input_resolution(512)) == (224, 256, 512)
    assert dino.num_tokens(256) == mae.num_tokens(256) == 256 and dino.num_tokens(512) == 1024
    with pytest.raises(ErwError, match="multiple of 16"):
        dino.input_resolution(100)


def test_tokens_shape_and_frozen(random_dino, images):
    tokens = random_dino(images)
    assert tokens.shape == (2, 4, 384) and tokens.dtype == torch.float32
    assert random_dino.dim == 384 and random_dino.num_tokens == 4 and random_dino.input_resolution == 28
    assert not any(p.requires_grad for p in random_dino.parameters()) and not tokens.requires_grad
    random_dino.train()
    assert not random_dino.training and not random_dino.model.training
    torch.testing.assert_close(random_dino(images.float() / 255), tokens)


def test_random_weights_warn_and_are_reproducible(random_dino, images, caplog):
    with caplog.at_level("WARNING"):
        again = load_encoder(EncoderConfig("dinov2-vit-s", weights="random"), RES)
    assert "meaningless" in caplog.text
    torch.testing.assert_close(again(images), random_dino(images))


def test_wrong_image_size_is_refused(random_dino):
    with pytest.raises(EncoderError, match=r"\[N, 3, 32, 32\]"):
        random_dino(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_safetensors_and_wrapped_state_dict_reproduce_outputs(random_dino, images, tmp_path):
    state = random_dino.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "enc.safetensors")
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "enc.pt")
    expected = random_dino(images)
    for name in ("enc.safetensors", "enc.pt"):
        encoder = load_encoder(EncoderConfig("dinov2-vit-s", weights=str(tmp_path / name)), RES)
        torch.testing.assert_close(encoder(images), expected)


def test_official_formats_load(random_dino, images, tmp_path):
    """DINOv2 release files carry a mask token; MoCo v3 ones wrap the online encoder with a head."""
    state = random_dino.model.state_dict()
    official = {**state, "mask_token": torch.zeros(1, 384)}
    torch.save(official, tmp_path / "dinov2.pth")
    moco = {f"module.base_encoder.{k}": v for k, v in state.items()}
    moco |= {f"module.momentum_encoder.{k}": v for k, v in state.items()}
    moco |= {"module.base_encoder.head.0.weight": torch.zeros(4, 384), "module.predictor.0.weight": torch.zeros(4)}
    torch.save({"arch": "vit_small", "state_dict": moco}, tmp_path / "moco.pth.tar")
    for name in ("dinov2.pth", "moco.pth.tar"):
        encoder = load_encoder(EncoderConfig("dinov2-vit-s", weights=str(tmp_path / name)), RES)
        torch.testing.assert_close(encoder(images), random_dino(images))


def test_mismatched_weights_give_one_clear_message(random_dino, tmp_path):
    state = dict(random_dino.model.state_dict())
    del state["blocks.0.attn.qkv.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(7)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(EncoderError) as err:
        load_encoder(EncoderConfig("dinov2-vit-s", weights=str(tmp_path / "bad.safetensors")), RES)
    message = str(err.value)
    assert "missing (1): blocks.0.attn.qkv.weight" in message
    assert "unexpected (1): blocks.0.extra.weight" in message
    assert "norm.weight: file (7,) vs model (384,)" in message


def test_weights_of_another_size_are_refused(random_dino, tmp_path):
    save_file({k: v.contiguous() for k, v in random_dino.model.state_dict().items()}, tmp_path / "s.safetensors")
    with pytest.raises(EncoderError, match="wrong shape"):
        load_encoder(EncoderConfig("dinov2-vit-b", weights=str(tmp_path / "s.safetensors")), RES)


def test_unreadable_weights_are_refused(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(EncoderError, match="neither a safetensors"):
        load_encoder(EncoderConfig("dinov2-vit-s", weights=str(tmp_path / "junk.bin")), RES)
    with pytest.raises(EncoderError, match="cannot read encoder weights"):
        load_encoder(EncoderConfig("dinov2-vit-s", weights=str(tmp_path / "absent.pt")), RES)


def test_weights_from_s3_uri(random_dino, images, s3_bucket):
    """Through the storage layer against a local S3 endpoint, custom encoder files included."""
    model, kwargs = tiny_vit()
    save_encoder_file(model, "vit_tiny_patch16_224", kwargs, f"{s3_bucket}/enc/tiny.safetensors")
    encoder = load_encoder(EncoderConfig(CUSTOM, weights=f"{s3_bucket}/enc/tiny.safetensors"), RES)
    torch.testing.assert_close(encoder(images), model.eval().forward_features(encoder_input(images))[:, 1:])
    with pytest.raises(EncoderError, match="cannot read encoder weights"):
        load_encoder(EncoderConfig("dinov2-vit-s", weights=f"{s3_bucket}/enc/absent.safetensors"), RES)


def test_pos_embed_resampling():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert resample_pos_embed(pos, 37) is pos
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, :1], pos[:, :1])  # class position kept
    constant = torch.randn(1, 1, 8).expand(1, 1 + 37 * 37, 8).contiguous()
    torch.testing.assert_close(resample_pos_embed(constant, 16), constant[:, : 1 + 256])
    no_prefix = torch.randn(1, 14 * 14, 8)
    assert resample_pos_embed(no_prefix, 16).shape == (1, 256, 8)


def test_release_resolution_checkpoint_is_resampled_on_load(images, tmp_path):
    """An official DINOv2 file has a 37x37 table (518px); the encoder at 32px needs 2x2."""
    torch.manual_seed(0)
    native = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    assert native.pos_embed.shape[1] == 1 + 37 * 37
    torch.save(native.state_dict(), tmp_path / "native.pth")
    encoder = load_encoder(EncoderConfig("dinov2-vit-s", weights=str(tmp_path / "native.pth")), RES)
    torch.testing.assert_close(encoder.model.pos_embed, resample_pos_embed(native.pos_embed.detach(), 2))
    torch.testing.assert_close(encoder.model.blocks[3].mlp.fc1.weight, native.blocks[3].mlp.fc1.weight)
    assert encoder(images).shape == (2, 4, 384)


def encoder_input(images):
    """uint8 images as the registry's ImageNet-normalised encoders see them."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (encoders.IMAGENET_MEAN, encoders.IMAGENET_STD))
    return (images.float() / 255 - mean) / std


def tiny_vit():
    kwargs = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs), kwargs


def test_custom_timm_file_encoder(images, tmp_path):
    model, kwargs = tiny_vit()
    uri = str(tmp_path / "digits-vit.safetensors")
    save_encoder_file(model, "vit_tiny_patch16_224", kwargs, uri, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    encoder = load_encoder(EncoderConfig(CUSTOM, weights=uri), RES)
    assert encoder.dim == 32 and encoder.input_resolution == 32
    tokens = encoder(images)
    expected = model.eval().forward_features((images.float() / 255 - 0.5) / 0.5)[:, 1:]
    assert tokens.shape == (2, 64, 32)
    torch.testing.assert_close(tokens, expected)


def test_custom_encoder_needs_its_metadata(tmp_path):
    model, _ = tiny_vit()
    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(EncoderError, match="save_encoder_file"):
        load_encoder(EncoderConfig(CUSTOM, weights=str(tmp_path / "plain.safetensors")), RES)
    with pytest.raises(EncoderError, match="encoder.weights"):
        load_encoder(EncoderConfig(CUSTOM, weights=""), RES)


def test_hub_without_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        raise AssertionError("only the hub path is expected here")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EncoderError, match="set encoder.weights"):
        load_encoder(EncoderConfig("dinov2-vit-s"), RES)


def test_encoder_without_hub_weights_needs_a_file():
    with pytest.raises(EncoderError, match="no weights for mocov3-vit-b"):
        load_encoder(EncoderConfig("mocov3-vit-b"), 256)


def test_configured_dim_is_checked():
    with pytest.raises(EncoderError, match="encoder.dim=768"):
        load_encoder(EncoderConfig("dinov2-vit-s", weights="random", dim=768), RES)
