"""SiT (Scalable Interpolant Transformer) with REPA projectors, and the ERW warmup split.

One class serves both ERW phases; both share parameter names, so the warmup hands its weights to
the full model by name:

    full model (phase 2)  embedders -> blocks 0..depth-1 -> final layer -> prediction [N, C, H, W]
                                         '-> projector after block align_depth -> tokens [N, T, D_enc]
    L2R model  (phase 1)  embedders -> blocks 0..K-1 -> projector after block K (no final layer)

Parameter names and shapes equal those of the public REPA/ERW SiT, so their released checkpoints
load with strict=True. RoPE (optional) has no parameters and saves nothing (the public ERW code
saves its RoPE tables as feat_rope.freqs_cos/freqs_sin: drop those keys, they are recomputed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erw.config import SIT_PRESETS, ModelConfig, parse_arch
from erw.errors import ErwError

TIME_FREQUENCIES = 256  # sinusoidal features of t fed to the timestep MLP (DiT, REPA)
BUILD_OVERRIDES = frozenset(
    {
        "input_size",
        "in_channels",
        "num_classes",
        "class_dropout",
        "depth",
        "hidden_size",
        "num_heads",
        "mlp_ratio",
        "qk_norm",
        "rope",
        "projector_dim",
        "encoder_dims",
        "align_depth",
    }
)
EMBEDDERS = ("x_embedder", "t_embedder", "y_embedder", "pos_embed")


class ModelError(ErwError):
    """Model dimensions that cannot be built."""


class HandoffError(ErwError):
    """A warmup checkpoint that does not fit the model it should initialise."""


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed position embedding [grid_size**2, dim] for tokens in row-major order."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    # The column index fills the first half, as in MAE/DiT/REPA: released checkpoints expect it.
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


class Rope2D(nn.Module):
    """2-D rotary position embedding (the EVA-02 form used by ERW): the first half of each head's
    channels rotates with the token's row, the second half with its column, in adjacent pairs."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        axis_dim = head_dim // 2
        freqs = theta ** (-torch.arange(0, axis_dim, 2).float() / axis_dim)
        angles = torch.outer(torch.arange(grid_size).float(), freqs).repeat_interleave(2, dim=-1)
        rows = angles[:, None, :].expand(grid_size, grid_size, axis_dim)
        cols = angles[None, :, :].expand(grid_size, grid_size, axis_dim)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        # Derived from the shape alone: not saved, so state dicts match models without RoPE.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, heads, T, head_dim]
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * self.cos + rotated * self.sin


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W] -> [N, T, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQUENCIES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        half = TIME_FREQUENCIES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # t in [0, 1] enters unscaled, as in the public REPA SiT (DiT fed integer steps up to 1000).
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding. Row `num_classes` is the null class of classifier-free guidance; in training
    mode each label is replaced by it with probability `dropout`: where its draw u ~ U[0, 1) is
    below `dropout` (draws: the trainer's, keyed per sample; None: drawn from the global RNG)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout = dropout

    def forward(self, labels: Tensor, draws: Tensor | None = None) -> Tensor:
        if self.training and self.dropout > 0:
            u = torch.rand(labels.shape, device=labels.device) if draws is None else draws
            drop = u < self.dropout
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # Identity when off, so the state dict has no norm weights (the REPA naming).
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Rope2D | None = None) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block whose norms are shifted, scaled and gated per sample by the conditioning
    (adaLN-Zero: the gates start at zero, so every block starts as the identity)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: Rope2D | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def make_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, out_dim),
    )


