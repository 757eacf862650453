"""Sparse mixture-of-experts FFN layers for the MM1.5-MoE variants, and sparse upcycling of a dense LLM.

MM1.5-1B-MoE / 3B-MoE (mm15-spec.md section 1.5) use 64 experts with top-2 gating and replace the dense
FFN every 2 decoder layers. The load-balancing loss has coefficient 0.01 and the router z-loss 0.001.
The paper does not say how the experts are initialised, what the capacity factor is, or which layers
of a pair are sparse. The project defaults for these are:

* **Layer selection.** With ``every = k``, the FFN of decoder layer ``i`` becomes sparse iff
  ``i % k == k - 1``. So ``every=2`` gives layers 1, 3, 5, ... and ``every=1`` gives all layers. This
  is the fairseq / NLLB-MoE / Switch convention ("the last layer of every group of k"). Layer 0 stays
  dense, so the first block always sees a dense FFN. An ``every`` larger than the layer count is an
  error (``upcycle_llm`` raises): no layer would be sparse.
* **Gates.** The router takes a softmax over all E experts in float32 and keeps the top-k
  probabilities. These are then **renormalised to sum to 1** (GShard top-2 / Mixtral style). Because
  of that, a freshly upcycled layer, whose experts are all copies of the dense MLP, computes exactly the
  dense function. Set ``renormalize=False`` to keep the raw top-k probabilities (Switch style). With
  ``top_k=1`` you want that, because a renormalised single gate is always 1 and the router then gets
  gradient only from the auxiliary losses.
* **Capacity.** Routing is dropless: every token is processed by all of its k experts and there is
  no capacity factor. That is exact and simple on one device. Capacity limits belong to an
  expert-parallel implementation.
* **Initialisation.** By default we use sparse upcycling (Komatsuzaki et al. 2022): every expert
  starts as an exact copy of the dense MLP, and the router starts small, random and seeded.
  ``upcycle=False`` initialises the experts randomly instead (an MoE trained from scratch).

Experts are stored as stacked weight tensors of shape (E, out, in), in the same layout as
``nn.Linear.weight``. The computation is grouped by expert: the (token, expert) assignments are sorted
by expert, each expert runs its matmuls on its contiguous slice, and the results are scatter-added back
weighted by the gates. The only Python loop is over the E experts.

Auxiliary losses are recorded on every forward pass in ``SparseMoE.last_aux``.
``moe_aux_loss(model)`` sums them over the layers, to be added to the LM loss. Padding tokens are
excluded from their statistics through a token mask: either an explicit argument, or, inside an
upcycled LLM, taken automatically from the 2-D ``attention_mask`` passed to the model (see
``upcycle_llm``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from mm15.checks import is_int, is_number

__all__ = [
    "PADDING_MASK_KWARG",
    "MoEConfig",
    "SparseMoE",
    "moe_aux_loss",
    "moe_layer_indices",
    "moe_layers",
    "moe_param_counts",
    "moe_token_mask",
    "set_moe_token_mask",
    "upcycle_llm",
]


@dataclass(frozen=True)
class MoEConfig:
    """Settings of the sparse FFN layers. The defaults are MM1.5-MoE's (mm15-spec.md section 1.5).

    ``every``: replace the FFN of decoder layers ``i`` with ``i % every == every - 1``.
    ``upcycle``: initialise experts as copies of the dense MLP (True) or randomly (False).
    ``router_jitter``: multiplicative noise on the router input during training only. The input is
    scaled by U(1 - j, 1 + j) (Switch Transformer). Use 0 to turn it off.
    ``renormalize``: renormalise the top-k gates to sum to 1 (see the module docstring).
    ``router_init_std``: std of the normal init of the router weight. It is small, so routing starts
    close to uniform.
    ``seed``: seeds the router init (and the expert init when not upcycling). Layer ``i`` uses
    ``seed + i``, so the layers differ and the global RNG is left untouched.
    """

    num_experts: int = 64
    top_k: int = 2
    every: int = 2
    load_balance_coef: float = 0.01
    router_z_coef: float = 0.001
    upcycle: bool = True
    router_jitter: float = 0.0
    renormalize: bool = True
    router_init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        # From a config.json or a recipe any type can arrive; a float count failed deep inside torch.
        for name in ("num_experts", "top_k", "every", "seed"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"MoEConfig.{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("load_balance_coef", "router_z_coef", "router_jitter", "router_init_std"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"MoEConfig.{name} must be a finite number, got {getattr(self, name)!r}")
        if not isinstance(self.upcycle, bool) or not isinstance(self.renormalize, bool):
            raise ValueError(
                f"MoEConfig.upcycle and renormalize must be true or false, got {self.upcycle!r}, "
                f"{self.renormalize!r}"
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if not self.load_balance_coef >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"load_balance_coef must be >= 0, got {self.load_balance_coef}")
        if not self.router_z_coef >= 0:
            raise ValueError(f"router_z_coef must be >= 0, got {self.router_z_coef}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if not self.router_init_std > 0:
            raise ValueError(f"router_init_std must be > 0, got {self.router_init_std}")


def moe_layer_indices(num_layers: int, every: int) -> list[int]:
    """Indices of the decoder layers whose FFN becomes sparse: ``i % every == every - 1``."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return [i for i in range(num_layers) if i % every == every - 1]


