"""An lmms-eval model adapter for ``MM15Model``: ``generate_until``, ``loglikelihood`` and
``generate_until_multi_round`` over lmms-eval request ``Instance`` objects.

lmms-eval is **not** a dependency of mm15: installing it from PyPI replaces the CPU build of torch
with a CUDA build (``torch`` 2.14 and the ``nvidia-*`` wheels, several GB). The adapter therefore
imports lmms-eval lazily: when it is installed, ``MM15LMM`` subclasses its ``lmms`` base class and
``register()`` adds it to lmms-eval's model registry as ``mm15``; when it is not, ``MM15LMM`` is a plain
class with the same methods (duck-typed), which is how the tests drive it with requests shaped like
``lmms_eval.api.instance.Instance`` (an ``args`` tuple per request, ``task_dict[task][split][doc_id]``
holding the documents).

Request arguments (lmms-eval 0.7):

* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``;
* ``loglikelihood``: ``(context, doc_to_target or continuation str, doc_to_visual, doc_id, task, split)``;
  the result is ``(mean token loss, is_greedy)``: a loss, as lmms-eval's models return and its
  multiple-choice scoring (argmin) expects;
* ``generate_until_multi_round``: ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task,
  split)``; rounds after the first come from ``doc_to_text(doc, previous_output=..., round_idx=...,
  previous_round_info=...)``, which returns ``(visuals, context, terminal, round_results, info)``;
  ``round_results``, when not None, becomes the request's result so far (lmms-eval's convention).

Visuals are PIL images (or video file paths, read as ``mm15.video.read_video`` frames and planned
unsplit). A context with no ``<image>`` gets the visuals' placeholders in front (lmms-eval's own
convention); a context that already has them must have one per visual, where a video is one visual
(a prompt about one clip has one ``<image>``, not one per frame it cannot know of). Each video's
placeholder becomes one ``<image>`` per sampled frame, as ``VideoQAReader`` expands a ``<video>``
slot. ``gen_kwargs`` map to
``GenerationConfig``: ``max_new_tokens``, ``until`` (stop strings), ``temperature`` and ``do_sample``
(greedy unless ``do_sample``, ``temperature > 0`` and ``top_p > 0``), ``top_p``, ``top_k``;
``num_beams`` > 1 is refused (generation is greedy or sampled, never beam search). Model arguments
other than ``pretrained``, ``batch_size``, ``max_new_tokens`` and the ``device`` and ``max_batch_size``
lmms-eval adds are refused (a ``TypeError`` naming them); a ``device`` other than the CPU is warned
about and not used.

Use with lmms-eval installed (a separate environment; see docs/evaluation.md)::

    from mm15.eval.lmms import register
    register()   # then: lmms-eval --model mm15 --model_args pretrained=DIR,batch_size=8 --tasks ...
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm15.image import load_image
from mm15.model.generate import GenerationConfig, continuation_logprobs
from mm15.model.mm15 import IMAGE_PLACEHOLDER, MM15Model, MM15Processor

__all__ = ["MM15LMM", "lmms_base", "manifest", "register"]

DEFAULT_MAX_NEW_TOKENS = 256


def lmms_base() -> type:
    """lmms-eval's ``lmms`` base class when lmms-eval is installed, else ``object``."""
    try:
        from lmms_eval.api.model import lmms
    except ImportError:
        return object
    return lmms


# Resolved once at import: the class below subclasses lmms-eval's base only when it is installed.
_BASE = lmms_base()


