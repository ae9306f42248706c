"""Stage 5, head warmup: a linear head on the cached frozen features (linear probe, then fine-tune).

Sample-weighted (weights from the noise stage) and logit-adjusted (the class prior is added to the
logits during training, see model.Classifier). Runs on the accelerator when there is one (on one CPU
thread beside GPUs it took ~18 min for 60 epochs at 300k images x 1,500 classes); seconds there.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .seeds import stage_generator


def train_head(feats: np.ndarray, labels: np.ndarray, weights: np.ndarray, log_prior: torch.Tensor,
               wcfg: dict, seed: int, show_progress: bool = True, device="cpu"):
    """Returns (head weight, head bias, per-epoch losses), on the CPU. Rows with weight 0 are left out.
    The head starts at zero and the batches are shuffled by the stage's own generator (seed, "warmup"):
    nothing here draws from, or depends on, torch's global random state."""
    keep = weights > 0
    x = torch.from_numpy(np.asarray(feats[keep], dtype=np.float32)).to(device)
    y = torch.from_numpy(labels[keep]).long().to(device)
    w = torch.from_numpy(weights[keep]).float().to(device)
    log_prior = log_prior.to(device)
    head = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], len(log_prior), device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=wcfg["lr"], weight_decay=wcfg["weight_decay"])
    steps_per_epoch = max(1, -(-len(y) // wcfg["batch_size"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=wcfg["epochs"] * steps_per_epoch)
    gen = stage_generator(seed, "warmup")
    history = []
    for _ in tqdm(range(wcfg["epochs"]), desc="warmup: linear head", unit="epoch",
                  disable=not show_progress, mininterval=2):
        total = 0.0
        for idx in torch.randperm(len(y), generator=gen).to(device).split(wcfg["batch_size"]):
            logits = head(x[idx]) + log_prior
            loss = (w[idx] * F.cross_entropy(logits, y[idx], reduction="none")).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)         # no .item(): no GPU sync per batch
        history.append(float(total) / max(1, len(y)))
    return head.weight.detach().cpu(), head.bias.detach().cpu(), history