class SparseMoE(nn.Module):
    """Top-k routed mixture of gated (SwiGLU, Llama-style) MLP experts. It is a drop-in FFN.

    ``forward(x, mask=None)`` maps (..., d) to (..., d). ``mask`` has shape ``x.shape[:-1]`` and is true
    or 1 for real tokens. Masked tokens are still computed, because their output is ignored downstream
    anyway, but they are left out of the aux-loss statistics. After each call ``last_aux`` holds the
    float32 scalars ``load_balance`` and ``router_z`` (raw) and ``load_balance_weighted`` and
    ``router_z_weighted`` (times their coefficients). ``last_expert_counts`` holds how many unmasked
    assignments each expert got, for monitoring.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        cfg: MoEConfig | None = None,
        act: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MoEConfig()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = self.cfg.num_experts
        self.top_k = self.cfg.top_k
        e, d, i = self.num_experts, hidden_size, intermediate_size
        fk = {"device": device, "dtype": dtype}
        # skip_init: nn.Linear's own init would draw from the global RNG (reset_parameters draws instead).
        # (skip_init needs the device itself: given None, it leaves the weight on the meta device.)
        router_device = device if device is not None else torch.get_default_device()
        self.router = skip_init(nn.Linear, d, e, bias=False, device=router_device, dtype=dtype)
        # (E, out, in), the nn.Linear layout, so upcycling is a broadcast copy of the dense weights.
        self.gate_proj = nn.Parameter(torch.empty(e, i, d, **fk))
        self.up_proj = nn.Parameter(torch.empty(e, i, d, **fk))
        self.down_proj = nn.Parameter(torch.empty(e, d, i, **fk))
        self.act_fn = act if act is not None else nn.SiLU()
        # Set by set_moe_token_mask() / the pre-hook of upcycle_llm. An explicit `mask` argument wins.
        self.token_mask: Tensor | None = None
        self.last_aux: dict[str, Tensor] = {}
        self.last_expert_counts: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None, expert_std: float = 0.02) -> None:
        """Random init: router ~ N(0, router_init_std), experts ~ N(0, expert_std) (the HF Llama init).

        The numbers are drawn on the CPU from a private generator and then copied, so a given seed gives
        the same weights on any device and the global RNG is left alone.
        """
        g = torch.Generator().manual_seed(self.cfg.seed if seed is None else seed)
        with torch.no_grad():
            for p, std in (
                (self.router.weight, self.cfg.router_init_std),
                (self.gate_proj, expert_std),
                (self.up_proj, expert_std),
                (self.down_proj, expert_std),
            ):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)

    @torch.no_grad()
    def load_dense(self, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> None:
        """Sparse upcycling: make every expert an exact copy of one dense gated MLP (nn.Linear weights)."""
        for name, src in (("gate_proj", gate_w), ("up_proj", up_w), ("down_proj", down_w)):
            dst: Tensor = getattr(self, name)
            if tuple(src.shape) != tuple(dst.shape[1:]):
                raise ValueError(f"{name}: dense weight {tuple(src.shape)} != expert {tuple(dst.shape[1:])}")
            dst.copy_(src.unsqueeze(0).expand_as(dst))

    def expert_numel(self) -> int:
        """Parameters of one expert."""
        return 3 * self.hidden_size * self.intermediate_size

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router of tokens x (N, d). Returns (logits, probs, top-k gates, top-k expert ids), all per token.

        The router runs in float32 even under autocast. ST-MoE found bf16 routers unstable, and the
        z-loss squares the logsumexp, so it needs the range.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            xr = x.float()
            if self.training and self.cfg.router_jitter > 0:
                j = self.cfg.router_jitter
                xr = xr * torch.empty_like(xr).uniform_(1.0 - j, 1.0 + j)
            logits = F.linear(xr, self.router.weight.float())
            probs = logits.softmax(dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.cfg.renormalize else top_p
        return logits, probs, gates, top_i

    def _aux_losses(self, logits: Tensor, probs: Tensor, top_i: Tensor, valid: Tensor | None) -> None:
        """ST-MoE load balancing and z-loss over the valid tokens; writes last_aux.

        load_balance = E * sum_e f_e * P_e. Here f_e is the fraction of tokens routed to expert e (among
        their top k; no gradient, as in Switch), so the f_e sum to k, and P_e is the mean router
        probability of e. Under uniform routing it equals k. This is ST-MoE's (flaxformer's) and
        Mixtral's form, the one MM1's coefficient 0.01 was set for (MM1 follows ST-MoE); dividing f by k
        (Megablocks) would halve the loss's weight at top-2.
        router_z = mean over tokens of logsumexp(logits)^2.
        """
        e = self.num_experts
        w = torch.ones(logits.shape[0], device=logits.device) if valid is None else valid.float()
        # clamp: an all-padding batch gives zero losses instead of NaN.
        n = w.sum().clamp_min(1.0)
        one_hot = F.one_hot(top_i, e).float().sum(dim=1)  # (N, E) assignments per token, 0..k each
        counts = (one_hot * w[:, None]).sum(dim=0)  # (E,)
        f = counts / n
        p = (probs * w[:, None]).sum(dim=0) / n
        load_balance = e * (f * p).sum()
        router_z = (torch.logsumexp(logits, dim=-1).square() * w).sum() / n
        self.last_expert_counts = counts.detach().long()
        self.last_aux = {
            "load_balance": load_balance,
            "router_z": router_z,
            "load_balance_weighted": self.cfg.load_balance_coef * load_balance,
            "router_z_weighted": self.cfg.router_z_coef * router_z,
        }

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        if mask is None and self.token_mask is not None:
            mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(lead):
            raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(lead)}")
        tokens = x.reshape(-1, d)
        n_tok = tokens.shape[0]
        logits, probs, gates, top_i = self.route(tokens)
        valid = None if mask is None else mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        self._aux_losses(logits, probs, top_i, valid)

        # Grouping: flatten the N*k (token, expert) assignments and sort them by expert. A stable
        # sort keeps the token order within each expert.
        flat_expert = top_i.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = torch.arange(n_tok, device=x.device).repeat_interleave(self.top_k)[order]
        gate_of = gates.reshape(-1)[order]
        # One host sync for the slice bounds, instead of one per expert.
        ends = torch.bincount(flat_expert, minlength=self.num_experts).cumsum(0).tolist()

        # Accumulate in float32: each token gets a sum of k weighted expert outputs (bf16 under autocast).
        out = torch.zeros(n_tok, d, device=x.device, dtype=torch.float32)
        start = 0
        for e, end in enumerate(ends):
            if end == start:
                continue
            idx = token_of[start:end]
            xe = tokens[idx]
            h = self.act_fn(F.linear(xe, self.gate_proj[e])) * F.linear(xe, self.up_proj[e])
            ye = F.linear(h, self.down_proj[e])
            out.index_add_(0, idx, ye.float() * gate_of[start:end, None])
            start = end
        return out.to(x.dtype).reshape(*lead, d)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"experts={self.num_experts}, top_k={self.top_k}, renormalize={self.cfg.renormalize}"
        )


# ---------------------------------------------------------------------------------------------------
# Integration with Hugging Face Llama-style causal LMs
# ---------------------------------------------------------------------------------------------------


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns ``layers``: ``model.model`` of a *ForCausalLM, or the base model itself."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    raise TypeError(f"{type(model).__name__} has no decoder `layers` (expected a Llama-style model)")


def moe_layers(model: nn.Module) -> Iterator[SparseMoE]:
    """All SparseMoE modules in ``model``, in module order."""
    for m in model.modules():
        if isinstance(m, SparseMoE):
            yield m


def set_moe_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Set (or clear, with None) the token mask that every MoE layer uses for its aux statistics.

    The mask stays until it is changed. So with gradient checkpointing the forward pass recomputed during
    backward sees the same mask as the original one. A decoder prepared by ``upcycle_llm`` sets it anew
    from every call (its ``attention_mask``, or a ``moe_padding_mask`` keyword); this is for calling the
    MoE layers some other way.
    """
    for m in moe_layers(model):
        m.token_mask = mask


