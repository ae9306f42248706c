"""One random stream per stage: the head warmup, the LoRA initialisation and the fine-tuning's
shuffles, augmentations, loader workers and mixup each draw from a generator seeded from
(seed, stage name) alone; the noise stage and the validation split draw from their own generators,
seeded from the config seed (app/noise, app/validation.py). No stage then depends on what ran
before it, or on what a cache, a shared store or a resumed run skipped: the same seed trains the
same model whatever was cached."""
import hashlib

import torch


def stage_seed(seed: int, stage: str) -> int:
    """A 63-bit seed for `stage`'s own stream: a function of (seed, stage) only."""
    digest = hashlib.sha256(f"{int(seed)}/{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """A CPU torch.Generator on `stage`'s own stream (draws made on the CPU are the same on any
    accelerator; move the result to the device)."""
    return torch.Generator().manual_seed(stage_seed(seed, stage))
