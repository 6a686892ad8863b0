"""SiT model: parameter counts, REPA naming, zero init, attention, warmup hand-off, cost."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from erw.config import ModelConfig, SIT_PRESETS
from erw.models.sit import (
    HandoffError,
    ModelError,
    SiT,
    build_sit,
    check_warmup_config,
    l2r_from_config,
    load_warmup,
    macs_per_image,
    sit_from_config,
    warmup_tensor_names,
)

TINY = dict(input_size=8, depth=3, hidden_size=32, num_heads=2, num_classes=10, projector_dim=16)


def tiny(**overrides) -> SiT:
    torch.manual_seed(0)
    return build_sit("SiT-S/2", **(TINY | overrides))


def randomize_(model: SiT, seed: int = 1) -> SiT:
    """Non-zero weights everywhere (zero-init gates would hide every block), pos_embed kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def inputs(model: SiT, n: int = 3):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen)
    return x, torch.rand(n, generator=gen), torch.randint(0, model.num_classes + 1, (n,), generator=gen)


# ---------------------------------------------------------------------------------------------
# Sizes and names.


def analytic_params(depth: int, d: int, patch: int, channels: int = 4, tokens: int = 256, classes: int = 1000) -> int:
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    embed = channels * patch * patch * d + d + (256 * d + d + d * d + d) + (classes + 1) * d + tokens * d
    final = d * patch * patch * channels + patch * patch * channels + 2 * d * d + 2 * d
    return embed + depth * per_block + final