def _positive_int(name: str, value: int | str) -> int:
    """``value`` (an int, or the text lmms-eval's --model_args gives) as an integer >= 1."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


class MM15LMM(_BASE):  # type: ignore[misc,valid-type]
    """``MM15Model`` behind lmms-eval's model interface (module docstring).

    ``pretrained`` is a model directory (``save_pretrained``); pass ``model=`` to wrap a model already in
    memory instead. ``batch_size`` prompts are generated together (grouped by identical ``gen_kwargs``).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: MM15Model | None = None,
        batch_size: int | str = 8,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        device: str | None = None,
        max_batch_size: int | str | None = None,
    ) -> None:
        # device and max_batch_size are what lmms-eval's command line adds to every model's arguments
        # (when set); any other name is a typo in --model_args and fails here rather than be ignored.
        # max_batch_size only bounds lmms-eval's "auto" batch size search, which this adapter has not.
        del max_batch_size
        if _BASE is not object:
            super().__init__()
        else:  # the attributes lmms.__init__ sets, for the duck-typed class
            self._rank, self._world_size, self.task_dict = 0, 1, {}
            self.cache_hook = None
        if (pretrained is None) == (model is None):
            raise ValueError("give exactly one of pretrained= (a model directory) or model=")
        self.model = model if model is not None else MM15Model.from_pretrained(pretrained)  # type: ignore[arg-type]
        self.model.eval()
        self.processor = MM15Processor.for_model(self.model)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        if device is not None and torch.device(device).type != "cpu":
            warnings.warn(
                f"mm15's lmms-eval adapter runs the model on the CPU; device={device!r} is not used",
                stacklevel=2,
            )

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # --- helpers --------------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _flatten(visuals: Any) -> list[Any]:
        if visuals is None:
            return []
        if not isinstance(visuals, list | tuple):
            return [visuals]  # an image, a video path, or something _images names in its error
        flat: list[Any] = []
        for visual in visuals:
            flat.extend(MM15LMM._flatten(visual))
        return flat

    @staticmethod
    def _images(visuals: Sequence[Any]) -> tuple[list[Image.Image], bool, list[int]]:
        """PIL images in order, whether they are video frames (read from video paths), and how many
        images each visual gave (one per image, a video's sampled frames)."""
        if visuals and all(isinstance(v, str | Path) for v in visuals):
            from mm15.video import read_video

            clips = [read_video(path).frames for path in visuals]
            return [frame for frames in clips for frame in frames], True, [len(f) for f in clips]
        if not all(isinstance(v, Image.Image) for v in visuals):
            kinds = sorted({type(v).__name__ for v in visuals})
            raise ValueError(f"visuals must be PIL images or video paths, got {kinds}")
        # The same decoding as mm15's own paths: alpha over white, EXIF orientation, 16-bit scaled.
        return [load_image(v) for v in visuals], False, [1] * len(visuals)

    @staticmethod
    def _user_text(context: str, counts: Sequence[int]) -> str:
        """The context with one ``<image>`` per image, where ``counts`` holds each visual's number of
        images: prepended when absent; when present, one per visual, each expanded to its images."""
        present = context.count(IMAGE_PLACEHOLDER)
        if present == 0:
            total = sum(counts)
            return IMAGE_PLACEHOLDER * total + ("\n" if total else "") + context
        if present != len(counts):
            raise ValueError(
                f"the context has {present} {IMAGE_PLACEHOLDER} placeholders but {len(counts)} visuals"
            )
        first, *rest = context.split(IMAGE_PLACEHOLDER)
        return first + "".join(IMAGE_PLACEHOLDER * n + text for n, text in zip(counts, rest, strict=True))

    def _prompt(self, context: str, counts: Sequence[int]) -> str:
        """The chat prompt of ``context`` for visuals of ``counts`` images each (``_user_text``)."""
        from mm15.eval.runner import chat_prompt

        return chat_prompt(self.model.tokenizer, self._user_text(context, counts))

    def generation_config(self, gen_kwargs: dict[str, Any] | None) -> GenerationConfig:
        """lmms-eval ``gen_kwargs`` -> ``GenerationConfig`` (module docstring)."""
        kwargs = dict(gen_kwargs or {})
        if int(kwargs.get("num_beams", 1) or 1) > 1:
            raise ValueError("mm15 generation has no beam search: num_beams must be 1")
        until = kwargs.get("until") or ()
        stops = (until,) if isinstance(until, str) else tuple(s for s in until if s)
        top_p = 1.0 if kwargs.get("top_p") is None else float(kwargs["top_p"])
        # top_p <= 0 keeps only the most likely token (as transformers' top-p filter does): greedy.
        sample = (
            bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature") or 0) > 0 and top_p > 0
        )
        return GenerationConfig(
            max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=float(kwargs["temperature"]) if sample else 0.0,
            top_k=int(kwargs.get("top_k") or 0) if sample else 0,
            top_p=top_p if sample else 1.0,
            stop=stops,
        )

    def _generate(
        self, prompts: list[str], images: list[list[Image.Image]], video: list[bool], cfg: GenerationConfig
    ) -> list[str]:
        from mm15.eval.runner import generate_texts

        out: list[str] = [""] * len(prompts)
        for flag in (False, True):  # frames are planned unsplit, so videos go in their own batches
            rows = [k for k, v in enumerate(video) if v == flag]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                texts = generate_texts(
                    self.model,
                    [prompts[k] for k in chunk],
                    [images[k] for k in chunk],
                    cfg,
                    processor=self.processor,
                    video=flag,
                )
                for k, text in zip(chunk, texts, strict=True):
                    out[k] = text.strip()
        return out

    def _generate_requests(self, requests: Sequence[Any], cfg: GenerationConfig) -> list[str]:
        """Outputs for one batch of ``generate_until`` requests, in order. Their visuals are decoded
        here, not before, and are dropped when this returns: only one batch's images are alive at a
        time (``generate_until``)."""
        prompts: list[str] = []
        images: list[list[Image.Image]] = []
        video: list[bool] = []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            pictures, is_video, counts = self._images(
                self._flatten(doc_to_visual(self._doc(task, split, doc_id)))
            )
            prompts.append(self._prompt(context, counts))
            images.append(pictures)
            video.append(is_video)
        return self._generate(prompts, images, video, cfg)

    # --- the lmms interface -------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy (or sampled) continuations, in request order; requests sharing ``gen_kwargs`` are
        batched together, ``batch_size`` at a time in the order they came.

        Each batch's visuals are decoded just before it is generated (as lmms-eval's own models do),
        so memory is bounded by ``batch_size``, not by the task: decoding a whole task first would hold
        e.g. DocVQA val's ~5k pages (~60 GB of pixels), or 24 frames per video request."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1] or {}, sort_keys=True, default=str), []).append(
                index
            )
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            cfg = self.generation_config(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate_requests([requests[k] for k in chunk], cfg)
                for index, text in zip(chunk, texts, strict=True):
                    results[index] = text
        return results

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation's tokens, whether greedy decoding gives it).

        The first value is a *loss*, lower = likelier, as lmms-eval's own models return it and as its
        ``multiple_choice`` scoring expects (it takes the argmin; EvolvingLMMs-Lab/lmms-eval#370), not
        the log-probability its base-class docstring describes.
        """
        results = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            pictures, is_video, counts = self._images(self._flatten(doc_to_visual(doc)))
            processor = self.processor
            if is_video:
                from mm15.eval.runner import _video_processor

                processor = _video_processor(self.model)
            logprobs, greedy = continuation_logprobs(
                self.model, processor, self._prompt(context, counts), pictures, continuation
            )
            loss = -logprobs.mean().item() if len(logprobs) else 0.0
            results.append((float(loss), greedy))
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[Any]:
        """Multi-round dialogue (lmms-eval's protocol, one request at a time): round 0 answers the
        context; each later round's visuals and context come from ``doc_to_text``, until it signals the
        end. Returns, per request, the tuple of the round results.

        Those are the model's answers, except that a ``round_res`` returned by ``doc_to_text`` (not
        None) *replaces* them, later answers being appended to it, as in lmms-eval's reference model
        (``llava_onevision.generate_until_multi_round``): the task keeps its own record of the rounds,
        and its ``process_results`` reads that record (MMSearch's early exit in round 1 returns
        ``[requery, None, None]`` and scores ``round_res[0]`` and ``round_res[2]``)."""
        results: list[Any] = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            cfg = self.generation_config(gen_kwargs)
            visuals: Any = doc_to_visual(doc)
            answers: list[Any] = []
            info: Any = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, round_res, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                    )
                    if round_res is not None:  # the task's record of the rounds is the result
                        answers = list(round_res)
                    if terminal:
                        break
                pictures, is_video, counts = self._images(self._flatten(visuals))
                answers += self._generate([self._prompt(context, counts)], [pictures], [is_video], cfg)
                round_idx += 1
            results.append(tuple(answers))
        return results


def manifest(name: str = "mm15") -> Any:
    """lmms-eval's ``ModelManifest`` for ``MM15LMM`` (lmms-eval >= 0.7): the payload of an
    ``lmms_eval.models`` entry point, for a package that wants ``--model mm15`` without ``register()``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=name, simple_class_path=f"{__name__}.MM15LMM")


def register(name: str = "mm15") -> type:
    """Make ``MM15LMM`` loadable by lmms-eval as ``--model <name>`` (needs lmms-eval installed).

    lmms-eval 0.7 resolves models through its manifest registry (``MODEL_REGISTRY_V2``); older
    versions through ``register_model``. Both are filled when present.
    """
    try:
        from lmms_eval.api.registry import register_model
    except ImportError as err:
        raise ImportError(
            "lmms-eval is not installed; it is not an mm15 dependency because it pulls a CUDA torch. "
            "Install it in a separate environment (docs/evaluation.md); MM15LMM works without it."
        ) from err
    register_model(name)(MM15LMM)
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError:  # lmms-eval < 0.7: the decorator registry is the only one
        return MM15LMM
    MODEL_REGISTRY_V2.register_manifest(manifest(name), overwrite=True)
    return MM15LMM
