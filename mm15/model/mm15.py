"""The assembled MM1.5 model: vision encoder -> C-Abstractor -> decoder LLM, with image-token placement.

A prompt holds one ``<image>`` placeholder per image. ``MM15Processor`` plans every image
(``mm15.geometry.plan_image``, splitting off when a sample has too many images), replaces each
placeholder with the plan's span (``expand_image_text``: tile markers as text, ``tokens_per_tile``
image tokens per tile) and tokenises. ``MM15Model`` encodes all tiles of a batch in one batched pass,
maps them to LLM-width tokens with the connector and writes them over the image-token embeddings, in
order; a count mismatch is an error naming both counts, never a silent truncation.

``save_pretrained`` writes one directory: ``config.json`` (the mm15 config plus the LLM's and the
encoder's architecture), ``model.safetensors``, the LLM's ``generation_config.json`` (its eos ids are
stop tokens) and the tokenizer files. ``from_pretrained`` rebuilds the architecture from those configs
and loads the weights; nothing is unpickled, and a damaged or edited directory is a ValueError naming
the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from mm15.geometry import ImagePlanConfig, TilePlan, plan_image
from mm15.image import ImageProcessor
from mm15.model.attention import PACKED_ATTENTION, block_causal_mask, register_attention
from mm15.model.connector import ConnectorConfig, build_connector
from mm15.model.head_loss import head_token_losses
from mm15.model.llm import LLMConfig, dtype_name, load_llm
from mm15.model.moe import PADDING_MASK_KWARG, MoEConfig, moe_aux_loss, moe_layers, upcycle_llm
from mm15.model.vision import VisionConfig, VisionEncoder
from mm15.paths import not_a_file_reason

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<|image_patch|>"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MM15Config:
    """The whole model: encoder, connector, LLM, optional MoE, and the image plan settings.

    The connector's ``vision_dim``/``num_patches`` must match the encoder, its ``llm_dim`` the LLM, its
    ``num_queries`` the plan's ``tokens_per_tile``, and the plan's ``tile_size`` the encoder's input
    size; ``MM15Model`` checks all four when it is built and names the mismatch.
    """

    vision: VisionConfig
    connector: ConnectorConfig
    llm: LLMConfig
    image: ImagePlanConfig = field(default_factory=ImagePlanConfig)
    moe: MoEConfig | None = None
    name: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MM15Config:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MM15Config: unknown fields {sorted(unknown)}")
        missing = sorted({"vision", "connector", "llm"} - set(data))
        if missing:
            raise ValueError(f"MM15Config: missing fields {missing}")
        moe = data.get("moe")
        try:
            return cls(
                vision=VisionConfig(**data["vision"]),
                connector=ConnectorConfig(**data["connector"]),
                llm=LLMConfig(**data["llm"]),
                image=ImagePlanConfig(**data.get("image", {})),
                moe=MoEConfig(**moe) if moe is not None else None,
                name=data.get("name", "custom"),
            )
        except TypeError as err:  # a sub-config with an unknown or missing field, or not an object
            raise ValueError(f"MM15Config: {err}") from None


@dataclass
class MM15Output:
    """Without labels, logits; with labels, the per-position losses, the loss (LM loss plus weighted MoE
    aux losses) and its reported parts, and no logits (``head_token_losses`` never stores them)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    past_key_values: Any = None


