"""Tests of the vision encoder on tiny random CLIP/SigLIP towers; nothing is downloaded.

The OpenCLIP converter is checked against an independent forward pass written here with plain torch ops
on OpenCLIP-format weights, and the encoder against transformers' own forward (output_hidden_states and
interpolate_pos_encoding).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, SiglipVisionModel

from mm15.image import CLIP_MEAN, CLIP_STD
from mm15.model.vision import (
    VisionConfig,
    VisionEncoder,
    convert_open_clip_checkpoint,
    convert_open_clip_state_dict,
    load_state_dict_file,
    load_vision_encoder,
    open_clip_vision_config,
    resize_position_embedding,
)

TINY_CLIP = VisionConfig(
    kind="clip", image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
)
TINY_SIGLIP = dataclasses.replace(TINY_CLIP, kind="siglip")
HF_CLASSES = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}


def build(cfg: VisionConfig, seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(cfg).eval()


def plain_hf(enc: VisionEncoder) -> torch.nn.Module:
    """A fresh transformers model with the encoder's config and weights, used through its own forward."""
    model = HF_CLASSES[enc.cfg.kind](enc.model.config)
    model.load_state_dict(enc.model.state_dict())
    return model.eval()


def pixels(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- shapes, feature layer, validation ---------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "prefix"), [(TINY_CLIP, 1), (TINY_SIGLIP, 0)])
def test_output_drops_cls_for_clip_only(cfg: VisionConfig, prefix: int) -> None:
    enc = build(cfg)
    x = pixels(3, 28)
    with torch.no_grad():
        out = enc(x)
        hidden = plain_hf(enc)(x, output_hidden_states=True).hidden_states
    assert out.shape == (3, enc.num_patches, 32) == (3, 4, 32)
    assert hidden[-1].shape[1] == 4 + prefix
    assert torch.equal(out, hidden[-1][:, prefix:])


@pytest.mark.parametrize("cfg", [TINY_CLIP, TINY_SIGLIP])
@pytest.mark.parametrize("layer", [-1, -2, -3, 0, 1, 2])
def test_feature_layer_selects_hf_hidden_state(cfg: VisionConfig, layer: int) -> None:
    enc = build(dataclasses.replace(cfg, feature_layer=layer))
    prefix = 1 if cfg.kind == "clip" else 0
    x = pixels(2, 28)
    with torch.no_grad():
        expected = plain_hf(enc)(x, output_hidden_states=True).hidden_states[layer][:, prefix:]
        assert torch.equal(enc(x), expected)


def test_siglip_features_skip_post_layernorm() -> None:
    # transformers' SigLIP last_hidden_state is post-layernormed; feature_layer=-1 is the raw block output.
    enc = build(TINY_SIGLIP)
    x = pixels(1, 28)
    with torch.no_grad():
        out = plain_hf(enc)(x, output_hidden_states=True)
        assert not torch.allclose(enc(x), out.last_hidden_state)
        assert torch.equal(enc(x), out.hidden_states[-1])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "eva"}, "kind"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"patch_size": True}, "patch_size"),
        ({"image_size": 30}, "image_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"feature_layer": 3}, "feature_layer"),
        ({"feature_layer": -4}, "feature_layer"),
        ({"feature_layer": 1.0}, "feature_layer"),
        ({"input_size": 50}, "input_size"),
        ({"input_size": 0}, "input_size"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"hidden_act": ""}, "hidden_act"),
        ({"pretrained": "some/dir"}, "image_size"),  # both a checkpoint and an architecture
    ],
)
def test_config_validation_names_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"VisionConfig\.{field}"):
        dataclasses.replace(TINY_CLIP, **changes)


def test_unknown_activation_names_field() -> None:
    with pytest.raises(ValueError, match=r"VisionConfig\.hidden_act"):
        VisionEncoder(dataclasses.replace(TINY_CLIP, hidden_act="not_an_activation"))


def test_input_shape_is_checked() -> None:
    enc = build(TINY_CLIP)
    with pytest.raises(ValueError, match=r"\(N, 3, 28, 28\)"):
        enc(pixels(1, 42))
    with pytest.raises(ValueError, match=r"\(N, 3, 28, 28\)"):
        enc(torch.zeros(1, 1, 28, 28))


