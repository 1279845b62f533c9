"""DiT: a Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie, 2023), with TiT options.

One readable file in the style of facebookresearch/DiT ``models.py``. Options from the
TiT / LightningDiT line of work are constructor flags: parameter-free RMSNorm instead of
LayerNorm, QK-norm, a SwiGLU MLP and 2-D rotary position embeddings (RoPE).

Conventions used across ucgm_fast:
- ``forward(x, t, y)``: x (B, C, H, W), t (B,) times in [0, 1], y (B,) int64 labels.
- Label ``num_classes`` is the null (unconditional) class: the embedding table has
  ``num_classes + 1`` rows, and label dropping is done by the training objective, not here.
- No learned sigma: the output has the input's shape.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#: How attention runs on CPU: "math" (explicit softmax(QK^T)V) below CPU_SDPA_MIN_TOKENS tokens,
#: F.scaled_dot_product_attention ("sdpa") from there on; CUDA always uses SDPA (flash / efficient kernels).
#: Measured with benchmarks/attention_cpu.py (torch 2.13 CPU, float32, 6 heads x 64 = DiT-S width,
#: forward + backward, the two interleaved, minimum of 10) on this project's 2-core machine while
#: other jobs kept its load average at 7-8, so only large ratios mean anything:
#:     1 thread,  one attention call, batch 64:  16 tok 0.96 (sdpa/math)  49 tok 0.98  64 tok 1.05  196 tok 0.62
#:     1 thread,  DiT-S training step, batch 32: 16 tok (8x8, /2) 1.06   49 tok (28x28, /4) 1.00   64 tok 0.94
#:     2 threads, attention forward only:        16 tok 1.31   49 tok 0.50   64 tok 0.88   196 tok 0.37
#: Math and SDPA tie within noise at 16-64 tokens, math is ahead only at 16 tokens (the 8x8 digits at
#: patch 2, in the training step and in forward-only sampling), SDPA wins clearly from ~200 tokens.
#: (The 2-4x advantage of math at 16-49 tokens noted in issue 5 did not reproduce here.)
CPU_SDPA_MIN_TOKENS = 32


#################################################################################
#                             Normalization and Modulation                      #
#################################################################################

def modulate(x, shift, scale):
    """x * (1 + scale) + shift, with (B, D) shift/scale broadcast over the tokens of x (B, N, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm: x / sqrt(mean(x^2, last dim) + eps), computed in float32 (as TiT's)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # 16-bit q / k under autocast: in float32
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """The block norm: parameter-free RMSNorm or LayerNorm without affine parameters (as in DiT)."""
    if use_rmsnorm:
        return RMSNorm(eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################

class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, (H/p)(W/p), D) tokens by a stride-p convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar times (B,) -> (B, D) by sinusoidal frequencies and a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        half = frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        # A buffer, not recomputed per call: one less op in every compiled graph.
        self.register_buffer("freqs", freqs, persistent=False)

    def timestep_embedding(self, t):
        """[cos(t s f_k), sin(t s f_k)] with f_k = 10000^(-k/half), s = time_scale (zero-padded if odd)."""
        args = (t.float() * self.time_scale)[:, None] * self.freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D); label num_classes is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


#################################################################################
#                           Rotary Position Embedding                           #
#################################################################################

class RotaryEmbedding2D(nn.Module):
    """2-D RoPE: rotate channel pairs of the first half of each head by the row, the second half by the column."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        axis_dim = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        pos = torch.arange(grid_size, dtype=torch.float64)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")
        # (N, head_dim / 2): one angle per channel pair, row angles then column angles.
        angles = torch.cat([rows.reshape(-1, 1) * inv_freq, cols.reshape(-1, 1) * inv_freq], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x):
        """x (B, heads, N, head_dim) -> each pair (a, b) rotated to (a cos - b sin, a sin + b cos)."""
        pairs = x.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and RoPE; SDPA on CUDA, measured choice on CPU."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, attention: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        if attention not in ("auto", "sdpa", "math"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'math', got {attention!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attention = attention
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # Parameter-free RMSNorm whatever the block norm (TiT pairs QK-norm with RMSNorm; LightningDiT's
        # QK-norm without RMSNorm would be a learnable LayerNorm, which no shipped recipe uses).
        self.q_norm = RMSNorm() if qk_norm else nn.Identity()
        self.k_norm = RMSNorm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def use_sdpa(self, x) -> bool:
        """SDPA on CUDA (and when forced); on CPU only from CPU_SDPA_MIN_TOKENS tokens (see the measurement)."""
        if self.attention != "auto":
            return self.attention == "sdpa"
        return x.is_cuda or x.shape[1] >= CPU_SDPA_MIN_TOKENS

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.use_sdpa(x):
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc2(GELU_tanh(fc1(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * (w2 x)), with w1 and w2 as one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_rmsnorm=False, qk_norm=False,
                 use_swiglu=False, attention="auto"):
        super().__init__()
        self.norm1 = make_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, attention=attention)
        self.norm2 = make_norm(hidden_size, use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        # SwiGLU at 2/3 of the width keeps the parameter count of the GELU MLP (as in TiT / LightningDiT).
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then a linear map to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels, use_rmsnorm=False):
        super().__init__()
        self.norm_final = make_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone: F(x, t, y) with the shape of x."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        use_rmsnorm=False,
        qk_norm=False,
        use_swiglu=False,
        use_rope=False,
        attention="auto",
        time_scale=1.0,
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("num_classes", num_classes), ("depth", depth), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiT: {name} must be a positive integer, got {value!r}")
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size={input_size} is not divisible by patch_size={patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.depth = depth

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, a buffer so optimizers and EMAs never see it (restored from checkpoints).
        self.register_buffer("pos_embed", torch.zeros(1, num_patches, hidden_size))
        self.rope = RotaryEmbedding2D(hidden_size // num_heads, self.x_embedder.grid_size) if use_rope else None

        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, use_rmsnorm=use_rmsnorm, qk_norm=qk_norm,
                     use_swiglu=use_swiglu, attention=attention)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears, sin-cos positions, N(0, 0.02) label/time embeddings; adaLN and output zeroed."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers: the model's output is exactly zero at initialization.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(B, N, p*p*C) tokens -> (B, C, H, W) image."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        """x (B, C, H, W), t (B,) times, y (B,) labels in [0, num_classes] -> (B, C, H, W)."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = block(x, c, self.rope)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance: uncond + s (cond - uncond), evaluated as one batch of 2B."""
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2, dim=0)
        return uncond + cfg_scale * (cond - uncond)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size^2, embed_dim) array: half the channels encode the column, half the row."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    """Concatenates the 1-D embeddings of the two grid coordinates."""
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """[sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-2k/D)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