class SiT(nn.Module):
    """The full SiT, or with `with_final_layer=False` the truncated L2R model of the ERW warmup.

    One projector per entry of `encoder_dims` reads the hidden state after block `align_depth`.
    out_channels = in_channels: the model predicts the velocity, no learned variance (as REPA).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        qk_norm: bool = False,
        rope: bool = False,
        projector_dim: int = 2048,
        encoder_dims: Sequence[int] = (),
        align_depth: int = 8,
        with_final_layer: bool = True,
    ):
        problems = _problems(input_size, patch_size, hidden_size, depth, num_heads, rope, class_dropout)
        if encoder_dims and not 1 <= align_depth <= depth:
            problems.append(f"align_depth={align_depth} is outside the model: choose 1..{depth}")
        if problems:
            raise ModelError("cannot build SiT:\n  - " + "\n  - ".join(problems))
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.num_heads, self.num_classes = hidden_size, num_heads, num_classes
        self.grid_size = input_size // patch_size
        self.align_depth = align_depth

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed, yet a (frozen) parameter so that checkpoints carry it like the public code's do.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size), requires_grad=False)
        self.rope = Rope2D(hidden_size // num_heads, self.grid_size) if rope else None
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.projectors = nn.ModuleList(make_projector(hidden_size, projector_dim, d) for d in encoder_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels) if with_final_layer else None
        self.initialize_weights()

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @torch.no_grad()
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_2d(self.hidden_size, self.grid_size).unsqueeze(0))
        # The patch embedding is a linear map of flattened patches: initialise it as one.
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        if self.final_layer is not None:
            zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, label_drop_draws: Tensor | None = None
    ) -> tuple[Tensor | None, list[Tensor]]:
        """x [N, C, H, W] input, t [N] time in [0, 1] (1 = noise), y [N] labels in [0, num_classes]
        (num_classes = null class), label_drop_draws [N] U[0, 1) draws of the training label drop
        (None: from the global RNG). Returns (prediction [N, C, H, W], or None for the L2R model,
        [projected tokens [N, T, D_enc] per projector], empty without projectors)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ModelError(f"SiT built for {self.input_size}x{self.input_size} inputs got {tuple(x.shape)}")
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, label_drop_draws)
        projected: list[Tensor] = []
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, self.rope)
            if depth == self.align_depth:
                projected = [projector(tokens) for projector in self.projectors]
        if self.final_layer is None:
            return None, projected
        return self.unpatchify(self.final_layer(tokens, c)), projected

    def unpatchify(self, patches: Tensor) -> Tensor:
        """[N, T, p*p*C] -> [N, C, H, W]; each patch is laid out (row, column, channel)."""
        n, g, p, c = patches.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = patches.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)


