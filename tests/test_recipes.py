"""Recipes: every YAML under recipes/ validates, bad recipes fail naming the field path, and round trips."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mm15.data.mixture import SFT_TOP_WEIGHTS, effective_weights, sft_mixture
from mm15.train.config import (
    DataConfig,
    ModelSpec,
    OptimizerConfig,
    RecipeConfig,
    ScheduleConfig,
    load_recipe,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The variants' one-stage SFT recipes (video, ui) are tested in tests/test_video.py and tests/test_ui.py.
VARIANT_RECIPES = ("video", "ui")
RECIPE_FILES = sorted(p for p in RECIPES.glob("*.yaml") if p.stem not in VARIANT_RECIPES)
GPU_RECIPES = ("mm15-1b", "mm15-3b", "mm15-3b-moe")


def _tiny() -> dict[str, Any]:
    return yaml.safe_load((RECIPES / "tiny.yaml").read_text())


def test_recipes_exist() -> None:
    names = {p.stem for p in RECIPE_FILES}
    assert {"tiny", "smol", *GPU_RECIPES} <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_loads_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    assert [s.name for s in recipe.stages] == ["pretrain", "ocr", "sft"]
    assert recipe.stages[0].parent == "init"
    assert [s.parent for s in recipe.stages[1:]] == ["pretrain", "ocr"]
    # Through YAML text as well, so to_dict() holds only what safe_dump can write.
    data = yaml.safe_load(yaml.safe_dump(recipe.to_dict()))
    assert RecipeConfig.from_dict(data) == recipe
    assert RecipeConfig.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()
    for stage in recipe.stages:
        assert stage.grad_accum(1) * stage.micro_batch == stage.global_batch
        leaves = {leaf.name for _, leaf, _ in stage.data.mixture_node().leaves()}
        assert set(stage.data.resolve_sources()) == leaves


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_have_the_paper_settings(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    pre, ocr, sft = recipe.stages
    assert (pre.max_steps, pre.global_batch, pre.data.seq_length) == (200_000, 512, 4096)
    assert effective_weights(pre.data.mixture_node()) == pytest.approx(
        {"caption": 0.5, "interleaved": 0.1, "text": 0.4}
    )
    assert (ocr.max_steps, ocr.global_batch, ocr.optimizer.lr) == (30_000, 256, 1e-5)
    assert ocr.optimizer.name == "adafactor"
    assert ocr.data.sampling == "balanced"
    plan = recipe.image_plan("ocr")
    assert plan.split and plan.tile_size * 2 == 1344 and plan.n_min == plan.n_max == 4
    assert (sft.max_steps, sft.global_batch, sft.optimizer.lr) == (23_000, 256, 2e-5)
    for stage in recipe.stages:
        assert {"encoder", "connector", "llm"} <= set(stage.trainable)
        assert stage.schedule.min_lr_ratio == 0.1
        # Real data only: a GPU recipe must not fall back to synthetic sources.
        assert all(spec.startswith("shards:") for spec in stage.data.resolve_sources().values())
    assert ("routers" in pre.trainable) == name.endswith("moe")


@pytest.mark.parametrize("name", ["tiny", "smol", *GPU_RECIPES])
def test_sft_mixture_matches_the_spec(name: str) -> None:
    got = effective_weights(load_recipe(RECIPES / f"{name}.yaml").stage("sft").data.mixture_node())
    want = effective_weights(sft_mixture())
    if name in ("tiny", "smol"):
        # The synthetic recipes split the multi-image group between compare/count and ICL episodes.
        assert got["icl"] == pytest.approx(got["multi-image"])
        got["multi-image"] += got.pop("icl")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-6), key
    # The spec's table (% of SFT samples) and the top-level groups.
    table = {"text-rich": 37.2, "refer-ground": 22.5, "general": 11.3}
    table |= {"math": 5.6, "code": 2.3, "science": 1.1}
    for key, percent in table.items():
        assert got[key] * 100 == pytest.approx(percent, abs=0.05), key
    single = sum(got[k] for k in table)
    assert math.isclose(single, SFT_TOP_WEIGHTS["single-image"], rel_tol=1e-6)
    assert math.isclose(got["multi-image"], 0.1, rel_tol=1e-6)
    assert math.isclose(got["text-only"], 0.1, rel_tol=1e-6)


def test_tiny_recipe_stages() -> None:
    recipe = load_recipe(RECIPES / "tiny.yaml")
    pre, ocr, _ = recipe.stages
    assert effective_weights(pre.data.mixture_node()) == pytest.approx(
        {"caption": 0.5, "interleaved": 0.1, "text": 0.4}
    )
    # MM1.5's "text" is the synthetic text-only generator.
    assert pre.data.resolve_sources()["text"] == "synth:text-only"
    assert all(spec.startswith("synth:ocr-") for spec in ocr.data.resolve_sources().values())
    assert not recipe.image_plan("pretrain").split and recipe.image_plan("ocr").split
    # Measured faster in float32 than under bf16 autocast (the recipe's header); smol keeps the default.
    assert {stage.autocast for stage in recipe.stages} == {"fp32"}
    assert {stage.autocast for stage in load_recipe(RECIPES / "smol.yaml").stages} == {"auto"}


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


BAD = [
    # (what, edit "dotted.path" -> value, expected error prefix after "recipe.")
    ("unknown key", "stages.0.optimizer.lrr", 1.0, "stages[0].optimizer.lrr: unknown key"),
    ("unknown top key", "stagse", [], "stagse: unknown key"),
    ("negative lr", "stages.1.optimizer.lr", -1, "stages[1].optimizer.lr: must be > 0, got -1"),
    ("lr as YAML string", "stages.0.optimizer.lr", "1e-3", "stages[0].optimizer.lr: must be a number"),
    ("duplicate stage", "stages.2.name", "ocr", "stages[2].name: duplicate stage name 'ocr'"),
    ("later parent", "stages.1.parent", "sft", "stages[1].parent: 'sft' is a later stage"),
    ("unknown parent", "stages.1.parent", "pretrian", "stages[1].parent: 'pretrian' is neither"),
    ("init parent late", "stages.2.parent", "init", "stages[2].parent: 'init' is only for the first"),
    ("bad trainable", "stages.0.trainable", ["vision"], "stages[0].trainable: unknown module 'vision'"),
    ("batch split", "stages.0.global_batch", 10, "stages[0].global_batch: (10) must be a multiple"),
    ("bool as int", "stages.0.max_steps", True, "stages[0].max_steps: must be an integer"),
    (
        "unknown source",
        "stages.0.data.mixture.captions",
        5,
        "stages[0].data.mixture.captions: unknown source",
    ),
    (
        "bad weight",
        "stages.0.data.mixture.caption",
        -1,
        "stages[0].data.mixture.caption: weight must be >= 0",
    ),
    (
        "bad synth",
        "stages.0.data.sources.text",
        "synth:nope",
        "stages[0].data.sources.text: unknown synthetic",
    ),
    ("bad format", "stages.0.data.sources.text", "/data/text", "stages[0].data.sources.text: must be"),
    (
        "raw llava",  # training reads packed shards; the message says how to pack
        "stages.0.data.sources.text",
        "llava:/data/llava.json",
        "stages[0].data.sources.text: 'llava' files are trained on as shards: pack them first",
    ),
    (
        "raw text",  # the command names the format: pack's default (llava) refused a text file
        "stages.0.data.sources.text",
        "text:/data/chat.jsonl",
        "stages[0].data.sources.text: 'text' files are trained on as shards: pack them first (mm15 data pack "
        "FILE --format text --images DIR",
    ),
    (
        "unused source",
        "stages.0.data.sources.extra",
        "synth:caption",
        "stages[0].data.sources.extra: not used",
    ),
    ("unbalanced", "stages.1.data.mixture.synth/ocr-sign", 2, "stages[1].data.sampling: 'balanced' needs"),
    ("bad choice", "stages.0.autocast", "fp16", "stages[0].autocast: must be one of"),
    ("bad prefetch", "stages.2.data.prefetch", "processes", "stages[2].data.prefetch: must be one of"),
    ("bad plan", "stages.1.image.n_max", 2, "stages[1].image: ImagePlanConfig.n_max (2) must be >="),
    ("tile size", "stages.1.image.tile_size", 96, "stages[1].image.tile_size: 96 is not the encoder"),
    ("betas", "stages.0.optimizer.betas", [0.9, 1.5], "stages[0].optimizer.betas[1]: must be in [0, 1)"),
    ("scale and lr", "stages.0.optimizer.module_lr", {"llm": 0.1}, None),
    ("warmup", "stages.0.schedule.warmup_steps", 61, "stages[0].schedule.warmup_steps: (61) must be <="),
    ("unknown preset", "model.preset", "mm15-2b", "model.preset: unknown preset 'mm15-2b'"),
    ("override field", "model.overrides", {"llm": {"layers": 2}}, "model.overrides.llm.layers: unknown"),
    ("override section", "model.overrides", {"decoder": {}}, "model.overrides.decoder: unknown section"),
    ("moe field", "model.overrides", {"moe": {"experts": 4}}, "model.overrides.moe.experts: unknown field"),
    ("moe value", "model.overrides", {"moe": {"top_k": 9, "num_experts": 4}}, "model.overrides.moe: "),
    ("moe type", "model.overrides", {"moe": 4}, "model.overrides.moe: must be a mapping"),
    ("missing data", "stages.0.data", None, "stages[0].data: must be a mapping"),
    (
        "routers of a dense model",
        "stages.2.trainable",
        ["routers"],
        "stages[2].trainable: only 'routers', but",
    ),
    (
        "routers among others on a dense model",
        "stages.2.trainable",
        ["llm", "routers"],
        "stages[2].trainable: names 'routers', but the model has no mixture-of-experts layers",
    ),
    # A stage named ".." wrote its checkpoints and final model beside the run directory.
    ("dot-dot stage", "stages.0.name", "..", "stages[0].name: must be a non-empty name without '/', and not"),
    ("dot stage", "stages.0.name", ".", "stages[0].name: must be a non-empty name"),
    (
        "nothing learns",
        "stages.0.optimizer.lr_scale",
        {"encoder": 0.0, "connector": 0.0, "llm": 0.0},
        "stages[0].optimizer.lr_scale: gives every trainable module",
    ),
    (
        "longer than the context",
        "model.overrides",
        {"llm": {"max_position_embeddings": 64}},
        "stages[0].data.seq_length: 1024 is longer than the decoder's context (64 positions",
    ),
    (
        "huge unsplit count",  # the token costs are found by trying every count: 10^12 never finished
        "stages.2.image.max_images_to_split",
        10**12,
        "stages[2].image: ImagePlanConfig.max_images_to_split must be in [0, 1024]",
    ),
]


@pytest.mark.parametrize(("what", "key", "value", "prefix"), BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_names_the_field(what: str, key: str, value: Any, prefix: str | None) -> None:
    data = _tiny()
    if what == "scale and lr":
        data["stages"][0]["optimizer"]["lr_scale"] = {"llm": 0.5}
        prefix = "stages[0].optimizer.module_lr: modules ['llm'] also have an lr_scale"
    _set(data, key, value)
    with pytest.raises(ValueError) as info:
        RecipeConfig.from_dict(data)
    assert str(info.value).startswith(f"recipe.{prefix}"), str(info.value)


def test_moe_overrides_add_or_remove_experts() -> None:
    """``overrides.moe`` gives a dense preset MM1.5's MoE settings with the fields changed, and the model
    the recipe builds has them; ``moe: null`` makes the MoE preset dense."""
    from mm15.model.mm15 import MM15Model
    from mm15.model.moe import MoEConfig, moe_layers

    data = _tiny()
    data["model"]["overrides"] = {"moe": {"num_experts": 4}}
    cfg = RecipeConfig.from_dict(data).model.build()
    assert cfg.moe == MoEConfig(num_experts=4)  # top-2, every 2nd layer, aux coefficients: MM1.5's
    layers = list(moe_layers(MM15Model.build(cfg).llm))
    assert len(layers) == cfg.llm.num_layers // 2 and layers[0].gate_proj.shape[0] == 4
    data["model"]["overrides"] = {"moe": {}}
    assert RecipeConfig.from_dict(data).model.build().moe == MoEConfig()
    dense = ModelSpec.from_dict({"preset": "mm15-3b-moe", "overrides": {"moe": None}})
    assert dense.build().moe is None
    # Routers alone train on a MoE model, and on a stage whose model comes from a directory (it may have
    # them); on the dense recipe's own model they are refused (test_bad_recipe_names_the_field).
    data["model"]["overrides"] = {"moe": {"num_experts": 4}}
    data["stages"][2]["trainable"] = ["routers"]
    assert RecipeConfig.from_dict(data).stages[2].trainable == ("routers",)
    data = _tiny()
    data["stages"] = [{**data["stages"][0], "parent": "./runs/moe/sft/final", "trainable": ["routers"]}]
    assert RecipeConfig.from_dict(data).stages[0].parent == "./runs/moe/sft/final"


def _override_fields() -> list[tuple[str, str, Any]]:
    """(section, field, type) of every field ``model.overrides`` reaches."""
    import dataclasses
    import typing

    from mm15.model.moe import MoEConfig
    from mm15.model.presets import preset
    from mm15.train.config import _OVERRIDE_SECTIONS

    cfg = preset("tiny")
    sections = {name: getattr(cfg, name) for name in _OVERRIDE_SECTIONS if name != "moe"}
    sections["moe"] = MoEConfig()  # what ``moe:`` gives a dense preset
    assert set(sections) == set(_OVERRIDE_SECTIONS)
    return [
        (section, f.name, typing.get_type_hints(type(obj))[f.name])
        for section, obj in sections.items()
        for f in dataclasses.fields(obj)
    ]


def _wrong_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a field of type ``hint`` (YAML's usual slips among them)."""
    import types
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = args
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return ["nope", 5]
    if origin is tuple:
        return ["0.5", ["x"]]
    return {
        bool: ["false", 1, ["x"]],
        int: ["4", 4.5, True, ["x"]],
        float: ["1e-3", True, ["x"]],
        str: [5, ["x"]],
    }[hint]


