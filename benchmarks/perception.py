"""Learning speed of perception: how many steps the tiny model needs to name the colour of one object.

A diagnostic for the demo's weak visual scores. Each sample is a grey 480 x 384 image with one filled
circle in one of eight colours, and the question "What color is the circle?". The tiny preset, random
init, learns it with each connector variant on the same samples (batch 8, AdamW, float32, MM1.5's
dynamic splitting), then answers 40 held-out images, also in float32: the answer is the colour whose
full answer has the lowest total negative log-likelihood, so chance is 1/8. With ``--diameter`` near
the synthetic scenes' object sizes (30-50 px at this image size) the circle spans one or two of the 16
tokens of a 64-pixel tile; ``--diameter 100 150`` makes it a large object, ``--solid`` fills the image.

``--task box`` asks for the circle's bounding box instead ("Where is the circle?", answered
"[x1, y1, x2, y2]" in MM1.5's text units) and scores greedy answers by Acc@IoU>=0.5, the grounding
metric of the synthetic refer-ground benchmark: one object, no phrase to match, so it isolates
reading a position out of the image tokens and writing it as numbers.

Usage: ``python benchmarks/perception.py [--task color|box] [--steps 300] [--diameter 30 50]
[--solid] [--variants c-abstractor,mlp]``; results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import time

import torch
from PIL import Image, ImageDraw

from mm15.boxes import format_box
from mm15.chat import ChatEncoder
from mm15.data.packing import Batch, collate
from mm15.data.sample import Sample, Turn
from mm15.eval.metrics import grounding_hit
from mm15.eval.runner import chat_prompt, generate_texts
from mm15.hardware import compute_dtype
from mm15.image import ImageProcessor
from mm15.model.connector import ConnectorKind
from mm15.model.generate import GenerationConfig
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
SIZE = (480, 384)  # width, height: a synthetic scene's size
BACKGROUND = (128, 128, 128)
QUESTIONS = {
    "color": "<image>\nWhat color is the circle?",
    "box": "<image>\nWhere is the circle? Answer in [x1, y1, x2, y2] format.",
}
BATCH = 8
EVAL_ITEMS = 40


@dataclasses.dataclass(frozen=True)
class Picture:
    """A probe image, its circle's colour and its pixel box (the whole image when ``--solid``)."""

    image: Image.Image
    color: str
    box: tuple[float, float, float, float]

    def answer(self, task: str) -> str:
        return self.color if task == "color" else format_box(self.box, self.image.height, self.image.width)


def picture(rng: random.Random, color: str, diameter: tuple[int, int], solid: bool) -> Picture:
    """A grey image with one circle of ``color`` (diameter drawn from ``diameter``), or all ``color``."""
    if solid:
        return Picture(
            Image.new("RGB", SIZE, COLORS[color]), color, (0.0, 0.0, float(SIZE[0]), float(SIZE[1]))
        )
    image = Image.new("RGB", SIZE, BACKGROUND)
    side = rng.randint(*diameter)
    x, y = rng.randint(0, SIZE[0] - side), rng.randint(0, SIZE[1] - side)
    # PIL fills the pixels x .. x + side inclusive, so the box's far edges are one past them.
    ImageDraw.Draw(image).ellipse((x, y, x + side, y + side), fill=COLORS[color])
    return Picture(image, color, (float(x), float(y), float(x + side + 1), float(y + side + 1)))


def sample(image: Image.Image, task: str, answer: str) -> Sample:
    return Sample(
        id="probe",
        category="general",
        source="probe",
        images=[image],
        turns=[Turn("user", QUESTIONS[task]), Turn("assistant", answer)],
    )


