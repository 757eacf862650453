"""Tests of mm15.model.moe: the sparse MoE FFN, its aux losses and sparse upcycling of a Llama-style LLM.

All models are tiny random Llamas (hidden 64, 4 layers, vocab 128) with 4 experts, so the module runs
in a few seconds on a CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from mm15.model.moe import (  # noqa: E402
    MoEConfig,
    SparseMoE,
    moe_aux_loss,
    moe_layer_indices,
    moe_layers,
    moe_param_counts,
    moe_token_mask,
    upcycle_llm,
)

VOCAB = 128


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    kw: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "attn_implementation": "eager",
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def small_cfg(**kw: object) -> MoEConfig:
    base: dict[str, object] = {"num_experts": 4, "top_k": 2, "every": 2}
    base.update(kw)
    return MoEConfig(**base)


def upcycled(dense: LlamaForCausalLM, **kw: object) -> LlamaForCausalLM:
    return upcycle_llm(copy.deepcopy(dense), small_cfg(**kw))


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("every", [1, 2])
def test_upcycled_model_equals_dense(dense: LlamaForCausalLM, every: int) -> None:
    # Every expert is the dense MLP and the renormalised top-k gates sum to 1, so each MoE layer computes
    # sum_k g_k * mlp(x) = mlp(x). The only differences are float32 rounding: the gate sum is 1 to
    # ~1 ulp, and the experts run matmuls on gathered row subsets, which may sum in a different
    # order. That is ~1e-7 relative per layer; the tolerance leaves room for a few layers of it.
    moe = upcycled(dense, every=every)
    x = ids(2, 12)
    with torch.no_grad():
        ref = dense(x).logits
        got = moe(x).logits
    assert len(list(moe_layers(moe))) == len(moe_layer_indices(4, every))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_upcycle_smollm2_shapes() -> None:
    # SmolLM2-135M's block geometry (hidden 576, intermediate 1536, 9 heads, 3 KV heads), with only 2
    # layers, a tiny vocab and 4 experts so that it fits a unit test.
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    dense_mlp = model.model.layers[1].mlp
    x = torch.randn(1, 3, 576)
    with torch.no_grad():
        ref = dense_mlp(x)
    upcycle_llm(model, MoEConfig(num_experts=4, top_k=2, every=2))
    moe = model.model.layers[1].mlp
    assert isinstance(moe, SparseMoE)
    assert isinstance(model.model.layers[0].mlp, LlamaMLP)
    assert moe.gate_proj.shape == (4, 1536, 576)
    assert moe.up_proj.shape == (4, 1536, 576)
    assert moe.down_proj.shape == (4, 576, 1536)
    assert moe.router.weight.shape == (4, 576)
    for e in range(4):
        assert torch.equal(moe.gate_proj[e], dense_mlp.gate_proj.weight)
        assert torch.equal(moe.down_proj[e], dense_mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-4)


def test_router_init_is_seeded_and_per_layer(dense: LlamaForCausalLM) -> None:
    a, b = upcycled(dense), upcycled(dense)
    ra = [m.router.weight for m in moe_layers(a)]
    rb = [m.router.weight for m in moe_layers(b)]
    assert all(torch.equal(x, y) for x, y in zip(ra, rb, strict=True))
    assert not torch.equal(ra[0], ra[1])  # layers 1 and 3 get different seeds
    assert ra[0].std().item() == pytest.approx(0.02, rel=0.3)
    c = upcycled(dense, seed=5)
    assert not torch.equal(next(moe_layers(c)).router.weight, ra[0])


def test_scratch_init_experts_differ(dense: LlamaForCausalLM) -> None:
    moe = next(moe_layers(upcycled(dense, upcycle=False)))
    assert not torch.equal(moe.gate_proj[0], moe.gate_proj[1])
    assert not torch.equal(moe.gate_proj[0], dense.model.layers[1].mlp.gate_proj.weight)


# ----------------------------------------------------------------------------------- layer choice


@pytest.mark.parametrize(("every", "expected"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (4, [3])])
def test_right_layers_replaced(dense: LlamaForCausalLM, every: int, expected: list[int]) -> None:
    assert moe_layer_indices(4, every) == expected
    model = upcycled(dense, every=every)
    got = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoE)]
    assert got == expected
    for i, layer in enumerate(model.model.layers):
        if i not in expected:
            assert isinstance(layer.mlp, LlamaMLP)


def test_every_beyond_the_layer_count_is_an_error(dense: LlamaForCausalLM) -> None:
    # every=5 on 4 layers upcycled nothing: a dense model that was still saved and reported as MoE.
    assert moe_layer_indices(4, 5) == []
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match=r"MoEConfig\.every \(5\) exceeds the LLM's 4 layers"):
        upcycle_llm(model, small_cfg(every=5))
    assert not any(isinstance(layer.mlp, SparseMoE) for layer in model.model.layers)


def test_upcycle_twice_raises(dense: LlamaForCausalLM) -> None:
    model = upcycled(dense)
    with pytest.raises(ValueError, match="already"):
        upcycle_llm(model, small_cfg())


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"every": 0}, "every"),
        ({"load_balance_coef": -0.1}, "load_balance_coef"),
        ({"router_z_coef": -1e-3}, "router_z_coef"),
        ({"router_z_coef": float("nan")}, "router_z_coef"),
        ({"router_jitter": 1.0}, "router_jitter"),
        ({"router_jitter": -0.1}, "router_jitter"),
        ({"router_init_std": 0.0}, "router_init_std"),
        # Types: every=1.5 put MoE on layers 2 and 5 of 6; float counts failed inside torch.
        ({"every": 1.5}, "every must be an integer"),
        ({"num_experts": 4.0}, "num_experts must be an integer"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"load_balance_coef": "0.01"}, "load_balance_coef must be a finite number"),
        ({"upcycle": "yes"}, "upcycle and renormalize must be true or false"),
    ],
)
def test_config_validation(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kw)


def test_config_defaults_are_mm15() -> None:
    c = MoEConfig()
    assert (c.num_experts, c.top_k, c.every) == (64, 2, 2)
    assert (c.load_balance_coef, c.router_z_coef) == (0.01, 0.001)
    assert c.upcycle and c.renormalize and c.router_jitter == 0.0


# ------------------------------------------------------------------------------------ correctness


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Slow dense reference: every expert on every token, combined with a dense (N, E) gate matrix."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = (tokens @ moe.router.weight.T).softmax(-1)
    top_p, top_i = probs.topk(moe.top_k, dim=-1)
    if moe.cfg.renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_p)
    out = torch.zeros_like(tokens)
    for e in range(moe.num_experts):
        h = F.silu(tokens @ moe.gate_proj[e].T) * (tokens @ moe.up_proj[e].T)
        out = out + gates[:, e : e + 1] * (h @ moe.down_proj[e].T)
    return out.reshape(x.shape)


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_equals_naive_reference(renormalize: bool) -> None:
    cfg = MoEConfig(num_experts=8, top_k=3, renormalize=renormalize, router_init_std=0.5, seed=3)
    moe = SparseMoE(16, 24, cfg)
    moe.reset_parameters(expert_std=0.3)  # larger weights than the default init, for non-trivial outputs
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    got = moe(x)
    assert got.shape == x.shape
    assert int(moe.last_expert_counts.sum()) == 3 * 7 * 3
    ref = naive_moe(moe, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # The gradients agree too: input, experts and router.
    w = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad((got * w).sum(), [x, moe.gate_proj, moe.router.weight])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, moe.gate_proj, moe.router.weight])
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_expert_and_router(dense: LlamaForCausalLM) -> None:
    model = upcycled(dense).train()
    # Break the symmetry of the copies. With identical experts the renormalised output does not depend
    # on the gates, so the router would get gradient from the aux losses only.
    with torch.no_grad():
        for m in moe_layers(model):
            for p in (m.gate_proj, m.up_proj, m.down_proj):
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    x = ids(4, 16)  # 64 tokens * 2 assignments over 4 experts
    out = model(x, labels=x)
    out.loss.backward()
    for m in moe_layers(model):
        assert m.last_expert_counts is not None
        assert bool((m.last_expert_counts > 0).all()), m.last_expert_counts  # every expert got tokens
        for p in (m.gate_proj, m.up_proj, m.down_proj):
            assert p.grad is not None
            assert bool((p.grad.flatten(1).abs().sum(1) > 0).all())  # per expert
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0

    # The aux losses alone reach every router. A layer's aux does not depend on its own experts, so the
    # last MoE layer's experts get none (earlier ones do, through the later layers' router inputs).
    model.zero_grad(set_to_none=True)
    model(x)
    moe_aux_loss(model)["total"].backward()
    layers = list(moe_layers(model))
    for m in layers:
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    assert layers[-1].gate_proj.grad is None


def test_unused_expert_gets_no_gradient() -> None:
    # Forced routing: the router only looks at feature 0, which is positive for every token, so
    # experts 0 and 1 always win and expert 2 never runs.
    moe = SparseMoE(4, 8, MoEConfig(num_experts=3, top_k=2))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 0], moe.router.weight[2, 0] = 2.0, 1.0, -1.0
    x = torch.randn(10, 4)
    x[:, 0] = x[:, 0].abs() + 0.1
    moe(x).sum().backward()
    assert moe.last_expert_counts.tolist() == [10, 10, 0]
    g = moe.gate_proj.grad.flatten(1).abs().sum(1)
    assert g[0] > 0 and g[1] > 0 and g[2] == 0


# ----------------------------------------------------------------------------------------- aux loss


def hand_aux(weight: list[list[float]], xs: list[list[float]], k: int) -> tuple[float, float]:
    """Load-balance and z-loss by hand, in plain Python floats."""
    e = len(weight)
    counts = [0.0] * e
    psum = [0.0] * e
    zsum = 0.0
    for x in xs:
        logits = [sum(w_i * x_i for w_i, x_i in zip(w, x, strict=True)) for w in weight]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        probs = [math.exp(v - lse) for v in logits]
        for j in sorted(range(e), key=lambda j: -probs[j])[:k]:
            counts[j] += 1
        for j in range(e):
            psum[j] += probs[j]
        zsum += lse**2
    n = len(xs)
    f = [c / n for c in counts]  # the fraction of tokens that chose expert j: these sum to k (ST-MoE)
    p = [s / n for s in psum]
    return e * sum(fi * pi for fi, pi in zip(f, p, strict=True)), zsum / n


ROUTER_W = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
# Logits (x0, x1, -x0-x1): no ties inside the top-2 boundary for any token.
TOKENS = [[1.0, 0.0], [0.0, 2.0], [1.5, 0.5], [-1.0, 0.25], [0.3, -2.0]]


def toy_moe(lb: float = 0.01, rz: float = 0.001) -> SparseMoE:
    moe = SparseMoE(2, 3, MoEConfig(num_experts=3, top_k=2, load_balance_coef=lb, router_z_coef=rz))
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor(ROUTER_W))
    return moe.eval()


def test_aux_losses_match_hand_computation() -> None:
    moe = toy_moe(lb=0.01, rz=0.001)
    moe(torch.tensor(TOKENS).unsqueeze(0))  # (1, 5, 2): leading dims are flattened
    lb, z = hand_aux(ROUTER_W, TOKENS, k=2)
    aux = moe.last_aux
    assert aux["load_balance"].item() == pytest.approx(lb, rel=1e-5)
    assert aux["router_z"].item() == pytest.approx(z, rel=1e-5)
    assert aux["load_balance_weighted"].item() == pytest.approx(0.01 * lb, rel=1e-5)
    assert aux["router_z_weighted"].item() == pytest.approx(0.001 * z, rel=1e-5)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in aux.values())


def test_load_balance_equals_mixtrals_reference() -> None:
    """The same number as transformers' Mixtral load_balancing_loss_func on the same router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    moe = SparseMoE(8, 16, MoEConfig(num_experts=6, top_k=2, router_init_std=1.0)).eval()
    x = torch.randn(1, 40, 8)
    moe(x)
    reference = load_balancing_loss_func((moe.router(x.reshape(-1, 8)),), 6, 2)
    assert moe.last_aux["load_balance"].item() == pytest.approx(reference.item(), rel=1e-6)


