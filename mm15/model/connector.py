"""Vision-language connectors: the C-Abstractor MM1/MM1.5 use, and an MLP baseline for ablations.

A connector turns a vision encoder's patch tokens (B, L, vision_dim), CLS already removed, into the
image tokens the LLM reads, (B, num_queries, llm_dim). MM1.5 keeps MM1's connector, the Honeybee
C-Abstractor (arXiv 2312.06742) with 144 tokens per (sub-)image. Its structure, following Honeybee's
``CAbstractor`` built on timm's RegNet ``RegStage``/``Bottleneck`` (mm15-spec.md §1.4):

    x + pos_emb -> (B, C, h, w) -> RegStage(depth, vision_dim -> hidden) -> AdaptiveAvgPool2d(sqrt(Q))
      -> RegStage(depth, hidden -> hidden) -> (B, Q, hidden) -> MLP readout -> (B, Q, llm_dim)

The convolutions keep local structure while pooling, which is why Honeybee prefers this to a resampler;
the pooling makes the token count independent of the input resolution (378 px -> 27x27 patches and
672 px -> 48x48 patches both give 144 tokens).

MM1/MM1.5 do not disclose the connector's depth, width or MLP depth; the defaults are Honeybee's
``c-abs.yaml`` (depth 3, hidden 1024, mlp_depth 2), a project default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

ConnectorKind = Literal["c-abstractor", "mlp"]

# timm RegNet Bottleneck defaults used by Honeybee: bottle_ratio=1 (bottleneck width == out_chs),
# group_size=1 (depthwise 3x3), se_ratio=0.25 of the block's *input* channels.
SE_RATIO = 0.25


def _square_side(n: int) -> int | None:
    """The integer side of a square number, or None when ``n`` is not a perfect square."""
    side = math.isqrt(n)
    return side if side * side == n else None


def _se_channels(in_chs: int) -> int:
    # Python's round (half to even), as timm computes int(round(in_chs * se_ratio)).
    return round(in_chs * SE_RATIO)


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """Settings of the vision-language connector; the defaults are Honeybee's C-Abstractor config.

    ``num_patches`` is the patch-token count the positional embedding is sized for (729 for a 378 px
    ViT-H/14). Inputs with another square token count are accepted: see ``CAbstractor.pos_emb_for``.
    ``mlp_pool`` only affects the MLP baseline: pool to ``num_queries`` tokens, or keep all L tokens.
    """

    kind: ConnectorKind = "c-abstractor"
    vision_dim: int
    llm_dim: int
    hidden_dim: int = 1024
    num_queries: int = 144
    depth: int = 3
    mlp_depth: int = 2
    pos_emb: bool = True
    num_patches: int
    mlp_pool: bool = True

    def __post_init__(self) -> None:
        if self.kind not in get_args(ConnectorKind):
            raise ValueError(
                f"ConnectorConfig.kind must be one of {get_args(ConnectorKind)}, got {self.kind!r}"
            )
        sizes = ("vision_dim", "llm_dim", "hidden_dim", "num_queries", "depth", "mlp_depth", "num_patches")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConnectorConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("pos_emb", "mlp_pool"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ConnectorConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("num_queries", "num_patches"):
            value = getattr(self, name)
            if _square_side(value) is None:
                raise ValueError(
                    f"ConnectorConfig.{name} must be a perfect square (a square token grid), got {value}"
                )
        # Adaptive pooling to a larger grid would silently duplicate tokens instead of abstracting them.
        if self.num_queries > self.num_patches:
            raise ValueError(
                f"ConnectorConfig.num_queries ({self.num_queries}) must be <= "
                f"num_patches ({self.num_patches})"
            )
        if self.kind == "mlp" and not self.mlp_pool and self.num_queries != self.num_patches:
            # Without pooling every patch becomes a token: any other query count misplaces features.
            raise ValueError(
                f"ConnectorConfig.num_queries ({self.num_queries}) must equal num_patches "
                f"({self.num_patches}) for the MLP connector without pooling (mlp_pool=False)"
            )
        if self.kind == "c-abstractor":
            # The squeeze-excite bottleneck has round(0.25 * in_chs) channels; zero would be an empty conv.
            for name in ("vision_dim", "hidden_dim"):
                if _se_channels(getattr(self, name)) < 1:
                    raise ValueError(
                        f"ConnectorConfig.{name} must be >= 3 for the C-Abstractor's squeeze-excite, "
                        f"got {getattr(self, name)}"
                    )

    @property
    def query_side(self) -> int:
        """Side of the square grid the connector pools to (12 for 144 queries)."""
        return math.isqrt(self.num_queries)  # exact: validated as a perfect square

    @property
    def patch_side(self) -> int:
        """Side of the patch grid the positional embedding is sized for (27 for 729 patches)."""
        return math.isqrt(self.num_patches)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """Image tokens the connector emits for ``num_input_tokens`` patch tokens of one (sub-)image."""
        if self.kind == "mlp" and not self.mlp_pool:
            return num_input_tokens
        return self.num_queries


# Honeybee builds its stages with timm's ConvNormAct(norm_layer=LayerNorm2d), which swaps in
# LayerNormAct2d: eps 1e-5 there, not LayerNorm2d's own 1e-6.
LAYER_NORM_EPS = 1e-5


class PointwiseNorm(nn.Module):
    """A 1x1 convolution + LayerNorm over channels + optional SiLU, on channels-last (B, H, W, C) maps.

    Written as ``nn.Linear`` on the last dimension: the same function and parameter count as timm's
    bias-free 1x1 conv + ``LayerNorm2d`` (the norm's bias makes a conv bias redundant), but it runs as
    one GEMM with no layout changes, several times faster on CPU than a 1x1 conv on NCHW.
    """

    def __init__(self, in_chs: int, out_chs: int, act: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_chs, out_chs, bias=False)
        self.norm = nn.LayerNorm(out_chs, eps=LAYER_NORM_EPS)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.linear(x)))


class DepthwiseNorm(nn.Module):
    """Depthwise 3x3 conv ('same' padding, no bias) + LayerNorm over channels + SiLU, channels-last."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        # The weight's gradient arrives channels-last; storing the weight that way too lets DDP's
        # gradient buckets alias it instead of copying (and silences its stride-mismatch warning).
        self.conv.to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) viewed as NCHW is channels-last memory, which the conv keeps: no copies.
        y = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.act(self.norm(y))