@pytest.mark.parametrize("size", list(SIT_PRESETS))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_preset_parameter_counts(size, patch):
    with torch.device("meta"):
        model = build_sit(f"SiT-{size}/{patch}")
    depth, hidden, heads = SIT_PRESETS[size]
    assert (len(model.blocks), model.hidden_size, model.num_heads) == (depth, hidden, heads)
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_params(depth, hidden, patch, tokens=(32 // patch) ** 2)


def test_known_parameter_counts():
    # DiT reports 675,129,632 for DiT-XL/2 with 8 output channels (learned sigma); SiT predicts 4,
    # dropping 1152 x 16 + 16 = 18,448. DiT-B/2: 130.5M.
    with torch.device("meta"):
        xl = build_sit("SiT-XL/2")
        b = build_sit("SiT-B/2")
        xl_repa = build_sit("SiT-XL/2", encoder_dims=[768])
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(xl) == 675_129_632 - 18_448
    assert abs(count(b) - 130.5e6) < 0.05e6
    assert count(xl_repa) - count(xl) == (1152 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 768 + 768)


def repa_keys(depth: int, qk_norm: bool, projectors: int) -> set[str]:
    """The public REPA SiT's state-dict keys, written out from its naming scheme."""
    keys = {
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "pos_embed",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    block += ["attn.q_norm", "attn.k_norm"] if qk_norm else []
    for i in range(depth):
        keys |= {f"blocks.{i}.{layer}.{kind}" for layer in block for kind in ("weight", "bias")}
    for k in range(projectors):
        keys |= {f"projectors.{k}.{layer}.{kind}" for layer in (0, 2, 4) for kind in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_matches_repa_naming(qk_norm):
    model = tiny(qk_norm=qk_norm, rope=True, encoder_dims=[24, 40], align_depth=2)
    state = model.state_dict()
    assert set(state) == repa_keys(depth=3, qk_norm=qk_norm, projectors=2)
    shapes = {
        "x_embedder.proj.weight": (32, 4, 2, 2),
        "y_embedder.embedding_table.weight": (11, 32),
        "pos_embed": (1, 16, 32),
        "blocks.0.attn.qkv.weight": (96, 32),
        "blocks.2.mlp.fc1.weight": (128, 32),
        "blocks.1.adaLN_modulation.1.weight": (192, 32),
        "projectors.1.4.weight": (40, 16),
        "final_layer.linear.weight": (16, 32),
        "final_layer.adaLN_modulation.1.weight": (64, 32),
    }
    if qk_norm:
        shapes["blocks.0.attn.q_norm.weight"] = (16,)
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not model.pos_embed.requires_grad


def test_bad_shapes_are_refused():
    with pytest.raises(ModelError, match="not divisible by num_heads"):
        build_sit("SiT-B/2", num_heads=5)
    with pytest.raises(ModelError, match="head dimension divisible by 4"):
        build_sit("SiT-S/2", **(TINY | dict(hidden_size=36, num_heads=6, rope=True)))
    with pytest.raises(ModelError, match="align_depth=9 is outside"):
        tiny(encoder_dims=[8], align_depth=9)
    with pytest.raises(ModelError, match="unknown SiT option"):
        build_sit("SiT-B/2", patch_size=4)


# ---------------------------------------------------------------------------------------------
# Forward behaviour.


def test_zero_init_gives_zero_prediction():
    model = tiny(encoder_dims=[24], align_depth=2).eval()
    prediction, (tokens,) = model(*inputs(model))
    assert prediction.shape == (3, 4, 8, 8) and torch.equal(prediction, torch.zeros_like(prediction))
    assert tokens.shape == (3, 16, 24) and tokens.abs().sum() > 0  # the alignment path is live


def test_unpatchify_inverts_patch_layout():
    model = tiny()
    image = torch.randn(2, 4, 8, 8)
    patches = image.unfold(2, 2, 2).unfold(3, 2, 2)  # [N, C, g, g, p, q]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 16)  # (row, column, channel) per patch
    assert torch.equal(model.unpatchify(patches), image)


def test_pos_embed_layout():
    # Token k sits at (row k // g, column k % g); the column fills the first half of the channels,
    # each half is [sin, cos] of position x frequency, the first frequency being 1 (as MAE/DiT/REPA).
    pos = tiny().pos_embed[0]  # [16 tokens, 32 channels], grid 4
    quarter = 8
    row0_col1, row1_col0 = pos[1], pos[4]
    assert row0_col1[0] == pytest.approx(math.sin(1.0)) and row0_col1[quarter] == pytest.approx(math.cos(1.0))
    assert row0_col1[2 * quarter] == 0.0 and row0_col1[3 * quarter] == 1.0
    assert row1_col0[0] == 0.0 and row1_col0[2 * quarter] == pytest.approx(math.sin(1.0))


def test_timestep_features_are_cos_then_sin_of_unscaled_t():
    embedder = build_sit("SiT-S/2", **(TINY | dict(hidden_size=256, num_heads=4))).t_embedder
    with torch.no_grad():  # make the MLP read out its input features: silu(features)
        for linear in (embedder.mlp[0], embedder.mlp[2]):
            linear.weight.copy_(torch.eye(256))
            linear.bias.zero_()
    out = embedder(torch.tensor([0.0, 1.0])).detach()
    silu = torch.nn.functional.silu
    torch.testing.assert_close(out[0], silu(torch.cat([torch.ones(128), torch.zeros(128)])))
    # The first frequency is 1: t = 1 gives cos(1) and sin(1), so t was not rescaled to 0..1000.
    assert out[1, 0].item() == pytest.approx(silu(torch.tensor(math.cos(1.0))).item())
    assert out[1, 128].item() == pytest.approx(silu(torch.tensor(math.sin(1.0))).item())


def test_block_modulation_order():
    # adaLN chunks are (shift, scale, gate) for attention, then for the MLP, as in DiT/REPA.
    block = randomize_(tiny()).blocks[0]
    with torch.no_grad():
        block.adaLN_modulation[1].weight.zero_()  # the chunks are then the bias alone
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.adaLN_modulation[1].bias.detach().chunk(6)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    norm = lambda v: torch.nn.functional.layer_norm(v, (32,), eps=1e-6)
    h = x + gate_a * block.attn(norm(x) * (1 + scale_a) + shift_a)
    expected = h + gate_m * block.mlp(norm(h) * (1 + scale_m) + shift_m)
    torch.testing.assert_close(block(x, c, None), expected)


def naive_attention(attn, x, rope=None):
    n, t, d = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).view(n, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = rope(q), rope(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, t, d) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "rope": True}])
def test_sdpa_equals_naive_attention(variant):
    model = randomize_(tiny(**variant))
    attn = model.blocks[0].attn
    x = torch.randn(2, model.num_tokens, 32)
    torch.testing.assert_close(attn(x, model.rope), naive_attention(attn, x, model.rope), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    rope = tiny(rope=True).rope
    q, k = torch.randn(16), torch.randn(16)
    scores = rope(q.expand(1, 1, 16, 16)) @ rope(k.expand(1, 1, 16, 16)).transpose(-1, -2)
    scores = scores[0, 0].view(4, 4, 4, 4)  # [query row, query col, key row, key col]
    torch.testing.assert_close(scores[1:, 1:, 1:, 1:], scores[:-1, :-1, :-1, :-1])  # shift both by (1, 1)
    assert not torch.allclose(scores[0, 0, 0, 1], scores[0, 0, 1, 0])  # rows and columns differ


def test_rope_rows_turn_the_first_half_columns_the_second():
    # The EVA-02/ERW layout, which released RoPE checkpoints depend on.
    rope = tiny(rope=True).rope
    x = torch.randn(1, 1, 16, 16)
    out = rope(x)[0, 0]
    assert torch.equal(out[0], x[0, 0, 0])  # token (0, 0): no rotation
    assert torch.equal(out[1, :8], x[0, 0, 1, :8]) and not torch.allclose(out[1, 8:], x[0, 0, 1, 8:])  # (0, 1)
    assert torch.equal(out[4, 8:], x[0, 0, 4, 8:]) and not torch.allclose(out[4, :8], x[0, 0, 4, :8])  # (1, 0)


def test_rope_and_qk_norm_change_the_output():
    plain = randomize_(tiny()).eval()
    batch = inputs(plain)
    expected, _ = plain(*batch)
    for variant in ({"rope": True}, {"qk_norm": True}):
        model = tiny(**variant).eval()
        model.load_state_dict(plain.state_dict(), strict=not variant.get("qk_norm"))
        out, _ = model(*batch)
        assert out.shape == expected.shape and not torch.allclose(out, expected, atol=1e-4), variant


def test_autocast_bf16_runs_with_rope_and_qk_norm():
    model = randomize_(tiny(rope=True, qk_norm=True, encoder_dims=[8], align_depth=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (tokens,) = model(*inputs(model))
    assert torch.isfinite(out.float()).all() and tokens.dtype == torch.bfloat16


def test_label_dropout_only_in_training_and_null_class_accepted():
    model = tiny(class_dropout=0.5)
    embedder, table = model.y_embedder, model.y_embedder.embedding_table.weight
    labels = torch.arange(10).repeat(50)
    null = table[10]
    is_null = lambda out: (out == null).all(dim=1)
    assert is_null(embedder.eval()(labels)).sum() == 0
    dropped = is_null(embedder.train()(labels)).float().mean()
    assert 0.4 < dropped < 0.6
    assert is_null(embedder.eval()(torch.full((3,), 10))).all()  # the null class itself, for CFG
    model.eval()
    x, t, _ = inputs(model)
    prediction, _ = model(x, t, torch.full((3,), 10))
    assert prediction.shape == x.shape


def test_wrong_input_size_is_refused():
    model = tiny()
    with pytest.raises(ModelError, match="8x8"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Config builders and the warmup hand-off.

CFG = ModelConfig(
    arch="SiT-S/2", depth=4, hidden_size=32, num_heads=2, num_classes=10, projector_dim=16, align_depth=3, l2r_depth=2
)


def test_l2r_names_are_full_model_names_with_equal_shapes():
    full = sit_from_config(CFG, input_size=8, in_channels=4, encoder_dim=24)
    l2r = l2r_from_config(CFG, input_size=8, in_channels=4, encoder_dim=24)
    full_state, l2r_state = full.state_dict(), l2r.state_dict()
    assert len(full.blocks) == 4 and len(l2r.blocks) == 2 and l2r.final_layer is None
    assert set(l2r_state) <= set(full_state)
    assert all(l2r_state[n].shape == full_state[n].shape for n in l2r_state)
    prediction, (tokens,) = l2r(*inputs(l2r))
    assert prediction is None and tokens.shape == (3, 16, 24)
    assert not sit_from_config(CFG, 8, 4, encoder_dim=None).projectors


def expected_warmup_names(l2r_depth: int) -> list[str]:
    names = [
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "pos_embed",
    ]
    layers = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    blocks = [f"blocks.{i}.{layer}" for i in range(l2r_depth) for layer in layers]
    return names + [f"{layer}.{kind}" for layer in blocks for kind in ("weight", "bias")]


def test_load_warmup_loads_exactly_the_expected_tensors():
    l2r = randomize_(l2r_from_config(CFG, 8, 4, encoder_dim=24), seed=3)
    full = sit_from_config(CFG, 8, 4, encoder_dim=24)
    before = {n: v.clone() for n, v in full.state_dict().items()}
    loaded = load_warmup(full, l2r.state_dict(), l2r_depth=2)
    assert sorted(loaded) == sorted(expected_warmup_names(2)) == sorted(warmup_tensor_names(full, 2))
    after, warm = full.state_dict(), l2r.state_dict()
    for name in after:
        assert torch.equal(after[name], warm[name] if name in loaded else before[name]), name
    assert not torch.equal(after["projectors.0.0.weight"], warm["projectors.0.0.weight"])  # not handed over


def refusal(warmup_state, model=None) -> str:
    model = model or sit_from_config(CFG, 8, 4, encoder_dim=24)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    with pytest.raises(HandoffError) as err:
        load_warmup(model, warmup_state, l2r_depth=2)
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())  # nothing half-loaded
    return str(err.value)


def test_load_warmup_refuses_other_width():
    wide = l2r_from_config(replace(CFG, hidden_size=64), 8, 4, encoder_dim=24)
    message = refusal(wide.state_dict())
    assert "wrong shape: blocks.0.attn.qkv.weight: warmup (192, 64), model (96, 32)" in message
    assert "hidden_size is 64" in message


def test_load_warmup_refuses_missing_block_and_names_every_tensor():
    state = {n: v for n, v in l2r_from_config(CFG, 8, 4, 24).state_dict().items() if not n.startswith("blocks.1.")}
    message = refusal(state)
    missing = [n for n in expected_warmup_names(2) if n.startswith("blocks.1.")]
    assert all(f"missing: {n}" in message for n in missing) and "blocks.0." not in message
    assert "the warmup has 1 blocks but model.l2r_depth=2" in message


def test_load_warmup_refuses_qk_norm_mismatch():
    with_norm = l2r_from_config(replace(CFG, qk_norm=True), 8, 4, 24)
    message = refusal(with_norm.state_dict())
    assert "unexpected: blocks.0.attn.q_norm.weight" in message and "qk_norm=True" in message
    full_with_norm = sit_from_config(replace(CFG, qk_norm=True), 8, 4, 24)
    message = refusal(l2r_from_config(CFG, 8, 4, 24).state_dict(), model=full_with_norm)
    assert "missing: blocks.1.attn.k_norm.bias" in message


def test_load_warmup_refuses_deeper_warmup_and_full_checkpoints():
    deeper = l2r_from_config(replace(CFG, l2r_depth=3), 8, 4, 24)
    assert "the warmup has 3 blocks but model.l2r_depth=2" in refusal(deeper.state_dict())
    full = sit_from_config(CFG, 8, 4, 24)
    assert "full (phase-2) checkpoint" in refusal(full.state_dict())


def test_check_warmup_config_catches_rope_mismatch():
    check_warmup_config(CFG, CFG)
    other = replace(CFG, rope=True, depth=6)  # depth may differ, rope may not
    with pytest.raises(HandoffError, match="rope: warmup True, now False") as err:
        check_warmup_config(CFG, other)
    assert "depth" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Cost.


def test_xl2_forward_cost_matches_dit_paper():
    with torch.device("meta"):
        model = build_sit("SiT-XL/2")
    assert abs(macs_per_image(model) / 118.6e9 - 1) < 0.01


def test_macs_agree_with_torch_flop_counter():
    model = randomize_(tiny(encoder_dims=[24], align_depth=2, rope=True))
    x, t, y = inputs(model, n=2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA is counted
        model(x, t, y)
    assert counter.get_total_flops() == 2 * 2 * macs_per_image(model)
