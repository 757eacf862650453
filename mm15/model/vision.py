"""The image encoder: a CLIP (or SigLIP) ViT that turns (sub-)image tiles into patch features.

MM1.5 keeps MM1's encoder, a ViT-H/14 trained with a CLIP objective on DFN-5B at 378x378 (27x27 = 729
patches); the public equivalent is ``apple/DFN5B-CLIP-ViT-H-14-378`` (OpenCLIP ``ViT-H-14-378-quickgelu``:
width 1280, 32 layers, 16 heads of width 80, MLP 5120, QuickGELU, ~632M parameters). For continual
pre-training and SFT each tile is 672x672, reached by interpolating the positional embedding
(27x27 -> 48x48 = 2304 patches) (mm15-spec.md §1.2).

``VisionEncoder`` wraps transformers' ``CLIPVisionModel`` / ``SiglipVisionModel`` and returns
(N, L, hidden) patch features:

* **Feature layer.** ``feature_layer`` indexes the hidden states the way transformers'
  ``output_hidden_states`` does: 0 is the embedding output (after CLIP's ``pre_layrnorm``), i is the
  output of block i, -1 the output of the last block. The post-layernorm is *not* applied, for either
  kind: MM1.5 does not say which layer it uses, and Honeybee takes CLIP's ``last_hidden_state``, which in
  transformers is the last block's output before ``post_layernorm`` (that norm only feeds the pooled CLS).
  Note that transformers' SigLIP ``last_hidden_state`` *does* include the post-layernorm; ``feature_layer``
  = -1 here is the raw last block output for SigLIP too.
  Only the blocks up to ``feature_layer`` run. ``post_layernorm`` and any later blocks stay in the module
  (so it round-trips through ``save_pretrained``) but get no gradient; under DDP freeze them or use
  ``find_unused_parameters``.
* **CLS.** CLIP's CLS token is dropped (the connector wants a square patch grid); SigLIP has none.
* **Positional-embedding interpolation.** With ``input_size`` != the checkpoint's ``image_size`` the
  patch-position table is resampled once, at construction, bicubically (``align_corners=False``, float32;
  the CLS position is kept as is) and *replaces* the model's ``position_embedding``; the embedding's
  ``image_size``/``position_ids`` and ``config.image_size`` are updated so the HF model natively runs
  at ``input_size``. The resampling is the same as transformers' ``interpolate_pos_encoding`` (the tests
  check the outputs agree), but done once rather than per forward:

  - the table that is fine-tuned at 672 px is the 48x48 one, and it is what ``save_pretrained`` writes
    (with ``image_size`` 672 in config.json), so a fine-tuned encoder reloads with no interpolation;
  - a tile of the wrong size raises (``forward`` checks it, and so does transformers' CLIP) instead of
    being silently re-interpolated (``interpolate_pos_encoding=True`` accepts any size);
  - the bicubic weights are applied in float32, not in the parameters' dtype when the model is bf16;
  - speed is not the reason: resampling ViT-H's 1280x27x27 table to 48x48 takes ~20 ms on 2 CPU cores,
    against tens of seconds for a ViT-H forward on a 672 px tile there (on a 4-layer width-256 test model
    the two paths timed the same within noise; their outputs are identical).

  At ``input_size == image_size`` nothing is touched: the module is exactly the plain HF model.
* **Checkpoints whose size is not a multiple of the patch.** ``google/siglip-so400m-patch14-384`` is
  384 px with 14-px patches: its convolution (stride 14) drops the last 6 pixels, so its 27x27 table is
  that of 378 px. Such an encoder runs on 378-px tiles by default (``input_size`` defaults to
  ``image_size`` rounded down to whole patches), with no resampling; only ``image_size`` (the
  embeddings' and ``config.image_size``) becomes 378, and that is what ``save_pretrained`` records.

Loading never unpickles arbitrary objects: HF directories are read with ``weights_only=True`` (safetensors
preferred) and local files only, and OpenCLIP checkpoints with safetensors or
``torch.load(weights_only=True)``.

Converting the published DFN5B checkpoint: ``apple/DFN5B-CLIP-ViT-H-14-378`` ships OpenCLIP weights
(``open_clip_pytorch_model.bin``, or a ``.safetensors`` file); download it yourself, nothing is fetched
here. Then, once::

    from mm15.model.vision import VisionConfig, convert_open_clip_checkpoint, load_vision_encoder

    convert_open_clip_checkpoint("DFN5B-CLIP-ViT-H-14-378/open_clip_pytorch_model.bin", "dfn5b-hf")
    encoder = load_vision_encoder(VisionConfig(pretrained="dfn5b-hf", input_size=672))

The conversion writes a transformers ``CLIPVisionModel`` directory (config.json + model.safetensors);
the text tower and the visual projection are left out, as MM1.5 uses the patch features. QuickGELU and
the head count cannot be read from the weights: see ``open_clip_vision_config``. A directory that is
already in transformers' CLIP format (config.json with model_type "clip") can be given to ``pretrained``
as is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from mm15.checks import is_int, is_number
from mm15.image import CLIP_MEAN, CLIP_STD, normalize_pixels
from mm15.model import LOAD_ERRORS
from mm15.model.attention import ENCODER_ATTENTION, register_attention

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

VisionKind = Literal["clip", "siglip"]

# SigLIP normalises to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# transformers' defaults per kind, used when the config leaves them to the kind. DFN-CLIP (like OpenAI
# CLIP) uses QuickGELU; OpenCLIP's LayerNorm keeps torch's eps of 1e-5.
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "mean": CLIP_MEAN, "std": CLIP_STD},
    "siglip": {
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "mean": SIGLIP_MEAN,
        "std": SIGLIP_STD,
    },
}
_MODEL_TYPES = {"clip": ("clip", "clip_vision_model"), "siglip": ("siglip", "siglip_vision_model")}
_ARCH_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")


def _check_feature_layer(feature_layer: int, num_layers: int) -> None:
    # num_layers + 1 hidden states: the embeddings, then one per block.
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"VisionConfig.feature_layer must be in [{-(num_layers + 1)}, {num_layers}] for a "
            f"{num_layers}-layer encoder, got {feature_layer}"
        )


def _check_input_size(input_size: int, patch_size: int) -> None:
    if input_size % patch_size:
        raise ValueError(
            f"VisionConfig.input_size ({input_size}) must be a multiple of the patch size ({patch_size})"
        )


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Which encoder to build: a local pretrained HF directory, or an architecture to initialise randomly.

    Give either ``pretrained`` (a directory with config.json and weights, e.g. one written by
    ``convert_open_clip_checkpoint`` or ``save_pretrained``; a full CLIP/SigLIP checkpoint works too, its
    text tower is ignored) or all of the architecture fields, not both. ``hidden_act`` and
    ``layer_norm_eps`` default to the kind's (CLIP: quick_gelu, 1e-5; SigLIP: gelu_pytorch_tanh, 1e-6).

    ``image_size`` is the resolution the weights were trained at; ``input_size`` the tile size the encoder
    runs on (default: ``image_size``, rounded down to whole patches: 378 for a 384-px checkpoint with 14-px
    patches, whose convolution never sees the rest); the positional embedding is interpolated from one to
    the other.
    ``feature_layer`` picks the hidden state (module docstring; -1 = last block, no post-layernorm).
    ``image_mean`` and ``image_std`` (both or neither) set the pixel normalisation the encoder expects;
    by default it is the checkpoint's ``preprocessor_config.json``, else the kind's (CLIP's or SigLIP's).
    ``MM15Model.save_pretrained`` records them, so a model trained from an encoder with its own
    normalisation loads with it.
    """

    kind: VisionKind = "clip"
    pretrained: str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    hidden_act: str | None = None
    layer_norm_eps: float | None = None
    feature_layer: int = -1
    input_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(VisionKind):
            raise ValueError(f"VisionConfig.kind must be one of {get_args(VisionKind)}, got {self.kind!r}")
        self._check_normalisation()
        if not is_int(self.feature_layer):
            raise ValueError(f"VisionConfig.feature_layer must be an integer, got {self.feature_layer!r}")
        if self.input_size is not None and (not is_int(self.input_size) or self.input_size < 1):
            raise ValueError(
                f"VisionConfig.input_size must be an integer >= 1 or None, got {self.input_size!r}"
            )
        if self.hidden_act is not None:
            from transformers.activations import ACT2FN

            if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
                raise ValueError(
                    f"VisionConfig.hidden_act must be a transformers activation name or None, got "
                    f"{self.hidden_act!r}"
                )
        eps = self.layer_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0):
            raise ValueError(f"VisionConfig.layer_norm_eps must be a number > 0 or None, got {eps!r}")

        if self.pretrained is not None:
            if isinstance(self.pretrained, os.PathLike):  # a Path, as LLMConfig.path accepts one
                object.__setattr__(self, "pretrained", os.fspath(self.pretrained))
            if not isinstance(self.pretrained, str) or not self.pretrained:
                raise ValueError(f"VisionConfig.pretrained must be a non-empty path, got {self.pretrained!r}")
            # Sizes come from the checkpoint's config.json; two sources of truth would drift apart.
            for name in (*_ARCH_FIELDS, "hidden_act", "layer_norm_eps"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"VisionConfig.{name} must be None when pretrained is set (the checkpoint's "
                        f"config.json defines it), got {getattr(self, name)!r}"
                    )
            return  # feature_layer and input_size are checked against the checkpoint when loading

        for name in _ARCH_FIELDS:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"VisionConfig.{name} is required when pretrained is not given")
            if not is_int(value) or value < 1:
                raise ValueError(f"VisionConfig.{name} must be an integer >= 1, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        _check_feature_layer(self.feature_layer, self.num_layers)
        if self.input_size is not None:
            _check_input_size(self.input_size, self.patch_size)

    def _check_normalisation(self) -> None:
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("VisionConfig.image_mean and image_std must be given together")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is None:
                continue
            numbers = isinstance(value, list | tuple) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
            )
            if not numbers or len(value) != 3:
                raise ValueError(f"VisionConfig.{name} must be 3 finite numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))  # JSON gives a list
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"VisionConfig.image_std must be > 0, got {self.image_std!r}")

    @classmethod
    def dfn5b_vit_h14_378(cls, **changes: Any) -> VisionConfig:
        """The DFN5B-CLIP ViT-H/14-378 architecture (OpenCLIP ``ViT-H-14-378-quickgelu``), random weights.

        For the published weights use ``pretrained=`` on a converted directory instead (module docstring).
        """
        fields: dict[str, Any] = {
            "kind": "clip",
            "image_size": 378,
            "patch_size": 14,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_layers": 32,
            "num_heads": 16,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }
        fields.update(changes)
        return cls(**fields)