OVERRIDE_CASES = [
    (section, name, bad) for section, name, hint in _override_fields() for bad in _wrong_values(hint)
]


@pytest.mark.parametrize(
    ("section", "name", "bad"), OVERRIDE_CASES, ids=[f"{s}.{n}={b!r}" for s, n, b in OVERRIDE_CASES]
)
def test_a_wrong_typed_model_override_is_refused_naming_the_field(section: str, name: str, bad: Any) -> None:
    """Override values went to the model's configs unchecked: ``image.split: "false"`` loaded as a
    (truthy) string, ``moe.seed: "abc"`` passed ``--check`` and crashed in training, and other wrong
    types gave messages that did not name the field."""
    data = _tiny()
    data["model"]["overrides"] = {section: {name: bad}}
    with pytest.raises(ValueError) as info:
        RecipeConfig.from_dict(data)
    assert str(info.value).startswith(f"recipe.model.overrides.{section}.{name}"), str(info.value)


SIZE_MISFITS = [
    (
        {"image": {"tokens_per_tile": 4}},
        "MM15Config.image.tokens_per_tile is 4 but connector.num_queries is 16",
    ),
    (
        {"connector": {"vision_dim": 32}},
        "MM15Config.connector.vision_dim is 32 but the encoder's hidden size is 64",
    ),
    ({"connector": {"llm_dim": 64}}, "MM15Config.connector.llm_dim is 64 but the LLM's hidden size is 128"),
    (
        {"vision": {"image_size": 32}},
        "MM15Config.connector.num_patches is 64 but the encoder's patches per tile is 16",
    ),
    ({"moe": {"every": 99}}, "MM15Config.moe.every is 99 but the LLM has 4 layers"),
    ({"vision": {"hidden_act": "nope"}}, "VisionConfig.hidden_act must be a transformers activation name"),
]


