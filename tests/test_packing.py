"""Packing: first-fit rows, block-diagonal causal masks, restarting positions, and the same loss."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mm15.chat import ChatEncoder
from mm15.data.packing import collate, pack_bins
from mm15.data.sample import Sample, Turn
from mm15.image import ImageProcessor
from mm15.model.attention import block_causal_mask
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset


def test_first_fit_decreasing_rows() -> None:
    assert pack_bins([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]  # 6+2, 5+3, 4
    assert pack_bins([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="longer than max_length=4"):
        pack_bins([3, 5], 4)


def test_mask_and_positions_isolate_samples() -> None:
    from mm15.chat import EncodedSample

    samples = [
        EncodedSample(list(range(10, 10 + n)), list(range(10, 10 + n)), [], str(n), "s", "general")
        for n in (3, 2, 4)
    ]
    batch = collate(samples, pad_id=0, max_length=6)
    # Rows: first-fit decreasing puts the 4-token and 2-token samples together, the 3-token one alone.
    assert batch.input_ids.shape == (2, 6) and batch.sample_order == [1, 2, 0]
    assert batch.position_ids.tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]]
    assert batch.packed and batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    mask = block_causal_mask(batch.position_ids)[:, 0]
    assert mask[0, 1].tolist() == [True, True, False, False, False, False]  # sample 1 sees itself only
    assert mask[0, 3].tolist() == [False, False, True, True, False, False]  # sample 2, causal
    assert mask[1, 4].tolist() == [False, False, False, False, True, False]  # padding: itself alone
    assert batch.labels.tolist() == [[-100, 11, -100, 11, 12, 13], [-100, 11, 12, -100, -100, -100]]
    assert batch.efficiency == pytest.approx(9 / 12)
    plain = collate(samples, pad_id=0, packed=False)
    assert plain.input_ids.shape == (3, 4) and plain.attention_mask.tolist()[1] == [1, 1, 0, 0]
    assert not plain.packed


@pytest.mark.parametrize("seed", range(5))
def test_block_causal_mask_equals_the_sample_id_definition(seed: int) -> None:
    """Against the definition: key j is visible to query i iff both are in the same sample and j <= i;
    a padding slot sees only itself."""
    rng = torch.Generator().manual_seed(seed)
    rows, width = 3, 64
    sample_id = torch.full((rows, width), -1)
    positions = torch.zeros((rows, width), dtype=torch.long)
    for r in range(rows):
        start, k = 0, 0
        while True:
            n = int(torch.randint(1, 20, (1,), generator=rng))
            if start + n > width - int(torch.randint(0, 8, (1,), generator=rng)):
                break
            sample_id[r, start : start + n] = k
            positions[r, start : start + n] = torch.arange(n)
            start, k = start + n, k + 1
    i = torch.arange(width)
    same = (sample_id[:, :, None] == sample_id[:, None, :]) & (sample_id[:, :, None] >= 0)
    pad_self = (sample_id < 0)[:, :, None] & (i[:, None] == i[None, :])
    expected = ((same & (i[None, None, :] <= i[None, :, None])) | pad_self).unsqueeze(1)
    assert torch.equal(block_causal_mask(positions), expected)


def test_packed_loss_equals_unpacked_loss_on_the_tiny_model() -> None:
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).eval()
    encoder = ChatEncoder(model.tokenizer, model.cfg.image, max_length=2048)
    images = {
        "red": Image.new("RGB", (120, 80), (200, 30, 30)),
        "wide": Image.new("RGB", (300, 60), (30, 200, 30)),
        "a": Image.new("RGB", (64, 64), (30, 30, 200)),
    }
    samples = [
        Sample(
            id="1",
            category="general",
            source="t",
            images=[images["red"]],
            turns=[Turn("user", "<image>\nWhat colour?"), Turn("assistant", "Red.")],
        ),
        Sample(
            id="2",
            category="text-only",
            source="t",
            turns=[Turn("user", "Say hi."), Turn("assistant", "Hi there, friend.")],
        ),
        Sample(
            id="3",
            category="interleaved",
            source="t",
            images=[images["wide"], images["a"]],
            turns=[Turn("assistant", "A strip <image> and a square <image>, the end.")],
        ),
    ]
    encoded = [encoder.encode(s, [(im.height, im.width) for im in s.images]) for s in samples]
    processor = ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std)

    def loss(packed: bool) -> torch.Tensor:
        batch = collate(encoded, pad_id=model.tokenizer.pad_token_id, max_length=2048, packed=packed)
        order = batch.sample_order
        pixels = processor(
            [im for i in order for im in samples[i].images], [p for i in order for p in encoded[i].plans]
        ).pixel_values
        with torch.no_grad():
            out = model(pixel_values=pixels, **batch.model_inputs())
        return out.loss

    packed, unpacked = loss(True), loss(False)
    # float32 throughout; the masked rows sum the same terms in another order: 1e-5.
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    assert collate(encoded, 0, 2048).input_ids.shape[0] == 1  # all three fit one row
