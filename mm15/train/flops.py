"""Model FLOPs of a training step: the numerator of MFU, one formula for mm15 and for the references.

A token that passes forward and backward through a weight matrix of n entries costs 6n FLOPs (2n in the
forward pass, 4n in the backward pass: the "6 x parameters x tokens" rule of Kaplan et al. and PaLM,
attention scores left out). ``6 x all parameters x tokens`` is only right for a plain language model
trained on every position; here each group of weights is multiplied by the positions it needs:

* decoder weights x every token of the batch. Embedding tables are left out: a lookup is a gather, not
  a product. In a mixture-of-experts decoder only the router and ``top_k`` experts run per token.
* LM head (vocab x width) x the **supervised** positions: logits nowhere else enter the loss. A model
  that computes the head at every position does that extra work uncredited, which is what makes its
  MFU comparable with mm15's (mm15 computes the head on supervised positions only). With 6 x params x
  tokens a 49,152-word head over SFT batches, most of whose positions are prompt or image, was credited
  with work nobody did, and mm15's MFU went past 100% on the tiny recipe.
* vision encoder x its patch tokens (every tile of every image);
* connector: a C-Abstractor's first RegNet stage x the patch tokens (it runs before the pooling), its
  second stage and readout x the image tokens it emits; an MLP connector's weights x the image tokens.

The 4n of the backward pass is 2n for the gradient of the input and 2n for the gradient of the weights.
A group whose weights are frozen (a stage's ``trainable`` leaves it out) skips the weight gradient, and
needs the input gradient only when a trainable group comes before it in the graph (encoder -> connector
-> decoder -> head): a frozen encoder at the start of the graph runs forward only (2n), a frozen decoder
after a trainable connector 4n. (A trainable group's first layer needs no input gradient either when
nothing before it trains; that one layer's 2n is not subtracted.)

Elementwise work (norms, biases, activations, the optimizer) is not counted, so only weight matrices
are (parameters of two or more dimensions): MFU measures how much of the machine's matmul rate goes
into the model's products. Squeeze-excite gates, which run once per tile on pooled channels, are left
out too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from mm15.model.connector import CAbstractor, MLPConnector, SqueezeExcite
from mm15.model.moe import moe_layers
from mm15.train.distributed import never_used_parameters


@dataclass(frozen=True)
class StepWork:
    """What one training step processed: the positions each group of weights is multiplied with."""

    tokens: int  # every real (non-padding) position the decoder runs on
    supervised: int  # positions with a target: where the LM head is needed
    patches: int  # encoder patch tokens, all tiles
    image_tokens: int  # connector outputs placed in the decoder's input


@dataclass(frozen=True)
class Backward:
    """Backward FLOPs per weight entry and position of each group, in graph order: 4 (input and weight
    gradients), 2 (input gradient only: frozen weights after a trainable group) or 0 (frozen, nothing
    trainable before it). Everything trains by default."""

    encoder: int = 4
    connector: int = 4
    decoder: int = 4
    head: int = 4

    @classmethod
    def of(cls, encoder: bool, connector: bool, decoder: bool, head: bool) -> Backward:
        """From which groups have trainable weights (module docstring). A trainable group of several
        layers also passes input gradients between its own layers (4); the head is one matrix, whose
        input gradient is needed only for a trainable group before it."""
        factors, upstream = [], False
        for trains in (encoder, connector, decoder):
            factors.append(4 if trains else 2 * upstream)
            upstream = upstream or trains
        return cls(*factors, head=2 * head + 2 * upstream)


@dataclass(frozen=True)
class FlopWeights:
    """Weights per position group (see the module docstring); ``step_flops`` multiplies them out."""

    decoder: int
    head: int
    encoder: int
    connector_per_patch: int = 0
    connector_per_image_token: int = 0
    backward: Backward = Backward()

    def step_flops(self, work: StepWork) -> float:
        """Forward (2n) + backward (``backward``) FLOPs of the model's products for ``work``."""
        b = self.backward
        return (
            (2.0 + b.decoder) * self.decoder * work.tokens
            + (2.0 + b.head) * self.head * work.supervised
            + (2.0 + b.encoder) * self.encoder * work.patches
            + (2.0 + b.connector)
            * (self.connector_per_patch * work.patches + self.connector_per_image_token * work.image_tokens)
        )


