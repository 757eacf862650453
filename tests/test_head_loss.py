"""The fused LM head + cross-entropy (mm15.model.head_loss) against the unfused reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm15.model.head_loss import head_token_losses

VOCAB, WIDTH, ROWS = 1001, 24, 37  # 1001 columns in blocks of 256: four blocks, the last one short


def operands(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, WIDTH, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=gen, dtype=dtype) * 0.3).requires_grad_()
    b = (torch.randn(VOCAB, generator=gen, dtype=dtype) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    targets[:3] = torch.tensor([0, 255, VOCAB - 1])  # block edges and the last id
    grad = torch.rand(ROWS, generator=gen, dtype=dtype)  # per-token weights, as the trainer applies
    return hidden, weight, b, targets, grad


def losses_and_grads(fn, hidden, weight, bias, targets, grad):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    losses = fn(hidden, weight, bias, targets)
    (losses * grad).sum().backward()
    return losses.detach(), [t.grad.clone() for t in (hidden, weight, bias) if t is not None]


def reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


def fused(hidden, weight, bias, targets, direct: bool = False):
    return head_token_losses(
        hidden, weight, targets, bias, block_elements=ROWS * 10, direct_elements=ROWS * VOCAB if direct else 0
    )


@pytest.mark.parametrize("direct", [False, True], ids=["blocks", "direct"])
@pytest.mark.parametrize("bias", [True, False])
def test_losses_and_gradients_equal_the_unfused_head_and_cross_entropy(bias: bool, direct: bool) -> None:
    args = operands(bias=bias)
    expected, expected_grads = losses_and_grads(reference, *args)
    got, got_grads = losses_and_grads(lambda *a: fused(*a, direct=direct), *args)
    assert got.dtype == torch.float32 and got.shape == (ROWS,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_float64_across_blocks() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(600, 4, generator=gen, dtype=torch.float64, requires_grad=True)  # 3 blocks
    bias = torch.randn(600, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 255, 256, 511, 599])
    assert torch.autograd.gradcheck(
        lambda h, w, b: head_token_losses(h, w, targets, b, block_elements=50, direct_elements=0),
        (hidden, weight, bias),
    )


def test_under_bf16_autocast_it_matches_the_autocast_reference() -> None:
    args = operands(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = losses_and_grads(reference, *args)
        got, got_grads = losses_and_grads(fused, *args)
    # Both round the logits to bf16; the softmax runs in float32 in both.
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("bias", [False, True])
def test_under_bf16_the_blocks_equal_the_direct_path_and_no_loss_is_negative(bias: bool) -> None:
    # Confident predictions (target logits near 100, where one bf16 step is 0.5): the target logit must
    # be the one the log-sum-exp saw, or the loss drifts by a bf16 step and goes below zero.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, WIDTH, generator=gen) * 0.3
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    hidden = weight[targets] * 40 + 0.01 * torch.randn(ROWS, WIDTH, generator=gen)
    b = torch.randn(VOCAB, generator=gen) * 0.1 if bias else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blocks = head_token_losses(hidden, weight, targets, b, block_elements=ROWS * 10, direct_elements=0)
        direct = head_token_losses(hidden, weight, targets, b, direct_elements=ROWS * VOCAB)
    assert direct.min() >= 0 and blocks.min() >= 0
    torch.testing.assert_close(blocks, direct, rtol=0, atol=1e-4)


def test_no_positions_give_no_losses_and_zero_gradients() -> None:
    hidden, weight, bias, _, _ = operands()
    # Zero logits are always at most direct_elements: the plain path runs, as for any small batch.
    losses = head_token_losses(hidden[:0], weight, torch.zeros(0, dtype=torch.long), bias)
    assert losses.shape == (0,)
    losses.sum().backward()
    assert torch.count_nonzero(weight.grad) == 0 and torch.count_nonzero(bias.grad) == 0


def test_bad_operands_are_named() -> None:
    hidden, weight, bias, targets, _ = operands()
    with pytest.raises(ValueError, match="hidden must be"):
        head_token_losses(hidden[:, :5], weight, targets)
    with pytest.raises(ValueError, match="targets must be"):
        head_token_losses(hidden, weight, targets[:4])
    with pytest.raises(ValueError, match="bias must be"):
        head_token_losses(hidden, weight, targets, bias[:7])
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 1001\)"):
        head_token_losses(hidden, weight, torch.full((ROWS,), VOCAB))
    with pytest.raises(ValueError, match="target ids"):
        head_token_losses(hidden, weight, torch.full((ROWS,), -100))  # an unfiltered ignore index


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("direct", [False, True], ids=["blocks", "direct"])
def test_a_tied_embedding_gradient_is_added_in_place(direct: bool, bf16: bool) -> None:
    """With the head tied to the token embedding, autograd must add the embedding's gradient into the
    head's in place (``aten::add_``), not allocate a third (V, D) tensor for the sum (``aten::add``)."""
    hidden_layer = torch.nn.Linear(WIDTH, WIDTH)
    table = torch.nn.Parameter(torch.randn(VOCAB, WIDTH) * 0.3)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(3))
    targets = tokens.roll(-1)

    def loss() -> torch.Tensor:
        hidden = hidden_layer(F.embedding(tokens, table))
        return fused(hidden, table, None, targets, direct=direct).mean()

    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = loss()
        value.backward()
    table_sized = [
        event.name
        for event in prof.events()
        if event.name in ("aten::add", "aten::add_") and [VOCAB, WIDTH] in event.input_shapes[:1]
    ]
    assert table_sized == ["aten::add_"]
    if bf16:
        return  # bf16 products round differently from the float32 reference below
    # The sum is right: the same gradient as with two separate tables, added up.
    summed = table.grad.clone()
    table.grad = None
    head_table = torch.nn.Parameter(table.detach().clone())
    hidden = hidden_layer(F.embedding(tokens, table))
    reference(hidden, head_table, None, targets).mean().backward()
    torch.testing.assert_close(summed, table.grad + head_table.grad, rtol=1e-5, atol=1e-6)


def test_int32_targets_give_the_same_losses_on_both_paths() -> None:
    """The blocked path cast targets to int64 and the direct one did not: int32 labels crashed there."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (6,), dtype=torch.int32)
    direct = head_token_losses(hidden, weight, targets)
    blocked = head_token_losses(hidden, weight, targets, direct_elements=0, block_elements=40)
    expected = F.cross_entropy(hidden @ weight.T, targets.long(), reduction="none")
    torch.testing.assert_close(direct, expected)
    torch.testing.assert_close(blocked, expected)
