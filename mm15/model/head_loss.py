"""The LM head and the next-token cross-entropy in one pass over vocabulary blocks, logits never stored.

Training needs, for each supervised position, ``logsumexp(h W^T + b) - (h W^T + b)[target]``. Computed
the usual way that is an (N, V) logits matrix, its float32 copy, a log-softmax of the same size and, in
backward, a zero-filled (N, V) gradient and the softmax gradient: five fresh buffers of N x V floats
per micro-batch. With SmolLM2's 49,152-word vocabulary and a long transcription (the OCR stage: some
6,000 supervised tokens per micro-batch) each is over a gigabyte, and every one is page-faulted in
anew (docs/benchmarks.md, "LM head and loss").

``head_token_losses`` walks the vocabulary in column blocks instead, as fused "linear cross-entropy"
kernels do (Liger's, Apple's Cut Cross-Entropy), here in plain PyTorch:

* forward: each block's logits ``h W_b^T`` feed a running log-sum-exp (max and rescaled sum), the
  target logits are row-wise dot products with the targets' rows of ``W``, and only ``lse`` (N,) is kept;
* backward: each block's logits are recomputed, turned into ``softmax - onehot`` scaled by the incoming
  per-token gradient, and give ``grad_h += g W_b`` and the block's own rows ``grad_W[b] = g^T h``, so
  the weight gradient is written once, row block by row block, with no accumulation across blocks.

The recomputation adds one (N, D) x (D, V) product to the three the head costs anyway; the blocks
stay a few megabytes, reused from the heap. Up to ``DIRECT_ELEMENTS`` logits (32 MB in float32, a
micro-batch of a few hundred supervised tokens) the plain computation is faster, since PyTorch's fused
log-softmax makes fewer passes than the running log-sum-exp, and its buffers are small: it is used
there (``benchmarks/head_loss.py``). Matrix products run in the autocast dtype when autocast is
on (as ``nn.Linear`` would) and the softmax in float32 (as ``F.cross_entropy(logits.float())``).

Both paths hand autograd a weight gradient that is a fresh, contiguous tensor, which matters when the
head is tied to the token embedding (SmolLM2 and the tiny presets). The weight then gets two gradients
in one backward pass, the head's (first) and the embedding's, and autograd adds the second into the
first in place only when the first is a plain contiguous tensor it holds alone. The blocked path's
gradient is one; ``F.linear``'s, on the direct path, is the transpose of a product, so autograd
allocated a third (V, D) tensor for the sum: 25 MB and a pass over 75 MB per micro-batch for the tiny
recipe's table (SmolLM2's vocabulary at width 128). ``_LinearHead`` computes the same product with
``grad_W = g^T h`` written directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one (N, block) logits block: 2M float32 values, 8 MB, well under glibc's mmap threshold.
BLOCK_ELEMENTS = 1 << 21
MIN_BLOCK = 256  # columns; narrower blocks make the products too thin to run efficiently
DIRECT_ELEMENTS = 1 << 23  # up to this many logits, the plain head + cross-entropy (module docstring)


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in here: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the softmax and the accumulations run: float32, or float64 for float64 operands."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_columns(rows: int, vocab: int, block_elements: int) -> int:
    return min(vocab, max(MIN_BLOCK, block_elements // max(rows, 1)))


class _LinearHead(torch.autograd.Function):
    """``hidden @ weight.T + bias`` whose weight gradient is a fresh contiguous (V, D) product (module
    docstring: autograd can then add a tied embedding's gradient into it in place)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        logits = hidden @ weight.t()
        return logits if bias is None else logits + bias

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logits: Tensor
    ) -> tuple[Tensor | None, ...]:
        hidden, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        need_h, need_w, need_b = ctx.needs_input_grad
        grad_h = grad_logits @ weight if need_h else None
        grad_w = grad_logits.t() @ hidden if need_w else None
        grad_b = grad_logits.sum(dim=0) if need_b and ctx.has_bias else None  # type: ignore[attr-defined]
        return grad_h, grad_w, grad_b


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        dtype: torch.dtype,
        block: int,
    ) -> Tensor:
        vocab = weight.shape[0]
        h = hidden.to(dtype)
        acc = _softmax_dtype(dtype)
        running_max = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
        running_sum = torch.zeros(h.shape[0], dtype=acc, device=h.device)
        for start in range(0, vocab, block):
            logits = _block_logits(h, weight, bias, start, min(start + block, vocab), dtype)
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits - new_max[:, None]
            ).sum(dim=1)
            running_max = new_max
        # The target logits as the blocks gave them: the weight rows, the dot product and the bias sum
        # rounded to ``dtype``. (Unrounded weights put the target logit up to a bf16 step away from the
        # one the log-sum-exp saw, and a confident token's loss below zero.)
        rows = weight[targets].to(dtype).to(acc)
        target_logit = (h.to(acc) * rows).sum(dim=1).to(dtype)
        if bias is not None:
            target_logit += bias[targets].to(dtype)
        target_logit = target_logit.to(acc)
        lse = running_max + running_sum.log()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype, ctx.block = dtype, block
        return lse - target_logit

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_losses: Tensor
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        dtype, block = ctx.dtype, ctx.block  # type: ignore[attr-defined]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rows, vocab = hidden.shape[0], weight.shape[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            acc = _softmax_dtype(dtype)
            scale = grad_losses.to(acc)[:, None]
            grad_h = torch.zeros(rows, h.shape[1], dtype=acc, device=h.device) if need_h else None
            grad_w = torch.empty_like(weight) if need_w else None
            grad_b = torch.empty_like(bias) if need_b and bias is not None else None
            row_index = torch.arange(rows, device=h.device)
            for start in range(0, vocab, block):
                end = min(start + block, vocab)
                probs = torch.exp(_block_logits(h, weight, bias, start, end, dtype) - lse[:, None])
                inside = (targets >= start) & (targets < end)
                probs[row_index[inside], targets[inside] - start] -= 1.0  # softmax - onehot
                probs.mul_(scale)
                g = probs.to(dtype)
                if grad_h is not None:
                    w = weight[start:end].to(dtype)
                    if dtype == acc:
                        grad_h.addmm_(g, w)
                    else:
                        grad_h += (g @ w).to(acc)
                if grad_w is not None:
                    if dtype == grad_w.dtype:
                        torch.mm(g.t(), h, out=grad_w[start:end])  # this block's rows, written once
                    else:
                        grad_w[start:end] = g.t() @ h
                if grad_b is not None:
                    grad_b[start:end] = probs.sum(dim=0)
        grad_hidden = grad_h.to(hidden.dtype) if grad_h is not None else None
        return grad_hidden, grad_w, grad_b, None, None, None


