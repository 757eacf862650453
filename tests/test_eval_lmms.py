"""The lmms-eval adapter, driven with request objects shaped like ``lmms_eval.api.instance.Instance``
(lmms-eval itself is not installed in the project environment)."""

from __future__ import annotations

import gc
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mm15.eval.lmms import MM15LMM, lmms_base, register
from mm15.eval.runner import chat_prompt, generate_texts
from mm15.model.generate import GenerationConfig
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset


@dataclass
class FakeInstance:
    """The parts of lmms-eval's ``Instance`` an lmms model reads: ``args`` (the arguments tuple)."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> tuple:
        return self.arguments


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def adapter() -> MM15LMM:
    torch.manual_seed(0)
    lmm = MM15LMM(model=MM15Model.build(preset("tiny")), batch_size=2, max_new_tokens=4)
    red = Image.new("RGB", (96, 64), (200, 20, 20))
    blue = Image.new("RGB", (64, 96), (20, 20, 200))
    lmm.task_dict = {
        "toy": {
            "test": [
                {"image": red, "question": "What color is it?", "answer": "red"},
                {"image": blue, "question": "What color is it?", "answer": "blue"},
                {"image": None, "question": "Say hello.", "answer": "hello"},
            ]
        }
    }
    return lmm


def visuals(doc: dict) -> list[Image.Image]:
    return [doc["image"]] if doc["image"] is not None else []


def request(doc_id: int, gen_kwargs: dict | None = None, context: str | None = None) -> FakeInstance:
    context = context if context is not None else f"Question {doc_id}: what is shown?"
    return FakeInstance("generate_until", (context, gen_kwargs or {}, visuals, doc_id, "toy", "test"))


def test_lmms_eval_is_not_a_dependency() -> None:
    assert lmms_base() is object and MM15LMM.__mro__[1] is object
    with pytest.raises(ImportError, match="not an mm15 dependency"):
        register()
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        MM15LMM()


def test_generate_until_matches_direct_generation_in_request_order(adapter: MM15LMM) -> None:
    requests = [
        request(0, {"max_new_tokens": 3, "until": ["\n\n"]}),
        request(2, {"max_new_tokens": 5}),
        request(1, {"max_new_tokens": 3, "until": ["\n\n"]}),
    ]
    outputs = adapter.generate_until(requests)
    assert len(outputs) == 3
    model, docs = adapter.model, adapter.task_dict["toy"]["test"]
    for req, out in zip(requests, outputs, strict=True):
        context, gen_kwargs, _, doc_id, _, _ = req.args
        pictures = visuals(docs[doc_id])
        user = "<image>" * len(pictures) + ("\n" if pictures else "") + context
        cfg = adapter.generation_config(gen_kwargs)
        assert out == generate_texts(model, [chat_prompt(model.tokenizer, user)], [pictures], cfg)[0].strip()
    assert requests[0].args[1] == {"max_new_tokens": 3, "until": ["\n\n"]}  # gen_kwargs untouched


def test_generation_settings_and_placeholders(adapter: MM15LMM) -> None:
    assert adapter.generation_config({}) == GenerationConfig(max_new_tokens=4)
    greedy = adapter.generation_config({"until": "STOP", "temperature": 0.7, "do_sample": False})
    assert greedy == GenerationConfig(max_new_tokens=4, stop=("STOP",))
    sampled = adapter.generation_config(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 9}
    )
    assert (sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (0.7, 0.9, 9)
    with pytest.raises(ValueError, match="no beam search"):
        adapter.generation_config({"num_beams": 3})
    # top_p 0 keeps only the likeliest token (transformers' rule): greedy, not the whole distribution.
    assert adapter.generation_config(
        {"do_sample": True, "temperature": 1.0, "top_p": 0.0}
    ) == GenerationConfig(max_new_tokens=4)
    # A context that places its own <image> keeps it; a wrong count is an error.
    assert adapter.generate_until([request(0, {}, "Look: <image> what color?")])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 visuals"):
        adapter.generate_until([request(0, {}, "<image><image> what?")])


def test_loglikelihood_is_a_loss_and_flags_the_greedy_continuation(adapter: MM15LMM) -> None:
    model, doc = adapter.model, adapter.task_dict["toy"]["test"][0]
    context = "Question 0: what is shown?"  # the random model's greedy reply to it is not empty
    prompt = chat_prompt(model.tokenizer, "<image>\n" + context)
    greedy_text = generate_texts(model, [prompt], [[doc["image"]]], GenerationConfig(max_new_tokens=3))[0]
    assert greedy_text
    (loss, is_greedy), (other_loss, other_greedy), (empty, empty_greedy) = adapter.loglikelihood(
        [
            FakeInstance("loglikelihood", (context, greedy_text, visuals, 0, "toy", "test")),
            FakeInstance(
                "loglikelihood", (context, lambda d: " " + d["answer"] + "!", visuals, 0, "toy", "test")
            ),
            FakeInstance("loglikelihood", (context, "", visuals, 0, "toy", "test")),
        ]
    )
    # A loss (lower = likelier), as lmms-eval's multiple-choice scoring takes the argmin.
    assert is_greedy and loss >= 0.0
    assert not other_greedy and other_loss > loss
    assert (empty, empty_greedy) == (0.0, True)


def test_multi_round(adapter: MM15LMM) -> None:
    seen: list[tuple[int, list[str]]] = []

    def doc_to_text(doc: dict, previous_output: list[str], round_idx: int, previous_round_info: Any) -> tuple:
        seen.append((round_idx, list(previous_output)))
        terminal = round_idx == 3
        # round_res is the rounds' results so far, as MMSearch returns it (previous_output).
        return visuals(doc), f"Round {round_idx}: and now?", terminal, previous_output, {"round": round_idx}

    args = ("First question?", {"max_new_tokens": 2}, visuals, doc_to_text, 1, "toy", "test")
    (answers,) = adapter.generate_until_multi_round([FakeInstance("generate_until_multi_round", args)])
    assert len(answers) == 3 and [r for r, _ in seen] == [1, 2, 3]
    assert [len(previous) for _, previous in seen] == [1, 2, 3]


def test_multi_round_returns_the_round_results_doc_to_text_gives(adapter: MM15LMM) -> None:
    """A ``round_res`` from ``doc_to_text`` is the request's result (lmms-eval's reference model):
    MMSearch ends in round 1 when the search finds nothing, returning ``[requery, None, None]``, and its
    ``process_results`` reads ``round_res[2]``; the adapter returned its own one answer instead
    (``IndexError`` there)."""
    gen_kwargs = {"max_new_tokens": 3}
    (requery,) = adapter.generate_until([request(0, gen_kwargs, "Question 0: what is shown?")])

    def early_exit(doc: dict, previous_output: list, round_idx: int, previous_round_info: Any) -> tuple:
        return None, None, True, [previous_output[-1], None, None], None

    seen: list[tuple[list, Any]] = []

    def replace_then_end(doc: dict, previous_output: list, round_idx: int, previous_round_info: Any) -> tuple:
        seen.append((list(previous_output), previous_round_info))
        if round_idx == 1:  # the task's own record replaces the answers; the next answer is appended
            return visuals(doc), "Question 1: what is shown?", False, ["kept", "record"], {"brief": 1}
        return None, None, True, None, None  # None: the results so far stand

    def multi_round(doc_to_text: Any) -> FakeInstance:
        args = ("Question 0: what is shown?", gen_kwargs, visuals, doc_to_text, 0, "toy", "test")
        return FakeInstance("generate_until_multi_round", args)

    ended, replaced = adapter.generate_until_multi_round(
        [multi_round(early_exit), multi_round(replace_then_end)]
    )
    assert requery and ended == (requery, None, None)  # (contexts the random model answers)
    (round1,) = adapter.generate_until([request(0, gen_kwargs, "Question 1: what is shown?")])
    assert round1 and replaced == ("kept", "record", round1)
    assert seen == [([requery], None), (["kept", "record", round1], {"brief": 1})]


def test_generate_until_decodes_images_one_batch_at_a_time(
    adapter: MM15LMM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request's images were decoded before anything was generated, so memory grew with the
    task (DocVQA val: ~60 GB of pages); now only one batch's are alive, and the outputs are those of
    each request generated alone, in request order."""
    a, b = {"max_new_tokens": 3}, {"max_new_tokens": 2}
    requests = [request(0, a), request(1, b), request(1, a), request(2, a), request(0, a), request(0, b)]
    expected = [adapter.generate_until([req])[0] for req in requests]
    made: list[weakref.ref] = []  # every image doc_to_visual handed out
    decoded = [0]  # doc_to_visual calls

    def fresh_visuals(doc: dict) -> list[Image.Image]:
        decoded[0] += 1
        pictures = [picture.copy() for picture in visuals(doc)]  # new images, as decoding gives
        made.extend(weakref.ref(picture) for picture in pictures)
        return pictures

    spied = [FakeInstance(r.request_type, (*r.args[:2], fresh_visuals, *r.args[3:])) for r in requests]
    generate, calls = adapter._generate, []

    def spy(prompts: list[str], images: list, video: list[bool], cfg: GenerationConfig) -> list[str]:
        gc.collect()
        calls.append((decoded[0], sum(ref() is not None for ref in made), len(prompts)))
        return generate(prompts, images, video, cfg)

    monkeypatch.setattr(adapter, "_generate", spy)
    assert adapter.generate_until(spied) == expected
    # (doc_to_visual calls so far, images alive, batch size) at each generation: group a's requests
    # 0 and 2, then 3 and 4 (doc 2 has no image), then group b's 1 and 5; batch_size is 2.
    assert calls == [(2, 2, 2), (4, 1, 2), (6, 2, 2)]


