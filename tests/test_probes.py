"""Context-use probes: a pretrained language model reads its prompt; the chance level is the generator's."""

from __future__ import annotations

import pytest
import torch

from mm15.data.synth import generate
from mm15.data.synth.scenes import WORDS
from mm15.eval.probes import ContextUse, context_use
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset


@pytest.fixture(scope="module")
def smol() -> MM15Model:
    torch.manual_seed(0)
    return MM15Model.build(preset("smol")).eval()


def test_a_pretrained_decoder_reads_its_prompt_on_both_probes(smol: MM15Model) -> None:
    # SmolLM2-135M-Instruct with an untrained encoder: it copies the asked name and the words to sort.
    result = context_use(smol, items=3)
    assert result.items == 3
    assert result.grounding_names == 1.0
    assert result.sorting_words == 1.0
    # The chance share: each question's word count over the 30-word vocabulary, averaged.
    sorts = (generate("text-only", i, split="eval").truth for i in range(200))
    counts = [len(t["items"]) for t in sorts if t.get("task") == "sort" and t.get("kind") == "words"][:3]
    assert result.sorting_chance == pytest.approx(sum(counts) / len(counts) / len(WORDS))


def test_the_table_names_every_probe_and_an_empty_sorting_share() -> None:
    lines = ContextUse(5, 0.6, None, 0.2, 0.0).table()
    assert len(lines) == 5 and lines[0].startswith("| probe |")
    assert "| 5 | 60% | 100% | about 50% |" in lines[2]
    assert "no vocabulary word written" in lines[3] and "20% (vocabulary words at random)" in lines[3]


def test_context_use_needs_at_least_one_item(smol: MM15Model) -> None:
    with pytest.raises(ValueError, match="items >= 1"):
        context_use(smol, items=0)