@pytest.mark.parametrize(("overrides", "message"), SIZE_MISFITS, ids=[m for _, m in SIZE_MISFITS])
def test_model_parts_that_do_not_fit_are_refused_when_the_recipe_loads(overrides: dict, message: str) -> None:
    """They passed `mm15 train --check` and stopped the run when the model was built, naming no field."""
    data = _tiny()
    data["model"]["overrides"] = overrides
    with pytest.raises(ValueError) as info:
        RecipeConfig.from_dict(data)
    assert str(info.value).startswith("recipe.model.overrides") and message in str(info.value), str(
        info.value
    )
    # Changed together, the same sizes fit.
    data["model"]["overrides"] = {
        "vision": {"image_size": 32},
        "connector": {"num_patches": 16},
        "image": {"tile_size": 32},
        "moe": {"every": 4},
    }
    RecipeConfig.from_dict(data)


def test_model_overrides_of_the_right_type_load_as_the_fields_type() -> None:
    data = _tiny()
    data["model"]["overrides"] = {
        "image": {"split": False},
        "llm": {"rope_theta": 10000},  # an integer for a float field
        "vision": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]},  # YAML lists
        "moe": {"num_experts": 4, "seed": 3},
    }
    cfg = RecipeConfig.from_dict(data).model.build()
    assert cfg.image.split is False and cfg.llm.rope_theta == 10000.0
    assert isinstance(cfg.llm.rope_theta, float)
    assert cfg.vision.image_mean == (0.5, 0.5, 0.5) and cfg.vision.image_std == (0.25, 0.25, 0.25)
    assert cfg.moe is not None and (cfg.moe.num_experts, cfg.moe.seed) == (4, 3)
    data["model"]["overrides"] = {"image": {"split": "false"}}
    with pytest.raises(
        ValueError, match=r"^recipe\.model\.overrides\.image\.split: must be true or false, got 'false'"
    ):
        RecipeConfig.from_dict(data)


