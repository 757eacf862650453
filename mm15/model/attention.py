"""Packed-sequence attention: each sample of a packed row attends to itself, at its own length's cost.

A packed row of samples with lengths ``n_1 .. n_k`` is usually computed with one dense ``L x L``
block-diagonal mask (``L = sum n_i``): correct, but attention then costs ``L^2`` instead of
``sum n_i^2``, several times more with four samples in a row, and on a CPU there is no varlen
FlashAttention to skip the masked blocks. ``packed_attention`` does what varlen kernels do: it cuts the
row at the sample boundaries and runs causal ``scaled_dot_product_attention`` on each sample alone.

It is registered with transformers' attention and mask interfaces under ``PACKED_ATTENTION`` and used by
the LLM whenever ``MM15Model.forward`` passes ``packed_position_ids`` (packed training batches); every
other call -- padded batches, generation with a KV cache -- goes to transformers' SDPA path unchanged.
No dense mask is built for packed rows then; ``block_causal_mask`` builds one for the dense path
(``MM15Model.packed_attention = False``), the reference the per-sample path is tested against.
The samples' spans come from the position ids, which restart at 0 for each packed sample
(``mm15.data.packing``). They travel as that tensor, not as a Python list, and the per-sample loop runs
outside ``torch.compile``'s graphs: a compiled decoder layer then sees only tensors of dynamic length and
does not recompile for every packing layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "mm15_packed"

Segments = list[list[tuple[int, int]]]


def packed_segments(position_ids: torch.Tensor) -> Segments:
    """Per row, the ``(start, end)`` spans of its samples: a new sample starts where the position is 0.

    Padding at the end of a row (position 0 everywhere) gives a run of one-token spans, merged into one
    span: padding outputs are never used, and causal attention keeps the run's first token (perhaps a
    real one-token sample) to itself. Only the row's final run is merged: one-token samples elsewhere
    in the row stay apart, each attending to itself alone.
    """
    rows: Segments = []
    length = position_ids.shape[1]
    for starts in (row.nonzero().flatten().tolist() for row in position_ids == 0):
        spans = list(zip(starts, [*starts[1:], length], strict=True))
        first_pad = len(spans)
        while first_pad > 0 and spans[first_pad - 1][1] - spans[first_pad - 1][0] == 1:
            first_pad -= 1
        if first_pad < len(spans) - 1:
            spans[first_pad:] = [(spans[first_pad][0], length)]
        rows.append(spans)
    return rows


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, L, L) boolean mask of packed rows from their position ids, which restart at 0 per sample.

    Query ``i`` may see keys ``i - position_ids[i] .. i``: back to its own sample's first token, never
    into the previous sample. Padding (position 0 after the last sample) sees only itself, so no softmax
    row is empty. Two comparisons over the (L, L) grid, a third of the work of comparing sample ids.
    """
    index = torch.arange(position_ids.shape[1], device=position_ids.device)
    first = index - position_ids  # the first key each query may see
    keys = index[None, None, :]
    return ((keys <= index[None, :, None]) & (keys >= first[:, :, None])).unsqueeze(1)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, L, D), ``key``/``value`` (B, Hkv, L, D).

    Returns (B, L, H, D) as transformers expects. Without ``packed_position_ids`` (B, L) this is
    transformers' SDPA path.
    """
    if packed_position_ids is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if packed_position_ids.shape != (query.shape[0], query.shape[2]):
        raise ValueError(
            f"packed_attention: position ids {tuple(packed_position_ids.shape)} for queries of batch "
            f"{query.shape[0]} and length {query.shape[2]}"
        )
    dropout_p = dropout if module.training else 0.0
    return _per_sample_attention(query, key, value, packed_position_ids, scaling, dropout_p), None


@torch.compiler.disable  # a graph break: the span list is data-dependent Python
def _per_sample_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    scaling: float | None,
    dropout_p: float,
) -> torch.Tensor:
    rows = []
    for row, spans in enumerate(packed_segments(position_ids)):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                is_causal=True,
                scale=scaling,
                dropout_p=dropout_p,
                enable_gqa=query.shape[1] != key.shape[1],
            )
            for start, end in spans
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def register_packed_attention() -> None:
    """Make ``PACKED_ATTENTION`` a transformers attention implementation (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_attention)
    # Masks for the unpacked calls (padding, generation) are SDPA's.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