def test_properties_and_normalisation() -> None:
    clip, siglip = build(TINY_CLIP), build(dataclasses.replace(TINY_SIGLIP, input_size=56))
    assert (clip.hidden_size, clip.image_size, clip.input_size, clip.num_patches) == (32, 28, 28, 4)
    assert (siglip.image_size, siglip.input_size, siglip.grid_size, siglip.num_patches) == (28, 56, 4, 16)
    assert (clip.image_mean, clip.image_std) == (CLIP_MEAN, CLIP_STD)
    assert siglip.image_mean == siglip.image_std == (0.5, 0.5, 0.5)
    assert isinstance(load_vision_encoder(TINY_CLIP), VisionEncoder)


# --- positional-embedding interpolation ---------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY_CLIP, TINY_SIGLIP])
def test_interpolation_is_identity_at_native_size(cfg: VisionConfig) -> None:
    native, same = build(cfg), build(dataclasses.replace(cfg, input_size=cfg.image_size))
    weight = native.model.embeddings.position_embedding.weight
    assert torch.equal(same.model.embeddings.position_embedding.weight, weight)
    assert resize_position_embedding(weight, 2, 1 if cfg.kind == "clip" else 0) is weight
    x = pixels(2, 28)
    with torch.no_grad():
        assert torch.equal(same(x), native(x))
        # ... and both are the plain transformers model's features.
        prefix = 1 if cfg.kind == "clip" else 0
        assert torch.equal(
            same(x), plain_hf(same)(x, output_hidden_states=True).hidden_states[-1][:, prefix:]
        )


@pytest.mark.parametrize("cfg", [TINY_CLIP, TINY_SIGLIP])
def test_interpolation_to_larger_tiles(cfg: VisionConfig) -> None:
    native = build(cfg)
    enc = build(dataclasses.replace(cfg, input_size=56))
    prefix = 1 if cfg.kind == "clip" else 0
    emb = enc.model.embeddings
    assert enc.num_patches == 16 and emb.position_embedding.weight.shape == (16 + prefix, 32)
    assert emb.position_ids.shape == (1, 16 + prefix)
    assert enc.model.config.image_size == 56 and enc.image_size == 28
    if prefix:  # the CLS position is carried over unchanged
        assert torch.equal(
            emb.position_embedding.weight[0], native.model.embeddings.position_embedding.weight[0]
        )
    x = pixels(2, 56)
    with torch.no_grad():
        out = enc(x)
        # Same resampling as transformers' per-forward interpolate_pos_encoding on the native model.
        reference = plain_hf(native)(x, interpolate_pos_encoding=True, output_hidden_states=True)
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.hidden_states[-1][:, prefix:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 3, 56, 56\)"):
        enc(pixels(1, 28))
    if prefix:  # transformers' CLIP now runs natively at 56 px: its own size check rejects 28 px
        with pytest.raises(ValueError, match="doesn't match model"):
            enc.model(pixels(1, 28))


def test_interpolated_embedding_is_trainable() -> None:
    enc = build(dataclasses.replace(TINY_CLIP, input_size=42)).train()
    table = enc.model.embeddings.position_embedding.weight
    assert any(p is table for p in enc.parameters())
    enc(pixels(2, 42)).square().mean().backward()
    assert table.grad is not None and table.grad[1:].abs().sum() > 0


