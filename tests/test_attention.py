"""Packed attention: per-sample attention over a packed row equals the dense block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from mm15.chat import ChatEncoder
from mm15.data.packing import collate
from mm15.data.synth import generate
from mm15.image import ImageProcessor, load_image
from mm15.model.attention import packed_segments
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset


def test_packed_segments_split_at_position_zero_and_merge_padding() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert packed_segments(positions) == [[(0, 3), (3, 5), (5, 8)], [(0, 8)]]
    assert packed_segments(torch.tensor([[0, 1, 0]])) == [[(0, 2), (2, 3)]]
    # One-token samples inside a row stay apart (merged, the second attended to the first); only the
    # row's final run of one-token spans, its padding, is one span.
    assert packed_segments(torch.tensor([[0, 1, 0, 0, 0, 1, 0, 0]])) == [
        [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8)]
    ]
    assert packed_segments(torch.tensor([[0, 0, 0]])) == [[(0, 3)]]


def test_adjacent_one_token_samples_attend_to_themselves_alone() -> None:
    from mm15.model.attention import block_causal_mask, packed_attention

    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 0, 0, 0, 1, 0, 0]])  # samples of 2, 1, 1, 2 tokens, then padding
    q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)  # GQA
    out, _ = packed_attention(torch.nn.Module().eval(), q, k, v, None, packed_position_ids=positions)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=block_causal_mask(positions), enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out[:, :6], dense[:, :6])  # the real tokens (padding outputs are unused)


@pytest.fixture(scope="module")
def packed_batch():
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).eval()
    encoder = ChatEncoder(model.tokenizer, model.cfg.image, max_length=2048)
    images = ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std)
    samples = [generate(name, 0, split="eval") for name in ("general-color", "text-only", "refer-ground")]
    pictures = [[load_image(ref) for ref in s.images] for s in samples]
    encoded = [
        encoder.encode(s, [(p.height, p.width) for p in ps]) for s, ps in zip(samples, pictures, strict=True)
    ]
    batch = collate(encoded, model.tokenizer.pad_token_id, 2048, packed=True)
    flat = [p for i in batch.sample_order for p in pictures[i]]
    plans = [plan for i in batch.sample_order for plan in encoded[i].plans]
    return model, batch, images(flat, plans).pixel_values


def test_packed_attention_equals_the_dense_block_diagonal_mask(packed_batch) -> None:
    model, batch, pixels = packed_batch
    assert len(batch.rows) == 1 and len(batch.rows[0]) == 3  # one row, three samples
    with torch.no_grad():
        fast = model(pixel_values=pixels, **batch.model_inputs())
        model.packed_attention = False
        dense = model(pixel_values=pixels, **batch.model_inputs())
        model.packed_attention = True
    torch.testing.assert_close(fast.token_losses, dense.token_losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.loss, dense.loss, rtol=1e-5, atol=1e-6)


def test_packed_attention_gradients_match(packed_batch) -> None:
    model, batch, pixels = packed_batch
    grads = []
    for packed in (True, False):
        model.zero_grad(set_to_none=True)
        model.packed_attention = packed
        out = model(pixel_values=pixels, **batch.model_inputs())
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.packed_attention = True
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_packed_attention_rejects_position_ids_of_another_shape() -> None:
    from mm15.model.attention import packed_attention

    query = key = value = torch.zeros(2, 4, 6, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match=r"position ids \(2, 5\)"):
        packed_attention(
            module, query, key, value, None, packed_position_ids=torch.zeros(2, 5, dtype=torch.long)
        )


def test_packed_rows_need_position_ids(packed_batch) -> None:
    model, batch, pixels = packed_batch
    inputs = {**batch.model_inputs(), "position_ids": None}
    with pytest.raises(ValueError, match="position_ids"):
        model(pixel_values=pixels, **inputs)
