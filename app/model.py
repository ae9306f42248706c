"""The classifier (visual tower -> L2-normalised feature -> linear head) and its one model file."""
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_visual
from .outputs import atomic_write

log = logging.getLogger("app")
FORMAT = "noisy-clip-classifier/1"


def log_class_prior(counts: torch.Tensor) -> torch.Tensor:
    """log of the (add-one smoothed) training class frequencies; an empty class stays finite."""
    counts = counts.double() + 1.0
    return (counts / counts.sum()).log().float()


class Classifier(nn.Module):
    """logits = head(normalize(visual(x))) + log_prior.

    The fixed log-prior term makes plain cross-entropy on these logits the logit-adjusted loss
    (Menon et al.): the head learns class-balanced scores. Inference subtracts tau * log_prior,
    so tau = 1 predicts for a balanced test set and tau = 0 for the training distribution.

    The tower runs in whatever precision autocast gives it; the head and the prior always in fp32:
    bf16 logits come in steps of 0.03-0.125 at their usual size, enough to flip near-ties between
    classes once the prior is subtracted.
    """

    def __init__(self, visual: nn.Module, num_classes: int, log_prior: torch.Tensor):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.output_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("log_prior", log_prior.clone().float())

    def forward(self, x):
        feature = self.visual(x)
        with torch.autocast(feature.device.type, enabled=False):
            return self.head(F.normalize(feature.float(), dim=-1)) + self.log_prior

    def balanced_logits(self, x, tau: float):
        return self(x) - tau * self.log_prior


def save_model_file(path, model: Classifier, backbone, classes, cfg, code_version: str) -> None:
    """ONE file: merged visual weights, head, class list, class prior, config, provenance."""
    obj = {
        "format": FORMAT,
        "arch": backbone.arch,
        "visual_config": backbone.config,
        "visual_state": {k: v.detach().cpu().float() for k, v in model.visual.state_dict().items()},
        "head_weight": model.head.weight.detach().cpu().float(),
        "head_bias": model.head.bias.detach().cpu().float(),
        "log_prior": model.log_prior.detach().cpu(),
        "classes": list(classes),
        "preprocess": backbone.preprocess,
        "config": cfg,
        "weights_sha256": backbone.sha256,
        "code_version": code_version,
    }
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_model_file(path) -> tuple[Classifier, dict]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a model file of this project (format {obj.get('format')!r})")
    visual = build_visual(obj["visual_config"])
    visual.load_state_dict(obj["visual_state"], strict=True)
    model = Classifier(visual, len(obj["classes"]), obj["log_prior"])
    model.head.weight.data.copy_(obj["head_weight"])
    model.head.bias.data.copy_(obj["head_bias"])
    return model.eval(), obj