def test_interpolating_a_linear_embedding_stays_linear() -> None:
    old, new = 27, 48  # 378 -> 672 px at patch 14
    pos = torch.arange(old, dtype=torch.float32)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    slope_r, slope_c, offset = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.25, 0.0]), 0.3
    table = rows.reshape(-1, 1) * slope_r + cols.reshape(-1, 1) * slope_c + offset
    cls = torch.full((1, 3), 7.0)
    out = resize_position_embedding(torch.cat([cls, table]), new, num_prefix_tokens=1)
    assert out.shape == (1 + new * new, 3) and torch.equal(out[0], cls[0])

    # Target patch centres in old-grid coordinates (align_corners=False).
    src = (torch.arange(new, dtype=torch.float32) + 0.5) * old / new - 0.5
    src_r, src_c = torch.meshgrid(src, src, indexing="ij")
    expected = src_r.reshape(-1, 1) * slope_r + src_c.reshape(-1, 1) * slope_c + offset
    step = slope_r.abs() + slope_c.abs()  # change of the function over one patch step in each direction
    rel_err = (out[1:] - expected).abs() / step
    # Away from the border (4-tap stencil inside the old grid) bicubic (a=-0.75) is linear to within 5%
    # of a patch step; at the border torch clamps instead of extrapolating, which costs < 15%.
    inside = (src.floor() >= 1) & (src.floor() + 2 <= old - 1)
    interior = (inside[:, None] & inside[None, :]).reshape(-1)
    assert rel_err[interior].max() < 0.05
    assert rel_err.max() < 0.15
    # A least-squares plane through the result recovers the slopes to 0.1%.
    design = torch.stack([src_r.reshape(-1), src_c.reshape(-1), torch.ones(new * new)], dim=1)
    fit = torch.linalg.lstsq(design, out[1:]).solution
    torch.testing.assert_close(fit[0], slope_r, rtol=0, atol=1e-3 * 2)
    torch.testing.assert_close(fit[1], slope_c, rtol=0, atol=1e-3 * 2)


# --- OpenCLIP conversion --------------------------------------------------------------------------------


