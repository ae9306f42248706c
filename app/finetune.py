"""Stage 6, noise-aware LoRA fine-tuning: one readable loop.

loss = mean_i( w_i * robust_loss(logits_i, y_i) ) + reg_lambda * ||merged - pretrained||^2

w_i comes from the noise stage; robust_loss is CE with label smoothing (or GCE; mixup optional); the
penalty is the squared norm of the LoRA and position-embedding deltas (zero at the start). AdamW,
linear warmup + cosine, gradient clipping, mixed precision, an exponential moving average of the
trained weights that becomes THE model,
data parallel over however many processes `accelerate launch` started. The batch is GLOBAL: the
same number of images per optimisation step on 1 or 8 GPUs (per-device batch and gradient
accumulation are derived from it), so the model does not depend on the server. The full training
state is checkpointed every epoch and `--resume` continues from the last one. After every epoch an
optional `evaluate` callback scores the weights that would be exported now (app/validation.py).
"""
import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import shaping
from .data import EpochShuffleSampler, ImageDataset, train_transform
from .lora import add_lora, delta_penalty, deltas_once
from .outputs import atomic_write
from .runtime import as_tensors, make_loader
from .seeds import stage_generator, stage_seed

log = logging.getLogger("app")
FAIL_ENV = "APP_FAIL_AFTER_STEPS"   # fault injection for the resume test: crash after N steps


def robust_loss(logits, targets, fcfg: dict):
    """Per-sample loss: CE with label smoothing, or GCE (Zhang & Sabuncu 2018): (1 - p_y^q) / q,
    between CE (q->0) and MAE (q=1): bounded, so confidently wrong labels cannot dominate the gradient."""
    logits = logits.float()
    if fcfg["loss"] == "ce":
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=fcfg["label_smoothing"])
    if fcfg["loss"] == "gce":
        p_y = F.softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        return (1.0 - p_y.clamp_min(1e-6).pow(fcfg["gce_q"])) / fcfg["gce_q"]
    raise ValueError(f"finetune.loss must be ce or gce, not {fcfg['loss']!r}")


def classification_loss(model, x, y, w, fcfg, mix: np.random.Generator | None):
    """mean_i(w_i * loss(logits_i, y_i)); with mixup (`mix`: this step's random generator) the images
    are blended with a permutation of the batch, and so are their losses and weights."""
    if mix is None:
        return (w * robust_loss(model(x), y, fcfg)).mean()
    lam = float(mix.beta(fcfg["mixup_alpha"], fcfg["mixup_alpha"]))
    perm = torch.as_tensor(mix.permutation(len(x)), device=x.device)
    logits = model(lam * x + (1 - lam) * x[perm])
    return (lam * w * robust_loss(logits, y, fcfg) + (1 - lam) * w[perm] * robust_loss(logits, y[perm], fcfg)).mean()


def warmup_cosine(total_steps: int, warmup_frac: float):
    warm = max(1, int(total_steps * warmup_frac))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return factor


class WeightAverage:
    """Exponential moving average of the trained parameters over the steps of THIS run: the
    optimiser's iterate averaging (Polyak), which yields one set of weights: one model, not a fusion
    of separately trained models. The decay ramps up, min(decay, (1 + t) / (10 + t)) at step t, so a
    short run is not dominated by its first steps. Checkpointed with the run (state_dict).
    One multi-tensor kernel per step (torch._foreach_lerp_) for all the parameters."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.live = [p.detach() for p in self.params]      # views: the optimizer updates them in place
        self.decay, self.steps = decay, 0
        self.average = [p.clone() for p in self.live]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.average, self.live, 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.live, self.average)

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in the model's parameters for the duration (to evaluate what would be
        exported now), the trained ones back afterwards."""
        trained = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int     # images per optimisation step, all processes together
    device_batch: int     # images per forward pass on one process
    accumulation: int     # forward passes per step on each process


