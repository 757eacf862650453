"""mm15's attention functions: per-sample attention for packed rows, short tiles in bf16 on the CPU.

**Packed rows.** Each sample of a packed row attends to itself, at its own length's cost.

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
(``mm15.data.packing``), and the batch's attention mask, which says where a row's padding begins (so
one-token samples at a row's end are not taken for padding). They travel as those tensors, not as a
Python list, and the per-sample loop runs
outside ``torch.compile``'s graphs: a compiled decoder layer then sees only tensors of dynamic length and
does not recompile for every packing layout.

**Vision encoders: short tiles in bf16 on the CPU.** torch's CPU flash-attention kernel, which SDPA
picks for bf16, is slow on short sequences: its forward and backward took 9-14 ms for the tiny
encoder's 160 heads of 65 tokens and for a ViT-B/16's 30 heads of 197 tokens, where the scores and
softmax in float32 and the second product in bf16 take 4.8-5.6 ms (an AMD EPYC with AVX512-BF16,
2026-12-07; SDPA's own math backend, which upcasts everything to float32, was no faster; in float32 the
flash kernel is as fast as the products). ``encoder_attention``, the vision encoder's attention
implementation (``ENCODER_ATTENTION``), computes such calls with ``short_attention``: up to
``SHORT_ATTENTION_MAX_LEN`` keys (2.1-2.5x faster at 65 tokens, 0.9-1.7x at 197-385:
``benchmarks/attention.py``) and while the scores, which it materialises and flash attention does not,
stay under ``SHORT_ATTENTION_MAX_SCORES`` values.
It is as accurate as SDPA in bf16 (tested against float64 with scores up to 170: rounding the scores
to bf16, as transformers' eager attention does, was 30x less accurate). Longer tiles (a ViT-H/14 at 378
px has 729 patches), float32, dropout and masks keep SDPA. The decoder keeps SDPA: its causal kernel
skips the masked half, and explicit products were slower on the tiny decoder's causal spans of 256-512
tokens. The choice depends only on shapes and dtypes, so runs stay deterministic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "mm15_packed"
ENCODER_ATTENTION = "mm15_encoder"

# Up to this many keys, the encoder's bf16 attention on the CPU runs as matrix products (module docstring).
SHORT_ATTENTION_MAX_LEN = 384
# ... and only while batch x heads x queries x keys stays under this (float32 scores of 256 MB).
SHORT_ATTENTION_MAX_SCORES = 1 << 26

Segments = list[list[tuple[int, int]]]


def packed_segments(position_ids: torch.Tensor, real: torch.Tensor | None = None) -> Segments:
    """Per row, the ``(start, end)`` spans of its samples: a new sample starts where the position is 0.

    ``real`` (rows, L), 1 on a sample's tokens and 0 on padding (the batch's attention mask), says where
    a row's padding begins: the padding is one span (its outputs are never used), and every sample
    before it, one-token samples included, is a span of its own. Without ``real`` the padding is
    guessed: the row's final run of one-token spans is merged into one (a real one-token sample at
    the start of that run keeps to itself, those after it would see it), so callers that have the
    mask pass it. Each row must start a sample at its first token.
    """
    if position_ids.shape[1] and bool((position_ids[:, 0] != 0).any()):
        raise ValueError("packed rows must start a sample (position 0) at their first token")
    rows: Segments = []
    length = position_ids.shape[1]
    ends = [length] * position_ids.shape[0] if real is None else real.sum(dim=1).tolist()
    for row, starts in enumerate(row.nonzero().flatten().tolist() for row in position_ids == 0):
        end = int(ends[row])
        starts = [s for s in starts if s < end]
        spans = list(zip(starts, [*starts[1:], end], strict=True))
        if real is None:
            first_pad = len(spans)
            while first_pad > 0 and spans[first_pad - 1][1] - spans[first_pad - 1][0] == 1:
                first_pad -= 1
            if first_pad < len(spans) - 1:
                spans[first_pad:] = [(spans[first_pad][0], length)]
        elif end < length:
            spans.append((end, length))
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
    packed_token_mask: torch.Tensor | None = None,
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
    return (
        _per_sample_attention(query, key, value, packed_position_ids, packed_token_mask, scaling, dropout_p),
        None,
    )


@torch.compiler.disable  # a graph break: the span list is data-dependent Python
def _per_sample_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    token_mask: torch.Tensor | None,
    scaling: float | None,
    dropout_p: float,
) -> torch.Tensor:
    rows = []
    for row, spans in enumerate(packed_segments(position_ids, token_mask)):
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


def takes_short_attention(query: torch.Tensor, key: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether ``encoder_attention`` computes this call with ``short_attention`` (module docstring).

    The dtype that counts is the one SDPA would compute in: autocast's where it is on.
    """
    on_cpu = query.device.type == "cpu"
    dtype = torch.get_autocast_dtype("cpu") if on_cpu and torch.is_autocast_enabled("cpu") else query.dtype
    return (
        on_cpu
        and dtype == torch.bfloat16
        and dropout_p == 0.0
        and key.shape[-2] <= SHORT_ATTENTION_MAX_LEN
        and query.shape[0] * query.shape[1] * query.shape[-2] * key.shape[-2] <= SHORT_ATTENTION_MAX_SCORES
    )


def short_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Unmasked attention, scores and softmax in float32: (B, H, L, D) -> (B, H, L, D).

    The function of ``F.scaled_dot_product_attention(query, key, value, scale=scale)``, with as many
    key and value heads as query heads.
    """
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"short_attention: {query.shape[1]} query heads for {key.shape[1]} key heads")
    # The scores in float32 at least, as SDPA's kernels keep them: rounded to bf16, a score of 170 (large
    # trained ViTs reach such values) would be off by up to 0.5 before the softmax. Scaling the queries is
    # a pass over L x D values instead of L x L scores.
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    exact = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.to(exact) * scale, key.to(exact).transpose(-1, -2))
        probs = torch.softmax(scores, dim=-1)
    # The second product in the values' dtype (bf16 under autocast), as SDPA's bf16 kernel computes it.
    return torch.matmul(probs.to(value.dtype), value)


def encoder_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The vision encoder's attention (transformers' signature): ``short_attention`` where it is faster.

    A vision tower attends over a whole tile, so transformers passes no mask; a call with a mask, a
    causal module, or one ``takes_short_attention`` refuses goes to transformers' SDPA path unchanged.
    Returns (B, L, H, D) as transformers expects.
    """
    plain = attention_mask is None and not getattr(module, "is_causal", False)
    if plain and takes_short_attention(query, key, dropout):
        return short_attention(query, key, value, scaling).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def register_attention() -> None:
    """Make ``PACKED_ATTENTION`` and ``ENCODER_ATTENTION`` transformers attention implementations.

    Idempotent. Masks for the calls that take SDPA's path (padding, generation) are SDPA's.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, function in ((PACKED_ATTENTION, packed_attention), (ENCODER_ATTENTION, encoder_attention)):
        ALL_ATTENTION_FUNCTIONS.register(name, function)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
