"""Attention: per-sample attention over a packed row equals the dense block-diagonal mask; the encoder's
short-tile attention equals SDPA and is taken exactly where its rule says."""

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


def test_with_the_token_mask_every_sample_is_its_own_span_and_padding_one() -> None:
    """Without the mask the row's last run of one-token spans is taken for padding: two one-token
    samples ending a full row were merged, the second attending to the first."""
    row = torch.tensor([[0, 1, 0, 0]])
    assert packed_segments(row, torch.ones(1, 4)) == [[(0, 2), (2, 3), (3, 4)]]
    padded = torch.tensor([[0, 1, 0, 0, 0, 0]])  # samples of 2, 1, 1 tokens, then 2 of padding
    assert packed_segments(padded, torch.tensor([[1, 1, 1, 1, 0, 0]])) == [[(0, 2), (2, 3), (3, 4), (4, 6)]]
    with pytest.raises(ValueError, match=r"must start a sample \(position 0\) at their first token"):
        packed_segments(torch.tensor([[1, 2, 0, 1]]))


def test_a_packed_row_gives_one_token_samples_their_logits_alone() -> None:
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).eval()
    samples = [[5, 9, 12, 7, 3], [40, 41, 42], [77], [78]]  # ends with two one-token samples
    ids = torch.tensor([[t for s in samples for t in s] + [0, 0]])
    positions = torch.tensor([[p for s in samples for p in range(len(s))] + [0, 0]])
    mask = torch.tensor([[1] * 10 + [0, 0]])
    with torch.no_grad():
        packed = model(ids, mask, position_ids=positions, packed=True).logits[0]
        start = 0
        for sample in samples:
            alone = model(torch.tensor([sample])).logits[0]
            torch.testing.assert_close(packed[start : start + len(sample)], alone, atol=2e-5, rtol=1e-5)
            start += len(sample)


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


@pytest.mark.parametrize(
    ("batch", "heads", "length", "dim", "scale"), [(3, 4, 65, 16, None), (2, 6, 197, 64, 0.3)]
)
def test_short_attention_equals_sdpa_with_its_gradients(batch, heads, length, dim, scale) -> None:
    from mm15.model.attention import short_attention

    torch.manual_seed(0)
    inputs = [
        torch.randn(batch, heads, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    upstream = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    outputs, grads = [], []
    for function in (short_attention, torch.nn.functional.scaled_dot_product_attention):
        out = function(*inputs, scale=scale)
        grads.append(torch.autograd.grad(out, inputs, upstream))
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for ours, sdpa in zip(*grads, strict=True):
        torch.testing.assert_close(ours, sdpa, rtol=1e-10, atol=1e-12)


def test_short_attention_in_bf16_is_as_accurate_as_sdpa_on_large_scores() -> None:
    """Scores rounded to bf16 (the first version) were off by up to 0.5 at a score of 170, 30x SDPA's error
    against float64; they are now computed in float32, as SDPA's kernels keep them."""
    from mm15.model.attention import short_attention

    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 197, 64) * 6).bfloat16(), (torch.randn(2, 4, 197, 64) * 6).bfloat16()
    v = torch.randn(2, 4, 197, 64).bfloat16()
    assert (q.double() @ k.double().transpose(-1, -2) / 8).abs().max() > 150
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = short_attention(q, k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == torch.bfloat16
    sdpa_error = (sdpa.double() - exact).abs().max().item()
    assert (ours.double() - exact).abs().max().item() <= 1.5 * sdpa_error + 1e-3


def test_encoder_attention_leaves_masked_and_causal_calls_to_sdpa(monkeypatch) -> None:
    from mm15.model import attention

    monkeypatch.setattr(attention, "short_attention", lambda *args: pytest.fail("took the short path"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 65, 16).bfloat16() for _ in range(3))
    mask = torch.rand(2, 1, 65, 65) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    plain, causal = torch.nn.Module().eval(), torch.nn.Module().eval()
    causal.is_causal = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked, _ = attention.encoder_attention(plain, q, k, v, mask, scaling=0.25)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
        torch.testing.assert_close(masked, expected.transpose(1, 2), rtol=0, atol=0)
        ordered, _ = attention.encoder_attention(causal, q, k, v, None, scaling=0.25)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
        torch.testing.assert_close(ordered, expected.transpose(1, 2), rtol=0, atol=0)


def test_short_attention_refuses_grouped_keys() -> None:
    from mm15.model.attention import short_attention

    with pytest.raises(ValueError, match="4 query heads for 2 key heads"):
        short_attention(torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))


def test_takes_short_attention_only_for_short_bf16_without_dropout() -> None:
    from mm15.model.attention import (
        SHORT_ATTENTION_MAX_LEN,
        SHORT_ATTENTION_MAX_SCORES,
        takes_short_attention,
    )

    def q(batch: int, length: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(1, 4, length, 16, dtype=dtype).expand(batch, -1, -1, -1)  # no memory per batch

    assert takes_short_attention(q(2, 65), q(2, 65))
    assert takes_short_attention(q(1, SHORT_ATTENTION_MAX_LEN), q(1, SHORT_ATTENTION_MAX_LEN))
    assert not takes_short_attention(q(1, SHORT_ATTENTION_MAX_LEN + 1), q(1, SHORT_ATTENTION_MAX_LEN + 1))
    assert not takes_short_attention(q(2, 65, torch.float32), q(2, 65, torch.float32))  # SDPA's flash is fast
    assert not takes_short_attention(q(2, 65), q(2, 65), dropout_p=0.1)
    # float32 queries count as bf16 where autocast would cast them for SDPA.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert takes_short_attention(q(2, 65, torch.float32), q(2, 65, torch.float32))
    # Too many scores to materialise: batch x heads x L x L over the cap.
    batch = SHORT_ATTENTION_MAX_SCORES // (4 * 256 * 256) + 1
    assert not takes_short_attention(q(batch, 256), q(batch, 256))
    assert takes_short_attention(q(batch - 1, 256), q(batch - 1, 256))


def test_the_encoder_takes_short_attention_in_bf16_and_matches_sdpa(monkeypatch) -> None:
    from mm15.model import attention
    from mm15.model.vision import VisionEncoder

    torch.manual_seed(0)
    encoder = VisionEncoder(preset("tiny").vision).eval()
    assert encoder.model.config._attn_implementation == attention.ENCODER_ATTENTION
    calls: list[tuple[int, ...]] = []
    short = attention.short_attention

    def counted(query: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(query.shape))
        return short(query, *args)

    monkeypatch.setattr(attention, "short_attention", counted)
    pixels = torch.randn(3, 3, encoder.input_size, encoder.input_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = encoder(pixels).float()
        encoder.model.config._attn_implementation = "sdpa"
        sdpa = encoder(pixels).float()
        encoder.model.config._attn_implementation = attention.ENCODER_ATTENTION
    layers = encoder.model.config.num_hidden_layers
    assert calls == [(3, encoder.model.config.num_attention_heads, 65, 16)] * layers
    assert not torch.equal(ours, sdpa)  # another kernel, so other bf16 roundings
    torch.testing.assert_close(ours, sdpa, rtol=0.05, atol=0.05)
    with torch.no_grad():  # float32: SDPA, the same values as transformers' own path
        calls.clear()
        ours = encoder(pixels)
        encoder.model.config._attn_implementation = "sdpa"
        torch.testing.assert_close(ours, encoder(pixels), rtol=0, atol=0)
    assert calls == []
