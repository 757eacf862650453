"""Model FLOPs for MFU: weights per position group against hand-written formulas; the trainer's MFU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_trainer import setup  # the tiny model, its data stream and optimizer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mm15.hardware import compute_dtype
from mm15.model.connector import CAbstractor, ConnectorConfig, MLPConnector, c_abstractor_param_count
from mm15.model.moe import MoEConfig, upcycle_llm
from mm15.train.flops import (
    Backward,
    FlopWeights,
    StepWork,
    causal_lm_weights,
    connector_weights,
    image_work,
    llava_next_flop_weights,
    matmul_weights,
    mm15_flop_weights,
)
from mm15.train.trainer import train_step

D, FFN, V, LAYERS, HEADS, KV_HEADS = 16, 24, 50, 2, 4, 2


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def decoder_formula() -> int:
    """Per layer: q and o (d x d), k and v (d x kv_heads * head_dim), the MLP 3 x d x FFN. The norms are
    elementwise and the embedding table is a lookup, so neither is in it."""
    kv = KV_HEADS * (D // HEADS)
    layer = 2 * D * D + 2 * D * kv + 3 * D * FFN
    return LAYERS * layer


def test_matmul_weights_leave_out_embedding_tables_and_vectors_and_count_ties_once() -> None:
    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3), nn.Conv2d(3, 2, 3))
    assert matmul_weights(module) == 4 * 3 + 3 * 2 * 3 * 3  # no bias, norm or table
    tied = nn.ModuleDict({"embed": nn.Embedding(7, 5), "head": nn.Linear(5, 7, bias=False)})
    tied["head"].weight = tied["embed"].weight
    assert matmul_weights(tied) == 0  # the only weight is the table


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_weights_split_decoder_and_head(tied: bool) -> None:
    assert causal_lm_weights(llama(tied)) == (decoder_formula(), V * D)


def test_moe_layers_count_only_the_routed_experts() -> None:
    model = upcycle_llm(llama(tied=True), MoEConfig(num_experts=4, top_k=2, every=2))
    # Layer 1 (every=2) trades its dense MLP for a router (d x E) and top_k of E experts per token.
    expected = decoder_formula() - 3 * D * FFN + D * 4 + 2 * 3 * D * FFN
    assert causal_lm_weights(model) == (expected, V * D)


def test_c_abstractor_weights_are_its_per_position_products() -> None:
    cfg = ConnectorConfig(vision_dim=24, llm_dim=32, hidden_dim=40, num_queries=4, num_patches=16, depth=2)
    per_patch, per_token = connector_weights(CAbstractor(cfg))

    # A block (c_in -> c) multiplies each position by its 1x1 convs (c_in x c, c x c), the depthwise 3x3
    # (9c) and a projecting shortcut (c_in x c) if c_in != c. Its squeeze-excite gate runs once per tile
    # on the pooled channels; norms, biases and the positional embedding are elementwise.
    def block(c_in: int, c: int) -> int:
        return c_in * c + 9 * c + c * c + (c_in * c if c_in != c else 0)

    assert per_patch == block(24, 40) + block(40, 40) == 7_440
    assert per_token == 2 * block(40, 40) + 40 * 32 + 32 * 32 == 9_424  # stage 2 and the readout
    assert per_patch + per_token < c_abstractor_param_count(cfg)


def test_mlp_connector_weights_run_per_image_token() -> None:
    cfg = ConnectorConfig(kind="mlp", vision_dim=24, llm_dim=32, num_queries=4, num_patches=16)
    assert connector_weights(MLPConnector(cfg)) == (0, 24 * 32 + 32 * 32)
    with pytest.raises(TypeError, match="no FLOP count for connector Linear"):
        connector_weights(nn.Linear(2, 2))


def test_the_llava_next_reference_is_counted_as_mm15_is() -> None:
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=llama(tied=False).config.to_dict(),
        image_grid_pinpoints=[[32, 64]],
        image_token_index=V - 1,
    )
    weights = llava_next_flop_weights(LlavaNextForConditionalGeneration(config))
    # CLIP without its position table: the patch conv 3*16*16*8 and one layer's matrices (q, k, v, o and
    # the MLP's two); the CLS vector, the norms and the biases are elementwise.
    layer = 4 * 8 * 8 + 8 * 12 + 12 * 8
    assert weights == FlopWeights(
        decoder=decoder_formula(),
        head=V * D,
        encoder=3 * 16 * 16 * 8 + layer,
        connector_per_patch=8 * D + D * D,  # the two-layer projector, on every patch feature
    )


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_mm15_encoder_counts_only_the_blocks_that_run(feature_layer: int) -> None:
    """The encoder runs its blocks up to the feature layer and never its post-layernorm; counting all of
    them overstated MFU (by 42% of the tiny encoder's weights at feature layer -2)."""
    import dataclasses

    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, feature_layer=feature_layer))
    model = MM15Model.build(cfg)
    hf = model.vision.model
    width = cfg.vision.hidden_size
    blocks = hf.encoder.layers
    ran = blocks[: len(blocks) + 1 + feature_layer]
    per_block = sum(p.numel() for p in blocks[0].parameters() if p.dim() == 2)
    assert per_block == 4 * width * width + 2 * width * hf.config.intermediate_size
    patch_conv = 3 * cfg.vision.patch_size**2 * width
    expected = patch_conv + len(ran) * per_block
    assert mm15_flop_weights(model).encoder == expected