def _block_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, start: int, end: int, dtype: torch.dtype
) -> Tensor:
    """(N, end - start) logits of vocabulary rows ``start:end``: the product and the bias added in
    ``dtype``, as ``F.linear`` gives them (the direct path), the result in float32 (float64 for float64
    operands)."""
    logits = h @ weight[start:end].to(dtype).t()
    if bias is not None:
        logits += bias[start:end].to(dtype)
    return logits.to(_softmax_dtype(dtype))


def head_token_losses(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    direct_elements: int = DIRECT_ELEMENTS,
) -> Tensor:
    """Per-position cross-entropy (float32, (N,)) of the logits ``hidden @ weight.T + bias`` against
    ``targets``, equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,
    reduction="none")`` up to rounding, without materialising the (N, V) logits (module docstring).

    ``hidden`` (N, D) are the positions to score, ``weight`` (V, D) the LM head, ``targets`` (N,) ids in
    [0, V). Differentiable in ``hidden``, ``weight`` and ``bias``. ``block_elements`` sizes the blocks;
    up to ``direct_elements`` logits in all the plain computation runs instead.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"head_token_losses: hidden must be (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"head_token_losses: targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"head_token_losses: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    vocab = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"head_token_losses: target ids must be in [0, {vocab}), got "
            f"{int(targets.min())}..{int(targets.max())}"
        )
    dtype = _compute_dtype(hidden.device, weight.dtype)
    block = _block_columns(hidden.shape[0], vocab, block_elements)
    # The products inside run in ``dtype`` by explicit casts, so autocast must not recast them again.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if hidden.shape[0] * vocab <= direct_elements:
            logits = _LinearHead.apply(
                hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
            )
            return F.cross_entropy(logits.to(_softmax_dtype(dtype)), targets.long(), reduction="none")
        return _HeadCrossEntropy.apply(hidden, weight, bias, targets.long(), dtype, block)