def test_loads_a_model_directory(adapter: MM15LMM, tmp_path: Path) -> None:
    adapter.model.save_pretrained(tmp_path / "m")
    loaded = MM15LMM(pretrained=str(tmp_path / "m"), batch_size="3", max_new_tokens="2")
    assert loaded.batch_size == 3 and loaded.max_new_tokens == 2 and not loaded.model.training
    assert loaded.rank == 0 and loaded.world_size == 1


def test_model_arguments_are_checked(adapter: MM15LMM) -> None:
    model = adapter.model
    with pytest.raises(TypeError, match="max_new_token"):  # a typo is not ignored
        MM15LMM(model=model, max_new_token=16)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 'auto'"):
        MM15LMM(model=model, batch_size="auto")
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer, got '0'"):
        MM15LMM(model=model, max_new_tokens="0")
    # What lmms-eval's command line adds: a device other than the CPU is said to be unused.
    with pytest.warns(UserWarning, match=r"device='cuda:0' is not used"):
        MM15LMM(model=model, device="cuda:0", max_batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MM15LMM(model=model, device="cpu")


@pytest.mark.parametrize(
    "visual",
    [
        {"array": np.zeros(10), "sampling_rate": 16000},  # lmms-eval's audio visual
        b"\x89PNG",
        3,
        np.zeros((4, 4, 3), np.uint8),
        torch.zeros(3, 4, 4),
    ],
    ids=["audio", "bytes", "int", "array", "tensor"],
)
def test_unsupported_visuals_are_named(adapter: MM15LMM, visual: Any) -> None:
    adapter.task_dict["odd"] = {"test": [{"visual": visual}]}
    odd = FakeInstance("generate_until", ("What?", {}, lambda doc: [doc["visual"]], 0, "odd", "test"))
    with pytest.raises(ValueError, match="visuals must be PIL images or video paths, got"):
        adapter.generate_until([odd])


def test_pil_visuals_are_decoded_as_mm15_decodes_images() -> None:
    """A transparent PNG with black ink was shown black on black (``convert("RGB")``); mm15 composites
    alpha over white everywhere else, so the adapter must too."""
    from mm15.image import load_image

    ink = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    ink.paste((0, 0, 0, 255), (10, 10, 40, 20))
    (shown,), is_video, counts = MM15LMM._images([ink])
    assert not is_video and counts == [1]
    assert shown.getpixel((0, 0)) == (255, 255, 255) and shown.getpixel((15, 15)) == (0, 0, 0)
    assert shown.tobytes() == load_image(ink).tobytes()


def test_a_video_is_one_visual_whose_placeholder_expands_to_its_frames(
    adapter: MM15LMM, tmp_path: Path
) -> None:
    """lmms-eval's video tasks write one ``<image>`` for the clip; counting frames instead of visuals
    refused that context ("1 <image> placeholders but 10 visuals")."""
    from mm15.video import read_video, write_video

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    clip = write_video(tmp_path / "five.mp4", [Image.new("RGB", (64, 48), c) for c in colours])
    adapter.task_dict["clips"] = {"test": [{"video": str(clip)}]}
    frames = read_video(clip).frames
    assert len(frames) == 5
    model, cfg = adapter.model, adapter.generation_config({"max_new_tokens": 3})

    def video_request(context: str) -> FakeInstance:
        args = (context, {"max_new_tokens": 3}, lambda doc: [doc["video"]], 0, "clips", "test")
        return FakeInstance("generate_until", args)

    for context, user in [
        ("<image>\nWhat happens?", "<image>" * 5 + "\nWhat happens?"),
        ("Watch <image> then say what happens.", "Watch " + "<image>" * 5 + " then say what happens."),
        ("What happens?", "<image>" * 5 + "\nWhat happens?"),  # no placeholder: all frames in front
    ]:
        (out,) = adapter.generate_until([video_request(context)])
        prompt = chat_prompt(model.tokenizer, user)
        assert out == generate_texts(model, [prompt], [frames], cfg, video=True)[0].strip()
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 visuals"):
        adapter.generate_until([video_request("<image><image> what?")])
    # Each visual's placeholder becomes its own images: two clips of 5 and 3 frames, or images (1 each).
    assert MM15LMM._user_text("A <image> B <image> C", [5, 3]) == f"A {'<image>' * 5} B {'<image>' * 3} C"
    assert MM15LMM._user_text("x <image> y <image>", [1, 1]) == "x <image> y <image>"
    assert MM15LMM._user_text("q", [5, 3]) == "<image>" * 8 + "\nq"
    assert MM15LMM._user_text("q", []) == "q"