def test_step_flops_multiply_each_group_by_its_positions() -> None:
    weights = FlopWeights(decoder=100, head=10, encoder=7, connector_per_patch=3, connector_per_image_token=5)
    work = StepWork(tokens=50, supervised=4, patches=20, image_tokens=8)
    assert weights.step_flops(work) == 6.0 * (100 * 50 + 10 * 4 + (7 + 3) * 20 + 5 * 8)
    # A frozen encoder runs forward only; a frozen decoder after a trainable connector still passes
    # the input gradient back (2n) but computes no weight gradient.
    frozen = dataclasses.replace(weights, backward=Backward.of(False, True, False, False))
    assert frozen.backward == Backward(encoder=0, connector=4, decoder=2, head=2)
    assert frozen.step_flops(work) == 2 * 7 * 20 + 6 * (3 * 20 + 5 * 8) + 4 * 100 * 50 + 4 * 10 * 4
    assert Backward.of(True, True, True, True) == Backward()
    assert Backward.of(False, False, False, True) == Backward(0, 0, 0, 2)


@pytest.mark.parametrize(
    "frozen",
    [(), ("vision",), ("vision", "connector"), ("llm",)],
    ids=["none", "encoder", "encoder+connector", "llm"],
)
def test_step_flops_match_torchs_count_with_frozen_modules(frozen: tuple[str, ...]) -> None:
    """The formula credited every group with a backward pass: a stage training without its encoder was
    counted 10.6% over the products torch runs. Compared on the linear layers (torch's count of a
    grouped convolution's backward ignores the groups), forward and backward, on the tiny model."""
    from torch.utils.flop_counter import FlopCounterMode

    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = MM15Model.build(cfg).train()
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    image, per_tile = model.image_token_id, cfg.image.tokens_per_tile
    ids = torch.tensor([[5] * 6 + [image] * (2 * per_tile) + [6] * 12])
    labels = torch.tensor([[-100] * (6 + 2 * per_tile) + [7] * 12])
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    patches, image_tokens = image_work(model, pixels)
    work = StepWork(
        tokens=ids.shape[1],
        supervised=int((labels[:, 1:] != -100).sum()),
        patches=patches,
        image_tokens=image_tokens,
    )
    counter = FlopCounterMode(display=False)
    with counter, compute_dtype(torch.float32):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
    linear = sum(n for op, n in counter.get_flop_counts()["Global"].items() if op.__name__ in ("mm", "addmm"))
    # The formula's convolutions, taken out: the encoder's patch convolution, the C-Abstractor's depthwise.
    weights = mm15_flop_weights(model)
    b = weights.backward
    patch_conv = model.vision.model.embeddings.patch_embedding.weight.numel()
    depthwise = [
        sum(m.weight.numel() for m in stage.modules() if isinstance(m, nn.Conv2d))
        for stage in (model.connector.stage1, model.connector.stage2)
    ]
    convolutions = (2 + b.encoder) * patch_conv * patches + (2 + b.connector) * (
        depthwise[0] * patches + depthwise[1] * image_tokens
    )
    # What the formula leaves out: the CLS token's rows in the encoder (about 1% of its work).
    assert weights.step_flops(work) - convolutions == pytest.approx(linear, rel=0.01)


def test_the_trainer_reports_mfu_from_the_counted_work() -> None:
    model, stream, optimizer, scheduler = setup()
    seen = []
    original = stream.next_micro

    def recording():
        micro = original()
        seen.append(micro)
        return micro

    stream.next_micro = recording
    peak = 1e11
    metrics = train_step(model, stream, optimizer, scheduler, 1, 0, torch.float32, 1.0, peak)
    (micro,) = seen
    patches, image_tokens = image_work(model, micro.pixel_values)
    tile = micro.pixel_values.shape[-1] // model.cfg.vision.patch_size
    assert patches == micro.pixel_values.shape[0] * tile * tile
    assert image_tokens == int((micro.batch.input_ids == model.image_token_id).sum())
    work = StepWork(
        tokens=micro.batch.real_tokens,
        supervised=int((micro.batch.labels[:, 1:] != -100).sum()),
        patches=patches,
        image_tokens=image_tokens,
    )
    seconds = micro.batch.real_tokens / metrics.tokens_per_s
    expected = mm15_flop_weights(model).step_flops(work) / seconds / peak
    assert metrics.mfu == pytest.approx(expected, rel=1e-9)