def matmul_weights(module: nn.Module, once_per_tile: tuple[type[nn.Module], ...] = ()) -> int:
    """Entries of ``module``'s weight matrices (parameters of two or more dimensions: linear and
    convolution weights, stacked experts), ties counted once. Embedding tables are gathers, and biases,
    norm scales and other vectors are elementwise work, so none of them count (module docstring).

    In MoE layers only the experts a token is routed to count (``top_k`` of ``num_experts``). Submodules
    of the ``once_per_tile`` types are left out: they run on a pooled vector, not per position.
    """
    skipped = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for m in module.modules():
        if once_per_tile and isinstance(m, once_per_tile):
            skipped |= {id(p) for p in m.parameters()}
    total = sum(p.numel() for p in module.parameters() if id(p) not in skipped and p.dim() >= 2)
    inactive = sum((m.num_experts - m.top_k) * m.expert_numel() for m in moe_layers(module))
    return total - inactive


def causal_lm_weights(llm: nn.Module) -> tuple[int, int]:
    """``(decoder, head)`` weights of a Hugging Face causal LM: its decoder stack and its output head."""
    head = llm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(llm).__name__} has no output embeddings (LM head) to count")
    return matmul_weights(llm.get_decoder()), head.weight.numel()


def connector_weights(connector: nn.Module) -> tuple[int, int]:
    """``(per patch, per image token)`` weights of an mm15 connector."""
    if isinstance(connector, CAbstractor):
        # The squeeze-excite gates run once per tile on the pooled channels: negligible, not per patch.
        per_patch = matmul_weights(connector.stage1, once_per_tile=(SqueezeExcite,))
        per_token = matmul_weights(connector.stage2, once_per_tile=(SqueezeExcite,))
        return per_patch, per_token + matmul_weights(connector.readout)
    if isinstance(connector, MLPConnector):
        return 0, matmul_weights(connector.readout)
    raise TypeError(f"no FLOP count for connector {type(connector).__name__}")


def mm15_flop_weights(model: nn.Module) -> FlopWeights:
    """The ``FlopWeights`` of an ``MM15Model`` (encoder, connector, decoder, head)."""
    decoder, head = causal_lm_weights(model.llm)
    per_patch, per_token = connector_weights(model.connector)
    # The encoder runs only the blocks up to its feature layer, and never its post-layernorm.
    unused = sum(p.numel() for _, p in never_used_parameters(model) if p.dim() >= 2)

    def trains(module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    return FlopWeights(
        decoder=decoder,
        head=head,
        encoder=matmul_weights(model.vision) - unused,
        connector_per_patch=per_patch,
        connector_per_image_token=per_token,
        backward=Backward.of(
            trains(model.vision),
            trains(model.connector),
            trains(model.llm.get_decoder()),
            model.llm.get_output_embeddings().weight.requires_grad,
        ),
    )


def image_work(model: nn.Module, pixel_values: Tensor | None) -> tuple[int, int]:
    """``(patches, image tokens)`` an ``MM15Model`` computes for a (tiles, 3, H, W) pixel batch."""
    if pixel_values is None:
        return 0, 0
    patch = model.cfg.vision.patch_size
    per_tile = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    tiles = pixel_values.shape[0]
    return tiles * per_tile, tiles * model.cfg.connector.num_output_tokens(per_tile)


def llava_next_flop_weights(model: nn.Module) -> FlopWeights:
    """transformers' ``LlavaNextForConditionalGeneration`` counted as mm15 is: the benchmarks' reference.

    Its projector (a two-layer MLP) runs on every patch feature of the tiles it encodes, before the
    features are unpadded and newline tokens added: per patch, not per image token it places.
    """
    inner = model.model
    return FlopWeights(
        decoder=matmul_weights(inner.language_model),
        head=model.lm_head.weight.numel(),
        encoder=matmul_weights(inner.vision_tower),
        connector_per_patch=matmul_weights(inner.multi_modal_projector),
    )