def add_image_token(tokenizer: Any, llm: nn.Module) -> int:
    """Register the image token as a special token, grow the embeddings if needed, return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # The list replaces the tokenizer's extra special tokens, so its own (<|box|>-style) ones go in too.
        own = list(getattr(tokenizer, "extra_special_tokens", None) or [])
        tokenizer.add_special_tokens({"additional_special_tokens": [*own, IMAGE_TOKEN]})
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id >= llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return int(token_id)


def add_chat_tokens(tokenizer: Any, llm: nn.Module) -> None:
    """A tokenizer with no chat template of its own is rendered with ``mm15.chat.FALLBACK_CHAT_TEMPLATE``
    (ChatML): make its ``<|im_start|>`` and ``<|im_end|>`` special tokens, growing the embeddings if
    needed, so a turn ends with one token that generation stops at instead of text pieces.

    Called when a model is built, not when one is loaded: the saved tokenizer keeps them, and a model
    saved before them keeps the tokenisation it was trained with.
    """
    from mm15.chat import FALLBACK_TURN_TOKENS  # mm15.chat imports this module

    if getattr(tokenizer, "chat_template", None):
        return
    special = set(tokenizer.all_special_tokens)
    missing = [token for token in FALLBACK_TURN_TOKENS if token not in special]
    if not missing:
        return
    # The list replaces the tokenizer's extra special tokens, so its own ones go in too (add_image_token).
    own = list(getattr(tokenizer, "extra_special_tokens", None) or [])
    tokenizer.add_special_tokens({"additional_special_tokens": [*own, *missing]})
    largest = max(tokenizer.convert_tokens_to_ids(token) for token in FALLBACK_TURN_TOKENS)
    if largest >= llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def size_mismatches(
    cfg: MM15Config,
    encoder_dim: int | None,
    encoder_patches: int | None,
    encoder_input: int | None,
    llm_dim: int | None,
) -> list[str]:
    """Where ``cfg``'s parts do not fit each other, given the encoder's and the LLM's sizes (None: not
    known, not checked); one message per mismatch."""
    c, image = cfg.connector, cfg.image
    checks = [
        ("connector.vision_dim", c.vision_dim, "the encoder's hidden size", encoder_dim),
        ("connector.num_patches", c.num_patches, "the encoder's patches per tile", encoder_patches),
        ("connector.llm_dim", c.llm_dim, "the LLM's hidden size", llm_dim),
        ("image.tokens_per_tile", image.tokens_per_tile, "connector.num_queries", c.num_queries),
        ("image.tile_size", image.tile_size, "the encoder's input size", encoder_input),
    ]
    return [
        f"MM15Config.{name} is {value} but {other} is {expected}"
        for name, value, other, expected in checks
        if expected is not None and value != expected
    ]


def config_problems(cfg: MM15Config) -> list[str]:
    """What building ``cfg`` would refuse that the config alone shows, before any weight is loaded.

    Sizes come from the config where it fixes them: a randomly initialised encoder's, and the tiny
    decoder's (a pretrained part's come from its directory and are checked when it loads); and MoE
    layers need a decoder deeper than ``moe.every`` - 1 layers.
    """
    v, llm = cfg.vision, cfg.llm
    encoder_dim = encoder_patches = encoder_input = None
    if v.pretrained is None:
        encoder_input = v.input_size or v.image_size
        encoder_dim, encoder_patches = v.hidden_size, (encoder_input // v.patch_size) ** 2
    random_llm = llm.source == "tiny"
    problems = size_mismatches(
        cfg, encoder_dim, encoder_patches, encoder_input, llm.hidden_size if random_llm else None
    )
    if random_llm and cfg.moe is not None and cfg.moe.every > llm.num_layers:
        problems.append(
            f"MM15Config.moe.every is {cfg.moe.every} but the LLM has {llm.num_layers} layers: no layer "
            "would be sparse"
        )
    return problems


class MM15Model(nn.Module):
    """Encoder, connector and LLM; ``forward`` places image features at the image-token positions."""

    def __init__(
        self, cfg: MM15Config, vision: VisionEncoder, connector: nn.Module, llm: nn.Module, tokenizer: Any
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer, llm)
        # Sparse layers are in place before assembly (build and from_pretrained upcycle first).
        self.has_moe = next(moe_layers(llm), None) is not None
        # Packed rows attend per sample (mm15.model.attention); other calls take the SDPA path as before.
        register_attention()
        llm.config._attn_implementation = PACKED_ATTENTION
        self.packed_attention = True  # per-sample attention for packed rows (False: the dense mask)
        self._check_sizes()

    def _check_sizes(self) -> None:
        v = self.vision
        llm_dim = self.llm.get_input_embeddings().embedding_dim
        problems = size_mismatches(self.cfg, v.hidden_size, v.num_patches, v.input_size, llm_dim)
        if problems:
            raise ValueError(problems[0])

    @classmethod
    def build(cls, cfg: MM15Config) -> MM15Model:
        """Build from a config: encoder and LLM loaded or randomly initialised, MoE upcycled if set."""
        vision = VisionEncoder(cfg.vision)
        llm, tokenizer = load_llm(cfg.llm)
        add_chat_tokens(tokenizer, llm)
        if cfg.moe is not None:
            upcycle_llm(llm, cfg.moe)
        return cls(cfg, vision, build_connector(cfg.connector), llm, tokenizer)

    # --- forward -------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, r, r) -> (tiles, tokens_per_tile, llm_dim), all tiles in one batched pass."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features written over the image-token positions, in order."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        positions = int(is_image.sum())
        tiles = 0 if pixel_values is None else pixel_values.shape[0]
        features = tiles * self.cfg.image.tokens_per_tile
        if positions != features:
            raise ValueError(
                f"the batch has {positions} image-token positions but its images give {features} image "
                f"features ({tiles} tiles x {self.cfg.image.tokens_per_tile} tokens)"
            )
        if tiles == 0:
            return embeds
        image_embeds = self.encode_images(pixel_values).reshape(-1, embeds.shape[-1])
        if image_embeds.shape[0] != positions:  # a connector that returns another count than it promised
            raise ValueError(
                f"the batch has {positions} image-token positions but the connector gave "
                f"{image_embeds.shape[0]} image features for {tiles} tiles"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        packed: bool = False,
    ) -> MM15Output:
        """Logits, and with ``labels`` (-100 = not supervised) the next-token loss.

        ``packed=True``: each row holds several samples, and ``position_ids`` restart at 0 where a sample
        starts (``mm15.data.packing``); each sample then attends only to its own tokens, and
        ``attention_mask`` is not needed (per-sample attention, or with ``packed_attention = False``
        the dense block-diagonal mask built from the position ids).

        Without labels, ``logits`` are (batch, positions, vocab), or only the last ``logits_to_keep``
        positions (generation's prefill needs one). With labels, the LM head runs only on the positions
        whose next token is supervised (image tokens and prompts carry no loss, and over a long image
        span the head is a large share of a training step), fused with the cross-entropy
        (``mm15.model.head_loss``): ``token_losses`` holds one float32 loss per supervised position, in
        row-major order, ``logits`` is None, and the loss is their mean, as Hugging Face computes it.
        """
        extra: dict[str, Any] = {}
        if packed:
            if position_ids is None or past_key_values is not None:
                raise ValueError("packed rows need position_ids and cannot use a KV cache")
            if self.has_moe and attention_mask is not None and attention_mask.dim() == 2:
                # The 4-D mask below cannot tell padding apart; the MoE aux losses must skip it.
                extra[PADDING_MASK_KWARG] = attention_mask
            if self.packed_attention:
                extra["packed_position_ids"] = position_ids
                if attention_mask is not None and attention_mask.dim() == 2:
                    extra["packed_token_mask"] = attention_mask  # where each row's padding begins
                # A broadcast view of one element: a 4-D mask stops transformers from building an
                # (L x L) one, and per-sample attention never reads it.
                rows, length = position_ids.shape
                attention_mask = torch.ones((), dtype=torch.bool).expand(rows, 1, length, length)
            else:
                attention_mask = block_causal_mask(position_ids)
        embeds = self.embed(input_ids, pixel_values)
        decoder_out = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **extra,
        )
        hidden = decoder_out.last_hidden_state
        head = self.llm.get_output_embeddings()
        result = MM15Output(logits=None, past_key_values=decoder_out.past_key_values)
        if labels is None:
            result.logits = head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        else:
            targets = labels[:, 1:]
            supervised = targets != -100
            result.token_losses = head_token_losses(
                hidden[:, :-1][supervised], head.weight, targets[supervised], head.bias
            )
            result.lm_loss = result.token_losses.mean()
            result.loss = result.lm_loss
        if self.has_moe:
            result.aux = moe_aux_loss(self.llm)
            if result.loss is not None:
                result.loss = result.loss + result.aux["total"]
        return result

    # --- save and load -------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """One directory: config.json, model.safetensors, generation_config.json, tokenizer files.
        Loading never unpickles."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf_vision = self.vision.model.config
        vision_arch = VisionConfig(
            kind=self.cfg.vision.kind,
            image_size=self.vision.input_size,  # the position table is already at the input size
            patch_size=self.vision.patch_size,
            hidden_size=self.vision.hidden_size,
            intermediate_size=int(hf_vision.intermediate_size),
            num_layers=self.vision.num_layers,
            num_heads=int(hf_vision.num_attention_heads),
            hidden_act=str(hf_vision.hidden_act),
            layer_norm_eps=float(hf_vision.layer_norm_eps),
            feature_layer=self.cfg.vision.feature_layer,
            # A pretrained encoder's normalisation came from its directory, which loading does not read.
            image_mean=self.vision.image_mean,
            image_std=self.vision.image_std,
        )
        # The LLM's dtype as its weights have it (a model cast after build would otherwise load back in
        # its config's dtype and compute other numbers).
        llm_arch = dataclasses.replace(self.cfg.llm, dtype=dtype_name(self.llm))
        saved_cfg = dataclasses.replace(self.cfg, vision=vision_arch, llm=llm_arch)
        document = {
            "mm15_format": FORMAT_VERSION,
            "config": saved_cfg.to_dict(),
            "llm_config": self.llm.config.to_dict(),
            "image_mean": list(self.vision.image_mean),
            "image_std": list(self.vision.image_std),
        }
        (path / CONFIG_NAME).write_text(json.dumps(document, indent=2, default=str))
        save_model(self, str(path / WEIGHTS_NAME))
        generation = getattr(self.llm, "generation_config", None)
        if generation is not None:
            # Its eos ids are stop tokens (mm15.chat.stop_token_ids; Llama 3 Instruct lists several). As
            # HF writes it, minus save_pretrained's strict validation: a finished run's save must not fail
            # over sampling defaults it never used.
            target = path / GENERATION_CONFIG_NAME
            generation.to_json_file(target, use_diff=True, keys_to_pop=["compile_config"])
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MM15Model:
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        path = Path(path)
        problem = not_a_file_reason(path / CONFIG_NAME) or not_a_file_reason(path / WEIGHTS_NAME)
        if problem is not None:
            # A training stage's directory holds its model under final/: point there.
            in_final = not_a_file_reason(path / "final" / CONFIG_NAME) is None
            hint = f"; did you mean {path / 'final'}?" if in_final else ""
            raise FileNotFoundError(
                f"{path} is not an mm15 model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}: "
                f"{problem}){hint}"
            )
        try:
            document = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}/{CONFIG_NAME}: not a JSON file ({err})") from None
        except OSError as err:
            raise ValueError(f"{path}/{CONFIG_NAME} cannot be read ({err.strerror})") from None
        if not isinstance(document, dict) or document.get("mm15_format") != FORMAT_VERSION:
            found = document.get("mm15_format") if isinstance(document, dict) else None
            raise ValueError(f"{path}/{CONFIG_NAME}: unsupported mm15_format {found!r}")
        if not isinstance(document.get("config"), dict) or not isinstance(document.get("llm_config"), dict):
            raise ValueError(f"{path}/{CONFIG_NAME}: needs the 'config' and 'llm_config' objects")
        try:
            cfg = MM15Config.from_dict(document["config"])
        except ValueError as err:
            raise ValueError(f"{path}/{CONFIG_NAME}: {err}") from None
        if cfg.vision.image_mean is None and "image_mean" in document and "image_std" in document:
            # Saved before VisionConfig recorded the normalisation: the document's copy has it.
            vision = dataclasses.replace(
                cfg.vision, image_mean=document["image_mean"], image_std=document["image_std"]
            )
            cfg = dataclasses.replace(cfg, vision=vision)
        llm_config = dict(document["llm_config"])
        try:
            hf_config = AutoConfig.for_model(llm_config.pop("model_type", None), **llm_config)
        except (ValueError, TypeError, KeyError, ArithmeticError, StrictDataclassError) as err:
            raise ValueError(f"{path}/{CONFIG_NAME}: llm_config is not a valid LLM config ({err})") from None
        generation = None
        if (path / GENERATION_CONFIG_NAME).is_file():  # saved since generation_config.json was written
            try:
                generation = GenerationConfig.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, TypeError) as err:
                raise ValueError(f"{path}/{GENERATION_CONFIG_NAME} cannot be read ({err})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot load the tokenizer saved with the model ({err})") from None
        try:  # an edited config.json whose parts no longer fit together (MM15Model._check_sizes, say)
            # Built in the saved dtype, not cast after: .to() would also cast RoPE's inv_freq buffer, which
            # transformers keeps in float32 when it loads a model in bf16 (outputs would differ on reload).
            llm = AutoModelForCausalLM.from_config(hf_config, dtype=cfg.llm.torch_dtype)
            if generation is not None:
                llm.generation_config = generation
            if cfg.moe is not None:
                upcycle_llm(llm, dataclasses.replace(cfg.moe, upcycle=False))
            model = cls(cfg, VisionEncoder(cfg.vision), build_connector(cfg.connector), llm, tokenizer)
        except (ValueError, TypeError, ArithmeticError, RuntimeError) as err:
            problem = f"the model it describes cannot be built ({err})"
            raise ValueError(f"{path}/{CONFIG_NAME}: {problem}") from None
        if not os.access(path / WEIGHTS_NAME, os.R_OK):
            # safetensors reports an unreadable file as "No such file or directory".
            raise ValueError(f"{path}/{WEIGHTS_NAME} cannot be read (Permission denied)")
        try:
            _check_weight_shapes(model, path)
            missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
        except SafetensorError as err:
            raise ValueError(f"{path}/{WEIGHTS_NAME} cannot be read (damaged or truncated: {err})") from None
        except OSError as err:
            raise ValueError(f"{path}/{WEIGHTS_NAME} cannot be read ({err.strerror or err})") from None
        if missing or unexpected:
            raise ValueError(
                f"{path}/{WEIGHTS_NAME} does not match the architecture: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        return model.eval()

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "vision": count(self.vision),
            "connector": count(self.connector),
            "llm": count(self.llm),
            "total": count(self),
        }


