"""Sequence packing: several encoded samples per row, each attending only to itself.

``pack_bins`` assigns samples to rows of at most ``max_length`` tokens (first-fit decreasing, so long
samples are placed first and short ones fill the gaps); ``collate`` builds the batch. A packed row
has position ids that restart at 0 for each sample, and the model, told the rows are packed
(``Batch.model_inputs``), lets each sample attend only to itself (``mm15.model.attention``), so each
sample computes exactly what it would alone: the packed loss equals the unpacked loss (tested on the
tiny model). No (length x length) mask is built here: per-sample attention does not need one, and at
2,048 tokens building it was a tenth of the data path's time. ``collate(..., packed=False)`` is the
plain right-padded batch with one sample per row.

Images: the model writes image features at the image-token positions in row-major order, so
``Batch.sample_order`` lists the samples in that order; the caller concatenates their tiles likewise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mm15.chat import IGNORE, EncodedSample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    labels: torch.Tensor  # (rows, length), IGNORE on padding, prompts and images
    position_ids: torch.Tensor  # (rows, length), restarting per sample
    attention_mask: torch.Tensor  # (rows, length): 1 on a sample's tokens, 0 on padding
    rows: list[list[int]]  # the samples (indices) of each row, left to right
    real_tokens: int
    packed: bool  # rows may hold several samples (attention must stay inside each)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of ``MM15Model.forward`` for this batch (all but the pixels)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "packed": self.packed,
        }

    @property
    def sample_order(self) -> list[int]:
        """Sample indices in the order their tokens appear (row-major): the order of their images."""
        return [index for row in self.rows for index in row]

    @property
    def efficiency(self) -> float:
        """Fraction of the batch's token slots holding real tokens (not padding)."""
        return self.real_tokens / self.input_ids.numel()


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Sample indices per row, first-fit decreasing; a sample longer than ``max_length`` is an error."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(
            f"samples {too_long} are longer than max_length={max_length}: drop them before packing "
            "(ChatEncoder raises SampleTooLong for them)"
        )
    bins: list[list[int]] = []
    space: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(space):
            if lengths[index] <= free:
                bins[row].append(index)
                space[row] -= lengths[index]
                break
        else:
            bins.append([index])
            space.append(max_length - lengths[index])
    return [sorted(row) for row in bins]


def collate(
    samples: Sequence[EncodedSample], pad_id: int, max_length: int | None = None, packed: bool = True
) -> Batch:
    """A batch of ``samples``: packed into rows of ``max_length`` tokens, or one padded sample per row."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [len(s.input_ids) for s in samples]
    if packed:
        if max_length is None:
            raise ValueError("packing needs max_length")
        rows = pack_bins(lengths, max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
    else:
        rows = [[i] for i in range(len(samples))]
        width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)  # slots holding a sample's token
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = lengths[index]
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(samples[index].input_ids)
            labels[r, span] = torch.tensor(samples[index].labels)
            # A sample's first token has no predecessor inside the sample: in a packed row the token
            # before it belongs to another sample, so it must not be a target (alone it never is).
            labels[r, start] = IGNORE
            position_ids[r, span] = torch.arange(n)
            real[r, span] = True
            start += n
    return Batch(input_ids, labels, position_ids, real.long(), rows, sum(lengths), packed)
