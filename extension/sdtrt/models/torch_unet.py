"""A UNet with the exact module tree, state-dict keys and numerics of the LDM/SGM `openaimodel.UNetModel` that
A1111 runs for SD1.x, SD2.x and SDXL (base and refiner), built from a `UNetSpec`.

Inside the WebUI we export A1111's own UNet module; this one serves the headless path (CLI, servers building
engines before replicas start) and the tests. It reproduces A1111's two run-time patches:
- timestep embeddings are computed in float32 and cast to the weights' dtype;
- skip connections are concatenated after resizing the upsampled tensor to the skip's size (nearest), so sizes that
  are multiples of 8 but not of 64 work. While exporting, the resize is unconditional, so the traced graph keeps a
  dynamic Resize in front of every skip Concat whatever size it was traced at.
With `convention=FORGE` (`sdtrt.models.convention`) it computes as Forge's UNet does instead: each Upsample
interpolates straight to the size of the skip connection the next output block concatenates, taken from that
tensor's shape (so the traced graph sizes every Resize from the skip, and one engine serves every size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdtrt.models.convention import A1111, FORGE, check_convention


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of an LDM/SGM UNet. Every field is derived from a state dict, except the head layout, which a
    config yaml may give (defaults follow the families: SD1 8 heads, SD2/SDXL 64 channels per head)."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    #: transformer blocks per level for input blocks (0 = no attention at that level)
    transformer_depth: tuple[int, ...]
    #: transformer blocks per output block, in output-block order (SDXL's output depths can differ)
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    use_linear_in_transformer: bool
    num_heads: int = -1
    num_head_channels: int = -1
    adm_in_channels: int | None = None

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer with `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def skip_layout(self) -> tuple[tuple[int, int], ...]:
        """(channels, downsampling exponent) of each input block's output, then of the middle block's: where
        ControlNet residuals go (13 entries for SD1/SD2, 10 for SDXL)."""
        mc, levels = self.model_channels, len(self.channel_mult)
        out = [(mc, 0)]
        for level, mult in enumerate(self.channel_mult):
            out += [(mult * mc, level)] * self.num_res_blocks
            if level != levels - 1:
                out.append((mult * mc, level + 1))
        return (*out, out[-1])

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> UNetSpec:
        d = dict(d)
        for k in ("channel_mult", "transformer_depth", "transformer_depth_output"):
            d[k] = tuple(d[k])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, in float32 as LDM/A1111 compute it."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def skip_cat(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """A1111's resizing concatenation: resize `h` to `skip`'s spatial size when they differ (always while tracing)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or h.shape[-2:] != skip.shape[-2:]:
        h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
    return torch.cat([h, skip], dim=1)


def decoder_step(block: nn.Module, h: torch.Tensor, skip: torch.Tensor, after: torch.Tensor | None,
                 emb: torch.Tensor, context: torch.Tensor, convention: str = A1111) -> torch.Tensor:
    """One output block on `h` and its skip connection `skip`, in `convention`. `after`: the skip connection the next
    output block concatenates (None at the last), whose size Forge's Upsample goes to. A1111's convention works on
    any LDM/SGM output block (A1111's own too); Forge's needs this module's blocks (their Upsample takes a size)."""
    if convention == FORGE:
        return block(torch.cat([h, skip], dim=1), emb, context, None if after is None else after.shape[-2:])
    return block(skip_cat(h, skip), emb, context)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the tensor dtype (LDM's GroupNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == torch.float32:
            # through nn.GroupNorm.forward, as LDM does: hosts that patch it (A1111's Lora) see this layer
            return super().forward(x.float()).to(x.dtype)
        w = self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32 if channels % 32 == 0 else _groups(channels), channels)


def _groups(channels: int) -> int:
    # Tiny test UNets use channel counts below 32; real ones always use 32 groups.
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class TimestepBlock(nn.Module):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,  # type: ignore[override]
                size: Sequence[int] | None = None) -> torch.Tensor:
        """`size`: where an Upsample goes (Forge's convention); None: x2."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        h = h + emb_out[..., None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """x2 (nearest), or straight to `size` (Forge's convention), then the 3x3 convolution."""
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        # Looked up at call time, so the exporter can swap in a plain matmul-softmax-matmul for the graph.
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        inner = dim * 4
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class UNetModel(nn.Module):
    """forward(x, timesteps, context, y=None) -> eps or v, as `openaimodel.UNetModel.forward` computes it in A1111
    (`convention` A1111) or as Forge's UNet does (FORGE; see the module docstring). `convention` is a plain attribute
    (no weight depends on it)."""

    def __init__(self, spec: UNetSpec, convention: str = A1111):
        super().__init__()
        self.spec = spec
        self.convention = check_convention(convention)
        mc = spec.model_channels
        ted = mc * 4
        self.in_channels, self.out_channels, self.model_channels = spec.in_channels, spec.out_channels, mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if spec.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(spec.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = spec.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, spec.context_dim, spec.use_linear_in_transformer)

        # 1. input blocks: conv_in, then per level num_res_blocks x (ResBlock [+ transformer]), then Downsample
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(spec.in_channels, mc, 3, padding=1))])
        chans = [mc]
        ch = mc
        levels = len(spec.channel_mult)
        for level, mult in enumerate(spec.channel_mult):
            for _ in range(spec.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
                ch = mult * mc
                if spec.transformer_depth[level] > 0:
                    layers.append(transformer(ch, spec.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
        # 2. middle block
        middle: list[nn.Module] = [ResBlock(ch, ted, ch)]
        if spec.transformer_depth_middle > 0:
            middle.append(transformer(ch, spec.transformer_depth_middle))
        middle.append(ResBlock(ch, ted, ch))
        self.middle_block = TimestepEmbedSequential(*middle)
        # 3. output blocks: per level (reversed) num_res_blocks + 1 x (ResBlock(cat) [+ transformer]) [+ Upsample]
        self.output_blocks = nn.ModuleList()
        index = 0
        for level, mult in list(enumerate(spec.channel_mult))[::-1]:
            for i in range(spec.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult)]
                ch = mc * mult
                depth = spec.transformer_depth_output[index]
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == spec.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                index += 1
        # 4. out
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, spec.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        if self.spec.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet (SDXL) needs the `y` vector")
            emb = emb + self.label_emb(y.to(self.dtype))
        h = x.to(self.dtype)
        context = context.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            h = decoder_step(block, h, skip, skips[-1] if skips else None, emb, context, self.convention)
        return self.out(h).to(x.dtype)