def _check_weight_shapes(model: nn.Module, path: Path) -> None:
    """ValueError naming every tensor whose shape in model.safetensors differs from the architecture
    config.json describes (an edited vocab_size or connector width), instead of load_state_dict's
    RuntimeError. Reads only the file's header."""
    from safetensors import safe_open

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = []
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            shape = tuple(weights.get_slice(name).get_shape())
            if name in expected and expected[name] != shape:
                wrong.append(f"{name} is {shape} in {WEIGHTS_NAME} but {expected[name]} in {CONFIG_NAME}")
    if wrong:
        raise ValueError(
            f"{path}/{WEIGHTS_NAME} does not match the architecture in {path}/{CONFIG_NAME} "
            f"({len(wrong)} tensors of another shape): " + "; ".join(sorted(wrong)[:5])
        )


def image_span_ids(plan: TilePlan, tokenizer: Any, image_token_id: int) -> list[int]:
    """Token ids of one image's span, ``expand_image_text(plan, IMAGE_TOKEN)`` built id by id.

    Markers are tokenised on their own and image tokens appended as ids, so a span never merges with
    the text around it and thousands of special tokens are never parsed from a string. Training
    (``mm15.chat``) and inference (``MM15Processor``) both build spans here.
    """
    ids: list[int] = []
    for tile in plan.tiles:
        if tile.marker:
            ids += tokenizer(tile.marker, add_special_tokens=False)["input_ids"]
        ids += [image_token_id] * plan.tokens_per_tile
    return ids