def batch_plan(n_images: int, global_batch: int, processes: int, max_device_batch: int) -> BatchPlan:
    """Per-device batch and gradient accumulation for a global batch on `processes` processes, at
    most `max_device_batch` images per forward pass. A dataset smaller than the global batch, or a
    global batch that the processes cannot share evenly, gets the largest batch that works (warned)."""
    if n_images < processes:
        raise ValueError(f"{n_images} training images for {processes} processes: too few to train on")
    wanted = global_batch
    global_batch = min(global_batch, n_images) // processes * processes
    if global_batch != wanted:
        log.warning("finetune: global batch %d instead of finetune.batch_size=%d (%d training images, "
                    "%d processes)", global_batch, wanted, n_images, processes)
    per_process = global_batch // processes
    accumulation = -(-per_process // max_device_batch)
    while per_process % accumulation:            # equal micro-batches: the step's mean is exact
        accumulation += 1
    return BatchPlan(global_batch, per_process // accumulation, accumulation)


def latest_checkpoint(ckpt_dir: Path):
    marker = ckpt_dir / "latest.txt"
    return ckpt_dir / marker.read_text().strip() if marker.exists() else None


FUSED_ADAMW_DEVICES = ("cuda", "cpu")      # where torch.optim.AdamW(fused=True) has a kernel


def make_trainable(model, cfg):
    """LoRA adapters (or, with tune: full, every visual weight) + the head, and their AdamW (one
    fused kernel for all the parameters where torch has it, else multi-tensor kernels).
    Returns (adapters, optimizer)."""
    fcfg, lcfg = cfg["finetune"], cfg["lora"]
    if fcfg["tune"] == "lora":
        adapters = add_lora(model.visual, lcfg["rank"], lcfg["alpha"], lcfg["last_blocks"], lcfg["targets"],
                            lcfg["train_pos_embed"], generator=stage_generator(cfg["seed"], "lora"))
        tuned = [p for a in adapters for p in a.parameters()]
    elif fcfg["tune"] == "full":       # the naive baseline: every visual weight, no regulariser
        if fcfg["reg_lambda"]:
            raise ValueError("finetune.reg_lambda penalises the LoRA delta: set it to 0 with tune: full")
        adapters = []
        tuned = list(model.visual.requires_grad_(True).parameters())
    else:
        raise ValueError(f"finetune.tune={fcfg['tune']!r} trains nothing: finetune() is not called for it")
    model.head.requires_grad_(True)
    head = list(model.head.parameters())
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for p in tuned + head)
    optimizer = torch.optim.AdamW(
        [{"params": tuned, "lr": fcfg["lr"]}, {"params": head, "lr": fcfg["head_lr"]}],
        weight_decay=fcfg["weight_decay"], fused=fused or None, foreach=None if fused else True)
    return adapters, optimizer


def train_step(model, adapters, optimizer, micro_batches, targets, sample_w, fcfg, accelerator,
               mix: np.random.Generator | None = None) -> torch.Tensor:
    """One optimisation step over the loader batches of one global batch (gradient accumulation when
    there are several; processes exchange gradients on the last one only).
    Returns (loss, classification loss, penalty), averaged over the micro-batches."""
    sums = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), deltas_once(adapters):
            x, idx, _ = as_tensors(batch, accelerator.device)
            with accelerator.autocast():
                cls = classification_loss(model, x, targets[idx], sample_w[idx], fcfg, mix)
            penalty = delta_penalty(adapters) if adapters else cls.new_zeros(())
            loss = cls + fcfg["reg_lambda"] * penalty
            accelerator.backward(loss / len(micro_batches))
        sums = sums + torch.stack([loss.detach(), cls.detach(), penalty.detach().float()]) / len(micro_batches)
    if fcfg["grad_clip"]:
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], fcfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def finetune(model, root, paths, labels, weights, preprocess, cfg, accelerator, out_dir, resume=False, data=None,
             evaluate=None):
    """Train LoRA adapters + head in place on `model` (a Classifier). Returns the per-epoch history.
    `data` (image count + digest) is stored with each checkpoint; a resume on other data is refused.
    `evaluate(classifier) -> dict`, called on every process after every epoch with the weights that
    would be exported then (the average, when averaging is on), adds its figures to the epoch's entry."""
    fcfg = cfg["finetune"]
    adapters, optimizer = make_trainable(model, cfg)
    if accelerator.is_main_process:
        log.info("finetune (%s): %d adapters, %d trained parameters (head included) on %d images",
                 fcfg["tune"], len(adapters), sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
                 len(paths))

    dataset = ImageDataset([Path(root) / p for p in paths],
                           train_transform(preprocess, fcfg["crop_scale"], fcfg["hflip"]),
                           preprocess["image_size"], seed=stage_seed(cfg["seed"], "finetune.augment"))
    plan = batch_plan(len(dataset), fcfg["batch_size"], accelerator.num_processes, fcfg["max_device_batch"])
    if accelerator.is_main_process:
        log.info("finetune: global batch %d = %d processes x %d images x %d accumulation steps",
                 plan.global_batch, accelerator.num_processes, plan.device_batch, plan.accumulation)
    # drop_last: every step sees a full global batch, so P processes x batch B x A accumulation steps
    # train exactly like one process x batch P*B*A (the same samples per step, the same mean loss).
    loader = make_loader(dataset, plan.device_batch, cfg["num_workers"],
                         sampler=EpochShuffleSampler(len(dataset), stage_seed(cfg["seed"], "finetune.shuffle")),
                         drop_last=True)
    loader.generator = workers = torch.Generator()     # the decoding workers' seeds: reseeded every epoch
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader) // plan.accumulation
    total_steps = fcfg["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, fcfg["warmup_frac"]))
    accelerator.register_for_checkpointing(scheduler)
    average = None
    if fcfg["ema_decay"]:
        average = WeightAverage([p for g in optimizer.param_groups for p in g["params"]], fcfg["ema_decay"])
        accelerator.register_for_checkpointing(average)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=accelerator.device)
    sample_w = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=accelerator.device)

    ckpt_dir = Path(out_dir) / "checkpoints"
    history, start_epoch = [], 0
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        state = json.loads((latest / "trainer_state.json").read_text())
        if state.get("data") != data:
            raise ValueError(f"--resume: the checkpoint {latest} was trained on other data ({state.get('data')}; "
                             f"this run: {data}). Start afresh without --resume, or in a new OUT_DIR.")
        accelerator.load_state(str(latest))
        history, start_epoch = state["history"], state["epoch"] + 1
        if accelerator.is_main_process:
            log.info("finetune: resumed from %s (epoch %d done)", latest, state["epoch"] + 1)
    elif resume and accelerator.is_main_process:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", ckpt_dir)

    fail_after = int(os.environ.get(FAIL_ENV, "0"))
    mix_seed = stage_seed(cfg["seed"], "finetune.mixup")
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, fcfg["epochs"]):
        model.train()
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        workers.manual_seed(stage_seed(cfg["seed"], f"finetune.workers.{epoch}"))
        sums = torch.zeros(3, device=accelerator.device)   # loss, classification, penalty
        batches = iter(loader)
        for _ in tqdm(range(steps_per_epoch), desc=f"finetune: epoch {epoch + 1}/{fcfg['epochs']}",
                      unit="step", disable=not accelerator.is_main_process, mininterval=2):
            micro_batches = [next(batches) for _ in range(plan.accumulation)]
            # mixup's draws are a function of (seed, step): the same after a resume
            mix = np.random.default_rng([mix_seed, step]) if fcfg["mixup_alpha"] else None
            sums += train_step(model, adapters, optimizer, micro_batches, targets, sample_w, fcfg, accelerator, mix)
            scheduler.step()
            if average is not None:
                average.update()
            step += 1
            if fail_after and step >= fail_after:
                raise RuntimeError(f"{FAIL_ENV}={fail_after}: simulated crash at step {step}")
        sums = accelerator.reduce(sums, reduction="mean") / max(1, steps_per_epoch)
        history.append({"epoch": epoch + 1, "loss": sums[0].item(), "cls_loss": sums[1].item(),
                        "delta_penalty": sums[2].item(),
                        "lr": optimizer.param_groups[0]["lr"], "head_lr": optimizer.param_groups[1]["lr"]})
        if evaluate is not None:
            history[-1].update(_evaluate_epoch(evaluate, accelerator.unwrap_model(model), average))
        if accelerator.is_main_process:
            h = history[-1]
            estimate = (f"; estimated test top-1 {h['estimated_test_top1']:.1%} "
                        f"(noisy split {h['noisy_split_top1']:.1%})" if evaluate is not None else "")
            log.info("finetune: epoch %d loss %.4f (cls %.4f, delta %.4g)%s", epoch + 1, h["loss"], h["cls_loss"],
                     h["delta_penalty"], estimate)
        _save_checkpoint(accelerator, ckpt_dir, {"epoch": epoch, "history": history, "data": data,
                                                 "settings": shaping(cfg)})
    if average is not None:         # THE model is this run's average (one set of weights)
        average.copy_to_model()
    return history


def _evaluate_epoch(evaluate, classifier, average: WeightAverage | None) -> dict:
    """evaluate(classifier) on the weights that would be exported now, leaving the training's weights
    and random state as they were: evaluating does not change the model."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), (average.swapped_in() if average is not None else contextlib.nullcontext()):
        figures = evaluate(classifier)
    return {**figures, "validation_seconds": round(time.perf_counter() - t0, 2)}


def _save_checkpoint(accelerator, ckpt_dir: Path, state: dict) -> None:
    """Full training state (model, optimizer, scheduler, RNG) + `state` (epoch, history, data, the
    settings that shape the model and data) for `--resume`; keeps only the last."""
    target = ckpt_dir / f"epoch-{state['epoch'] + 1:03d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        (target / "trainer_state.json").write_text(json.dumps(state))
        previous = latest_checkpoint(ckpt_dir)
        with atomic_write(ckpt_dir / "latest.txt") as f:
            f.write(target.name)
        if previous is not None and previous != target and previous.exists():
            shutil.rmtree(previous)
    accelerator.wait_for_everyone()