def test_missing_and_default_fields() -> None:
    data = _tiny()
    del data["stages"][0]["name"]
    with pytest.raises(ValueError, match=r"^recipe\.stages\[0\]\.name: required$"):
        RecipeConfig.from_dict(data)
    data = _tiny()
    for stage in data["stages"]:
        del stage["parent"]  # defaults: init, then the previous stage
    recipe = RecipeConfig.from_dict(data)
    assert [s.parent for s in recipe.stages] == ["init", "pretrain", "ocr"]
    assert recipe.stages[0].max_corrupt_fraction == 0.01 and recipe.stages[0].nan_policy == "error"
    data["stages"][1]["parent"] = "./runs/elsewhere/pretrain"  # a checkpoint path: syntax only
    assert RecipeConfig.from_dict(data).stages[1].parent == "./runs/elsewhere/pretrain"


def test_a_key_repeated_in_a_mapping_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys: a stray second "caption:" silently changed the mixture.
    text = (RECIPES / "mm15-1b.yaml").read_text()
    flow = "mixture: {caption: 50, interleaved: 10, text: 40}"
    assert flow in text
    twice = text.replace(flow, "mixture: {caption: 50, interleaved: 10, text: 40, caption: 5}")
    path = tmp_path / "twice.yaml"
    path.write_text(twice)
    line = twice[: twice.index(flow[:9])].count("\n") + 1
    column = twice.split("\n")[line - 1].rindex("caption: 5") + 1
    message = f"line {line}, column {column}: while reading a mapping (first 'caption' on line {line}), "
    with pytest.raises(ValueError, match=re.escape(message + "key 'caption' appears twice")):
        load_recipe(path)