class ReservedTokenError(ValueError):
    """Text holds the image token itself (``<|image_patch|>``): it would add an image position that no
    image fills, and the batch's counts would no longer match."""


# Around a span of text that must be tokenised as plain text although it spells a special token
# (Unicode private-use characters, which no tokenizer's template carries): see escape_special_tokens.
LITERAL_START, LITERAL_END = "\ue001", "\ue002"
_LITERAL_SPAN = re.compile(f"{LITERAL_START}(.*?){LITERAL_END}", re.DOTALL)
# Per tokenizer: its length when the pattern was built (tokens added later change both) and the pattern.
_SPECIAL_PATTERNS: weakref.WeakKeyDictionary[Any, tuple[int, re.Pattern[str]]] = weakref.WeakKeyDictionary()


def special_token_strings(tokenizer: Any) -> set[str]:
    """The strings ``tokenizer`` reads as special tokens: its named ones and the added tokens marked
    special (Llama 3 lists ``<|eot_id|>`` only there)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_tokens) | {tok.content for tok in added.values() if tok.special}


def _special_pattern(tokenizer: Any) -> re.Pattern[str]:
    """Every special-token string of ``tokenizer`` but the image token (reserved: text holding it is
    refused), and the two literal marks themselves, longest first."""
    cached = _SPECIAL_PATTERNS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    strings = (special_token_strings(tokenizer) - {IMAGE_TOKEN, ""}) | {LITERAL_START, LITERAL_END}
    pattern = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))
    _SPECIAL_PATTERNS[tokenizer] = (len(tokenizer), pattern)
    return pattern


def escape_special_tokens(text: str, tokenizer: Any) -> str:
    """``text`` (a message, an answer, a document) with every special-token string in it marked as text.

    A tokenizer reads ``<|im_end|>`` or ``<|endoftext|>`` written in a text as the control token itself,
    so a sample that *mentions* ChatML ended its answer halfway (a supervised end-of-turn mid-answer)
    and a user could write a turn boundary into a prompt. Contents are escaped before the chat template
    renders them; ``text_token_ids`` then tokenises each marked span as plain characters, while the
    template's own markers stay control tokens. The marks themselves are escaped too, so no character
    of the text is lost.
    """
    return _special_pattern(tokenizer).sub(lambda m: LITERAL_START + m.group(0) + LITERAL_END, text)


def _token_ids(text: str, tokenizer: Any, as_plain_text: bool) -> list[int]:
    # verbose=False: no transformers warning for a text past the tokenizer's model_max_length; every
    # caller checks the length against its own budget and says so in its own words.
    kwargs = {"split_special_tokens": True} if as_plain_text else {}
    return tokenizer(text, add_special_tokens=False, verbose=False, **kwargs)["input_ids"]


def text_token_ids(text: str, tokenizer: Any, image_token_id: int) -> list[int]:
    """Token ids of a piece of text with no image in it; ``ReservedTokenError`` if it holds the image
    token (every text that reaches the model is tokenized here). Spans marked by
    ``escape_special_tokens`` are tokenised as plain text."""
    if LITERAL_START not in text:
        ids = _token_ids(text, tokenizer, as_plain_text=False)
    else:
        ids, start = [], 0
        for span in _LITERAL_SPAN.finditer(text):
            if span.start() > start:
                ids += _token_ids(text[start : span.start()], tokenizer, as_plain_text=False)
            ids += _token_ids(span.group(1), tokenizer, as_plain_text=True)
            start = span.end()
        if start < len(text):
            ids += _token_ids(text[start:], tokenizer, as_plain_text=False)
    if image_token_id in ids:
        raise ReservedTokenError(f"the text contains the reserved image token {IMAGE_TOKEN!r}")
    return ids


def tokenize_with_images(
    text: str, plans: Sequence[TilePlan], tokenizer: Any, image_token_id: int
) -> list[int]:
    """Token ids of ``text`` with each ``<image>`` replaced, in order, by its plan's span."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(plans):
        raise ValueError(
            f"the text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(plans)} plans"
        )
    ids: list[int] = []
    for index, part in enumerate(parts):
        if index > 0:
            ids += image_span_ids(plans[index - 1], tokenizer, image_token_id)
        if part:
            ids += text_token_ids(part, tokenizer, image_token_id)
    return ids


