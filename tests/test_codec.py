"""Latent codecs: a small random-weight AutoencoderKL of the real architecture, and identity."""

from __future__ import annotations

import pytest
import torch

from erw import storage
from erw.data import codec as vae
from erw.data.codec import CodecError, LatentNorm, build_codec, load_codec


def small_autoencoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vae")
    small_autoencoder().save_pretrained(path)
    return str(path)


def images(n=2, size=32):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_autoencoder_moments_and_round_trip_shapes(vae_dir):
    codec = build_codec("sd-vae-ft-ema", vae_dir)
    assert (codec.latent_channels, codec.downsample, codec.scaling_factor) == (4, 2, 0.18215)
    moments = codec.encode(images())
    assert moments.dtype == torch.float16 and moments.shape == (2, 8, 16, 16)
    mean, std = moments.float().chunk(2, dim=1)
    assert torch.isfinite(moments).all() and (std > 0).all()

    latent = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    z = codec.normalize(latent)
    assert z.dtype == torch.float32 and z.shape == (2, 4, 16, 16)
    torch.testing.assert_close(z, latent * 0.18215)
    decoded = codec.decode(z)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 3, 32, 32)


def test_decode_undoes_the_normalisation(vae_dir):
    codec = build_codec("sd-vae-ft-mse", vae_dir)
    latent = torch.randn(1, 4, 8, 8)
    expected = ((codec.vae.decode(latent).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(codec.decode(codec.normalize(latent)), expected)


def test_identity_codec_is_exact():
    codec = build_codec("identity")
    pixels = images(3, 16)
    moments = codec.encode(pixels)
    assert moments.shape == (3, 6, 16, 16) and moments.dtype == torch.float16
    assert (moments[:, 3:] == 0).all()  # std 0: sampling is a no-op
    mean, std = moments.float().chunk(2, dim=1)
    latent = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert latent.min() >= -1 and latent.max() <= 1
    assert torch.equal(codec.decode(codec.normalize(latent)), pixels)


def test_channel_normalisation_from_a_manifest():
    manifest = {
        "codec": {"name": "identity", "latent_channels": 3, "scaling_factor": 1.0, "normalization": "channel"},
        "latent_stats": {"mean": [0.5, -0.25, 0.0], "std": [2.0, 0.5, 1.0]},
    }
    codec = load_codec(manifest)
    latent = torch.randn(2, 3, 4, 4)
    z = codec.normalize(latent)
    torch.testing.assert_close(z[:, 1], (latent[:, 1] + 0.25) / 0.5)
    torch.testing.assert_close(codec.norm.denormalize(z), latent)
    assert (
        LatentNorm.from_manifest({**manifest, "codec": {**manifest["codec"], "normalization": "scale"}}).scale
        == (1.0,) * 3
    )


def test_weights_from_an_s3_prefix(vae_dir, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ERW_CACHE", str(tmp_path / "cache"))
    from pathlib import Path

    for file in Path(vae_dir).iterdir():
        storage.upload_file(file, f"{s3_bucket}/vae/{file.name}")
    codec = build_codec("sd-vae-ft-ema", f"{s3_bucket}/vae")
    reference = build_codec("sd-vae-ft-ema", vae_dir)
    for (name, a), (_, b) in zip(codec.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(list((tmp_path / "cache" / "weights").iterdir())) == 1  # cached for the next load


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CodecError, match="unknown codec 'sd-vae'"):
        build_codec("sd-vae")
    with pytest.raises(CodecError, match="does not exist"):
        build_codec("sd-vae-ft-ema", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="is not a diffusers AutoencoderKL directory"):
        build_codec("sd-vae-ft-ema", str(tmp_path / "empty"))

    from diffusers import AutoencoderKL

    def offline(*_args, **_kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(CodecError, match="stabilityai/sd-vae-ft-ema.*data.codec_weights"):
        vae.load_autoencoder("sd-vae-ft-ema")
