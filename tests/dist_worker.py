"""Worker for tests/test_distributed.py: a few AdamW steps of the tiny model on a fixed global batch.

Run under ``torchrun --nproc_per_node W`` (or plain ``python`` for one process)::

    dist_worker.py --strategy {none,ddp,fsdp2} --steps N --out result.json
                   [--bf16] [--save-dir D --save-at K] [--load CHECKPOINT]

The global batch is 4 synthetic samples, two with images and two text-only; rank ``r`` of ``W`` takes the
contiguous slice ``[r*4/W, (r+1)*4/W)``, so with 2 ranks rank 1 has no image at all and fewer supervised
tokens than rank 0. Each step: forward, per-token cross-entropy, the rank's mean scaled by
``scale_for_global_mean``, ``touch_unused_branches``, backward, ``AdamW`` step (``build_optimizer``'s
per-module groups). Rank 0 writes ``{"losses": [global mean loss per step], "checksum": ...,
"rank_checksums": [...], "start_step": ...}``: the loss is all-reduced, the checksum is the float64 sum of
all (full, unsharded) parameters, per rank so that the replicas can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from mm15.chat import ChatEncoder  # noqa: E402
from mm15.data.packing import collate  # noqa: E402
from mm15.data.synth import generate  # noqa: E402
from mm15.image import ImageProcessor, load_image  # noqa: E402
from mm15.model.mm15 import MM15Model  # noqa: E402
from mm15.model.presets import preset  # noqa: E402
from mm15.train import distributed as D  # noqa: E402
from mm15.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mm15.train.trainer import build_optimizer  # noqa: E402

GLOBAL_BATCH = [("general-color", 0), ("refer-ground", 0), ("text-only", 0), ("text-only", 1)]
TRAINABLE = ("encoder", "connector", "llm")
LR = {"encoder": 1e-3, "connector": 2e-3, "llm": 2e-3}


def local_batch(model: MM15Model, rank: int, world: int):
    per_rank = len(GLOBAL_BATCH) // world
    names = GLOBAL_BATCH[rank * per_rank : (rank + 1) * per_rank]
    encoder = ChatEncoder(model.tokenizer, model.cfg.image, max_length=1024)
    images = ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std)
    encoded, pictures = [], []
    for name, index in names:
        sample = generate(name, index, split="train", seed=0)
        loaded = [load_image(ref, name=f"{sample.id}[{i}]") for i, ref in enumerate(sample.images)]
        encoded.append(encoder.encode(sample, [(p.height, p.width) for p in loaded]))
        pictures.append(loaded)
    batch = collate(encoded, model.tokenizer.pad_token_id, 1024, packed=True)
    order = batch.sample_order
    flat = [p for i in order for p in pictures[i]]
    plans = [plan for i in order for plan in encoded[i].plans]
    pixel_values = images(flat, plans).pixel_values if flat else None
    return batch, pixel_values


def checksums(model: torch.nn.Module) -> float:
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        total += full.detach().double().sum()
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=D.STRATEGIES, default="none")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--save-dir")
    parser.add_argument("--save-at", type=int, default=-1)
    parser.add_argument("--load")
    args = parser.parse_args()

    info = D.init_distributed()
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).train()
    batch, pixel_values = local_batch(model, info.rank, info.world_size)
    wrapped = D.wrap_model(model, args.strategy, torch.bfloat16 if args.bf16 else None, trainable=TRAINABLE)
    base = D.unwrap(wrapped)
    optimizer = build_optimizer(base, TRAINABLE, LR)
    start = 0
    if args.load:
        start, _ = load_checkpoint(args.load, base, optimizer)

    targets = batch.labels[:, 1:]
    supervised = targets != -100
    local_count = int(supervised.sum())
    global_count = D.global_token_count(local_count)
    losses = []
    for step in range(start, start + args.steps):
        assert D.all_ranks_have_data(True)
        out = wrapped(pixel_values=pixel_values, **batch.model_inputs())
        per_token = out.token_losses
        loss = D.scale_for_global_mean(per_token.mean(), local_count, global_count, info.world_size)
        loss = D.touch_unused_branches(wrapped, loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = per_token.detach().sum().double().reshape(1)
        if info.is_distributed:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / global_count)
        if args.save_dir and step + 1 == args.save_at:
            save_checkpoint(args.save_dir, step + 1, base, optimizer, None, {"step": step + 1}, keep_last=1)

    mine = checksums(base)
    ranks = [mine]
    if info.is_distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, mine)
        ranks = gathered
    if info.is_main:
        result = {
            "losses": losses,
            "checksum": mine,
            "rank_checksums": ranks,
            "start_step": start,
            "local_tokens": local_count,
            "global_tokens": global_count,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
    D.cleanup()


if __name__ == "__main__":
    main()
