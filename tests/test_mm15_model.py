"""The assembled model: image-token placement, batches, KV-cache generation, save/load, presets."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm15.hardware import autocast, compute_dtype
from mm15.model.generate import (
    GenerationConfig,
    continuation_logprobs,
    generate,
    parse_grounding,
    stream,
)
from mm15.model.mm15 import IMAGE_TOKEN, MM15Config, MM15Model, MM15Processor
from mm15.model.presets import PRESETS, preset

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model() -> MM15Model:
    torch.manual_seed(0)
    return MM15Model.build(preset("tiny")).eval()


@pytest.fixture(scope="module")
def processor(model: MM15Model) -> MM15Processor:
    return MM15Processor.for_model(model)


def picture(h: int, w: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_prompt_expansion_counts_match_the_plans(model: MM15Model, processor: MM15Processor) -> None:
    images = [picture(200, 300, 1), picture(500, 50, 2), picture(40, 40, 3), picture(90, 60, 4)]
    batch = processor(
        ["one <image> image", "text only", "two <image><image>", "four <image><image><image><image>"],
        [[images[0]], [], images[:2], images],
        padding_side="right",
    )
    plans = batch["plans"]
    assert [p.split for p in plans] == [True, True, True, False, False, False, False]  # no split at >= 3
    image_id = model.image_token_id
    per_row = (batch["input_ids"] == image_id).sum(-1).tolist()
    assert per_row == [
        plans[0].num_image_tokens,
        0,
        plans[1].num_image_tokens + plans[2].num_image_tokens,
        4 * model.cfg.image.tokens_per_tile,
    ]
    assert batch["pixel_values"].shape[0] == sum(p.num_tiles for p in plans)
    # Markers are text: image 1 of the two-image sample is marked (1, i, j).
    text = model.tokenizer.decode(batch["input_ids"][2], skip_special_tokens=False)
    assert "(1, 1, 1)" in text and "(1, 0, 0)" in text and IMAGE_TOKEN in text


def test_image_spans_are_the_geometry_expansion(model: MM15Model) -> None:
    from mm15.geometry import expand_image_text, plan_image
    from mm15.model.mm15 import image_span_ids

    for plan in (
        plan_image(300, 200, model.cfg.image),
        plan_image(50, 60, model.cfg.image, images_in_sample=3),
    ):
        ids = image_span_ids(plan, model.tokenizer, model.image_token_id)
        expected = model.tokenizer(expand_image_text(plan, IMAGE_TOKEN), add_special_tokens=False)[
            "input_ids"
        ]
        assert ids == expected


def test_features_land_on_image_positions_in_one_encoder_pass(
    model: MM15Model, processor: MM15Processor
) -> None:
    batch = processor(
        ["a <image> b", "c <image> <image> d"], [[picture(64, 64, 5)], [picture(30, 200, 6)] * 2]
    )
    calls = []
    hook = model.vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    finally:
        hook.remove()
    assert len(calls) == 1  # every tile of the batch in one pass
    features = model.encode_images(batch["pixel_values"]).reshape(-1, embeds.shape[-1])
    is_image = batch["input_ids"] == model.image_token_id
    torch.testing.assert_close(embeds[is_image], features)
    text_embeds = model.llm.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(embeds[~is_image], text_embeds[~is_image])


def test_count_mismatch_names_both_counts(model: MM15Model, processor: MM15Processor) -> None:
    batch = processor(["x <image>"], [[picture(64, 64, 7)]])
    with pytest.raises(ValueError, match=r"\d+ image-token positions but its images give \d+ image features"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:-1])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(["<image><image>"], [[picture(64, 64, 7)]])


def test_a_connector_giving_another_feature_count_is_an_error(
    model: MM15Model, processor: MM15Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = processor(["<image> q"], [[picture(64, 64, 3)]])
    encode = model.encode_images  # as if the connector returned twice the tokens it promised
    monkeypatch.setattr(model, "encode_images", lambda x: torch.cat([encode(x), encode(x)], dim=1))
    with pytest.raises(ValueError, match="connector gave"):
        model.embed(batch["input_ids"], batch["pixel_values"])


def test_kv_cache_decoding_matches_full_forward(model: MM15Model, processor: MM15Processor) -> None:
    batch = processor(["look <image> here", "hi"], [[picture(100, 150, 8)], []], padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, mask, batch["pixel_values"], position_ids=position_ids, use_cache=True)
        cache, steps = out.past_key_values, []
        new_tokens = torch.tensor([[5, 9, 17], [33, 4, 100]])
        for k in range(3):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            step = model.llm(
                input_ids=new_tokens[:, k : k + 1],
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            cache = step.past_key_values
            steps.append(step.logits[:, -1])
        full_ids = torch.cat([ids, new_tokens], dim=1)
        full_pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(full_ids, mask, batch["pixel_values"], position_ids=full_pos).logits
    for k in range(3):
        # float32 throughout; the cached path sums attention in another order: 1e-5 relative.
        torch.testing.assert_close(steps[k], full[:, ids.shape[1] + k], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_as_rows_alone(model: MM15Model, processor: MM15Processor) -> None:
    prompts, images = ["see <image>", "a longer text-only prompt"], [[picture(80, 60, 9)], []]
    cfg = GenerationConfig(max_new_tokens=6)
    together = generate(model, processor(prompts, images), cfg)
    alone = [generate(model, processor([p], [i]), cfg)[0] for p, i in zip(prompts, images, strict=True)]
    assert together == alone
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, processor(prompts, images, padding_side="right"), cfg)


def test_a_tiny_temperature_samples_the_top_token_instead_of_failing() -> None:
    """logits / 1e-40 overflowed to +-inf, the softmax was NaN and ``torch.multinomial`` raised: in the
    server, for every request of the batch."""
    from mm15.model.generate import pick_next_token

    logits = torch.tensor([[0.5, 2.0, -1.0, 1.99], [3.0, 3.0, -5.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-40, 1e-6):
        picks = {
            tuple(pick_next_token(logits, GenerationConfig(temperature=temperature), generator).tolist())
            for _ in range(50)
        }
        assert {row[0] for row in picks} == {1}  # the largest logit
        assert {row[1] for row in picks} <= {0, 1}  # a tie: either of the two, never another
    # A usual temperature still samples from softmax(logits / T).
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[pick_next_token(logits[:1], GenerationConfig(temperature=1.0), generator)] += 1
    torch.testing.assert_close(counts / 2000, torch.softmax(logits[0], dim=0), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"seed": 2**64}, r"seed must be in \[-2\*\*63, 2\*\*64\)"),
        ({"seed": -(2**63) - 1}, "seed must be in"),
    ],
)
def test_generation_config_refuses_what_sampling_cannot_use(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**changes)
    assert GenerationConfig(seed=2**64 - 1).seed == 2**64 - 1  # the largest seed torch takes


def test_streaming_sampling_and_stop_strings(model: MM15Model, processor: MM15Processor) -> None:
    batch = processor(["tell me"], [[]])
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    pieces = list(stream(model, batch, sampled))
    assert "".join(p[0] for p in pieces) == generate(model, batch, sampled)[0]  # same seed, same text
    assert generate(model, batch, sampled) != generate(model, batch, GenerationConfig(max_new_tokens=12))
    full = generate(model, batch, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3))[0]
    clean = [i for i, ch in enumerate(full) if ch != "\ufffd" and i > 0]
    assert clean, f"the seeded sample should hold a printable character: {full!r}"
    stop = full[clean[0]]
    stopped = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3, stop=(stop,))
    cut = generate(model, batch, stopped)[0]
    assert cut == full[: full.index(stop)]


def test_continuation_logprobs_are_the_training_loss_and_flag_the_greedy_answer(
    model: MM15Model, processor: MM15Processor
) -> None:
    prompt, images = "see <image> and say", [picture(90, 70, 13)]
    answer = " a box here"
    with compute_dtype(torch.float32):  # exact comparison: no bf16 rounding on either side
        logprobs, greedy = continuation_logprobs(model, processor, prompt, images, answer)
    cont = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert logprobs.shape == (len(cont),) and logprobs.dtype == torch.float32
    # The same tokens scored as a training batch scores them: prompt unsupervised, continuation supervised.
    batch = processor([prompt], [images])
    ids = torch.cat([batch["input_ids"], torch.tensor([cont])], dim=1)
    labels = ids.clone()
    labels[:, : batch["input_ids"].shape[1]] = -100
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), batch["pixel_values"], labels=labels)
    torch.testing.assert_close(-logprobs, out.token_losses, rtol=1e-5, atol=1e-5)
    # The greedy continuation is flagged, another one is not.
    with compute_dtype(torch.float32):
        produced = generate(model, processor([prompt], [images]), GenerationConfig(max_new_tokens=4))[0]
        _, produced_is_greedy = continuation_logprobs(model, processor, prompt, images, produced)
    assert produced_is_greedy and not greedy
    assert continuation_logprobs(model, processor, prompt, images, "")[0].numel() == 0


def test_stream_holds_back_partial_stop_strings() -> None:
    from mm15.model.generate import visible_text

    assert visible_text("answer: 42 EN", ("END",)) == ("answer: 42 ", False)
    assert visible_text("answer: 42 END more", ("END",)) == ("answer: 42 ", True)
    assert visible_text("caf\ufffd", ()) == ("caf", False)


def test_one_stop_string_is_one_stop_not_its_characters(model: MM15Model, processor: MM15Processor) -> None:
    """``stop="END"`` was iterated letter by letter: the answer was cut at its first E, N or D."""
    from serve_helpers import scripted_answer

    assert GenerationConfig(stop="END").stop == ("END",)  # a bare string, as OpenAI's stop takes
    assert GenerationConfig(stop=["END", "\n"]).stop == ("END", "\n")
    for bad in (None, 3, b"END", [b"END"], ["END", 3], {"END"}):
        with pytest.raises(ValueError, match=r"GenerationConfig\.stop must be a string or a sequence"):
            GenerationConfig(stop=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"GenerationConfig\.stop must not contain empty strings"):
        GenerationConfig(stop="")
    with scripted_answer(model, "Done. The answer is 42 END extra"):
        answer = generate(model, processor(["q"]), GenerationConfig(max_new_tokens=40, stop="END"))
    assert answer == ["Done. The answer is 42 "]


def test_no_decoder_pass_runs_after_the_last_token(model: MM15Model, processor: MM15Processor) -> None:
    """A decoding step ran after the budget was spent, for logits nobody read."""
    from serve_helpers import scripted_answer

    calls: list[int] = []
    hook = model.llm.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for budget, passes in ((1, 0), (4, 3), (20, 6)):  # 20: "abcdef" then the end-of-turn token
            calls.clear()
            with scripted_answer(model, "abcdef"):
                text = generate(model, processor(["q"]), GenerationConfig(max_new_tokens=budget))[0]
            assert (text, len(calls)) == ("abcdef"[:budget], passes)
    finally:
        hook.remove()


def test_an_empty_prompt_is_refused_naming_its_row(model: MM15Model, processor: MM15Processor) -> None:
    """It was an IndexError, a "needs left-padded prompts" error, or a RuntimeError when scored."""
    from mm15.serve.conversation import question_turn, render_prompt

    cfg = GenerationConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 of the batch has no tokens"):
        generate(model, processor([""]), cfg)
    with pytest.raises(ValueError, match="prompt 0 of the batch has no tokens"):
        generate(model, processor(["", "hi"]), cfg)
    with pytest.raises(ValueError, match="prompt 1 of the batch has no tokens"):
        list(stream(model, processor(["hi", ""]), cfg))
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        continuation_logprobs(model, processor, "", [], "abc")
    # An empty user message is not an empty prompt: the template still writes the turn's markers.
    prompt, _ = render_prompt(model.tokenizer, [question_turn("")])
    assert len(generate(model, processor([prompt]), cfg)) == 1
    assert continuation_logprobs(model, processor, prompt, [], "abc")[0].numel() == 3


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def llama3_style_model(path: Path, chat_template: str | None) -> MM15Model:
    """The tiny preset on a local Hugging Face Llama whose byte-level tokenizer is Llama 3's kind: eos
    ``<|end_of_text|>``, and (with ``chat_template``) turns that end with ``<|eot_id|>``. The vocabulary
    has no spare rows, so every token mm15 adds grows the embeddings."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mm15.model.llm import LLMConfig, _bytes_to_unicode

    vocab = {token: i for i, token in enumerate(LLAMA3_SPECIALS)}
    vocab.update({char: len(LLAMA3_SPECIALS) + byte for byte, char in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=LLAMA3_SPECIALS[0],
        eos_token=LLAMA3_SPECIALS[1],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,  # the tiny preset's connector width
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return MM15Model.build(
        dataclasses.replace(preset("tiny"), llm=LLMConfig(source="hf", path=str(path)))
    ).eval()


def trained_answer(model: MM15Model) -> list[int]:
    """The supervised tokens of a one-turn conversation answered "Paris": what training teaches."""
    from mm15.chat import IGNORE, ChatEncoder
    from mm15.data.sample import Sample, Turn

    sample = Sample(
        id="s",
        category="general",
        source="test",
        turns=[Turn("user", "Capital?"), Turn("assistant", "Paris")],
    )
    encoded = ChatEncoder(model.tokenizer, model.cfg.image, 4096).encode(sample, [])
    return [label for label in encoded.labels if label != IGNORE]


def test_generation_stops_at_the_chat_templates_end_of_turn_not_only_at_eos(tmp_path: Path) -> None:
    """A Llama-3-style decoder ends turns with <|eot_id|>, not its eos <|end_of_text|>: answers ran on
    to max_new_tokens and wrote the next turn's header and question."""
    from serve_helpers import scripted_answer

    from mm15.chat import stop_token_ids
    from mm15.serve.conversation import question_turn, render_prompt

    model = llama3_style_model(tmp_path, LLAMA3_TEMPLATE)
    tokenizer = model.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert stop_token_ids(tokenizer, model.llm) == {tokenizer.eos_token_id, eot}
    assert trained_answer(model) == [*tokenizer("Paris", add_special_tokens=False)["input_ids"], eot]
    prompt, _ = render_prompt(tokenizer, [question_turn("Capital of France?")])
    batch = MM15Processor.for_model(model)([prompt])
    with scripted_answer(model, "Paris<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd Spain?"):
        assert generate(model, batch, GenerationConfig(max_new_tokens=40)) == ["Paris"]


def test_a_tokenizer_without_a_chat_template_gets_the_fallbacks_turn_tokens(tmp_path: Path) -> None:
    """The fallback template's <|im_end|> was learnt as plain text pieces, never one token to stop at."""
    from serve_helpers import scripted_answer

    from mm15.chat import stop_token_ids
    from mm15.serve.conversation import question_turn, render_prompt

    model = llama3_style_model(tmp_path / "llm", None)
    tokenizer = model.tokenizer
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer("<|im_start|>a<|im_end|>", add_special_tokens=False)["input_ids"][::2] == [
        im_start,
        im_end,
    ]
    assert {"<|im_start|>", "<|im_end|>", IMAGE_TOKEN} <= set(tokenizer.all_special_tokens)
    assert model.llm.get_input_embeddings().num_embeddings == len(tokenizer)  # grown for all three
    assert stop_token_ids(tokenizer, model.llm) == {tokenizer.eos_token_id, im_end}
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert trained_answer(model) == [
        *tokenizer("Paris", add_special_tokens=False)["input_ids"],
        im_end,
        *newline,
    ]
    prompt, _ = render_prompt(tokenizer, [question_turn("Capital of France?")])
    batch = MM15Processor.for_model(model)([prompt])
    with scripted_answer(model, "Paris<|im_end|>\n<|im_start|>user\nAnd Spain?"):
        assert generate(model, batch, GenerationConfig(max_new_tokens=40)) == ["Paris"]
    # Saved and loaded, the markers stay special tokens with the same ids, and the weights fit.
    model.save_pretrained(tmp_path / "mm15")
    loaded = MM15Model.from_pretrained(tmp_path / "mm15")
    assert loaded.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [im_start, im_end]
    assert loaded.image_token_id == model.image_token_id
    assert stop_token_ids(loaded.tokenizer, loaded.llm) == {tokenizer.eos_token_id, im_end}
    assert loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"] == batch["input_ids"][0].tolist()


def test_grounding_parse_returns_original_pixels() -> None:
    parsed = parse_grounding("the button [100, 250, 300, 500] and [10, 20]", 1640, 2360)
    assert parsed["boxes"] == [(236.0 + 1.18, 410.0 + 0.82, 708.0 + 1.18, 820.0 + 0.82)]
    assert parsed["points"] == [(23.6 + 1.18, 32.8 + 0.82)]


def test_save_and_load_give_identical_outputs(
    model: MM15Model, processor: MM15Processor, tmp_path: Path
) -> None:
    batch = processor(["x <image> y"], [[picture(120, 90, 10)]])
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.iterdir())
    loaded = MM15Model.from_pretrained(tmp_path)
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = loaded(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert torch.equal(a, b)
    assert loaded.image_token_id == model.image_token_id


def test_an_llm_cast_after_build_loads_in_the_dtype_it_was_saved_in(
    model: MM15Model, processor: MM15Processor, tmp_path: Path
) -> None:
    """config.json recorded the config's dtype (float32) for an LLM cast to bf16 after build, so it
    loaded back in float32 and computed other logits; one in float16 cannot be kept and says so."""
    cast = copy.deepcopy(model)
    cast.llm.to(torch.bfloat16)
    # .to() casts RoPE's frequencies too; a model built or loaded in bf16 keeps them in float32.
    assert cast.llm.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    cast.llm.model.rotary_emb.inv_freq = model.llm.model.rotary_emb.inv_freq.clone()
    cast.save_pretrained(tmp_path / "bf16")
    loaded = MM15Model.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in loaded.llm.parameters()} == {
        torch.bfloat16
    } and loaded.cfg.llm.dtype == "bfloat16"
    batch = processor(["x <image> y"], [[picture(120, 90, 10)]])
    with torch.no_grad():
        a = cast(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = loaded(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert torch.equal(a, b)
    cast.llm.to(torch.float16)
    with pytest.raises(ValueError, match=r"the LLM's weights are \['torch.float16'\]"):
        cast.save_pretrained(tmp_path / "fp16")


def test_a_bf16_model_and_an_encoders_own_normalisation_survive_save_and_load(tmp_path: Path) -> None:
    """from_pretrained once built the LLM in float32 whatever the saved dtype, and the encoder with its
    kind's mean/std instead of those its pretrained directory gave."""
    import json

    from mm15.image import ImageProcessor
    from mm15.model.vision import VisionConfig, VisionEncoder

    base = preset("tiny")
    torch.manual_seed(0)
    encoder_dir = tmp_path / "encoder"
    VisionEncoder(base.vision).save_pretrained(encoder_dir)
    (encoder_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    cfg = dataclasses.replace(
        base,
        vision=VisionConfig(kind="clip", pretrained=str(encoder_dir)),
        llm=dataclasses.replace(base.llm, dtype="bfloat16"),
    )
    model = MM15Model.build(cfg).eval()
    assert model.vision.image_mean == (0.5, 0.5, 0.5) and next(model.llm.parameters()).dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "model")
    loaded = MM15Model.from_pretrained(tmp_path / "model")
    assert (loaded.vision.image_mean, loaded.vision.image_std) == ((0.5,) * 3, (0.25,) * 3)
    assert {p.dtype for p in loaded.llm.parameters()} == {torch.bfloat16}
    # RoPE's frequencies stay float32 in a bf16 LLM, built or loaded (a cast put them in bf16: angles
    # 0.25 rad off at position 1500, and a model from an HF directory reloaded with other logits).
    for m in (model, loaded):
        assert m.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    images = [picture(120, 90, 10)]
    batch = MM15Processor.for_model(model)(["x <image> y"], [images])
    again = MM15Processor.for_model(loaded)(["x <image> y"], [images])
    assert torch.equal(batch["pixel_values"], again["pixel_values"])
    tiles = ImageProcessor(cfg.image, dtype=torch.uint8)(images).pixel_values  # what training feeds
    with torch.no_grad():
        assert torch.equal(model.vision(tiles), loaded.vision(tiles))
        a = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = loaded(again["input_ids"], again["attention_mask"], again["pixel_values"]).logits
    assert torch.equal(a, b)
    # A directory saved before the vision config recorded it: the document's top-level copy is used.
    document = json.loads((tmp_path / "model" / "config.json").read_text())
    del document["config"]["vision"]["image_mean"], document["config"]["vision"]["image_std"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(document))
    assert MM15Model.from_pretrained(tmp_path / "model").vision.image_std == (0.25,) * 3


def test_vision_config_normalisation_is_checked() -> None:

    arch = preset("tiny").vision
    assert dataclasses.replace(arch, image_mean=[0, 0.5, 1], image_std=[1, 1, 1]).image_mean == (
        0.0,
        0.5,
        1.0,
    )
    for mean, std, message in [
        ((0.5,) * 3, None, "given together"),
        ((0.5,) * 2, (1.0,) * 2, "image_mean must be 3 finite numbers"),
        ((0.5,) * 3, (1.0, 0.0, 1.0), "image_std must be > 0"),
        ((0.5, float("nan"), 0.5), (1.0,) * 3, "image_mean must be 3 finite numbers"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(arch, image_mean=mean, image_std=std)


def test_a_damaged_model_directory_is_a_clear_error(model: MM15Model, tmp_path: Path) -> None:
    """Each way a saved directory can be damaged is a ValueError naming the file, never a raw
    SafetensorError, KeyError or TypeError (chat, serve and eval print it and exit 2)."""
    import json
    import shutil

    model.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())

    def damaged(name: str, change: Callable[[Path], None]) -> Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        change(folder)
        return folder

    def write_config(document: object) -> Callable[[Path], None]:
        return lambda folder: (folder / "config.json").write_text(json.dumps(document))

    llm, connector = config["llm_config"], config["config"]["connector"]
    vocab, width, hidden = llm["vocab_size"], llm["hidden_size"], connector["hidden_dim"]
    narrower_connector = {**connector, "hidden_dim": hidden // 2}
    narrower = {**config, "config": {**config["config"], "connector": narrower_connector}}
    layers_as_text = {**llm, "num_hidden_layers": str(llm["num_hidden_layers"])}
    cases = {
        "truncated-weights": (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
            "model.safetensors cannot be read (damaged or truncated",
        ),
        "config-not-json": (
            lambda f: (f / "config.json").write_text("{oops"),
            "config.json: not a JSON file",
        ),
        "config-a-list": (write_config([1, 2]), "unsupported mm15_format None"),
        "config-without-parts": (write_config({"mm15_format": 1}), "needs the 'config' and 'llm_config'"),
        "config-missing-fields": (
            write_config({**config, "config": {"name": "x"}}),
            "MM15Config: missing fields ['connector', 'llm', 'vision']",
        ),
        "config-unknown-field": (
            write_config({**config, "config": {**config["config"], "vision": {"bogus": 1}}}),
            "unexpected keyword argument 'bogus'",
        ),
        "no-tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "cannot load the tokenizer"),
        # These three gave load_state_dict's RuntimeError and huggingface_hub's validation error.
        "llm-vocab-edited": (
            write_config({**config, "llm_config": {**llm, "vocab_size": vocab + 80}}),
            f"is ({vocab}, {width}) in model.safetensors but ({vocab + 80}, {width}) in config.json",
        ),
        "connector-width-edited": (
            write_config(narrower),
            re.compile(
                r"model\.safetensors does not match the architecture in .*config\.json .*connector\.\S+ is "
                rf"\([^)]*\b{hidden}\b[^)]*\) in model\.safetensors "
                rf"but \([^)]*\b{hidden // 2}\b[^)]*\) in config\.json"
            ),
        ),
        "llm-config-wrong-type": (
            write_config({**config, "llm_config": layers_as_text}),
            re.compile(r"config\.json: llm_config is not a valid LLM config .*num_hidden_layers"),
        ),
        # A ZeroDivisionError from transformers' own config check escaped as a traceback.
        "llm-heads-zero": (
            write_config({**config, "llm_config": {**llm, "num_attention_heads": 0}}),
            re.compile(r"config\.json: llm_config is not a valid LLM config"),
        ),
        # Sizes that no longer fit each other: MM15Model's own check, which named no file.
        "vision-width-edited": (
            write_config(
                {
                    **config,
                    "config": {
                        **config["config"],
                        "vision": {**config["config"]["vision"], "hidden_size": 32},
                    },
                }
            ),
            re.compile(r"config\.json: the model it describes cannot be built \(.*connector\.vision_dim"),
        ),
        "config-sub-field-wrong": (
            write_config({**config, "config": {**config["config"], "connector": {**connector, "depth": 0}}}),
            re.compile(r"config\.json: .*ConnectorConfig\.depth"),
        ),
    }
    for name, (change, message) in cases.items():
        pattern = message if isinstance(message, re.Pattern) else re.escape(message)
        with pytest.raises(ValueError, match=pattern):
            MM15Model.from_pretrained(damaged(name, change))
    stage = tmp_path / "run" / "sft"  # a training stage's directory: its model is in final/
    shutil.copytree(tmp_path / "good", stage / "final")
    with pytest.raises(FileNotFoundError, match=re.escape(f"did you mean {stage / 'final'}?")):
        MM15Model.from_pretrained(stage)


def test_the_llms_generation_config_and_its_stop_ids_survive_save_and_load(tmp_path: Path) -> None:
    # Only the tokenizer was saved: a decoder whose generation_config.json lists extra eos ids (Llama 3
    # Instruct's <|eot_id|> and <|eom_id|>) stopped only at config.json's eos after a reload.
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from mm15.chat import stop_token_ids
    from mm15.model.llm import LLMConfig, build_tiny_tokenizer

    sizes = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4}
    torch.manual_seed(0)
    decoder = LlamaForCausalLM(LlamaConfig(vocab_size=320, eos_token_id=2, bos_token_id=1, **sizes))
    decoder.generation_config = GenerationConfig(eos_token_id=[2, 10], bos_token_id=1)
    decoder.save_pretrained(tmp_path / "llm")
    build_tiny_tokenizer().save_pretrained(tmp_path / "llm")
    built = MM15Model.build(
        dataclasses.replace(preset("tiny"), llm=LLMConfig(source="hf", path=str(tmp_path / "llm")))
    )
    assert 10 in stop_token_ids(built.tokenizer, built.llm)
    built.save_pretrained(tmp_path / "mm15")
    loaded = MM15Model.from_pretrained(tmp_path / "mm15")
    assert stop_token_ids(loaded.tokenizer, loaded.llm) == stop_token_ids(built.tokenizer, built.llm)
    assert loaded.llm.generation_config.eos_token_id == [2, 10]
    # A damaged generation_config.json is named, like the other files.
    (tmp_path / "mm15" / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config\.json cannot be read"):
        MM15Model.from_pretrained(tmp_path / "mm15")


def off_grid_siglip(path: Path) -> Path:
    """google/siglip-so400m-patch14-384's geometry at a tiny width: 384 px, 14-px patches, 27x27."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=384, patch_size=14, **sizes)).save_pretrained(path)
    return path


def test_a_siglip_encoder_off_the_patch_grid_builds_saves_and_loads(tmp_path: Path) -> None:
    # siglip-so400m-patch14-384 (384 px, 14-px patches) could not be built at its default size, and at
    # input_size=378 save_pretrained raised "VisionConfig.image_size (384) must be a multiple of
    # patch_size (14)", so every end-of-training save failed.
    from mm15.model.vision import VisionConfig

    base = preset("tiny")
    cfg = dataclasses.replace(
        base,
        vision=VisionConfig(kind="siglip", pretrained=str(off_grid_siglip(tmp_path / "siglip"))),
        connector=dataclasses.replace(base.connector, vision_dim=32, num_patches=729),
        image=dataclasses.replace(base.image, tile_size=378, split=False),  # one tile per image
    )
    torch.manual_seed(0)
    built = MM15Model.build(cfg).eval()
    assert (built.vision.input_size, built.vision.num_patches) == (378, 729)
    proc = MM15Processor.for_model(built)
    batch = proc(["a <image>"], [[picture(300, 200, 3)]])
    assert batch["pixel_values"].shape[-2:] == (378, 378)
    built.save_pretrained(tmp_path / "mm15")
    loaded = MM15Model.from_pretrained(tmp_path / "mm15")
    assert loaded.cfg.vision.image_size == loaded.vision.input_size == 378
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        assert torch.equal(loaded(*args).logits, built(*args).logits)


def test_moe_model_saves_loads_and_reports_aux(tmp_path: Path) -> None:
    from dataclasses import replace

    from mm15.model.moe import MoEConfig

    torch.manual_seed(1)
    cfg = replace(preset("tiny"), moe=MoEConfig(num_experts=4, top_k=2, every=2))
    moe = MM15Model.build(cfg).eval()
    proc = MM15Processor.for_model(moe)
    batch = proc(["q <image>"], [[picture(64, 64, 11)]], padding_side="right")
    out = moe(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["input_ids"])
    assert set(out.aux) >= {"load_balance", "router_z", "total"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux["total"])
    moe.save_pretrained(tmp_path)
    again = MM15Model.from_pretrained(tmp_path)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(again(*args).logits, moe(*args).logits)


def test_packed_rows_keep_padding_out_of_the_moe_aux_losses() -> None:
    # Packed rows pass a 4-D attention mask, which cannot mark padding; the row padding the collator
    # adds must still stay out of the router statistics, as it does for one padded sample per row.
    from dataclasses import replace

    from mm15.chat import EncodedSample
    from mm15.data.packing import collate
    from mm15.model.moe import MoEConfig, moe_layers

    torch.manual_seed(2)
    cfg = replace(preset("tiny"), moe=MoEConfig(num_experts=4, top_k=2, every=2))
    moe = MM15Model.build(cfg).eval()

    def sample(n: int) -> EncodedSample:
        ids = torch.randint(1, 200, (n,)).tolist()
        return EncodedSample(ids, ids, [], "x", "src", "c")

    samples = [sample(12), sample(5), sample(4)]
    aux = {}
    for packed in (True, False):
        batch = collate(samples, pad_id=0, max_length=12, packed=packed)
        with torch.no_grad():
            aux[packed] = moe(**batch.model_inputs()).aux
        assert [int(m.last_expert_counts.sum()) for m in moe_layers(moe.llm)] == [2 * 21, 2 * 21]
    assert batch.real_tokens == 21
    for name in ("load_balance", "router_z"):
        torch.testing.assert_close(aux[True][name], aux[False][name], rtol=1e-4, atol=1e-6)


def test_loss_on_supervised_positions_equals_the_full_head_loss(
    model: MM15Model, processor: MM15Processor
) -> None:
    batch = processor(
        ["see <image> now answer", "text only question"], [[picture(70, 90, 12)], []], padding_side="right"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.clone()
    labels[ids == model.image_token_id] = -100  # no loss on image tokens
    labels[mask == 0] = -100
    labels[:, :3] = -100  # nor on the start of each prompt
    out = model(ids, mask, batch["pixel_values"], labels=labels)
    with torch.no_grad():
        embeds = model.embed(ids, batch["pixel_values"])
        reference = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    supervised = labels[:, 1:] != -100
    per_token = torch.nn.functional.cross_entropy(
        reference.logits[:, :-1][supervised], labels[:, 1:][supervised], reduction="none"
    )
    assert out.logits is None  # the fused head never builds them
    assert out.token_losses.shape == (int(supervised.sum()),)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_losses, per_token, rtol=1e-5, atol=1e-5)


def test_config_mismatches_are_named() -> None:
    from dataclasses import replace

    cfg = preset("tiny")
    with pytest.raises(ValueError, match=r"connector\.llm_dim is 99"):
        MM15Model.build(replace(cfg, connector=replace(cfg.connector, llm_dim=99)))
    with pytest.raises(ValueError, match=r"image\.tokens_per_tile"):
        MM15Model.build(replace(cfg, image=replace(cfg.image, tokens_per_tile=9)))
    with pytest.raises(ValueError, match="unknown fields"):
        MM15Config.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("mm15-2b")
    # An empty path (an unset $DFN_DIR expanded) is an error, not "no path" and random weights.
    with pytest.raises(ValueError, match=r"VisionConfig\.pretrained must be a non-empty path"):
        preset("mm15-1b", vision_path="")
    with pytest.raises(ValueError, match=r"LLMConfig\.path is required"):
        preset("mm15-1b", llm_path="")


@pytest.mark.parametrize("name", ["mm15-1b", "mm15-3b", "mm15-7b", "mm15-3b-moe"])
def test_a_full_size_preset_has_one_dtype_with_or_without_its_weights(name: str) -> None:
    # With llm_path the decoder loaded in float32, twice its random stand-in's (bf16) memory.
    assert preset(name).llm.dtype == preset(name, llm_path="/models/llm").llm.dtype == "bfloat16"


def test_the_image_token_joins_the_tokenizers_own_special_tokens() -> None:
    from mm15.model.llm import LLMConfig, load_llm
    from mm15.model.mm15 import add_image_token

    llm, tokenizer = load_llm(LLMConfig())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|box|>", "<|ref|>"]})
    add_image_token(tokenizer, llm)
    assert {"<|box|>", "<|ref|>", IMAGE_TOKEN} <= set(tokenizer.all_special_tokens)


@pytest.mark.parametrize(
    ("name", "llm_millions"),
    [("mm15-1b", 1235.8), ("mm15-3b", 3212.7), ("mm15-7b", 6738.4), ("mm15-3b-moe", 69804.3)],
)
def test_full_size_presets_on_the_meta_device(name: str, llm_millions: float) -> None:
    with torch.device("meta"):
        big = MM15Model.build(preset(name))
    counts = big.num_parameters()
    print(name, {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    # ViT-H/14 at 378 px has ~632M parameters (FastVLM lists 632M); 672 px adds 1575 x 1280 positions.
    assert abs(counts["vision"] - 1575 * 1280 - 632e6) / 632e6 < 0.01
    assert abs(counts["llm"] / 1e6 - llm_millions) < 0.1
    assert big.vision.num_patches == 2304 and big.cfg.image.tokens_per_tile == 144
    plan = MM15Processor(big.tokenizer, big.cfg.image, big.vision.image_mean, big.vision.image_std)
    plans = plan.plan("<image>", [Image.new("RGB", (2016, 2016))])
    assert plans[0].grid == (3, 3) and plans[0].num_image_tokens == 1440


def test_every_preset_is_registered() -> None:
    assert set(PRESETS) == {"tiny", "smol", "mm15-1b", "mm15-3b", "mm15-7b", "mm15-3b-moe"}


def test_smol_preset_answers_a_text_question_offline() -> None:
    smol = MM15Model.build(preset("smol")).eval()
    assert smol.llm.config.num_hidden_layers == 30 and smol.vision.num_patches == 196
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = smol.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = MM15Processor.for_model(smol)([prompt], [[]])
    with autocast():
        answer = generate(smol, batch, GenerationConfig(max_new_tokens=10))[0]
    assert "Paris" in answer


def test_a_stop_string_that_is_a_special_token_stops(model: MM15Model, processor: MM15Processor) -> None:
    """The stop check reads text decoded without special tokens: ``stop="<|im_start|>"`` never matched
    and a fake next turn leaked into the answer."""
    from serve_helpers import scripted_answer

    with scripted_answer(model, "Hi there<|im_start|>user\nfake next turn"):
        cfg = GenerationConfig(max_new_tokens=60, stop=["<|im_start|>"])
        assert generate(model, processor(["q"]), cfg) == ["Hi there"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": "4"}, "max_new_tokens must be an integer"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"seed": 1.5}, "seed must be an integer or None"),
        ({"temperature": "1"}, "temperature must be a number"),
        ({"top_p": True}, "top_p must be a number"),
    ],
)
def test_generation_config_refuses_values_of_the_wrong_type(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**changes)


def test_a_continuation_is_tokenised_as_every_text_is(model: MM15Model, processor: MM15Processor) -> None:
    """The continuation skipped the image-token check (a count-mismatch error followed) and read
    special-token strings as control tokens."""
    from mm15.model.mm15 import ReservedTokenError

    with pytest.raises(ReservedTokenError, match="reserved image token"):
        continuation_logprobs(model, processor, "say", [], f" {IMAGE_TOKEN}")
    logprobs, _ = continuation_logprobs(model, processor, "say", [], " <|im_end|>")
    as_text = model.tokenizer(" <|im_end|>", add_special_tokens=False, split_special_tokens=True)
    assert len(logprobs) == len(as_text["input_ids"]) > 2