class Probe:
    """One connector variant of the tiny preset with its encoder, processor and optimizer."""

    def __init__(self, kind: ConnectorKind, task: str, seed: int, lr: float) -> None:
        self.task = task
        cfg = preset("tiny")
        cfg = dataclasses.replace(cfg, connector=dataclasses.replace(cfg.connector, kind=kind))
        torch.manual_seed(seed)
        self.model = MM15Model.build(cfg).train()
        self.encoder = ChatEncoder(self.model.tokenizer, cfg.image, max_length=2048)
        self.processor = ImageProcessor(cfg.image, self.model.vision.image_mean, self.model.vision.image_std)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def batch(self, samples: list[Sample]) -> tuple[Batch, torch.Tensor]:
        encoded = [self.encoder.encode(s, [(im.height, im.width) for im in s.images]) for s in samples]
        batch = collate(encoded, pad_id=self.model.tokenizer.pad_token_id, max_length=2048)
        order = batch.sample_order
        pixels = self.processor(
            [im for i in order for im in samples[i].images], [p for i in order for p in encoded[i].plans]
        ).pixel_values
        return batch, pixels

    def train_step(self, samples: list[Sample]) -> float:
        batch, pixels = self.batch(samples)
        loss = self.model(pixel_values=pixels, **batch.model_inputs()).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def correct(self, probe: Picture) -> bool:
        """Colour: the colour whose whole answer is most likely (total, not mean, NLL: answers differ
        in length) is the circle's. Box: the greedy answer's first box has IoU >= 0.5."""
        self.model.eval()
        if self.task == "color":
            nll = {}
            for color in COLORS:
                batch, pixels = self.batch([sample(probe.image, self.task, color)])
                out = self.model(pixel_values=pixels, **batch.model_inputs())
                nll[color] = out.loss.item() * int((batch.labels != -100).sum())
            hit = min(nll, key=nll.__getitem__) == probe.color
        else:
            prompt = chat_prompt(self.model.tokenizer, QUESTIONS["box"])
            cfg = GenerationConfig(max_new_tokens=32)
            # generate_texts autocasts to fast_dtype() (bf16 where bf16 matmuls are fast): answer in the
            # float32 the probe trains in, as the colour task's forward passes do.
            with compute_dtype(torch.float32):
                (text,) = generate_texts(self.model, [prompt], [[probe.image]], cfg)
            hit = grounding_hit(text, probe.box, probe.image.width, probe.image.height)
        self.model.train()
        return hit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=tuple(QUESTIONS), default="color", help="what to answer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--diameter", type=int, nargs=2, default=(30, 50), metavar=("MIN", "MAX"))
    parser.add_argument("--solid", action="store_true", help="fill the image with the colour instead")
    parser.add_argument("--variants", default="c-abstractor,mlp", help="connector kinds, comma-separated")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1 or not 1 <= args.diameter[0] <= args.diameter[1] <= min(SIZE):
        parser.error(f"need --steps >= 1 and 1 <= MIN <= MAX <= {min(SIZE)}")
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
    shown = "solid colour" if args.solid else f"circle of {args.diameter[0]}-{args.diameter[1]} px"
    chance = f"chance {100 / len(COLORS):.1f}%" if args.task == "color" else "scored by Acc@IoU>=0.5"
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"tiny preset, random init, float32; task {args.task}: {shown} on a {SIZE[0]}x{SIZE[1]} image; "
        f"{args.steps} steps of {BATCH}, lr {args.lr}; {EVAL_ITEMS} held-out images, {chance}"
    )
    print()
    print("| connector | loss, first 25 steps | loss, last 25 steps | held-out accuracy | seconds |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        probe = Probe(kind, args.task, args.seed, args.lr)  # type: ignore[arg-type]
        rng = random.Random(args.seed)  # every variant sees the same images
        start, losses = time.perf_counter(), []
        for _ in range(args.steps):
            colors = [rng.choice(list(COLORS)) for _ in range(BATCH)]
            drawn = [picture(rng, c, args.diameter, args.solid) for c in colors]
            losses.append(probe.train_step([sample(p.image, args.task, p.answer(args.task)) for p in drawn]))
        held_out = random.Random(args.seed + 1)
        correct = 0
        for _ in range(EVAL_ITEMS):
            color = held_out.choice(list(COLORS))
            correct += probe.correct(picture(held_out, color, args.diameter, args.solid))
        seconds = time.perf_counter() - start
        head, tail = losses[:25], losses[-25:]
        print(
            f"| {kind} | {sum(head) / len(head):.3f} | {sum(tail) / len(tail):.3f} | "
            f"{100 * correct / EVAL_ITEMS:.1f}% | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