def _hf_classes(kind: str) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    # Imported here so that the rest of mm15 does not need transformers installed.
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("mm15.model.vision needs transformers (pip install -e '.[dev]')") from err
    if kind == "clip":
        return CLIPVisionConfig, CLIPVisionModel
    return SiglipVisionConfig, SiglipVisionModel


def hf_vision_config(cfg: VisionConfig) -> PretrainedConfig:
    """The transformers vision config of an architecture ``cfg``, at its ``image_size`` (no interpolation)."""
    if cfg.pretrained is not None:
        raise ValueError("hf_vision_config needs architecture fields; VisionConfig.pretrained is set")
    defaults = _KIND_DEFAULTS[cfg.kind]
    hidden_act = cfg.hidden_act or defaults["hidden_act"]  # checked by VisionConfig
    kwargs: dict[str, Any] = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": hidden_act,
        "layer_norm_eps": float(cfg.layer_norm_eps or defaults["layer_norm_eps"]),
        "num_channels": 3,
    }
    if cfg.kind == "siglip":
        kwargs["vision_use_head"] = False  # the attention-pooling head only serves the contrastive loss
    config_cls, _ = _hf_classes(cfg.kind)
    return config_cls(**kwargs)


def resize_position_embedding(weight: torch.Tensor, grid_size: int, num_prefix_tokens: int) -> torch.Tensor:
    """Resample a (num_prefix + g*g, d) position table to (num_prefix + grid_size**2, d).

    The first ``num_prefix_tokens`` rows (CLIP's CLS position) are kept; the rest, a row-major g x g grid,
    is resized bicubically with ``align_corners=False`` and no antialiasing (as transformers' ViT
    interpolation does; timm's and OpenCLIP's resampling antialias by default, which changes the kernel
    even when upscaling 27 -> 48, by up to about 8% of a value), computed in float32 and returned in
    ``weight``'s dtype. At the same grid size the input is returned unchanged (the same tensor).
    """
    if weight.ndim != 2 or weight.shape[0] <= num_prefix_tokens:
        raise ValueError(f"position table must be (num_prefix + g*g, d), got {tuple(weight.shape)}")
    num_grid = weight.shape[0] - num_prefix_tokens
    old = math.isqrt(num_grid)
    if old * old != num_grid:
        raise ValueError(f"position table has {num_grid} patch rows, not a square grid")
    if grid_size == old:
        return weight
    dim = weight.shape[1]
    prefix, grid = weight[:num_prefix_tokens], weight[num_prefix_tokens:]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, d, g, g)
    # Bicubic weights overshoot and cancel; keep them in float32 even under bf16 autocast. (The meta
    # device used to size models without memory has no autocast to turn off.)
    device_type = grid.device.type
    no_autocast = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, dim).to(weight.dtype)
    return torch.cat([prefix, grid], dim=0)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a ValueError naming the file for anything else."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _channel_stats(pre: dict[str, Any], key: str, path: Path) -> tuple[float, ...]:
    """``pre[key]`` as per-channel floats: a list of numbers (its length and values are checked where
    tiles are normalised); a ValueError naming the file and key otherwise."""
    value = pre[key]
    if not isinstance(value, list) or not all(is_number(v) for v in value):
        raise ValueError(f"{path}: {key} must be a list of numbers (one per channel), got {value!r}")
    return tuple(float(v) for v in value)


