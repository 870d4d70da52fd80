"""MSA²Net: multi-scale adaptive attention-guided network (BMVC 2024), paper-consistent.

A MaxViT encoder (timm, ``maxvit_rmlp_small_rw_224`` family, randomly initialised; four stages
at strides 4, 8, 16, 32) and a token decoder that upsamples with Swin-style patch expanding.
At each of the three skips a MASAG gate fuses the encoder skip with the linearly projected
decoder feature; the decoder then refines with two DAE-Former dual transformer blocks at 1/16
and two large-kernel-attention (LKA) blocks at 1/8 and 1/4, expands ×4 to full resolution
and ends in a 1×1 head. No deep supervision; the official loss is Boundary DoU.

Re-implemented from ``/work/shared/specs/msa2net_sa2net.md`` section 1 (the paper-consistent
version of 1.2): the never-executed D3 modules and the 1→3 input conv are not built, the
decoder uses ordinary permutes (the spec's ``layout="spatial"``, not the released code's
channel/pixel-scrambling reshape), the stem takes ``in_channels`` directly, and MaxViT
attention uses a fixed window/grid size with masked padding so any tile that is a multiple
of 32 works with the same weights. See ``models/msa2net.md``.

Axes: N×C×H×W channels-first, N×H×W×C channels-last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import InputShapeError
from .base import SegmentationNetwork
from .masag import MASAG
from .msa2net_blocks import DualTransformerBlock, LKABlock, MaxViTEncoder, PatchExpand
from .registry import register_network
from .spec import HEAD_MASK

__all__ = [
    "MSA2NetConfig",
    "DecoderStage",
    "MSA2Net",
    "build_msa2net",
    "DIVISOR",
    "LOSSES",
]

#: Input sides must be multiples of this (the encoder's total stride).
DIVISOR = 32
#: Smallest input side the spec declares (a 2×2 map at 1/32).
MIN_SIZE = 64
#: Parameter-name prefix of the encoder.
ENCODER_PREFIXES = ("encoder.",)
#: ``config.loss`` -> registered loss name.
LOSSES = {"boundary_dou": "msa2net", "dice_ce": "dice_ce"}


@dataclass(frozen=True)
class MSA2NetConfig:
    """Settings of MSA²Net. The defaults are the published (paper) configuration.

    Attributes:
        variant: ``"tiny"``, ``"lite"`` or ``"paper"``.
        in_channels: image channels (the MaxViT stem is built for them).
        num_classes: K (1 = one sigmoid logit).
        embed_dims: widths of the four encoder stages; each must double the previous one,
            since the decoder stage at scale i works at the skip width ``embed_dims[i]``.
        depths: MaxViT blocks per encoder stage.
        stem_widths: widths of the two stem convolutions.
        dim_head: MaxViT attention head width.
        partition_size: P, the fixed MaxViT window and grid side (7 in the paper at 224²).
        rel_pos_dim: hidden width of MaxViT's relative-position MLP.
        decoder_depth: dual (1/16) or LKA (1/8, 1/4) blocks per decoder stage (2 in the paper).
        channel_heads: heads of the DAE channel attention (must divide ``embed_dims[2]``).
        mlp_ratio: expansion of the MixFFN and LKA MLPs.
        loss: ``"boundary_dou"`` (official) or ``"dice_ce"``.
        preferred_tile: the tile side the variant is meant to run on.
    """

    variant: str = "paper"
    in_channels: int = 3
    num_classes: int = 9
    embed_dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 5, 2)
    stem_widths: tuple[int, ...] = (32, 64)
    dim_head: int = 32
    partition_size: int = 7
    rel_pos_dim: int = 512
    decoder_depth: int = 2
    channel_heads: int = 8
    mlp_ratio: int = 4
    loss: str = "boundary_dou"
    preferred_tile: int = 224

    def validate(self) -> None:
        """Raise :class:`InputShapeError` with one sentence if the settings cannot work."""
        dims = tuple(self.embed_dims)
        if self.in_channels < 1 or self.num_classes < 1:
            raise InputShapeError("MSA²Net needs at least 1 input channel and 1 class.")
        if len(dims) != 4 or len(tuple(self.depths)) != 4 or min(self.depths) < 1:
            raise InputShapeError("MSA²Net needs 4 encoder widths and 4 depths of at least 1.")
        if any(dims[i + 1] != 2 * dims[i] for i in range(3)):
            raise InputShapeError(
                f"MSA²Net encoder widths must double at every stage, got {dims}."
            )
        if any(d % self.dim_head for d in dims):
            raise InputShapeError(
                f"Every MSA²Net encoder width must be a multiple of dim_head={self.dim_head}."
            )
        if dims[2] % self.channel_heads:
            raise InputShapeError(
                f"The 1/16 decoder width {dims[2]} must be a multiple of "
                f"channel_heads={self.channel_heads}."
            )
        if len(tuple(self.stem_widths)) != 2 or self.partition_size < 1:
            raise InputShapeError(
                "MSA²Net needs 2 stem widths and a partition size of at least 1."
            )
        if self.decoder_depth < 1:
            raise InputShapeError("MSA²Net needs at least one block per decoder stage.")
        if self.loss not in LOSSES:
            raise InputShapeError(
                f"Unknown MSA²Net loss {self.loss!r}; choose one of: {', '.join(LOSSES)}."
            )


class DecoderStage(nn.Module):
    """One decoder stage with a skip (spec 1.5).

    g = Linear(d); z = g + MASAG(skip, g); z = LayerNorm(z); z = blocks(z); expand(z).

    Args:
        channels: C, the width of the incoming decoder feature and of the skip.
        block: ``"dae"`` (dual transformer blocks) or ``"lka"`` (large-kernel attention).
        depth: number of blocks.
        final: use the final ×4 expand (to C channels) instead of ×2 (to C/2).
        channel_heads: heads of the DAE channel attention.
        mlp_ratio: MLP expansion inside the blocks.

    Shapes:
        d: N×H×W×C (channels-last), skip: N×C×H×W.
        Output: N×2H×2W×C/2 (N×4H×4W×C if final).
    """

    def __init__(
        self,
        channels: int,
        block: str,
        depth: int = 2,
        final: bool = False,
        channel_heads: int = 8,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        c = int(channels)
        self.block_type = block
        self.proj = nn.Linear(c, c)
        self.masag = MASAG(c)
        self.norm = nn.LayerNorm(c)
        if block == "dae":
            blocks: list[nn.Module] = [
                DualTransformerBlock(c, channel_heads, mlp_ratio) for _ in range(depth)
            ]
        elif block == "lka":
            blocks = [LKABlock(c, mlp_ratio) for _ in range(depth)]
        else:
            raise InputShapeError(f"Unknown decoder block {block!r}; use 'dae' or 'lka'.")
        self.blocks = nn.ModuleList(blocks)
        self.expand = PatchExpand(c, c, scale=4) if final else PatchExpand(c, c // 2, scale=2)

    def fuse(self, d: Tensor, skip: Tensor) -> Tensor:
        """The gated fusion g + MASAG(skip, g), N×C×H×W."""
        g = self.proj(d).permute(0, 3, 1, 2)
        return g + self.masag(skip, g)

    def forward(self, d: Tensor, skip: Tensor) -> Tensor:
        z = self.norm(self.fuse(d, skip).permute(0, 2, 3, 1))  # N×H×W×C
        n, h, w, c = z.shape
        if self.block_type == "dae":
            tokens = z.reshape(n, h * w, c)
            for blk in self.blocks:
                tokens = blk(tokens, h, w)
            z = tokens.view(n, h, w, c)
        else:
            y = z.permute(0, 3, 1, 2)
            for blk in self.blocks:
                y = blk(y)
            z = y.permute(0, 2, 3, 1)
        return self.expand(z)


def _init_decoder(module: nn.Module) -> None:
    """Spec 1.11: xavier-uniform Linear/Conv weights with zero bias, LayerNorm 1/0 (BN, the
    LKA layer scales and the channel-attention temperatures keep their own init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MSA2Net(SegmentationNetwork):
    """MSA²Net with a MaxViT encoder and the paper-consistent decoder.

    ``model(x)`` takes N×C×H×W (H, W multiples of 32) and returns ``{"mask": logits}``,
    N×K×H×W, in both training and eval mode.
    """

    def __init__(self, config: MSA2NetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.spec = self._make_spec(
            "msa2net",
            divisor=DIVISOR,
            min_size=MIN_SIZE,
            loss=LOSSES[config.loss],
            encoder_prefixes=ENCODER_PREFIXES,
            preferred_tile=config.preferred_tile,
            cpu_batch_size=4,  # bf16, 256 px tiles: 0.54 us/px at 4, 0.70 at 2
            extra={"partition_size": config.partition_size, "layout": "spatial"},
        )
        dims = tuple(config.embed_dims)
        self.encoder = MaxViTEncoder(
            config.in_channels,
            dims,
            tuple(config.depths),
            tuple(config.stem_widths),  # type: ignore[arg-type]
            config.dim_head,
            config.partition_size,
            config.rel_pos_dim,
        )
        self.expand3 = PatchExpand(dims[3], dims[2], scale=2)
        kw: dict[str, Any] = dict(
            depth=config.decoder_depth,
            channel_heads=config.channel_heads,
            mlp_ratio=config.mlp_ratio,
        )
        self.stage2 = DecoderStage(dims[2], "dae", **kw)
        self.stage1 = DecoderStage(dims[1], "lka", **kw)
        self.stage0 = DecoderStage(dims[0], "lka", final=True, **kw)
        self.head = nn.Conv2d(dims[0], config.num_classes, 1)
        for part in (self.expand3, self.stage2, self.stage1, self.stage0, self.head):
            _init_decoder(part)

    def decode(self, features: list[Tensor]) -> Tensor:
        """Logits N×K×H×W from the encoder features E0..E3 (N×Ci×Hi×Wi)."""
        e0, e1, e2, e3 = features
        d = self.expand3(e3.permute(0, 2, 3, 1))  # N×H/16×W/16×C2
        d = self.stage2(d, e2)
        d = self.stage1(d, e1)
        d = self.stage0(d, e0)  # N×H×W×C0
        return self.head(d.permute(0, 3, 1, 2))

    def forward(self, x: Tensor) -> dict[str, Any]:
        """``{"mask": N×K×H×W logits}`` for an N×C×H×W batch."""
        self._check_batch(x, "MSA²Net", multiple_of=DIVISOR)
        return {HEAD_MASK: self.decode(self.encoder(x))}


#: What the small variants share: 8×8 partitions, a 2-block decoder, 256 px tiles.
_SMALL_VARIANT = dict(partition_size=8, decoder_depth=2, preferred_tile=256)


@register_network(
    "msa2net",
    config_cls=MSA2NetConfig,
    variants={
        "tiny": dict(
            _SMALL_VARIANT,
            embed_dims=(8, 16, 32, 64),
            depths=(1, 1, 1, 1),
            stem_widths=(8, 16),
            dim_head=8,
            rel_pos_dim=64,
        ),
        "lite": dict(
            _SMALL_VARIANT,
            embed_dims=(32, 64, 128, 256),
            depths=(1, 1, 2, 1),
            stem_widths=(16, 32),
            dim_head=32,
            rel_pos_dim=512,
        ),
        "paper": dict(),
    },
    summary="MSA²Net (BMVC 2024): MaxViT encoder, MASAG skip gates, DAE/LKA decoder.",
)
def build_msa2net(config: MSA2NetConfig) -> MSA2Net:
    """Build MSA²Net from its config."""
    return MSA2Net(config)