@contextmanager
def moe_token_mask(model: nn.Module, mask: Tensor | None) -> Iterator[None]:
    """Context manager form of ``set_moe_token_mask``. The previous masks are restored on exit."""
    layers = list(moe_layers(model))
    previous = [m.token_mask for m in layers]
    for m in layers:
        m.token_mask = mask
    try:
        yield
    finally:
        for m, p in zip(layers, previous, strict=True):
            m.token_mask = p


# A keyword a caller of the decoder may add to give the MoE layers the padding mask itself, when its
# ``attention_mask`` cannot carry it (packed rows pass a 4-D one). The pre-hook removes it again.
PADDING_MASK_KWARG = "moe_padding_mask"


def _mask_from_call(decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: take the token mask for the aux losses from the call.

    A ``moe_padding_mask`` keyword (``PADDING_MASK_KWARG``, removed before the decoder sees it) wins;
    otherwise the model's ``attention_mask`` is used if it is a 2-D (batch, keys) padding mask. Its last
    T columns are kept, where T is the number of new tokens, so incremental decoding with a KV cache also
    works. With neither (a 4-D or missing mask and no keyword) the mask is cleared, and every token
    counts.
    """
    explicit = kwargs.pop(PADDING_MASK_KWARG, None)
    try:
        bound = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    am = explicit if explicit is not None else bound.get("attention_mask")
    ref = bound.get("input_ids")
    if ref is None:
        ref = bound.get("inputs_embeds")
    mask = None
    if isinstance(am, Tensor) and am.dim() == 2 and isinstance(ref, Tensor) and ref.dim() >= 2:
        t = ref.shape[1]
        if am.shape[0] == ref.shape[0] and am.shape[1] >= t:
            mask = am[:, am.shape[1] - t :].bool()
    if explicit is not None and mask is None:
        raise ValueError(
            f"{PADDING_MASK_KWARG} must be a 2-D (batch, positions) mask matching the input, got shape "
            f"{tuple(explicit.shape) if isinstance(explicit, Tensor) else type(explicit).__name__}"
        )
    set_moe_token_mask(decoder, mask)
    return args, kwargs


def upcycle_llm(model: nn.Module, cfg: MoEConfig | None = None) -> nn.Module:
    """Replace the dense MLP of the layers chosen by ``cfg.every`` with SparseMoE, in place.

    Works for HF Llama-style models (``LlamaForCausalLM`` such as SmolLM2, or the bare ``LlamaModel``),
    whose ``model.layers[i].mlp`` has bias-free ``gate_proj``/``up_proj``/``down_proj`` Linears and an
    ``act_fn``. The activation module is reused, so a non-SiLU ``hidden_act`` is kept. With
    ``cfg.upcycle`` every expert is an exact copy of the dense MLP; otherwise the experts are random,
    seeded with ``cfg.seed + i``. Routers are always seeded with ``cfg.seed + i``. The new modules take
    the device and dtype of the dense weights.

    It also registers (once) a forward pre-hook on the decoder. The hook passes a 2-D ``attention_mask``
    to the MoE layers so that padding stays out of the aux losses. To load an MoE checkpoint, call this
    with ``upcycle=False`` and the same cfg, then ``load_state_dict``.

    Raises ValueError if ``cfg.every`` exceeds the layer count (no layer would become sparse).

    Returns ``model`` for chaining.
    """
    cfg = cfg if cfg is not None else MoEConfig()
    decoder = _decoder(model)
    layers = decoder.layers
    indices = moe_layer_indices(len(layers), cfg.every)
    if not indices:  # a dense model that would still be saved and reported as MoE
        raise ValueError(
            f"MoEConfig.every ({cfg.every}) exceeds the LLM's {len(layers)} layers: no layer would become "
            f"sparse (every must be <= {len(layers)})"
        )
    for i in indices:
        dense = layers[i].mlp
        if isinstance(dense, SparseMoE):
            raise ValueError(f"layer {i} is already a SparseMoE; upcycle_llm was applied twice")
        projs = [getattr(dense, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projs):
            raise TypeError(f"layer {i}: mlp {type(dense).__name__} is not a Llama-style gated MLP")
        gate, up, down = projs
        if any(p.bias is not None for p in projs):
            raise ValueError(f"layer {i}: MLPs with biases (mlp_bias=True) are not supported")
        w = gate.weight
        moe = SparseMoE(
            hidden_size=gate.in_features,
            intermediate_size=gate.out_features,
            cfg=cfg,
            act=getattr(dense, "act_fn", None),
            device=w.device,
            dtype=w.dtype,
        )
        moe.reset_parameters(seed=cfg.seed + i)
        if cfg.upcycle:
            moe.load_dense(gate.weight, up.weight, down.weight)
        moe.train(dense.training)
        layers[i].mlp = moe
    if not getattr(decoder, "_mm15_moe_mask_hook", False):
        decoder.register_forward_pre_hook(_mask_from_call, with_kwargs=True)
        decoder._mm15_moe_mask_hook = True
    return model


def moe_aux_loss(model: nn.Module) -> dict[str, Tensor]:
    """Weighted aux losses of the last forward pass, summed over all MoE layers (Switch/ST-MoE add them
    per layer).

    Returns ``{"load_balance", "router_z", "total"}``. ``total`` is what to add to the LM loss. A model
    without MoE layers gives zeros. Raises RuntimeError if an MoE layer has not run a forward pass yet.
    """
    layers = list(moe_layers(model))
    if not layers:
        z = torch.zeros(())
        return {"load_balance": z, "router_z": z.clone(), "total": z.clone()}
    lb: Tensor | float = 0.0
    rz: Tensor | float = 0.0
    for m in layers:
        if not m.last_aux:
            raise RuntimeError("moe_aux_loss called before a forward pass through the MoE layers")
        lb = lb + m.last_aux["load_balance_weighted"]
        rz = rz + m.last_aux["router_z_weighted"]
    assert isinstance(lb, Tensor) and isinstance(rz, Tensor)
    return {"load_balance": lb, "router_z": rz, "total": lb + rz}


def moe_param_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, and parameters active per token (only top_k of the E experts run).

    Returns ``{"total", "active", "expert", "moe_layers"}``. ``expert`` is the number of parameters in
    all the experts of all MoE layers. Routers count as active. Shared (tied) parameters are counted once.
    Example: SmolLM2-135M (30 layers, d=576, I=1536) with 64 experts on 15 layers adds
    15 * 63 * 3 * 576 * 1536, about 2.5B, parameters in total but only 15 * 2.65M (one extra expert
    per layer) plus the routers per token.
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates ties
    layers = list(moe_layers(model))
    expert = sum(m.num_experts * m.expert_numel() for m in layers)
    inactive = sum((m.num_experts - m.top_k) * m.expert_numel() for m in layers)
    return {"total": total, "active": total - inactive, "expert": expert, "moe_layers": len(layers)}