# The vision tower's own modules (CLIP and SigLIP name them alike; CLIP spells pre_layrnorm so).
_VISION_TOWER_PARTS = frozenset({"embeddings", "encoder", "pre_layrnorm", "post_layernorm"})


class VisionEncoder(nn.Module):
    """(N, 3, S, S) normalised tiles -> (N, L, hidden) patch features; S = input_size, L = num_patches.

    ``model`` is the wrapped transformers ``CLIPVisionModel`` / ``SiglipVisionModel``, already resized to
    ``input_size`` (module docstring). Parameters are float32; run under autocast for bf16.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = self._load_pretrained(cfg) if cfg.pretrained is not None else self._build(cfg)
        hf = self.model.config
        _check_feature_layer(cfg.feature_layer, hf.num_hidden_layers)
        self._num_prefix_tokens = 1 if cfg.kind == "clip" else 0
        # The resolution the weights were trained at, before any interpolation below.
        self._image_size = int(hf.image_size)
        if cfg.input_size is not None:
            input_size = cfg.input_size
            _check_input_size(input_size, hf.patch_size)
        else:
            # What the weights actually see: the stride-patch convolution drops the pixels past the last
            # whole patch, so SigLIP so400m-patch14-384 (384 px, a 27x27 grid) runs on 378-px tiles.
            input_size = self._image_size // hf.patch_size * hf.patch_size
            if input_size < 1:
                raise ValueError(
                    f"vision checkpoint image_size ({self._image_size}) is smaller than its patch size "
                    f"({hf.patch_size})"
                )
        self._set_input_size(input_size)
        # Hidden state k is the output of block k (0: the embeddings), so only the first k blocks run.
        self._num_blocks_run = cfg.feature_layer % (hf.num_hidden_layers + 1)
        self._mean, self._std = self._norm_stats(cfg)
        # SDPA, but explicit products for short tiles in bf16 on the CPU (mm15.model.attention).
        register_attention()
        hf._attn_implementation = ENCODER_ATTENTION

    @staticmethod
    def _build(cfg: VisionConfig) -> PreTrainedModel:
        _, model_cls = _hf_classes(cfg.kind)
        return model_cls(hf_vision_config(cfg))

    @staticmethod
    def _load_pretrained(cfg: VisionConfig) -> PreTrainedModel:
        path = Path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"VisionConfig.pretrained: {path} is not a Hugging Face model directory (no config.json)"
            )
        model_type = _read_json(path / "config.json").get("model_type")
        if model_type not in _MODEL_TYPES[cfg.kind]:
            raise ValueError(
                f"VisionConfig.kind is {cfg.kind!r} but {path}/config.json has model_type {model_type!r}"
            )
        config_cls, model_cls = _hf_classes(cfg.kind)
        # A full CLIP/SigLIP config.json holds the vision tower's config under vision_config.
        try:
            hf_config = config_cls.from_pretrained(path, local_files_only=True)
            if cfg.kind == "siglip":
                hf_config.vision_use_head = False
            model, info = model_cls.from_pretrained(
                path,
                config=hf_config,
                local_files_only=True,
                weights_only=True,  # never unpickle arbitrary objects from a .bin
                dtype=torch.float32,
                output_loading_info=True,
            )
        except LOAD_ERRORS as err:
            raise ValueError(f"VisionConfig.pretrained: cannot load the encoder in {path} ({err})") from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"VisionConfig.pretrained: {path} lacks {len(missing)} encoder weights (e.g. {missing[:3]}); "
                "they would be left randomly initialised"
            )
        # A full CLIP/SigLIP checkpoint also holds the text tower, the projections and SigLIP's pooling
        # head, which the encoder does not use; weights of the tower's own parts that do not fit (a
        # config.json with fewer layers than the weights) would be dropped silently.
        extra = sorted(
            key
            for key in info["unexpected_keys"]
            if key.removeprefix("vision_model.").split(".")[0] in _VISION_TOWER_PARTS
        )
        if extra:
            raise ValueError(
                f"VisionConfig.pretrained: {path} has {len(extra)} encoder weights its config.json has no "
                f"place for (e.g. {extra[:3]}); check num_hidden_layers and the other sizes there"
            )
        return model

    def _set_input_size(self, input_size: int) -> None:
        """Make the HF model run natively at ``input_size`` by resampling its position table once.

        The embeddings' ``image_size`` and ``config.image_size`` are set to ``input_size`` even when the
        table already has the right grid (a 384-px checkpoint with 14-px patches has the 27x27 table of
        378 px), so that tiles of ``input_size`` are accepted and ``save_pretrained`` records it.
        """
        emb = self.model.embeddings
        grid = input_size // emb.patch_size
        old = emb.position_embedding.weight
        if old.shape[0] != self._num_prefix_tokens + grid * grid:
            self._resample_position_table(grid)
        emb.image_size = input_size
        # Shared with the model, so save_pretrained records the size the table is now for.
        self.model.config.image_size = input_size

    def _resample_position_table(self, grid: int) -> None:
        emb = self.model.embeddings
        old = emb.position_embedding.weight
        with torch.no_grad():
            new_weight = resize_position_embedding(old.detach(), grid, self._num_prefix_tokens)
        new = nn.Embedding(new_weight.shape[0], new_weight.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight.copy_(new_weight)
        new.weight.requires_grad_(old.requires_grad)
        emb.position_embedding = new
        emb.position_ids = torch.arange(new_weight.shape[0], device=old.device).expand((1, -1))
        emb.num_patches = grid * grid
        emb.num_positions = new_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def image_size(self) -> int:
        """The resolution the loaded (or configured) weights were trained at, e.g. 378."""
        return self._image_size

    @property
    def input_size(self) -> int:
        """The tile size the encoder runs on, e.g. 672."""
        return int(self.model.embeddings.image_size)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid at ``input_size`` (27 at 378 px, 48 at 672 px for patch 14)."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per tile at ``input_size`` (CLS excluded): 729 at 378 px, 2304 at 672 px."""
        return self.grid_size**2

    @property
    def image_mean(self) -> tuple[float, ...]:
        """Per-channel mean the tiles must be normalised with (CLIP: OpenAI's; SigLIP: 0.5)."""
        return self._mean

    @property
    def image_std(self) -> tuple[float, ...]:
        """Per-channel std the tiles must be normalised with (CLIP: OpenAI's; SigLIP: 0.5)."""
        return self._std

    @staticmethod
    def _norm_stats(cfg: VisionConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The config's mean/std, else the checkpoint's preprocessor_config.json ones, else the kind's."""
        if cfg.image_mean is not None and cfg.image_std is not None:
            return cfg.image_mean, cfg.image_std
        defaults = _KIND_DEFAULTS[cfg.kind]
        if cfg.pretrained is not None:
            path = Path(cfg.pretrained) / "preprocessor_config.json"
            if path.is_file():
                pre = _read_json(path)
                if "image_mean" in pre and "image_std" in pre:
                    return _channel_stats(pre, "image_mean", path), _channel_stats(pre, "image_std", path)
        return tuple(defaults["mean"]), tuple(defaults["std"])

    def save_pretrained(self, path: str | Path) -> None:
        """Write the wrapped HF model (at input_size) so that ``VisionConfig(pretrained=path)`` reloads it,
        with its normalisation in ``preprocessor_config.json`` (where ``_norm_stats`` reads it back)."""
        self.model.save_pretrained(path)
        stats = {"image_mean": list(self.image_mean), "image_std": list(self.image_std)}
        (Path(path) / "preprocessor_config.json").write_text(json.dumps(stats, indent=2) + "\n")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"VisionEncoder input must be (N, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        if pixel_values.dtype == torch.uint8:  # raw tiles from ImageProcessor(dtype=torch.uint8)
            pixel_values = normalize_pixels(pixel_values, self.image_mean, self.image_std)
        model = self.model
        # The HF model's own forward would also run the blocks after feature_layer, apply SigLIP's
        # post-layernorm and keep every hidden state alive to return one; its submodules are used instead
        # (the tests check the result against output_hidden_states).
        hidden = model.embeddings(pixel_values)
        if self.cfg.kind == "clip":
            hidden = model.pre_layrnorm(hidden)
        for block in model.encoder.layers[: self._num_blocks_run]:
            hidden = block(hidden, None)  # no attention mask: every tile is all patches
        return hidden[:, self._num_prefix_tokens :]


def load_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The encoder ``cfg`` describes: loaded from ``cfg.pretrained`` or randomly initialised."""
    return VisionEncoder(cfg)


# --- OpenCLIP checkpoints ----------------------------------------------------------------------------

_OC_GLOBAL = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_OC_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OC_FUSED = ("attn.in_proj_weight", "attn.in_proj_bias")  # split into q/k/v
_OC_OPTIONAL = ("proj",)  # the CLIP embedding projection, unused for patch features
_OC_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# OpenCLIP ViT configs use head_width 64 except these widths (ViT-H/g/bigG/e), all with 16 heads.
_OC_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16, 1792: 16}


def _strip_ddp_prefix(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """OpenCLIP's training checkpoints hold the DDP-wrapped model, every key under ``module.``; its own
    loader strips that prefix, and so does this (only when every key has it)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _visual_items(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    sd = _strip_ddp_prefix(sd)
    visual = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not visual:
        raise KeyError(f"not an OpenCLIP visual tower state dict: no keys start with {prefix!r}")
    return visual


def _expected_open_clip_shapes(visual: Mapping[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    """Every key an OpenCLIP ViT visual tower of these sizes has, with its shape; checks the state dict."""
    for key in ("conv1.weight", "positional_embedding"):
        if key not in visual:
            raise KeyError(f"OpenCLIP state dict is missing {prefix}{key}")
    width, channels, patch, patch_w = visual["conv1.weight"].shape
    num_positions = visual["positional_embedding"].shape[0]
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1 or patch != patch_w or channels != 3:
        raise ValueError(
            f"unsupported OpenCLIP visual tower: conv1 {tuple(visual['conv1.weight'].shape)}, "
            f"positional_embedding {tuple(visual['positional_embedding'].shape)} "
            "(want 3-channel square patches, and one class token plus a square grid)"
        )
    indices = {int(m.group(1)) for k in visual if (m := _OC_BLOCK_RE.fullmatch(k))}
    num_layers = max(indices) + 1 if indices else 0
    if num_layers == 0:
        raise KeyError(f"OpenCLIP state dict has no {prefix}transformer.resblocks.* keys")
    fc_key = "transformer.resblocks.0.mlp.c_fc.weight"
    if fc_key not in visual:
        raise KeyError(f"OpenCLIP state dict is missing {prefix}{fc_key}")
    mlp = visual[fc_key].shape[0]

    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (num_positions, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
        "ln_post.weight": (width,),
        "ln_post.bias": (width,),
    }
    block_shapes = {
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (mlp, width),
        "mlp.c_fc.bias": (mlp,),
        "mlp.c_proj.weight": (width, mlp),
        "mlp.c_proj.bias": (width,),
    }
    for i in range(num_layers):
        shapes.update({f"transformer.resblocks.{i}.{k}": s for k, s in block_shapes.items()})
    return shapes


def _check_open_clip_keys(visual: Mapping[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = _expected_open_clip_shapes(visual, prefix)
    missing = sorted(k for k in shapes if k not in visual)
    unexpected = sorted(k for k in visual if k not in shapes and k not in _OC_OPTIONAL)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {[prefix + k for k in missing[:4]]}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected keys, e.g. {[prefix + k for k in unexpected[:4]]} "
                "(only plain pre-norm ViT towers without layer scale or attention pooling are supported)"
            )
        raise KeyError("OpenCLIP visual state dict does not match a ViT tower: " + "; ".join(parts))
    for key, shape in shapes.items():
        if tuple(visual[key].shape) != shape:
            raise ValueError(
                f"OpenCLIP key {prefix}{key} has shape {tuple(visual[key].shape)}, expected {shape}"
            )
    return shapes


def convert_open_clip_state_dict(
    sd: Mapping[str, torch.Tensor], *, prefix: str = "visual."
) -> dict[str, torch.Tensor]:
    """Map an OpenCLIP ViT visual tower's weights to transformers ``CLIPVisionModel`` keys.

    ``sd`` may be the full CLIP model's state dict: only keys under ``prefix`` are read (use ``prefix=""``
    for a bare ``model.visual.state_dict()``); a ``module.`` prefix on every key (OpenCLIP's DDP training
    checkpoints) is removed first. Missing or unexpected keys under ``prefix`` and wrong shapes
    raise. The fused ``attn.in_proj_{weight,bias}`` rows are (q; k; v) as in ``nn.MultiheadAttention`` and
    are split into q/k/v_proj; ``visual.proj`` (the width x embed_dim projection into the joint CLIP space)
    is dropped. The tensors are copies, so the result can be saved with safetensors.
    """
    visual = _visual_items(sd, prefix)
    shapes = _check_open_clip_keys(visual, prefix)
    out: dict[str, torch.Tensor] = {}
    for key in shapes:
        if key in _OC_GLOBAL:
            out[_OC_GLOBAL[key]] = visual[key].clone()
            continue
        match = _OC_BLOCK_RE.fullmatch(key)
        assert match is not None  # every non-global expected key is a block key
        i, name = match.group(1), match.group(2)
        base = f"encoder.layers.{i}."
        if name in _OC_FUSED:
            kind = "weight" if name.endswith("weight") else "bias"
            for proj, part in zip(("q", "k", "v"), visual[key].chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{proj}_proj.{kind}"] = part.clone()
        else:
            out[base + _OC_BLOCK[name]] = visual[key].clone()
    return out


def open_clip_vision_config(
    sd: Mapping[str, torch.Tensor],
    *,
    prefix: str = "visual.",
    num_heads: int | None = None,
    hidden_act: str = "quick_gelu",
    feature_layer: int = -1,
    input_size: int | None = None,
) -> VisionConfig:
    """The ``VisionConfig`` of an OpenCLIP ViT visual tower, with sizes read from the weight shapes.

    Two things are not in the shapes. The head count: OpenCLIP's default head width is 64, but ViT-H/g/bigG/e
    (width 1280/1408/1664/1792) use 16 heads; that rule is applied unless ``num_heads`` is given. The
    activation: DFN and OpenAI CLIP models (OpenCLIP names ending in ``-quickgelu``) use QuickGELU, the
    default here; LAION-trained OpenCLIP models use ``"gelu"``. A wrong value for either changes the
    outputs without any error.
    """
    visual = _visual_items(sd, prefix)
    _check_open_clip_keys(visual, prefix)
    width, _, patch, _ = visual["conv1.weight"].shape
    grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
    num_layers = 1 + max(int(m.group(1)) for k in visual if (m := _OC_BLOCK_RE.fullmatch(k)))
    if num_heads is None:
        if width not in _OC_HEADS_BY_WIDTH and width % 64:
            raise ValueError(f"cannot infer the head count of width {width}; pass num_heads")
        num_heads = _OC_HEADS_BY_WIDTH.get(width, width // 64)
    return VisionConfig(
        kind="clip",
        image_size=grid * patch,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,  # OpenCLIP's LayerNorm uses torch's default
        feature_layer=feature_layer,
        input_size=input_size,
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without unpickling arbitrary objects.

    ``.safetensors`` is read with safetensors; ``.bin``/``.pt``/``.pth`` with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. A training
    checkpoint's ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise ValueError(f"{path}: expected a .safetensors, .bin, .pt or .pth checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # cut or damaged archive
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj


def convert_open_clip_checkpoint(
    src: str | Path, dst_dir: str | Path, *, num_heads: int | None = None, hidden_act: str = "quick_gelu"
) -> VisionConfig:
    """Convert a local OpenCLIP checkpoint file into a transformers ``CLIPVisionModel`` directory.

    Writes ``dst_dir/config.json`` and ``dst_dir/model.safetensors`` (vision tower only) and returns the
    ``VisionConfig`` that loads it; see the module docstring for the DFN5B walk-through and
    ``open_clip_vision_config`` for ``num_heads``/``hidden_act``. OpenCLIP's own training checkpoints
    (``{"state_dict": {"module.visual...": ...}}``) are read too.
    """
    from safetensors.torch import save_file

    sd = load_state_dict_file(src)
    arch = open_clip_vision_config(sd, num_heads=num_heads, hidden_act=hidden_act)
    weights = convert_open_clip_state_dict(sd)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    hf_vision_config(arch).save_pretrained(dst)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, dst / "model.safetensors", metadata={"format": "pt"}
    )
    return VisionConfig(kind="clip", pretrained=str(dst))