class MM15Processor:
    """Prompts with ``<image>`` placeholders + images -> input ids, attention mask and tile tensors."""

    def __init__(
        self, tokenizer: Any, plan_cfg: ImagePlanConfig, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.tokenizer = tokenizer
        self.plan_cfg = plan_cfg
        self.images = ImageProcessor(plan_cfg, mean=mean, std=std)

    @classmethod
    def for_model(cls, model: MM15Model) -> MM15Processor:
        return cls(model.tokenizer, model.cfg.image, model.vision.image_mean, model.vision.image_std)

    def plan(self, prompt: str, images: Sequence[Image.Image]) -> list[TilePlan]:
        """Each image's plan, in placeholder order; the placeholder count must equal the image count."""
        count = prompt.count(IMAGE_PLACEHOLDER)
        if count != len(images):
            raise ValueError(
                f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images"
            )
        return [
            plan_image(image.height, image.width, self.plan_cfg, image_index=k, images_in_sample=len(images))
            for k, image in enumerate(images)
        ]

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        padding_side: str = "left",
    ) -> dict[str, Any]:
        """A padded batch. ``images[i]`` are prompt i's images in placeholder order (may be empty)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        ids, plans, flat = [], [], []
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        for prompt, sample in zip(prompts, images, strict=True):
            sample_plans = self.plan(prompt, sample)
            ids.append(tokenize_with_images(prompt, sample_plans, self.tokenizer, image_token_id))
            plans.extend(sample_plans)
            flat.extend(sample)
        width = max(len(x) for x in ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, span] = 1
        pixel_values = self.images(flat, plans).pixel_values if flat else None
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "plans": plans,
        }