def open_clip_state_dict(width: int = 32, layers: int = 2, mlp: int = 64, patch: int = 14, grid: int = 2):
    """A random OpenCLIP-format CLIP state dict: the visual tower plus some text-tower keys to ignore."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    v = {
        "conv1.weight": rnd(width, 3, patch, patch, std=0.05),
        "class_embedding": rnd(width, std=0.5),
        "positional_embedding": rnd(grid * grid + 1, width, std=0.5),
        "ln_pre.weight": 1 + rnd(width, std=0.1),
        "ln_pre.bias": rnd(width, std=0.1),
        "ln_post.weight": 1 + rnd(width, std=0.1),
        "ln_post.bias": rnd(width, std=0.1),
        "proj": rnd(width, 16, std=width**-0.5),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        v |= {
            b + "ln_1.weight": 1 + rnd(width, std=0.1),
            b + "ln_1.bias": rnd(width, std=0.1),
            b + "attn.in_proj_weight": rnd(3 * width, width, std=width**-0.5),
            b + "attn.in_proj_bias": rnd(3 * width, std=0.1),
            b + "attn.out_proj.weight": rnd(width, width, std=width**-0.5),
            b + "attn.out_proj.bias": rnd(width, std=0.1),
            b + "ln_2.weight": 1 + rnd(width, std=0.1),
            b + "ln_2.bias": rnd(width, std=0.1),
            b + "mlp.c_fc.weight": rnd(mlp, width, std=width**-0.5),
            b + "mlp.c_fc.bias": rnd(mlp, std=0.1),
            b + "mlp.c_proj.weight": rnd(width, mlp, std=mlp**-0.5),
            b + "mlp.c_proj.bias": rnd(width, std=0.1),
        }
    sd = {"visual." + k: t for k, t in v.items()}
    # Text-tower keys, including one that looks like a visual block key without the prefix.
    sd |= {
        "token_embedding.weight": rnd(10, width, std=1.0),
        "transformer.resblocks.0.attn.in_proj_weight": rnd(3 * width, width, std=1.0),
        "logit_scale": torch.tensor(4.6),
    }
    return sd


def open_clip_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenCLIP's ViT visual trunk written out with plain ops: all tokens (CLS first), before ln_post."""

    def w(key: str) -> torch.Tensor:
        return sd["visual." + key]

    def norm(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:], w(name + ".weight"), w(name + ".bias"), eps=1e-5)

    patch = w("conv1.weight").shape[-1]
    h = F.conv2d(x, w("conv1.weight"), stride=patch)  # (N, d, g, g)
    h = h.reshape(h.shape[0], h.shape[1], -1).permute(0, 2, 1)  # (N, g*g, d), row-major patches
    n, t, d = h.shape[0], h.shape[1] + 1, h.shape[2]
    h = torch.cat([w("class_embedding").expand(n, 1, d), h], dim=1) + w("positional_embedding")
    h = norm(h, "ln_pre")
    hd = d // heads
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"transformer.resblocks.{i}."
        y = norm(h, b + "ln_1")
        qkv = y @ w(b + "attn.in_proj_weight").T + w(b + "attn.in_proj_bias")
        q, k, v = (z.reshape(n, t, heads, hd).transpose(1, 2) for z in qkv.split(d, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(1, 2).reshape(n, t, d)
        h = h + att @ w(b + "attn.out_proj.weight").T + w(b + "attn.out_proj.bias")
        y = norm(h, b + "ln_2") @ w(b + "mlp.c_fc.weight").T + w(b + "mlp.c_fc.bias")
        y = y * torch.sigmoid(1.702 * y)  # QuickGELU
        h = h + y @ w(b + "mlp.c_proj.weight").T + w(b + "mlp.c_proj.bias")
        i += 1
    return h


def test_open_clip_conversion_matches_reference_forward() -> None:
    sd = open_clip_state_dict()
    cfg = open_clip_vision_config(sd, num_heads=4)
    enc = VisionEncoder(cfg).eval()
    converted = convert_open_clip_state_dict(sd)
    enc.model.load_state_dict(converted, strict=True)  # every HF key present, nothing extra
    x = pixels(2, 28)
    with torch.no_grad():
        ref = open_clip_reference(sd, x, heads=4)
        hf = enc.model(x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hf[-1], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(enc(x), ref[:, 1:], rtol=0, atol=1e-5)
    key = converted["encoder.layers.1.self_attn.k_proj.weight"]
    fused = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(key, fused[32:64])  # rows (q; k; v) of the fused projection
    assert key.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()  # a copy


def test_open_clip_config_from_shapes() -> None:
    cfg = open_clip_vision_config(open_clip_state_dict(), num_heads=4)
    assert cfg == dataclasses.replace(TINY_CLIP, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    with pytest.raises(ValueError, match="num_heads"):  # width 32: neither a 64-multiple nor a known width
        open_clip_vision_config(open_clip_state_dict())
    # DFN5B-CLIP ViT-H-14-378 shapes, as meta tensors (no memory), give the published architecture.
    width, mlp = 1280, 5120
    meta = {
        k: torch.empty(s, device="meta")
        for k, s in {
            "conv1.weight": (width, 3, 14, 14),
            "class_embedding": (width,),
            "positional_embedding": (27 * 27 + 1, width),
            "ln_pre.weight": (width,),
            "ln_pre.bias": (width,),
            "ln_post.weight": (width,),
            "ln_post.bias": (width,),
            "proj": (width, 1024),
        }.items()
    }
    for i in range(32):
        b = f"transformer.resblocks.{i}."
        for name, shape in {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (mlp, width),
            "mlp.c_fc.bias": (mlp,),
            "mlp.c_proj.weight": (width, mlp),
            "mlp.c_proj.bias": (width,),
        }.items():
            meta[b + name] = torch.empty(shape, device="meta")
    cfg = open_clip_vision_config({"visual." + k: t for k, t in meta.items()})
    assert cfg == VisionConfig.dfn5b_vit_h14_378()
    assert (cfg.image_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads) == (378, 16, 80)


def test_open_clip_bad_state_dicts() -> None:
    sd = open_clip_state_dict()
    missing = {k: t for k, t in sd.items() if k != "visual.transformer.resblocks.1.mlp.c_proj.bias"}
    with pytest.raises(KeyError, match=r"missing 1 keys.*resblocks\.1\.mlp\.c_proj\.bias"):
        convert_open_clip_state_dict(missing)
    layer_scale = sd | {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
    with pytest.raises(KeyError, match=r"unexpected keys.*ls_1\.gamma"):
        convert_open_clip_state_dict(layer_scale)
    bad_shape = sd | {"visual.ln_pre.bias": torch.zeros(31)}
    with pytest.raises(ValueError, match=r"visual\.ln_pre\.bias"):
        convert_open_clip_state_dict(bad_shape)
    with pytest.raises(KeyError, match="no keys start with"):
        convert_open_clip_state_dict({"token_embedding.weight": torch.zeros(2, 2)})
    # A bare visual state dict works with prefix="".
    bare = {k.removeprefix("visual."): t for k, t in sd.items() if k.startswith("visual.")}
    assert convert_open_clip_state_dict(bare, prefix="").keys() == convert_open_clip_state_dict(sd).keys()


class _NotATensor:
    """Pickled into a .bin to check that loading refuses arbitrary objects."""


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_convert_open_clip_checkpoint_file(tmp_path: Path, suffix: str) -> None:
    from safetensors.torch import save_file

    sd = open_clip_state_dict()
    src = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".safetensors":
        save_file(sd, src)
    else:
        torch.save(sd, src)
    cfg = convert_open_clip_checkpoint(src, tmp_path / "hf", num_heads=4)
    enc = load_vision_encoder(cfg).eval()
    x = pixels(2, 28)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), open_clip_reference(sd, x, heads=4)[:, 1:], rtol=0, atol=1e-5)


def test_an_open_clip_training_checkpoint_with_ddp_keys_converts(tmp_path: Path) -> None:
    # open_clip_train saves {"epoch", "name", "state_dict"} of the DDP-wrapped model: every key starts
    # with "module.", which the converter refused ("no keys start with 'visual.'").
    sd = open_clip_state_dict()
    wrapped = {"module." + k: v for k, v in sd.items()}
    torch.save({"epoch": 1, "name": "run", "state_dict": wrapped}, tmp_path / "epoch_1.pt")
    cfg = convert_open_clip_checkpoint(tmp_path / "epoch_1.pt", tmp_path / "hf", num_heads=4)
    enc = load_vision_encoder(cfg).eval()
    x = pixels(2, 28)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), open_clip_reference(sd, x, heads=4)[:, 1:], rtol=0, atol=1e-5)
    plain = convert_open_clip_state_dict(sd)
    assert convert_open_clip_state_dict(wrapped).keys() == plain.keys()
    assert open_clip_vision_config(wrapped, num_heads=4) == open_clip_vision_config(sd, num_heads=4)
    # Only a prefix every key has is the wrapper's: a lone "module." key is left alone.
    with pytest.raises(KeyError, match="unexpected keys"):
        convert_open_clip_state_dict({**sd, "visual.module.x": torch.zeros(1)})


def test_bin_loading_never_unpickles_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.bin: not a readable checkpoint \(Weights only load failed"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match=r"expected a \.safetensors"):
        load_state_dict_file(tmp_path / "model.ckpt")


# --- loading from a local directory ----------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY_CLIP, dataclasses.replace(TINY_SIGLIP, feature_layer=-2)])
def test_save_pretrained_roundtrip(tmp_path: Path, cfg: VisionConfig) -> None:
    enc = build(cfg)
    enc.save_pretrained(tmp_path)
    loaded = load_vision_encoder(
        VisionConfig(kind=cfg.kind, pretrained=str(tmp_path), feature_layer=cfg.feature_layer)
    ).eval()
    x = pixels(2, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), enc(x))
    assert (loaded.image_size, loaded.num_patches, loaded.hidden_size) == (28, 4, 32)


def test_save_pretrained_keeps_the_encoders_normalisation_and_takes_a_path(tmp_path: Path) -> None:
    # The saved directory reloaded with the kind's default mean and std (CLIP's), so the same uint8
    # tiles gave other features; and VisionConfig refused a pathlib.Path.
    cfg = dataclasses.replace(TINY_CLIP, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    enc = build(cfg)
    enc.save_pretrained(tmp_path)
    reloaded = VisionConfig(kind="clip", pretrained=tmp_path)  # a Path, stored as a string
    assert reloaded.pretrained == str(tmp_path)
    loaded = load_vision_encoder(reloaded).eval()
    assert (loaded.image_mean, loaded.image_std) == ((0.5,) * 3, (0.25,) * 3)
    tiles = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(tiles), enc.eval()(tiles))


def test_pretrained_full_clip_checkpoint(tmp_path: Path) -> None:
    # A full CLIP checkpoint (text tower, projections): only the vision tower is loaded.
    from transformers import CLIPConfig, CLIPModel

    vision = {"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "quick_gelu"}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    full = CLIPModel(
        CLIPConfig(vision_config=vision, text_config=text | {"vocab_size": 50}, projection_dim=8)
    )
    full.save_pretrained(tmp_path)
    enc = load_vision_encoder(VisionConfig(pretrained=str(tmp_path), feature_layer=-2)).eval()
    x = pixels(2, 28)
    with torch.no_grad():
        expected = full.eval().vision_model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(enc(x), expected)


def test_pretrained_with_interpolation_and_resave(tmp_path: Path) -> None:
    native = build(TINY_CLIP)
    native.save_pretrained(tmp_path / "native")
    enc = load_vision_encoder(VisionConfig(pretrained=str(tmp_path / "native"), input_size=56)).eval()
    assert (enc.image_size, enc.input_size, enc.num_patches) == (28, 56, 16)
    x = pixels(1, 56)
    with torch.no_grad():
        expected = plain_hf(native)(x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        torch.testing.assert_close(enc(x), expected, rtol=0, atol=1e-6)
    # Saved after interpolation, the checkpoint is a 56 px model: it reloads with no resampling.
    enc.save_pretrained(tmp_path / "at56")
    again = load_vision_encoder(VisionConfig(pretrained=str(tmp_path / "at56"))).eval()
    assert (again.image_size, again.input_size) == (56, 56)
    with torch.no_grad():
        assert torch.equal(again(x), enc(x))


def off_grid_checkpoint(path: Path, kind: str) -> Path:
    """google/siglip-so400m-patch14-384's geometry at a tiny width: 384 px, 14-px patches, so a 27x27
    table (the stride-14 convolution drops the last 6 pixels)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config_cls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    HF_CLASSES[kind](config_cls(image_size=384, patch_size=14, **sizes)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_a_checkpoint_off_the_patch_grid_runs_on_whole_patches(tmp_path: Path, kind: str) -> None:
    # It failed to build ("input_size (384) must be a multiple of the patch size (14)"); with
    # input_size=378 the table already fitted, so image_size stayed 384 and 378-px tiles were refused.
    path = off_grid_checkpoint(tmp_path / "ckpt", kind)
    prefix = 1 if kind == "clip" else 0
    for input_size in (None, 378):
        enc = load_vision_encoder(VisionConfig(kind=kind, pretrained=str(path), input_size=input_size)).eval()
        assert (enc.image_size, enc.input_size, enc.num_patches) == (384, 378, 729)
        assert enc.model.embeddings.position_embedding.weight.shape[0] == prefix + 729  # not resampled
        x = pixels(1, 378)
        with torch.no_grad():
            # What the checkpoint computes on a 384-px tile: the pixels past 378 never reach it.
            padded = F.pad(x, (0, 6, 0, 6), value=9.0)
            hf = HF_CLASSES[kind].from_pretrained(path).eval()
            expected = hf(padded, output_hidden_states=True).hidden_states[-1][:, prefix:]
            assert torch.equal(enc(x), expected)
            # The wrapped model's config says 378, so transformers' own forward takes the tile too.
            native = plain_hf(enc)(x, output_hidden_states=True).hidden_states[-1][:, prefix:]
            assert torch.equal(native, expected)
        with pytest.raises(ValueError, match=r"\(N, 3, 378, 378\)"):
            enc(pixels(1, 384))
    enc.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["image_size"] == 378
    again = load_vision_encoder(VisionConfig(kind=kind, pretrained=str(tmp_path / "saved"))).eval()
    assert (again.image_size, again.input_size, again.num_patches) == (378, 378, 729)
    with torch.no_grad():
        assert torch.equal(again(x), enc(x))
    with pytest.raises(ValueError, match=r"input_size \(384\) must be a multiple of the patch size"):
        load_vision_encoder(VisionConfig(kind=kind, pretrained=str(path), input_size=384))


def test_pretrained_errors_and_preprocessor_stats(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"VisionConfig\.pretrained"):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path / "absent")))
    build(TINY_SIGLIP).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match=r"VisionConfig\.kind"):
        VisionEncoder(VisionConfig(kind="clip", pretrained=str(tmp_path / "siglip")))
    with pytest.raises(ValueError, match=r"VisionConfig\.feature_layer"):
        VisionEncoder(VisionConfig(kind="siglip", pretrained=str(tmp_path / "siglip"), feature_layer=5))
    # A config.json promising more blocks than the weights hold must not leave blocks random.
    short = tmp_path / "short"
    build(dataclasses.replace(TINY_CLIP, num_layers=1)).save_pretrained(short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="lacks"):
        VisionEncoder(VisionConfig(pretrained=str(short)))
    # And one promising fewer blocks must not drop the others (a full CLIP checkpoint's text tower is
    # left out without a word: test_pretrained_full_clip_checkpoint).
    build(dataclasses.replace(TINY_CLIP, num_layers=2)).save_pretrained(tmp_path / "long")
    long_config = json.loads((tmp_path / "long" / "config.json").read_text())
    (tmp_path / "long" / "config.json").write_text(json.dumps(long_config | {"num_hidden_layers": 1}))
    with pytest.raises(
        ValueError, match=r"has \d+ encoder weights its config\.json has no place for.*layers\.1\."
    ):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path / "long")))
    # Damaged files name the directory or the file.
    (tmp_path / "long" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"long/config\.json is not valid JSON"):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path / "long")))
    (tmp_path / "long" / "config.json").write_text(json.dumps(long_config))
    weights = tmp_path / "long" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot load the encoder in .*long \("):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path / "long")))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_state_dict_file(weights)
    torch.save({"visual.conv1.weight": torch.zeros(4)}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable checkpoint"):
        load_state_dict_file(tmp_path / "cut.pt")
    # The checkpoint's preprocessor_config.json mean/std win over the kind's defaults.
    (short / "config.json").write_text(json.dumps(config))
    (short / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    enc = VisionEncoder(VisionConfig(pretrained=str(short)))
    assert (enc.image_mean, enc.image_std) == ((0.5,) * 3, (0.25,) * 3)
    # A scalar or strings there, or a config.json that is not an object, failed with a TypeError or an
    # AttributeError naming nothing.
    for bad in (0.5, "abc", [0.5, "a", 0.5]):
        (short / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": bad, "image_std": [0.25] * 3})
        )
        with pytest.raises(
            ValueError, match=r"short/preprocessor_config\.json: image_mean must be a list of numbers"
        ):
            VisionEncoder(VisionConfig(pretrained=str(short)))
    (short / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"short/config\.json must hold a JSON object, not list"):
        VisionEncoder(VisionConfig(pretrained=str(short)))


# --- full size and precision -----------------------------------------------------------------------------


def test_vit_h14_378_on_meta_device() -> None:
    with torch.device("meta"):
        at378 = VisionEncoder(VisionConfig.dfn5b_vit_h14_378())
        at672 = VisionEncoder(VisionConfig.dfn5b_vit_h14_378(input_size=672))
    count = sum(p.numel() for p in at378.parameters())
    print(f"DFN5B ViT-H/14-378 vision tower: {count:,} parameters (FastVLM lists 632M)")
    assert abs(count - 632e6) / 632e6 < 0.01
    assert (at378.num_patches, at378.hidden_size) == (729, 1280)
    assert at672.num_patches == 2304 == at672.grid_size**2
    assert at672.model.embeddings.position_embedding.weight.shape == (2305, 1280)
    assert sum(p.numel() for p in at672.parameters()) - count == (2304 - 729) * 1280


def test_bf16_autocast_forward() -> None:
    enc = build(dataclasses.replace(TINY_CLIP, input_size=42))
    x = pixels(2, 42)
    with torch.no_grad():
        full = enc(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = enc(x)
        # Weights cast to bf16 as well (e.g. a frozen encoder at inference).
        half = enc.to(torch.bfloat16)(x.bfloat16())
    # Under autocast the matmuls run in bf16 while the residual stream stays float32.
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, full)
    assert half.dtype == torch.bfloat16
    for out in (mixed, half):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.1)


def test_uint8_tiles_are_normalised_by_the_encoder() -> None:
    from mm15.image import normalize_pixels

    enc = build(TINY_CLIP)
    raw = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        got = enc(raw)
        want = enc(normalize_pixels(raw, enc.image_mean, enc.image_std))
    assert torch.equal(got, want)