def _sized(kwargs, **config):
    """The config's sizes, overridable by kwargs (depth / hidden_size / num_heads shrink a config for tests)."""
    return DiT(**{**config, **kwargs})

def DiT_XL_1(**kwargs):
    return _sized(kwargs, depth=28, hidden_size=1152, patch_size=1, num_heads=16)

def DiT_XL_2(**kwargs):
    return _sized(kwargs, depth=28, hidden_size=1152, patch_size=2, num_heads=16)

def DiT_XL_4(**kwargs):
    return _sized(kwargs, depth=28, hidden_size=1152, patch_size=4, num_heads=16)

def DiT_XL_8(**kwargs):
    return _sized(kwargs, depth=28, hidden_size=1152, patch_size=8, num_heads=16)

def DiT_L_1(**kwargs):
    return _sized(kwargs, depth=24, hidden_size=1024, patch_size=1, num_heads=16)

def DiT_L_2(**kwargs):
    return _sized(kwargs, depth=24, hidden_size=1024, patch_size=2, num_heads=16)

def DiT_L_4(**kwargs):
    return _sized(kwargs, depth=24, hidden_size=1024, patch_size=4, num_heads=16)

def DiT_L_8(**kwargs):
    return _sized(kwargs, depth=24, hidden_size=1024, patch_size=8, num_heads=16)