class SqueezeExcite(nn.Module):
    """Channel gate from globally pooled features: x * sigmoid(fc2(silu(fc1(mean_hw(x))))), channels-last."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, rd_channels)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(rd_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(1, 2), keepdim=True)
        gate = self.fc2(self.act(self.fc1(gate)))
        return x * gate.sigmoid()


class RegBottleneck(nn.Module):
    """timm RegNet ``Bottleneck`` as Honeybee configures it: bottle_ratio=1, depthwise 3x3, SE 0.25, SiLU.

    Works on channels-last (B, H, W, C) maps. Stride is always 1: in the C-Abstractor only the adaptive
    pooling between the stages downsamples.
    """

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = PointwiseNorm(in_chs, out_chs)
        self.conv2 = DepthwiseNorm(out_chs)
        # timm sizes the SE bottleneck from the block's input channels, not its width.
        self.se = SqueezeExcite(out_chs, _se_channels(in_chs))
        self.conv3 = PointwiseNorm(out_chs, out_chs, act=False)  # linear before the residual sum
        self.shortcut = nn.Identity() if in_chs == out_chs else PointwiseNorm(in_chs, out_chs, act=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act(y + self.shortcut(x))


class RegStage(nn.Sequential):
    """``depth`` bottleneck blocks; the first maps in_chs -> out_chs, the rest keep out_chs."""

    def __init__(self, depth: int, in_chs: int, out_chs: int) -> None:
        super().__init__(*[RegBottleneck(in_chs if i == 0 else out_chs, out_chs) for i in range(depth)])


def mlp_readout(in_dim: int, out_dim: int, depth: int, act: type[nn.Module]) -> nn.Sequential:
    """Linear(in, out), then (act, Linear(out, out)) repeated depth - 1 times (Honeybee's ``build_mlp``)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [act(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _token_grid_side(x: torch.Tensor, vision_dim: int) -> int:
    """Check a (B, L, vision_dim) patch-token batch and return the side of its square token grid."""
    if x.ndim != 3 or x.shape[-1] != vision_dim:
        raise ValueError(f"connector input must be (B, L, {vision_dim}), got {tuple(x.shape)}")
    side = _square_side(x.shape[1])
    if side is None:
        raise ValueError(f"connector input must have a square number of patch tokens, got L={x.shape[1]}")
    return side


def _tokens_to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    # Patch tokens are row-major (h, w): (B, h*w, C) -> (B, C, h, w).
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major again


class CAbstractor(nn.Module):
    """Honeybee C-Abstractor: (B, L, vision_dim) patch tokens -> (B, num_queries, llm_dim) image tokens."""

    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos_emb: nn.Parameter | None = None
        if cfg.pos_emb:
            # Added to the patch tokens before the convolutions, as in Honeybee.
            self.pos_emb = nn.Parameter(torch.empty(1, cfg.num_patches, cfg.vision_dim))
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        self.stage1 = RegStage(cfg.depth, cfg.vision_dim, cfg.hidden_dim)
        self.pool = nn.AdaptiveAvgPool2d(cfg.query_side)
        self.stage2 = RegStage(cfg.depth, cfg.hidden_dim, cfg.hidden_dim)
        self.readout = mlp_readout(cfg.hidden_dim, cfg.llm_dim, cfg.mlp_depth, nn.SiLU)

    def pos_emb_for(self, num_tokens: int) -> torch.Tensor:
        """The positional embedding for ``num_tokens`` (a square) patch tokens, shape (1, num_tokens, C).

        At the native size it is the parameter itself. Otherwise its grid is resized bicubically
        (align_corners=False, no antialias, in float32), like the ViT positional-embedding interpolation
        that takes a 378 px encoder to 672 px tiles (27x27 -> 48x48). MM1.5 does not say how it adapts the
        connector's embedding; this is the project default (spec §1.4, §8).
        """
        if self.pos_emb is None:
            raise RuntimeError("this C-Abstractor was built with pos_emb=False")
        if num_tokens == self.cfg.num_patches:
            return self.pos_emb
        side = _square_side(num_tokens)
        if side is None:
            raise ValueError(f"cannot interpolate the positional embedding to a non-square L={num_tokens}")
        grid = _tokens_to_grid(self.pos_emb.float(), self.cfg.patch_side)
        # Bicubic weights overshoot and cancel; keep them in float32 even under bf16 autocast.
        with torch.autocast(device_type=grid.device.type, enabled=False):
            grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return _grid_to_tokens(grid).to(self.pos_emb.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = _token_grid_side(x, self.cfg.vision_dim)
        if self.pos_emb is not None:
            x = x + self.pos_emb_for(x.shape[1]).to(x.dtype)
        # Row-major patch tokens (B, h*w, C) are already a channels-last (B, h, w, C) map: a view.
        x = self.stage1(x.reshape(x.shape[0], side, side, x.shape[-1]))
        x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.stage2(x)
        return self.readout(x.reshape(x.shape[0], -1, x.shape[-1]))


class MLPConnector(nn.Module):
    """LLaVA-style baseline for ablations: optional adaptive pooling to num_queries, then an MLP (GELU).

    No positional embedding: ViT patch tokens already carry their position, and the pooling is a fixed
    average, so nothing here needs to know where a token sits.
    """

    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pool = nn.AdaptiveAvgPool2d(cfg.query_side) if cfg.mlp_pool else None
        self.readout = mlp_readout(cfg.vision_dim, cfg.llm_dim, cfg.mlp_depth, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            side = _token_grid_side(x, self.cfg.vision_dim)
            x = _grid_to_tokens(self.pool(_tokens_to_grid(x, side)))
        elif x.ndim != 3 or x.shape[-1] != self.cfg.vision_dim:
            raise ValueError(f"connector input must be (B, L, {self.cfg.vision_dim}), got {tuple(x.shape)}")
        return self.readout(x)


def build_connector(cfg: ConnectorConfig) -> nn.Module:
    """The connector ``cfg.kind`` names."""
    if cfg.kind == "c-abstractor":
        return CAbstractor(cfg)
    if cfg.kind == "mlp":
        return MLPConnector(cfg)
    raise ValueError(f"ConnectorConfig.kind must be one of {get_args(ConnectorKind)}, got {cfg.kind!r}")


def c_abstractor_param_count(cfg: ConnectorConfig) -> int:
    """Parameter count of the C-Abstractor for ``cfg``, in closed form from the layer shapes.

    Written from the architecture, not by walking the module, so the tests can check one against the
    other. Per bottleneck block with c_in inputs, c outputs and r = round(c_in / 4) SE channels:
    1x1 conv c_in*c, depthwise 3x3 9*c, SE 2*r*c + r + c (with biases), 1x1 conv c*c, three LayerNorms 3*2c,
    plus c_in*c + 2c for a projecting shortcut when c_in != c.
    """
    if cfg.kind != "c-abstractor":
        raise ValueError(f"c_abstractor_param_count needs kind 'c-abstractor', got {cfg.kind!r}")

    def block(c_in: int, c: int) -> int:
        r = round(c_in / 4)
        count = c_in * c + 9 * c + (2 * r * c + r + c) + c * c + 3 * (2 * c)
        if c_in != c:
            count += c_in * c + 2 * c
        return count

    v, h, o, n = cfg.vision_dim, cfg.hidden_dim, cfg.llm_dim, cfg.depth
    pos = cfg.num_patches * v if cfg.pos_emb else 0
    stages = block(v, h) + (2 * n - 1) * block(h, h)  # stage1: 1 projecting + n-1 square; stage2: n square
    readout = (h * o + o) + (cfg.mlp_depth - 1) * (o * o + o)
    return pos + stages + readout