def test_yaml_merge_keys_are_read_and_may_be_overridden(tmp_path: Path) -> None:
    """The duplicate-key check built the "<<" key before PyYAML applied the merge: a valid recipe was
    "not valid YAML"."""
    text = (RECIPES / "tiny.yaml").read_text()
    first = "optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.1, betas: [0.9, 0.95]}"
    third = "optimizer: {name: adamw, lr: 3.0e-3, weight_decay: 0.0, betas: [0.9, 0.95]}"
    assert first in text and third in text
    merged = text.replace(first, "optimizer: &adamw " + first[len("optimizer: ") :]).replace(
        third, "optimizer: {<<: *adamw, lr: 3.0e-3, weight_decay: 0.0}"
    )
    path = tmp_path / "merge.yaml"
    path.write_text(merged)
    assert load_recipe(path).stages[2].optimizer == load_recipe(RECIPES / "tiny.yaml").stages[2].optimizer
    # A key written twice by hand is still an error, merge or not.
    path.write_text(merged.replace("{<<: *adamw, lr: 3.0e-3,", "{<<: *adamw, lr: 3.0e-3, lr: 1.0,"))
    with pytest.raises(ValueError, match="key 'lr' appears twice"):
        load_recipe(path)


def test_a_sequence_too_short_for_any_image_is_refused_at_load() -> None:
    # The tiny SFT plan: a single image costs at least (4 tiles + overview) x 16 image tokens, and a sample
    # of three or more images, which are never split, 3 x 16; each tile's "(k, i, j)" marker comes on top.
    # tiny.yaml's decoder reads SmolLM2's tokenizer, so a marker counts its lower bound of 7 tokens
    # (SmolLM2 takes 9): 3 x (16 + 7) = 69. The image tokens alone (48) once passed.
    data = _tiny()
    sft = data["stages"][2]
    for short in (64, 68):
        sft["data"]["seq_length"] = short
        with pytest.raises(
            ValueError,
            match=rf"stages\[2\]\.data\.seq_length: {short} tokens cannot hold .* 69 tokens: 48 image tokens",
        ):
            RecipeConfig.from_dict(data)
    sft["data"]["seq_length"] = 69
    RecipeConfig.from_dict(data)
    # The tiny preset's own byte tokenizer is counted exactly: a marker is 9 bytes, 3 x (16 + 9) = 75.
    data["model"].pop("overrides")
    sft["data"]["seq_length"] = 74
    with pytest.raises(ValueError, match=r"seq_length: 74 tokens cannot hold .* 75 tokens"):
        RecipeConfig.from_dict(data)
    sft["data"]["seq_length"] = 75
    RecipeConfig.from_dict(data)
    # Text alone needs no room for an image.
    sft["data"]["seq_length"] = 40
    sft["data"]["mixture"] = {"text-only": 1}
    sft["data"]["sources"] = {"text-only": "synth:text-only"}
    RecipeConfig.from_dict(data)