def DiT_B_1(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=768, patch_size=1, num_heads=12)

def DiT_B_2(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=768, patch_size=2, num_heads=12)

def DiT_B_4(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=768, patch_size=4, num_heads=12)

def DiT_B_8(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=768, patch_size=8, num_heads=12)

def DiT_S_1(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=384, patch_size=1, num_heads=6)

def DiT_S_2(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=384, patch_size=2, num_heads=6)

def DiT_S_4(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=384, patch_size=4, num_heads=6)

def DiT_S_8(**kwargs):
    return _sized(kwargs, depth=12, hidden_size=384, patch_size=8, num_heads=6)


# Patch size 1 is for compact latents (VA-VAE, DC-AE): the published TiT-XL/1 recipes use it.
DiT_models = {
    'DiT-XL/1': DiT_XL_1,  'DiT-XL/2': DiT_XL_2,  'DiT-XL/4': DiT_XL_4,  'DiT-XL/8': DiT_XL_8,
    'DiT-L/1':  DiT_L_1,   'DiT-L/2':  DiT_L_2,   'DiT-L/4':  DiT_L_4,   'DiT-L/8':  DiT_L_8,
    'DiT-B/1':  DiT_B_1,   'DiT-B/2':  DiT_B_2,   'DiT-B/4':  DiT_B_4,   'DiT-B/8':  DiT_B_8,
    'DiT-S/1':  DiT_S_1,   'DiT-S/2':  DiT_S_2,   'DiT-S/4':  DiT_S_4,   'DiT-S/8':  DiT_S_8,
}

#: The published TiT models: a DiT with parameter-free RMSNorm, QK-norm, SwiGLU and 2-D RoPE
#: (``get_model("TiT-XL/2")`` = DiT-XL/2 with these options).
TIT_OPTIONS = {"use_rmsnorm": True, "qk_norm": True, "use_swiglu": True, "use_rope": True}


def resolve_model_name(name, options: dict):
    """(registry name, options) that ``name`` stands for: ``TiT-*`` is the DiT of that size with
    :data:`TIT_OPTIONS` (the given options win); any other name is returned as it is."""
    if isinstance(name, str) and name.startswith("TiT-"):
        return "DiT-" + name[4:], {**TIT_OPTIONS, **options}
    return name, options


#: Constructor options that get_model accepts besides input_size / in_channels / num_classes.
MODEL_OPTIONS = ("mlp_ratio", "use_rmsnorm", "qk_norm", "use_swiglu", "use_rope", "attention", "time_scale",
                 "depth", "hidden_size", "num_heads")


def get_model(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, **options) -> DiT:
    """DiT_models[name](input_size=..., in_channels=..., num_classes=..., **options).

    Parameters
    ----------
    name : str
        A registry name, e.g. ``"DiT-S/2"`` (see ``DiT_models``), or ``"TiT-*"``: the same size with
        :data:`TIT_OPTIONS` (options given here win).
    input_size, in_channels, num_classes : int
        Image side, channels and the number of real classes (label ``num_classes`` is the null class).
    **options
        TiT options ``use_rmsnorm``, ``qk_norm``, ``use_swiglu``, ``use_rope``; ``attention``
        ("auto", "sdpa", "math"); ``time_scale``; ``mlp_ratio``; and ``depth``, ``hidden_size``,
        ``num_heads`` to shrink a config (tests, tiny runs).
    """
    name, options = resolve_model_name(name, options)
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(DiT_models)} (and TiT-* of each)")
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise TypeError(f"get_model: unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(MODEL_OPTIONS)}")
    return DiT_models[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes, **options)
