"""Does a trained model read its prompt? Two probes of context use, run on a model directory.

Not a speed comparison but a diagnostic for the demo's zero in referring and grounding (README): both
need the model to take something from its context -- the name of the object asked for, the box given --
and carry it into the answer. The probes ask whether the model does that at all, on held-out samples of
the synthetic engine (eval seeds):

* **grounding names**: for grounding questions ("Where is the green circle?") whose reference answer
  repeats the object's name ("Here is the green circle: ..."), the log-likelihood of the answer up to the
  name against the same words with the name of another object of the scene. A model that reads the
  question prefers the asked name every time; one that ignores it prefers it about half the time.
* **sorting**: text-only "Sort these words alphabetically: ..." questions answered greedily. Of the
  words in the answers that belong to the generator's 30-word vocabulary, the share that are words of
  the question (1.0 for a model that copies them, in any order; the table also gives the share for
  vocabulary words drawn at random), and the share of exact answers.

Usage: ``python benchmarks/context_use.py --model runs/demo/tiny/sft/final [--items 40]``
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from mm15.data.synth import generate
from mm15.data.synth.scenes import WORDS
from mm15.eval.runner import chat_prompt
from mm15.image import load_image
from mm15.model.generate import GenerationConfig, continuation_logprobs
from mm15.model.generate import generate as generate_text
from mm15.model.mm15 import MM15Model, MM15Processor


def answer_logprob(
    model: MM15Model, processor: MM15Processor, question: str, images: list, answer: str
) -> float:
    """log p(answer | question) with the chat template, summed over the answer's tokens."""
    prompt = chat_prompt(model.tokenizer, question)
    return continuation_logprobs(model, processor, prompt, images, answer)[0].sum().item()


def grounding_names(model: MM15Model, processor: MM15Processor, items: int) -> int:
    """How many of ``items`` held-out grounding questions get the asked name as the likelier answer."""
    preferred = scored = 0
    index = 0
    while scored < items:
        sample = generate("refer-ground", index, split="eval")
        index += 1
        qa = sample.truth["qa"][0]
        objects = sample.truth["scene"]["objects"]
        asked = objects[qa["targets"][0]] if qa["task"] == "ground" else None
        name = f"{asked['color']} {asked['shape']}" if asked else ""
        answer = sample.turns[1].content
        others = [f"{o['color']} {o['shape']}" for o in objects if f"{o['color']} {o['shape']}" != name]
        if not asked or name not in answer or not others:
            continue
        prefix = answer[: answer.index(name) + len(name)]
        question = sample.turns[0].content
        images = [load_image(ref) for ref in sample.images]
        right = answer_logprob(model, processor, question, images, prefix)
        wrong = answer_logprob(model, processor, question, images, prefix.replace(name, others[0]))
        scored += 1
        preferred += right > wrong
    return preferred


def sorting(model: MM15Model, processor: MM15Processor, items: int) -> tuple[float | None, float, float]:
    """Over ``items`` word-sorting questions: the share of the answers' vocabulary words (words of the
    generator's ``WORDS``) that are words of their question (None when the answers hold none), that
    share for words drawn at random from the vocabulary, and the share of exact answers."""
    found = total = exact = done = 0
    chance = 0.0
    vocabulary = set(WORDS)
    config = GenerationConfig(max_new_tokens=48)
    index = 0
    while done < items:
        sample = generate("text-only", index, split="eval")
        index += 1
        truth = sample.truth
        if truth.get("task") != "sort" or truth.get("kind") != "words":
            continue
        batch = processor([chat_prompt(model.tokenizer, truth["prompt"])])
        answer = generate_text(model, batch, config)[0]
        words = [w for w in re.findall(r"[a-z]+", answer.lower()) if w in vocabulary]
        found += sum(w in truth["items"] for w in words)
        total += len(words)
        exact += answer.strip() == truth["answer"]
        chance += len(truth["items"]) / len(WORDS)
        done += 1
    return (found / total if total else None), chance / done, exact / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved mm15 model directory")
    parser.add_argument("--items", type=int, default=40, help="held-out items per probe")
    args = parser.parse_args()
    if args.items < 1:
        parser.error("--items must be >= 1")
    model = MM15Model.from_pretrained(args.model).eval()
    processor = MM15Processor.for_model(model)
    with torch.no_grad():
        preferred = grounding_names(model, processor, args.items)
        share, chance, exact = sorting(model, processor, args.items)
    print(f"model: {args.model}")
    print("| probe | items | this model | reads its prompt | ignores it |")
    print("|---|---|---|---|---|")
    print(
        f"| grounding: the asked object's name more likely than another object's | {args.items} "
        f"| {preferred / args.items:.0%} | 100% | about 50% |"
    )
    print(
        f"| sorting: the answers' vocabulary words that are words of the question | {args.items} "
        f"| {'no vocabulary word written' if share is None else f'{share:.0%}'} | 100% "
        f"| {chance:.0%} (vocabulary words at random) |"
    )
    print(f"| sorting: exact answers | {args.items} | {exact:.0%} | up to 100% | 0% |")


if __name__ == "__main__":
    main()