def test_load_balance_is_k_when_uniform() -> None:
    """ST-MoE's and Mixtral's form (MM1's 0.01 was set for it); it was divided by k, halving the loss."""
    moe = toy_moe()
    with torch.no_grad():
        moe.router.weight.zero_()  # all probabilities 1/E; f sums to k = 2, so E * sum f_e / E = 2
    moe(torch.randn(6, 2))
    assert moe.last_aux["load_balance"].item() == pytest.approx(2.0, rel=1e-6)
    assert moe.last_aux["router_z"].item() == pytest.approx(math.log(3) ** 2, rel=1e-6)


def test_masked_tokens_excluded_from_aux() -> None:
    moe = toy_moe()
    x = torch.tensor([[*TOKENS[:3], [9.0, -4.0]], [*TOKENS[3:], [5.0, 5.0], [-7.0, 1.0]]])  # (2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out_masked = moe(x, mask=mask)
    lb, z = hand_aux(ROUTER_W, TOKENS, k=2)  # only the 5 unmasked tokens
    assert moe.last_aux["load_balance"].item() == pytest.approx(lb, rel=1e-5)
    assert moe.last_aux["router_z"].item() == pytest.approx(z, rel=1e-5)
    assert int(moe.last_expert_counts.sum()) == 5 * 2
    # The output is still computed for every token; only the statistics ignore padding.
    torch.testing.assert_close(out_masked, moe(x))
    # Without the mask the padding tokens change the statistics.
    assert moe.last_aux["router_z"].item() != pytest.approx(z, rel=1e-3)
    # The context-manager form gives the same as the argument.
    with moe_token_mask(moe, mask):
        moe(x)
    assert moe.last_aux["router_z"].item() == pytest.approx(z, rel=1e-5)
    assert moe.token_mask is None
    # All-padding: zero losses, not NaN.
    moe(x, mask=torch.zeros(2, 4))
    assert moe.last_aux["load_balance"].item() == 0.0 and moe.last_aux["router_z"].item() == 0.0
    with pytest.raises(ValueError, match="mask shape"):
        moe(x, mask=torch.ones(2, 3))