def test_the_byte_tokenizer_count_is_what_the_tiny_model_spends_on_a_span() -> None:
    """The exact count used for the tiny byte tokenizer equals the model's own span of the cheapest sample."""
    from mm15.geometry import plan_image
    from mm15.model.llm import build_tiny_tokenizer
    from mm15.model.mm15 import image_span_ids

    data = _tiny()
    data["model"].pop("overrides")
    data["stages"][2]["data"]["seq_length"] = 75
    recipe = RecipeConfig.from_dict(data)
    plan = recipe.image_plan("sft")
    tokenizer = build_tiny_tokenizer()
    spans = [plan_image(64, 64, plan, image_index=k, images_in_sample=3) for k in range(3)]
    assert sum(len(image_span_ids(span, tokenizer, 0)) for span in spans) == 75


def test_a_raw_json_file_named_as_shards_is_refused_at_load(tmp_path: Path) -> None:
    """``shards:records.jsonl`` passed --check, then the first read said "corrupt tar stream"."""
    from typer.testing import CliRunner

    from mm15.cli import app

    raw = tmp_path / "records.jsonl"
    raw.write_text('{"image": "a.png", "conversations": []}\n')
    data = _tiny()
    data["stages"][0]["data"]["sources"]["text"] = f"shards:{raw}"
    message = (
        f"recipe.stages[0].data.sources.text: {str(raw)!r} is a file but not a .tar shard: a shard source "
        "is a folder of shards or one .tar shard. LLaVA, interleaved and text JSON/JSONL files are trained "
        "on as shards: pack them first (mm15 data pack FILE"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        RecipeConfig.from_dict(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(recipe), "--check"])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "mm15 data pack" in flat and "sources.text" in flat, result.output
    # A .tar shard, a folder and a path that is not there (checked when the stage starts) still load.
    (tmp_path / "one.tar").write_bytes(b"")
    for target in (tmp_path / "one.tar", tmp_path, tmp_path / "absent.jsonl"):
        data["stages"][0]["data"]["sources"]["text"] = f"shards:{target}"
        RecipeConfig.from_dict(data)


