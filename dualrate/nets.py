"""The two networks of Dual-Rate Diffusion: a heavy ContextEncoder and a LightDenoiser.

Both are small U-ViTs (conv ResBlocks at S x S and S/2 x S/2, a transformer on the S/4 grid, an up path with skips;
S and the image channels come from the model config).
The encoder's features are the last activations of every level of its up path; the light denoiser projects
them with 1x1 convs and concatenates them in at each level. Neither network knows the noise schedule: they
take t in [0, 1] and return v (the denoiser) or features (the encoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualrate.config import ModelConfig, NetConfig


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of continuous t in [0, 1] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _groups(c: int) -> int:
    return min(8, c // 4) if c >= 8 else 1


class ResBlock(nn.Module):
    """GroupNorm -> FiLM(emb) -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus a (1x1) skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.film = nn.Linear(emb_dim, 2 * c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = F.silu(self.norm1(x) * (1 + scale) + shift)
        h = self.conv2(F.silu(self.norm2(self.conv1(h))))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """DiT-style block with adaptive LayerNorm (scale, shift, gate) from the embedding."""

    def __init__(self, dim: int, heads: int, emb_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(emb_dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x: (B, L, D)
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(emb)[:, None, :].chunk(6, dim=2)  # (B, 1, D) each
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,L,Dh)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1 * self.proj(att)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class Embedding(nn.Module):
    """MLP over sinusoidal embeddings of each time input, plus a label embedding (index num_classes = null)."""

    def __init__(self, n_times: int, num_classes: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.times = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) for _ in range(n_times)
        )
        self.label = nn.Embedding(num_classes + 1, dim)

    def forward(self, times: list[Tensor], label: Tensor) -> Tensor:
        e = self.label(label.long())
        for mlp, t in zip(self.times, times, strict=True):
            # The sinusoid is computed in fp32 (1000 * t overflows nothing but loses digits in fp16), then cast to
            # the MLP's dtype so a half-precision export runs.
            e = e + mlp(timestep_embedding(t, self.dim).to(e.dtype))
        return F.silu(e)


class UViT(nn.Module):
    """The shared topology. `extra` gives per-level channels concatenated into the up path and the 8x8 tokens
    (the light network's projected encoder features); the down path sees only z."""

    def __init__(self, cfg: NetConfig, emb_dim: int, *, image_channels: int, image_size: int,
                 extra: tuple[int, int, int] = (0, 0, 0)) -> None:
        super().__init__()
        c0, c1, c2 = cfg.channels
        x0, x1, x2 = extra
        self.stem = nn.Conv2d(image_channels, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, emb_dim)  # S x S
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)  # S/2
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid_in = nn.Linear(c2 + x2, c2)  # S/4 x S/4 grid as tokens
        self.pos = nn.Parameter(torch.zeros(1, (image_size // 4) ** 2, c2))
        self.blocks = nn.ModuleList(TransformerBlock(c2, cfg.heads, emb_dim) for _ in range(cfg.transformer_blocks))
        self.up2 = ResBlock(2 * c2, c2, emb_dim)  # S/4, skip from pool1
        self.up1 = ResBlock(c2 + c1 + x1, c1, emb_dim)  # S/2, skip from down1
        self.up0 = ResBlock(c1 + c0 + x0, c0, emb_dim)  # S, skip from down0

    def forward(self, z: Tensor, emb: Tensor, extra: list[Tensor] | None = None) -> list[Tensor]:
        """Returns the last activation of each up-path level: [(B,c0,S,S), (B,c1,S/2,S/2), (B,c2,S/4,S/4)]."""

        def cat(h: Tensor, i: int) -> Tensor:
            return h if extra is None else torch.cat([h, extra[i]], dim=1)

        h0 = self.down0(self.stem(z), emb)  # (B, c0, S, S)
        h1 = self.down1(self.pool0(h0), emb)  # (B, c1, S/2, S/2)
        h2 = self.pool1(h1)  # (B, c2, S/4, S/4)
        b, c, hh, ww = h2.shape
        tok = self.mid_in(cat(h2, 2).flatten(2).transpose(1, 2)) + self.pos  # (B, S^2/16, c2)
        for blk in self.blocks:
            tok = blk(tok, emb)
        m = tok.transpose(1, 2).reshape(b, c, hh, ww)
        u2 = self.up2(torch.cat([m, h2], dim=1), emb)  # (B, c2, S/4, S/4)
        u1 = self.up1(cat(torch.cat([F.interpolate(u2, scale_factor=2.0, mode="nearest"), h1], dim=1), 1), emb)
        u0 = self.up0(cat(torch.cat([F.interpolate(u1, scale_factor=2.0, mode="nearest"), h0], dim=1), 0), emb)
        return [u0, u1, u2]


class ContextEncoder(nn.Module):
    """Heavy network E(z_tau, tau, y) -> e, run every K-th step. e = the up path's activations at every level.
    A standalone model's encoder has no weights and returns three (B, 1, 1, 1) zeros (ModelConfig.kind)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.standalone = cfg.standalone
        if not self.standalone:
            self.embed = Embedding(1, cfg.num_classes, cfg.encoder.emb_dim)
            self.net = UViT(cfg.encoder, cfg.encoder.emb_dim, image_channels=cfg.channels, image_size=cfg.image_size)

    def forward(self, z_tau: Tensor, tau: Tensor, label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.standalone:
            # Shaped by the batch, in z's dtype; tau and label only keep the graph's inputs those of every encoder.
            zero = (z_tau[:, :1, :1, :1] + (tau[:, None, None, None] + label[:, None, None, None]).to(z_tau.dtype)) * 0.0
            return zero, zero, zero
        f0, f1, f2 = self.net(z_tau, self.embed([tau], label))
        return f0, f1, f2


class LightDenoiser(nn.Module):
    """Light network g(z_t, t, tau, y, e) -> v, run at every step, reusing the most recent encoder features.
    In a standalone model it is the whole model: g(z_t, t, y) -> v, blind to tau and e (ModelConfig.kind)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.denoiser
        self.standalone = cfg.standalone
        self.embed = Embedding(1 if self.standalone else 2, cfg.num_classes, d.emb_dim)
        # 1x1 projections of the encoder features down to the light network's width at each level.
        self.proj = nn.ModuleList(
            () if self.standalone else (nn.Conv2d(ce, cd, 1) for ce, cd in zip(cfg.encoder.channels, d.channels, strict=True))
        )
        extra = (0, 0, 0) if self.standalone else d.channels
        self.net = UViT(d, d.emb_dim, extra=extra, image_channels=cfg.channels, image_size=cfg.image_size)
        self.out_norm = nn.GroupNorm(_groups(d.channels[0]), d.channels[0])
        self.out = nn.Conv2d(d.channels[0], cfg.channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, z_t: Tensor, t: Tensor, tau: Tensor, label: Tensor, f0: Tensor, f1: Tensor, f2: Tensor) -> Tensor:
        if self.standalone:
            u0 = self.net(z_t, self.embed([t], label))[0]
            # tau and e are ignored; the zero term keeps them inputs of the exported graph (one contract for all models).
            unused = (tau[:, None, None, None] + f0 + f1 + f2).to(u0.dtype) * 0.0
        else:
            extra = [p(f) for p, f in zip(self.proj, (f0, f1, f2), strict=True)]
            u0 = self.net(z_t, self.embed([t, tau], label), extra)[0]
            unused = None
        v = self.out(F.silu(self.out_norm(u0)))  # (B, C, S, S)
        return v if unused is None else v + unused


def count_flops(module: nn.Module, *inputs: Tensor) -> int:
    """FLOPs of one forward pass, counted by torch's FlopCounterMode (matmuls and convs, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def standalone_config(cfg: ModelConfig, size: str, k: int = 4) -> ModelConfig:
    """The standalone baselines of a dual-rate config. "large": the encoder's U-ViT with the output head, run every
    step (what one would serve without dual-rate). "small": the encoder's U-ViT narrowed (every level's width times
    one factor, rounded to multiples of 4, the transformer's width then moved by up to +-8) to the candidate whose
    FLOPs per forward are closest to the pair's average per step at interval k, (encoder + k * denoiser) / k.
    The returned config keeps the pair's `encoder` entry only as a record."""
    import dataclasses

    if size == "large":
        return dataclasses.replace(cfg, kind="standalone", denoiser=cfg.encoder)
    if size != "small":
        raise ValueError(f"standalone size must be 'large' or 'small', not {size!r}")
    enc_f, den_f = per_image_flops(cfg)
    target = enc_f / k + den_f
    best: tuple[float, ModelConfig] | None = None
    heads = cfg.encoder.heads
    tried = set()
    for pct in range(20, 101, 2):
        c0, c1, c2 = (max(4, 4 * round(c * pct / 100 / 4)) for c in cfg.encoder.channels)
        for chans in ((c0, c1, c2 + d) for d in (-8, -4, 0, 4, 8)):  # the transformer's width, finer
            if chans in tried or chans[2] <= 0 or chans[2] % heads:
                continue
            tried.add(chans)
            cand = dataclasses.replace(cfg, kind="standalone", denoiser=dataclasses.replace(cfg.encoder, channels=chans))
            try:
                flops = per_image_flops(cand)[1]
            except ValueError:  # a width GroupNorm cannot split
                continue
            err = abs(flops - target) / target
            if best is None or err < best[0]:
                best = (err, cand)
    if best is None:
        raise ValueError(f"no narrowed U-ViT of {cfg.encoder} is valid")
    return best[1]


def per_image_flops(cfg: ModelConfig) -> tuple[int, int]:
    """(encoder, denoiser) FLOPs for one image, counted at batch 1."""
    enc, den = ContextEncoder(cfg).eval(), LightDenoiser(cfg).eval()
    z, t, y = torch.zeros(1, *cfg.sample_shape), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    feats = [torch.zeros(1, *shape) for shape in cfg.feature_shapes]
    return count_flops(enc, z, t, y), count_flops(den, z, t, t, y, *feats)