def test_llm_attention_mask_excludes_padding_from_aux(dense: LlamaForCausalLM) -> None:
    # Right padding: with causal attention the real tokens' hidden states do not depend on the pad
    # tokens, so with the mask the aux losses must not change when the pad ids change.
    model = upcycled(dense)
    a = ids(2, 10, seed=3)
    b = a.clone()
    b[1, 6:] = (b[1, 6:] + 17) % VOCAB  # different pad content
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0

    def aux(x: torch.Tensor, mask: torch.Tensor | None) -> list[float]:
        with torch.no_grad():
            model(input_ids=x, attention_mask=mask)
        return [v.item() for m in moe_layers(model) for v in m.last_aux.values()]

    assert aux(a, am) == pytest.approx(aux(b, am), rel=1e-5)
    assert all(int(m.last_expert_counts.sum()) == 16 * 2 for m in moe_layers(model))
    assert aux(a, None) != pytest.approx(aux(b, None), rel=1e-5)  # without a mask the pads count
    assert all(int(m.last_expert_counts.sum()) == 20 * 2 for m in moe_layers(model))


def test_moe_aux_loss_sums_layers(dense: LlamaForCausalLM) -> None:
    model = upcycled(dense, every=1)
    with pytest.raises(RuntimeError, match="before a forward"):
        moe_aux_loss(model)
    model(ids(2, 8))
    aux = moe_aux_loss(model)
    layers = list(moe_layers(model))
    assert len(layers) == 4
    lb = sum(m.last_aux["load_balance_weighted"] for m in layers)
    rz = sum(m.last_aux["router_z_weighted"] for m in layers)
    torch.testing.assert_close(aux["load_balance"], lb)
    torch.testing.assert_close(aux["router_z"], rz)
    torch.testing.assert_close(aux["total"], lb + rz)
    assert aux["total"].requires_grad
    assert moe_aux_loss(dense)["total"].item() == 0.0


