"""Does a model read its prompt? Two probes of context use on held-out synthetic samples.

Referring and grounding need the model to carry something from its context -- the name of the object
asked for, the box it is given -- into the answer. These probes ask whether a model does that at all,
on samples of the synthetic engine's eval split:

* **grounding names**: for grounding questions ("Where is the green circle?") whose reference answer
  repeats the object's name ("Here is the green circle: ..."), the log-likelihood of the answer up to the
  name against the same words with the name of another object of the scene
  (``continuation_logprobs``). A model that reads the question prefers the asked name every time; one
  that ignores it, about half the time.
* **sorting**: text-only "Sort these words alphabetically: ..." questions answered greedily. Of the words
  in the answers that belong to the generator's vocabulary (``WORDS``, 30 words), the share that are
  words of the question (1.0 for a model that copies them, in any order), next to that share for
  vocabulary words drawn at random, and the share of exact answers.

``mm15 demo`` runs them on its final model; ``benchmarks/context_use.py`` on any saved model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mm15.data.synth import generate
from mm15.data.synth.scenes import WORDS
from mm15.eval.runner import chat_prompt
from mm15.image import load_image
from mm15.model.generate import GenerationConfig, continuation_logprobs
from mm15.model.generate import generate as generate_text
from mm15.model.mm15 import MM15Processor

if TYPE_CHECKING:
    from PIL import Image

    from mm15.model.mm15 import MM15Model


@dataclass(frozen=True)
class ContextUse:
    """What the probes measured over ``items`` questions each (shares in [0, 1])."""

    items: int
    grounding_names: float  # the asked name likelier than another object's
    sorting_words: float | None  # answers' vocabulary words that are the question's (None: no such word)
    sorting_chance: float  # that share for vocabulary words drawn at random
    sorting_exact: float

    def table(self) -> list[str]:
        """The results as Markdown table lines, with what a model that reads or ignores its prompt gets."""
        words = "no vocabulary word written" if self.sorting_words is None else f"{self.sorting_words:.0%}"
        return [
            "| probe | items | this model | reads its prompt | ignores it |",
            "|---|---|---|---|---|",
            f"| grounding: the asked object's name likelier than another object's | {self.items} "
            f"| {self.grounding_names:.0%} | 100% | about 50% |",
            f"| sorting: the answers' vocabulary words that are words of the question | {self.items} "
            f"| {words} | 100% | {self.sorting_chance:.0%} (vocabulary words at random) |",
            f"| sorting: exact answers | {self.items} | {self.sorting_exact:.0%} | up to 100% | 0% |",
        ]


def _answer_logprob(
    model: MM15Model, processor: MM15Processor, question: str, images: list[Image.Image], answer: str
) -> float:
    """log p(answer | question) with the chat template, summed over the answer's tokens."""
    prompt = chat_prompt(model.tokenizer, question)
    return continuation_logprobs(model, processor, prompt, images, answer)[0].sum().item()


def grounding_names(model: MM15Model, processor: MM15Processor, items: int) -> float:
    """The share of ``items`` held-out grounding questions whose asked name is the likelier answer."""
    preferred = scored = index = 0
    while scored < items:
        sample = generate("refer-ground", index, split="eval")
        index += 1
        qa = sample.truth["qa"][0]
        if qa["task"] != "ground":
            continue
        names = [f"{o['color']} {o['shape']}" for o in sample.truth["scene"]["objects"]]
        name = names[qa["targets"][0]]
        answer = sample.turns[1].content
        others = [n for n in names if n != name]
        if name not in answer or not others:
            continue  # the answer is a bare box, or the scene has one object
        prefix = answer[: answer.index(name) + len(name)]
        question = sample.turns[0].content
        images = [load_image(ref) for ref in sample.images]
        right = _answer_logprob(model, processor, question, images, prefix)
        wrong = _answer_logprob(model, processor, question, images, prefix.replace(name, others[0]))
        scored += 1
        preferred += right > wrong
    return preferred / items


def sorting_words(
    model: MM15Model, processor: MM15Processor, items: int
) -> tuple[float | None, float, float]:
    """Over ``items`` held-out word-sorting questions: the share of the answers' vocabulary words that
    are words of their question (None when the answers hold none), that share for vocabulary words drawn
    at random, and the share of exact answers."""
    vocabulary = set(WORDS)
    config = GenerationConfig(max_new_tokens=48)
    found = total = exact = done = index = 0
    chance = 0.0
    while done < items:
        truth = generate("text-only", index, split="eval").truth
        index += 1
        if truth.get("task") != "sort" or truth.get("kind") != "words":
            continue
        answer = generate_text(model, processor([chat_prompt(model.tokenizer, truth["prompt"])]), config)[0]
        words = [w for w in re.findall(r"[a-z]+", answer.lower()) if w in vocabulary]
        found += sum(w in truth["items"] for w in words)
        total += len(words)
        exact += answer.strip() == truth["answer"]
        chance += len(truth["items"]) / len(vocabulary)
        done += 1
    return (found / total if total else None), chance / items, exact / items


@torch.no_grad()
def context_use(model: MM15Model, items: int = 40) -> ContextUse:
    """Both probes, ``items`` held-out questions each."""
    if items < 1:
        raise ValueError(f"context_use needs items >= 1, got {items}")
    processor = MM15Processor.for_model(model)
    words, chance, exact = sorting_words(model, processor, items)
    return ContextUse(items, grounding_names(model, processor, items), words, chance, exact)
