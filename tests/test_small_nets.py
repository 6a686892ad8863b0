"""The small encoder and evaluator: they learn, and their files load where the pipeline reads them."""

import pytest
import torch

from erw.cli import build_parser, main
from erw.config import EncoderConfig, load_config, validate
from erw.evaluation.features import load_feature_network
from erw.evaluation import small_evaluator
from erw.models import small_nets
from erw.models.encoders import CUSTOM, load_encoder

RES = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small networks run faster on one thread than on two threads contended by other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """Two digit classes (0 and 1), 360 images: enough to learn in a few steps."""
    from erw.data.digits import digit_images

    images, labels = digit_images()
    keep = labels < 2
    return torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[keep])


FAST = small_nets.FitSettings(steps=30, batch_size=32, lr=3e-3)


def test_encoder_learns_and_loads_through_the_registry(digits, tmp_path):
    images, labels = digits
    kwargs = small_nets.encoder_kwargs(RES, patch_size=8, dim=32, depth=2, heads=2)
    vit, report = small_nets.fit_encoder(images, labels, FAST, kwargs, log=lambda _: None)
    assert report.val_accuracy > 0.8 and report.num_val == 72  # two classes: chance is 0.5

    uri = str(tmp_path / "enc.safetensors")
    small_nets.save_encoder(vit, kwargs, uri)
    cfg = load_config(
        None,
        [
            f"encoder.name={CUSTOM}",
            f"encoder.weights={uri}",
            "data.resolution=32",
            "data.codec=identity",
            "model.arch=SiT-S/8",
            "model.depth=4",
            "model.align_depth=2",
            "model.l2r_depth=1",
        ],
    )
    validate(cfg)
    encoder = load_encoder(cfg.encoder, RES)
    tokens = encoder(images[:4])
    assert encoder.dim == 32 and tokens.shape == (4, 16, 32)  # 4x4 grid of 8x8-pixel patches
    normalised = (images[:4].float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(tokens, vit.forward_features(normalised)[:, 1:])


def test_evaluator_learns_and_exports_for_erw_evaluate(digits, tmp_path):
    images, labels = digits
    net, report = small_evaluator.fit_evaluator(images, labels, FAST, width=8, log=lambda _: None)
    assert report.val_accuracy > 0.8
    uri = str(tmp_path / "evaluator.pt2")
    small_evaluator.save_evaluator(net, uri, RES)
    loaded = load_feature_network(uri)
    assert loaded.has_logits and loaded.identity.startswith("custom:")
    out = loaded(images[:5])
    features, logits = net(images[:5])
    assert out["pool"].shape == (5, 32) and out["logits"].shape == (5, 2)
    torch.testing.assert_close(out["pool"], features.detach())
    torch.testing.assert_close(out["logits"], logits.detach())


def test_encoder_and_evaluator_differ_in_architecture_and_seed():
    assert small_nets.FitSettings().seed == 0
    net = small_evaluator.DigitEvaluator(num_classes=10)
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in net.modules())
    assert net.head.in_features == 64  # features are 4x the width
    args = build_parser().parse_args(["fit-evaluator", "--images", "x", "--out", "y"])
    assert args.seed == 1 and build_parser().parse_args(["fit-encoder", "--images", "x", "--out", "y"]).seed == 0


def test_random_shift_moves_whole_pixels():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    image[0, :, 3, 4] = 255
    g = torch.Generator().manual_seed(0)
    assert torch.equal(small_nets.random_shift(image, 0, g), image.float())
    for _ in range(10):
        shifted = small_nets.random_shift(image, 1, g)
        ys, xs = torch.nonzero(shifted[0, 0], as_tuple=True)
        assert len(ys) == 1 and abs(int(ys[0]) - 3) <= 1 and abs(int(xs[0]) - 4) <= 1


def test_bad_inputs_are_refused_before_training():
    images = torch.zeros(40, 3, RES, RES, dtype=torch.uint8)
    with pytest.raises(small_nets.SmallNetError, match="two classes"):
        small_nets.check_images(images, torch.zeros(40, dtype=torch.int64))
    with pytest.raises(small_nets.SmallNetError, match="uint8 images"):
        small_nets.check_images(images.float(), torch.arange(40) % 2)
    with pytest.raises(small_nets.SmallNetError, match="must be positive"):
        small_nets.FitSettings(steps=0)
    with pytest.raises(small_nets.SmallNetError, match="not a multiple of the encoder patch size"):
        small_nets.encoder_kwargs(30, patch_size=4)
    with pytest.raises(small_nets.SmallNetError, match="not divisible by its 3 heads"):
        small_nets.encoder_kwargs(32, dim=64, heads=3)


def test_commands_train_from_an_image_folder(digits_folder, tmp_path, capsys):
    assert "fit-encoder" in build_parser().format_help() and "fit-evaluator" in build_parser().format_help()
    encoder_file, evaluator_file = str(tmp_path / "enc.safetensors"), str(tmp_path / "eval.pt2")
    common = ["--images", digits_folder, "--steps", "2", "--batch-size", "16", "--threads", "1"]
    assert main(["fit-encoder", *common, "--out", encoder_file, "--dim", "16", "--depth", "1", "--heads", "2"]) == 0
    assert main(["fit-evaluator", *common, "--out", evaluator_file, "--width", "4"]) == 0
    out = capsys.readouterr().out
    assert "1797 images, 10 classes, 32px" in out and "encoder.name=timm-file" in out
    assert load_encoder(EncoderConfig(CUSTOM, weights=encoder_file), RES).num_tokens == 64  # --patch-size 4
    assert load_feature_network(evaluator_file)(torch.zeros(1, 3, RES, RES, dtype=torch.uint8))["logits"].shape == (
        1,
        10,
    )
    assert main(["fit-encoder", *common, "--out", encoder_file, "--patch-size", "5"]) == 2
    assert "not a multiple of the encoder patch size" in capsys.readouterr().err