def test_param_counts(dense: LlamaForCausalLM) -> None:
    base = sum(p.numel() for p in dense.parameters())
    model = upcycled(dense, num_experts=4, top_k=2, every=2)
    counts = moe_param_counts(model)
    expert = 3 * 64 * 128
    router = 4 * 64
    # Two MoE layers; each replaces one dense MLP (= one expert) by 4 experts plus a router.
    assert counts["total"] == base + 2 * (3 * expert + router)
    assert counts["active"] == base + 2 * (1 * expert + router)
    assert counts["expert"] == 2 * 4 * expert
    assert counts["moe_layers"] == 2
    assert moe_param_counts(dense) == {"total": base, "active": base, "expert": 0, "moe_layers": 0}


# ------------------------------------------------------------------------------------ mixed precision


def test_bf16_autocast_forward(dense: LlamaForCausalLM) -> None:
    model = upcycled(dense).train()
    x = ids(2, 8)
    with torch.no_grad():
        ref = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
        aux = moe_aux_loss(model)
    assert torch.isfinite(out.logits).all()
    # The router runs in float32 even under autocast.
    assert all(v.dtype == torch.float32 for m in moe_layers(model) for v in m.last_aux.values())
    torch.testing.assert_close(out.logits.float(), ref, atol=0.1, rtol=0.05)  # bf16 has ~3 digits
    (out.loss + aux["total"]).backward()
    assert all(torch.isfinite(m.router.weight.grad).all() for m in moe_layers(model))


def test_router_jitter_only_in_training() -> None:
    moe = SparseMoE(8, 16, MoEConfig(num_experts=4, router_jitter=0.5))
    x = torch.randn(20, 8)
    moe.eval()
    l1 = moe.route(x)[0]
    torch.testing.assert_close(moe.route(x)[0], l1)
    moe.train()
    assert not torch.allclose(moe.route(x)[0], l1)


def test_building_moe_layers_leaves_the_global_rng_alone(dense: LlamaForCausalLM) -> None:
    """The router's nn.Linear drew its default init from the global RNG before reset_parameters
    replaced it: a dense and an MoE build from one seed got different connector weights."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    SparseMoE(16, 32, small_cfg())
    upcycle_llm(copy.deepcopy(dense), small_cfg())
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert SparseMoE(16, 32, small_cfg()).router.weight.device.type == "cpu"
