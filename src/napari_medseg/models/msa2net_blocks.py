"""Building blocks of MSA²Net: the MaxViT encoder and the decoder blocks.

* :class:`MaxViTEncoder`: a timm MaxViT (``maxvit_rmlp_*_rw`` family: MBConv + SE, block
  attention, grid attention, log-coordinate relative-position MLP) randomly initialised, cut
  after its four stages. Partition attention is re-run here with a **fixed** window/grid size
  ``P`` and bottom/right zero padding of every stage's map to a multiple of ``P``; the padded
  tokens are masked out of the attention (spec 1.16c, option iii). Any input side that is a
  multiple of 32 works and the weights mean the same thing at every tile size.
* :class:`DualTransformerBlock` (DAE-Former: efficient attention, channel attention, MixFFN),
  used at 1/16 (spec 1.7).
* :class:`LKABlock` (large-kernel attention + conv MLP), used at 1/8 and 1/4 (spec 1.8).
* :class:`PatchExpand` (×2 and the final ×4 expansion, spec 1.9).

Axes: "N×C×H×W" is channels-first, "N×H×W×C" channels-last, "N×L×C" tokens
(L = H·W, row-major).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, model_cfgs
from torch import Tensor, nn

from .layers import ChannelLayerNorm

__all__ = [
    "maxvit_config",
    "MaxViTEncoder",
    "partition_windows",
    "merge_windows",
    "partition_grid",
    "merge_grid",
    "EfficientAttention",
    "ChannelAttention",
    "MixFFN",
    "DualTransformerBlock",
    "LKABlock",
    "PatchExpand",
]

#: The timm configuration the paper's encoder belongs to (``maxvit_rmlp_small_rw_224``).
MAXVIT_BASE_CFG = "maxvit_rmlp_small_rw"


# --------------------------------------------------------------------------- MaxViT encoder


def maxvit_config(
    embed_dims: tuple[int, ...],
    depths: tuple[int, ...],
    stem_widths: tuple[int, int],
    dim_head: int,
    partition_size: int,
    rel_pos_dim: int,
) -> MaxxVitCfg:
    """A timm MaxViT config of the ``maxvit_rmlp_small_rw`` family with other sizes.

    Every stage uses "M" blocks (MBConv, block attention, grid attention); everything not
    given here (SiLU MBConv with expansion from the input width and SE ratio 1/16, no MBConv
    output bias, rel-pos MLP, layer scale 1e-6, LN eps 1e-6, "vit_eff" init) is that of
    ``maxvit_rmlp_small_rw_224``.
    """
    base = model_cfgs[MAXVIT_BASE_CFG]
    size = (int(partition_size), int(partition_size))
    transformer = dataclasses.replace(
        base.transformer_cfg,
        dim_head=int(dim_head),
        rel_pos_dim=int(rel_pos_dim),
        window_size=size,
        grid_size=size,
    )
    return dataclasses.replace(
        base,
        embed_dim=tuple(int(d) for d in embed_dims),
        depths=tuple(int(d) for d in depths),
        block_type=("M",) * len(embed_dims),
        stem_width=tuple(int(w) for w in stem_widths),
        transformer_cfg=transformer,
    )


def partition_windows(x: Tensor, size: int) -> Tensor:
    """Split N×H×W×C into non-overlapping size×size windows: (N·H/s·W/s)×s×s×C."""
    n, h, w, c = x.shape
    x = x.view(n, h // size, size, w // size, size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c)


def merge_windows(windows: Tensor, size: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`partition_windows`: back to N×H×W×C."""
    c = windows.shape[-1]
    x = windows.view(-1, h // size, w // size, size, size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def partition_grid(x: Tensor, size: int) -> Tensor:
    """Split N×H×W×C into a size×size grid: each group holds the size×size tokens taken with
    stride (H/size, W/size) across the whole map; returns (N·H/s·W/s)×s×s×C."""
    n, h, w, c = x.shape
    x = x.view(n, size, h // size, size, w // size, c)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, size, size, c)


def merge_grid(groups: Tensor, size: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`partition_grid`: back to N×H×W×C."""
    c = groups.shape[-1]
    x = groups.view(-1, h // size, w // size, size, size, c)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, h, w, c)


def _attend(attn: nn.Module, tokens: Tensor, key_valid: Tensor | None) -> Tensor:
    """timm ``AttentionCl`` with its rel-pos bias plus a key mask (-inf on padded tokens).

    Args:
        attn: a timm ``AttentionCl`` (qkv, rel_pos, proj).
        tokens: B×L×C, one row per window/grid group.
        key_valid: B×L booleans (False = padding), or None when nothing is padded.
    """
    b, n, _ = tokens.shape
    heads, dim_head = attn.num_heads, attn.dim_head
    qkv = attn.qkv(tokens)
    if attn.head_first:
        q, k, v = qkv.view(b, n, heads, dim_head * 3).transpose(1, 2).chunk(3, dim=3)
    else:
        q, k, v = qkv.reshape(b, n, 3, heads, dim_head).transpose(1, 3).unbind(2)
    bias = attn.rel_pos.get_bias().to(q.dtype) if attn.rel_pos is not None else None
    if key_valid is not None:
        mask = torch.zeros_like(key_valid, dtype=q.dtype)
        mask = mask.masked_fill(~key_valid, float("-inf"))[:, None, None, :]
        bias = mask if bias is None else bias + mask
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, n, heads * dim_head)
    return attn.proj_drop(attn.proj(out))


def _tracing() -> bool:
    """True while the graph is being recorded for export (TorchScript trace, ONNX or dynamo).

    Under tracing the map sizes are symbolic, so whether a map needs padding is not known:
    :func:`_partition_attention` then always takes its pad-and-mask path (with zero padding
    where none is needed), which computes the same values as the eager fast path.
    """
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def _partition_attention(layer: nn.Module, x: Tensor, size: int) -> Tensor:
    """Block or grid attention of a timm ``PartitionAttentionCl`` on padded maps.

    Args:
        layer: the timm partition-attention layer (its ``partition_block`` says which kind).
        x: N×H×W×C, already layer-normed.
        size: P, the window side (block) or the number of groups per side (grid).

    Returns:
        N×H×W×C. The map is zero-padded at the bottom/right to multiples of P, the padded
        tokens are excluded as keys, and the padding is cropped again.

    Only P is a constant of the computation: the padded sizes, the number of groups and
    the key mask follow the map size, so the graph traced for export (where the padded
    path is always taken) stays valid at every H and W.
    """
    n, h, w, c = x.shape
    # Padded sides as (number of groups)·P: a form that stays a visible multiple of P when
    # the sides are symbolic (torch.export), so the partition reshapes need no guards.
    hp, wp = (h + size - 1) // size * size, (w + size - 1) // size * size
    pad_h, pad_w = hp - h, wp - w
    block = bool(layer.partition_block)
    part = partition_windows if block else partition_grid
    merge = merge_windows if block else merge_grid
    padded = _tracing() or bool(pad_h) or bool(pad_w)
    key_valid = None
    if padded:
        # 1 on real tokens, 0 on padding, partitioned like the map: (N·groups)×P².
        ones = torch.ones_like(x[..., :1])
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        key_valid = part(F.pad(ones, (0, 0, 0, pad_w, 0, pad_h)), size)
        key_valid = key_valid.reshape(-1, size * size) > 0.5
    groups = part(x, size)
    out = _attend(layer.attn, groups.reshape(-1, size * size, c), key_valid)
    out = merge(out.view(-1, size, size, c), size, hp, wp)
    return out[:, :h, :w] if padded else out


class MaxViTEncoder(nn.Module):
    """A timm MaxViT cut after stage 4, returning the four stage features (strides 4 to 32).

    Only the stem and the stages of timm's ``MaxxVit`` are kept (no classifier head); a
    LayerNorm2d (eps 1e-6) is applied to the last feature only, as in the paper's code.
    Parameter names follow timm (``stem.*``, ``stages.i.blocks.j.*``), so timm weights of the
    same configuration load into it.

    Args:
        in_channels: image channels (the stem is built for them; no 1→3 repetition).
        embed_dims: widths of the four stages.
        depths: blocks per stage.
        stem_widths: widths of the two stem convolutions.
        dim_head: attention head width (heads = width / dim_head).
        partition_size: P, the fixed window and grid side of every stage.
        rel_pos_dim: hidden width of the relative-position MLP.

    Shapes:
        input N×C×H×W with H, W multiples of 32; output four N×Ci×H/2^(i+2)×W/2^(i+2).
    """

    def __init__(
        self,
        in_channels: int,
        embed_dims: tuple[int, ...],
        depths: tuple[int, ...],
        stem_widths: tuple[int, int],
        dim_head: int,
        partition_size: int,
        rel_pos_dim: int,
    ) -> None:
        super().__init__()
        cfg = maxvit_config(embed_dims, depths, stem_widths, dim_head, partition_size, rel_pos_dim)
        size = 32 * int(partition_size)  # only used by timm to derive sizes we override
        full = MaxxVit(cfg, img_size=size, in_chans=int(in_channels), num_classes=0)
        self.stem = full.stem
        self.stages = full.stages
        self.norm = LayerNorm2d(int(embed_dims[-1]), eps=1e-6)
        self.partition_size = int(partition_size)
        self.channels = tuple(int(d) for d in embed_dims)

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        x = block.conv(x).permute(0, 2, 3, 1)  # MBConv, then channels-last
        for layer in (block.attn_block, block.attn_grid):
            y = _partition_attention(layer, layer.norm1(x), self.partition_size)
            x = x + layer.drop_path1(layer.ls1(y))
            x = x + layer.drop_path2(layer.ls2(layer.mlp(layer.norm2(x))))
        return x.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Features E0..E3 of an N×C×H×W batch (E3 layer-normed)."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            for block in stage.blocks:
                x = self._block(block, x)
            features.append(x)
        features[-1] = self.norm(features[-1])
        return features


# --------------------------------------------------------------------------- decoder blocks


class EfficientAttention(nn.Module):
    """Single-head efficient attention (linear in the number of pixels).

    K̂ = softmax over positions, Q̂ = softmax over channels, G = K̂ Vᵀ (C×C),
    output = reprojection(Gᵀ Q̂).

    Shapes: N×C×H×W in and out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.keys = nn.Conv2d(channels, channels, 1)
        self.queries = nn.Conv2d(channels, channels, 1)
        self.values = nn.Conv2d(channels, channels, 1)
        self.reprojection = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        keys = torch.softmax(self.keys(x).reshape(n, c, h * w), dim=2)
        queries = torch.softmax(self.queries(x).reshape(n, c, h * w), dim=1)
        values = self.values(x).reshape(n, c, h * w)
        context = keys @ values.transpose(1, 2)  # N×C×C
        out = context.transpose(1, 2) @ queries  # N×C×L
        return self.reprojection(out.reshape(n, c, h, w))


class ChannelAttention(nn.Module):
    """Transposed (cross-covariance) attention between channels, ``heads`` heads.

    Per head q, k, v are d×L (d = C/heads); q and k rows are L2-normalised over L;
    A = softmax(τ q kᵀ) is d×d with a learned temperature τ per head.

    Shapes: N×L×C in and out.
    """

    def __init__(self, channels: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = int(heads)
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.qkv = nn.Linear(channels, channels * 3, bias=False)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each N×heads×d×L
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(n, length, c)
        return self.proj(out)


class MixFFN(nn.Module):
    """Linear C→rC, depthwise 3×3 on the map, GELU, Linear rC→C (SegFormer's Mix-FFN).

    Shapes: N×L×C in and out (L = H·W, row-major).
    """

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        hidden = int(channels * ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        n, length, _ = x.shape
        y = self.fc1(x)
        y = y.transpose(1, 2).reshape(n, -1, h, w)
        y = self.dwconv(y).flatten(2).transpose(1, 2)
        return self.fc2(self.act(y))


class DualTransformerBlock(nn.Module):
    """DAE-Former dual block: spatial efficient attention, MixFFN, channel attention, MixFFN,
    each pre-normed (LayerNorm eps 1e-5) with a residual.

    Shapes: N×L×C in and out, with the map size (h, w) given at run time.
    """

    def __init__(self, channels: int, heads: int = 8, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = EfficientAttention(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp1 = MixFFN(channels, mlp_ratio)
        self.norm3 = nn.LayerNorm(channels)
        self.channel_attn = ChannelAttention(channels, heads)
        self.norm4 = nn.LayerNorm(channels)
        self.mlp2 = MixFFN(channels, mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        n, length, c = x.shape
        y = self.norm1(x).transpose(1, 2).reshape(n, c, h, w)
        x = x + self.attn(y).flatten(2).transpose(1, 2)
        x = x + self.mlp1(self.norm2(x), h, w)
        x = x + self.channel_attn(self.norm3(x))
        return x + self.mlp2(self.norm4(x), h, w)


class LKABlock(nn.Module):
    """Large-kernel attention block (VAN style) with a conv MLP and layer scales (init 0.01).

    Attention: y = LN(x); a = GELU(1×1(y)); a = a ⊙ 1×1(DW7×7 dil 3(DW5×5(a)));
    x = x + γ1 ⊙ (1×1(a) + y). MLP: x = x + γ2 ⊙ 1×1(GELU(DW3×3(1×1(LN(x))))).

    Shapes: N×C×H×W in and out.
    """

    def __init__(self, channels: int, mlp_ratio: int = 4, layer_scale: float = 0.01) -> None:
        super().__init__()
        c = int(channels)
        hidden = int(c * mlp_ratio)
        self.norm1 = ChannelLayerNorm(c, eps=1e-5)
        self.proj_in = nn.Conv2d(c, c, 1)
        self.act = nn.GELU()
        self.lka_dw = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.lka_dw_dilated = nn.Conv2d(c, c, 7, padding=9, dilation=3, groups=c)
        self.lka_pw = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.gamma1 = nn.Parameter(torch.full((c, 1, 1), float(layer_scale)))
        self.norm2 = ChannelLayerNorm(c, eps=1e-5)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.gamma2 = nn.Parameter(torch.full((c, 1, 1), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        a = self.act(self.proj_in(y))
        a = a * self.lka_pw(self.lka_dw_dilated(self.lka_dw(a)))
        x = x + self.gamma1 * (self.proj_out(a) + y)
        m = self.fc2(self.act(self.dwconv(self.fc1(self.norm2(x)))))
        return x + self.gamma2 * m


class PatchExpand(nn.Module):
    """Swin-style patch expanding: Linear C→s²·C′ (no bias), channels split as (s, s, C′)
    with C′ fastest and moved into space, then LayerNorm(C′).

    ``scale=2, out_channels=C/2`` is the decoder's expand; ``scale=4, out_channels=C`` the
    final ×4 expand.

    Shapes: N×H×W×C in, N×sH×sW×C′ out.
    """

    def __init__(self, channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__()
        self.scale = int(scale)
        self.out_channels = int(out_channels)
        self.expand = nn.Linear(channels, self.scale**2 * self.out_channels, bias=False)
        self.norm = nn.LayerNorm(self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, _ = x.shape
        s, c = self.scale, self.out_channels
        y = self.expand(x).view(n, h, w, s, s, c)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(n, h * s, w * s, c)
        return self.norm(y)