def _problems(
    input_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int, rope: bool, class_dropout: float
) -> list[str]:
    if min(input_size, patch_size, hidden_size, depth, num_heads) < 1:
        return [
            f"input_size/patch_size/hidden_size/depth/num_heads must be positive, got "
            f"{input_size}/{patch_size}/{hidden_size}/{depth}/{num_heads}"
        ]
    out = []
    if input_size % patch_size:
        out.append(f"input_size={input_size} is not divisible by patch_size={patch_size}")
    if hidden_size % 4:
        out.append(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {hidden_size}")
    if hidden_size % num_heads:
        out.append(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    elif rope and (hidden_size // num_heads) % 4:
        out.append(f"rope needs a head dimension divisible by 4, got {hidden_size // num_heads}")
    if not 0.0 <= class_dropout < 1.0:
        out.append(f"class_dropout={class_dropout} must be in [0, 1)")
    return out


# ---------------------------------------------------------------------------------------------
# Builders.


def build_sit(arch: str = "SiT-XL/2", **overrides) -> SiT:
    """'SiT-XL/2' plus overrides of BUILD_OVERRIDES, e.g. build_sit('SiT-B/2', encoder_dims=[768])."""
    unknown = sorted(set(overrides) - BUILD_OVERRIDES)
    if unknown:
        raise ModelError(f"unknown SiT option(s) {', '.join(unknown)}; known: {', '.join(sorted(BUILD_OVERRIDES))}")
    size, patch_size = parse_arch(arch)
    depth, hidden_size, num_heads = SIT_PRESETS[size]
    kwargs = dict(patch_size=patch_size, depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    return SiT(**(kwargs | overrides))


def _config_kwargs(cfg: ModelConfig, input_size: int, in_channels: int) -> dict:
    _, hidden_size, num_heads = cfg.dims()
    return dict(
        input_size=input_size,
        patch_size=cfg.patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        num_heads=num_heads,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=cfg.num_classes,
        class_dropout=cfg.class_dropout,
        qk_norm=cfg.qk_norm,
        rope=cfg.rope,
        projector_dim=cfg.projector_dim,
    )


def sit_from_config(cfg: ModelConfig, input_size: int, in_channels: int, encoder_dim: int | None) -> SiT:
    """The phase-2 model; one projector at cfg.align_depth, or none when encoder_dim is None."""
    return SiT(
        **_config_kwargs(cfg, input_size, in_channels),
        depth=cfg.dims()[0],
        encoder_dims=[encoder_dim] if encoder_dim is not None else [],
        align_depth=cfg.align_depth,
    )


def l2r_from_config(cfg: ModelConfig, input_size: int, in_channels: int, encoder_dim: int | None) -> SiT:
    """The phase-1 model: blocks 0..l2r_depth-1, one projector after the last, no final layer.
    Its forward returns (None, [tokens])."""
    if encoder_dim is None:
        raise ModelError("the ERW warmup aligns to an encoder: the L2R model needs encoder_dim")
    if not 1 <= cfg.l2r_depth < cfg.dims()[0]:
        raise ModelError(f"model.l2r_depth={cfg.l2r_depth} must be in 1..{cfg.dims()[0] - 1}")
    return SiT(
        **_config_kwargs(cfg, input_size, in_channels),
        depth=cfg.l2r_depth,
        encoder_dims=[encoder_dim],
        align_depth=cfg.l2r_depth,
        with_final_layer=False,
    )


# ---------------------------------------------------------------------------------------------
# Hand-off from the warmup (phase 1) to the full model (phase 2).


def warmup_tensor_names(model: SiT, l2r_depth: int) -> list[str]:
    """What phase 2 takes from the warmup: embedders, blocks 0..l2r_depth-1 and pos_embed (fixed, but
    loaded so that its shape rejects a warmup at another resolution or width). Not the projector:
    the phase-2 projector reads another block."""

    def from_warmup(name: str) -> bool:
        head = name.split(".")
        return head[0] in EMBEDDERS or (head[0] == "blocks" and int(head[1]) < l2r_depth)

    return [name for name in model.state_dict() if from_warmup(name)]


def load_warmup(model: SiT, warmup_state: dict[str, Tensor], l2r_depth: int) -> list[str]:
    """Copy the warmup's embedders and first l2r_depth blocks into `model`; return their names.

    Refuses (HandoffError, nothing loaded) unless every expected tensor is present with the right
    shape and nothing else is there besides the warmup projector."""
    if not 1 <= l2r_depth < len(model.blocks):
        raise HandoffError(f"l2r_depth={l2r_depth} must be in 1..{len(model.blocks) - 1}")
    target = model.state_dict()
    names = warmup_tensor_names(model, l2r_depth)
    missing = [n for n in names if n not in warmup_state]
    misshaped = [
        f"{n}: warmup {tuple(warmup_state[n].shape)}, model {tuple(target[n].shape)}"
        for n in names
        if n in warmup_state and warmup_state[n].shape != target[n].shape
    ]
    expected = set(names)
    unexpected = [n for n in warmup_state if n not in expected and not n.startswith("projectors.")]
    if missing or misshaped or unexpected:
        lines = [f"the warmup checkpoint does not fit this model (l2r_depth={l2r_depth}):"]
        for title, items in (("missing", missing), ("wrong shape", misshaped), ("unexpected", unexpected)):
            lines += [f"  {title}: {item}" for item in items]
        qk_norm = isinstance(model.blocks[0].attn.q_norm, nn.LayerNorm)
        lines.append("likely cause:")
        lines += [f"  - {cause}" for cause in _likely_causes(warmup_state, l2r_depth, misshaped, qk_norm)]
        raise HandoffError("\n".join(lines))
    with torch.no_grad():
        for name in names:
            target[name].copy_(warmup_state[name])  # state_dict tensors alias the parameters
    return names


def _likely_causes(warmup_state: dict[str, Tensor], l2r_depth: int, misshaped: list[str], qk_norm: bool) -> list[str]:
    causes = []
    if any(n.startswith("final_layer.") for n in warmup_state):
        causes.append("it has a final layer: this is a full (phase-2) checkpoint, not a warmup checkpoint")
    block_ids = {int(n.split(".")[1]) for n in warmup_state if n.startswith("blocks.")}
    if block_ids and max(block_ids) + 1 != l2r_depth:
        causes.append(f"the warmup has {max(block_ids) + 1} blocks but model.l2r_depth={l2r_depth}: set it to match")
    elif block_ids != set(range(l2r_depth)):
        causes.append(f"blocks {sorted(set(range(l2r_depth)) - block_ids)} are absent: the checkpoint is incomplete")
    warmup_qk_norm = any(".q_norm." in n for n in warmup_state)
    if warmup_qk_norm != qk_norm:
        causes.append(f"the warmup was trained with qk_norm={warmup_qk_norm}, this model has qk_norm={qk_norm}")
    if misshaped:
        width = warmup_state.get("x_embedder.proj.bias")
        seen = f" (the warmup's hidden_size is {width.shape[0]})" if width is not None else ""
        causes.append(f"another arch, hidden_size, mlp_ratio, num_classes, patch size or resolution{seen}")
    return causes + ["the warmup config must match in arch, hidden_size, mlp_ratio, qk_norm, rope and l2r_depth"]


def warmup_config_differences(cfg: ModelConfig, warmup_cfg: ModelConfig, *, rope_may_differ: bool = False) -> list[str]:
    """The model settings in which a warmup differs from phase 2, one line each. RoPE leaves no
    trace in the weights, so only the configs can tell; it has no parameters either, so phase 2
    may add it on purpose (rope_may_differ: the ERW reference's run)."""
    fields = {
        "patch size": lambda m: m.patch_size,
        "hidden_size": lambda m: m.dims()[1],
        "num_heads": lambda m: m.dims()[2],
        "mlp_ratio": lambda m: m.mlp_ratio,
        "qk_norm": lambda m: m.qk_norm,
        "rope": lambda m: m.rope,
        "num_classes": lambda m: m.num_classes,
        "l2r_depth": lambda m: m.l2r_depth,
    }
    if rope_may_differ:
        del fields["rope"]
    return [
        f"{name}: warmup {get(warmup_cfg)}, now {get(cfg)}"
        for name, get in fields.items()
        if get(warmup_cfg) != get(cfg)
    ]


def check_warmup_config(cfg: ModelConfig, warmup_cfg: ModelConfig, *, rope_may_differ: bool = False) -> None:
    """Refuse a warmup whose model settings differ from phase 2's (see warmup_config_differences)."""
    differ = warmup_config_differences(cfg, warmup_cfg, rope_may_differ=rope_may_differ)
    if differ:
        raise HandoffError("the warmup was trained with other model settings:\n  - " + "\n  - ".join(differ))


# ---------------------------------------------------------------------------------------------
# Cost, for throughput and model-FLOPs-utilisation reports.


def macs_per_image(model: SiT) -> int:
    """Forward multiply-accumulates per image: every linear and convolution and the two attention
    matmuls; norms, activations, softmax and modulation are left out (well under 1%).
    FLOPs = 2 x MACs; a training step (forward + backward) costs about 3 forward passes."""
    t, d, p = model.num_tokens, model.hidden_size, model.patch_size
    macs = t * model.in_channels * p * p * d  # patch embedding
    macs += TIME_FREQUENCIES * d + d * d  # timestep MLP, once per image
    for block in model.blocks:
        mlp_hidden = block.mlp.fc1.out_features
        macs += d * 6 * d  # adaLN modulation, once per image
        macs += t * (3 * d * d + d * d + 2 * d * mlp_hidden)  # qkv, attention output, MLP
        macs += 2 * t * t * d  # q k^T and attention-weighted v
    for projector in model.projectors:
        macs += t * sum(layer.in_features * layer.out_features for layer in projector if isinstance(layer, nn.Linear))
    if model.final_layer is not None:
        macs += d * 2 * d + t * model.final_layer.linear.in_features * model.final_layer.linear.out_features
    return macs


def flops_per_image(model: SiT) -> int:
    """Forward FLOPs per image (2 per multiply-accumulate)."""
    return 2 * macs_per_image(model)