def test_a_recipe_nested_too_deeply_is_a_clear_error(tmp_path: Path) -> None:
    """5000 nested lists were a RecursionError traceback in ``mm15 train --check`` and ``mm15 demo``."""
    from typer.testing import CliRunner

    from mm15.cli import app

    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{deep}: not valid YAML (nested too deeply)")):
        load_recipe(deep)
    result = CliRunner().invoke(app, ["train", str(deep), "--check"])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "not valid YAML (nested too deeply)" in flat, result.output
    assert not isinstance(result.exception, RecursionError)


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1])
def test_a_seed_beyond_64_bits_is_refused_at_load(seed: int) -> None:
    """``seed: 2**70`` passed --check, then the run stopped on "Overflow when unpacking long long"."""
    data = _tiny()
    data["seed"] = seed
    with pytest.raises(ValueError, match=re.escape("recipe.seed: must fit in a 64-bit signed integer")):
        RecipeConfig.from_dict(data)
    for fits in (2**63 - 1, -(2**63), 0):
        data["seed"] = fits
        assert RecipeConfig.from_dict(data).seed == fits


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # A string that is no number in exponent form: the YAML hint would send the user astray.
        ("stages.0.max_steps", "10", "stages[0].max_steps: must be an integer, got '10' (str)"),
        ("stages.0.optimizer.lr", "0.001", "stages[0].optimizer.lr: must be a number, got '0.001' (str)"),
        ("stages.0.compile", "1e-3", "stages[0].compile: must be true or false, got '1e-3' (str)"),
        # Exponent form in a number field: YAML 1.1 read it as a string, and the hint says how to write it.
        (
            "stages.0.optimizer.lr",
            "1e-3",
            "stages[0].optimizer.lr: must be a number, got '1e-3' (str) (YAML reads 1e-3 as a string: "
            "write it with a dot and a signed exponent, e.g. 1.0e-3)",
        ),
        (
            "stages.0.max_steps",
            "1e3",
            "stages[0].max_steps: must be an integer, got '1e3' (str) (YAML reads 1e3 as a string: write "
            "the integer in full, e.g. 1000 for 1e3)",
        ),
    ],
)
def test_the_yaml_exponent_hint_only_where_it_can_be_the_cause(key: str, value: str, message: str) -> None:
    data = _tiny()
    _set(data, key, value)
    with pytest.raises(ValueError) as info:
        RecipeConfig.from_dict(data)
    assert str(info.value) == f"recipe.{message}"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML") as raised:
        load_recipe(bad)
    assert str(raised.value).startswith(f"{bad}: not valid YAML: line 2, column 1: ")
    assert "<unicode string>" not in str(raised.value)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match=r"^recipe: must be a mapping"):
        load_recipe(bad)
    bad.write_bytes(b"\xce\xff binary")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match=r"gone.yaml: no such file"):
        load_recipe(tmp_path / "gone.yaml")
    with pytest.raises(FileNotFoundError, match=r"is a directory, not a file"):
        load_recipe(tmp_path)


def test_grad_accum_checks_world_size() -> None:
    stage = load_recipe(RECIPES / "mm15-3b.yaml").stage("pretrain")
    assert stage.grad_accum(1) == 64 and stage.grad_accum(64) == 1
    with pytest.raises(ValueError, match=r"global_batch \(512\) must be a multiple of micro_batch \*"):
        stage.grad_accum(3)


def test_optimizer_and_schedule_helpers() -> None:
    opt = OptimizerConfig(lr=1e-3, lr_scale={"llm": 0.1}, module_lr={"encoder": 5e-4})
    assert opt.lr_for("llm") == pytest.approx(1e-4)
    assert opt.lr_for("encoder") == 5e-4 and opt.lr_for("connector") == 1e-3
    with pytest.raises(ValueError, match=r"^lr: must be > 0"):
        OptimizerConfig(lr=0)
    sched = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert sched.factor(0, 100) == pytest.approx(0.1) and sched.factor(9, 100) == 1.0
    assert sched.factor(99, 100) == pytest.approx(0.1, abs=1e-3)
    assert sched.factor(500, 100) == pytest.approx(0.1)


def test_data_config_direct() -> None:
    data = DataConfig(mixture={"synth/caption": 1.0, "general": 1.0})
    assert data.resolve_sources() == {"synth/caption": "synth:caption", "general": "synth:general"}
    with pytest.raises(ValueError, match=r"^mixture\.pdfa: unknown source"):
        DataConfig(mixture=copy.deepcopy({"pdfa": 1.0}))
    placeholder = DataConfig(mixture={"pdfa": 1.0}, sources={"pdfa": "shards:/does/not/exist"})
    assert placeholder.resolve_sources() == {"pdfa": "shards:/does/not/exist"}


@pytest.mark.parametrize(
    ("recipe", "category"), [("refer-ground-only", "refer-ground"), ("text-only", "text-only")]
)
def test_ablations_are_the_tiny_sft_on_one_category(recipe: str, category: str) -> None:
    ablation = load_recipe(RECIPES / "ablations" / f"{recipe}.yaml").stage("sft")
    tiny = load_recipe(RECIPES / "tiny.yaml").stage("sft")
    assert effective_weights(ablation.data.mixture_node()) == {category: 1.0}
    assert ablation.parent == "runs/tiny/ocr/final"
    same = ("trainable", "optimizer", "schedule", "global_batch", "micro_batch", "loss_weighting")
    for field in (*same, "autocast"):
        assert getattr(ablation, field) == getattr(tiny, field), field
    assert ablation.data.seq_length == tiny.data.seq_length
