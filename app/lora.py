"""LoRA on the visual tower, as a weight parametrization (peft's idea, plain torch):

    W_effective = W_pretrained + (alpha / rank) * B @ A,   B = 0 at the start,

registered on the projection weights of every block (or the last N). The resampled position
embeddings get a full delta of their own (PositionDelta). Every delta is explicit, so the regulariser
toward pretrained CLIP is exactly ||merged - pretrained||^2 and merging is torch's own
`remove_parametrizations(leave_parametrized=True)`.
"""
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

# Which weight of a ResidualAttentionBlock each target names, and which rows of it (q/k/v share
# nn.MultiheadAttention's packed in_proj_weight).
TARGETS = {
    "q": ("attn", "in_proj_weight", 0), "k": ("attn", "in_proj_weight", 1),
    "v": ("attn", "in_proj_weight", 2), "out": ("attn.out_proj", "weight", None),
    "fc": ("mlp.c_fc", "weight", None), "proj": ("mlp.c_proj", "weight", None),
}


class LoRADelta(nn.Module):
    """Parametrization adding a low-rank delta to some row blocks of a weight matrix."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, row_blocks: list | None):
        super().__init__()
        out_features, in_features = weight.shape
        self.blocks = row_blocks            # None: whole matrix; else which thirds (q, k, v)
        self.block_rows = out_features // 3 if row_blocks else out_features
        self.out_features = out_features
        self.scale = alpha / rank
        n = len(row_blocks) if row_blocks else 1
        # on the weight's device and dtype: the tower may already sit on a GPU when adapters are added
        like = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n, rank, in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(n, self.block_rows, rank, **like))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        parts = torch.bmm(self.lora_B, self.lora_A) * self.scale   # (n, block_rows, in)
        if self.blocks is None:
            return parts[0]
        full = parts.new_zeros(3, self.block_rows, parts.shape[-1])
        full[list(self.blocks)] = parts
        return full.reshape(self.out_features, -1)

    def forward(self, weight):
        return weight + self.delta().to(weight.dtype)


class PositionDelta(nn.Module):
    """Parametrization adding a full trainable delta (zero at the start) to the position embeddings:
    after resampling to a new input size they need to move, and the pull keeps them near the
    resampled pretrained ones."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros_like(weight))

    def delta(self) -> torch.Tensor:
        return self.offset

    def forward(self, weight):
        return weight + self.offset.to(weight.dtype)


def add_lora(visual: nn.Module, rank: int, alpha: float, last_blocks, targets,
             train_pos_embed: bool = False) -> list[nn.Module]:
    """Freeze the tower, register LoRA on `targets` of its last `last_blocks` blocks (`all`: every
    block) and, with `train_pos_embed`, a PositionDelta on the position embeddings."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {list(TARGETS)}")
    visual.requires_grad_(False)
    blocks = visual.transformer.resblocks
    grouped = {}                            # (module path, weight name) -> q/k/v row blocks
    for t in targets:
        path, name, row = TARGETS[t]
        grouped.setdefault((path, name), []).append(row)
    adapters = []
    first = 0 if last_blocks == "all" else max(0, len(blocks) - int(last_blocks))
    for block in list(blocks)[first:]:
        for (path, name), rows in grouped.items():
            module = block.get_submodule(path)
            rows = None if rows == [None] else sorted(rows)
            adapter = LoRADelta(getattr(module, name), rank, alpha, rows)
            parametrize.register_parametrization(module, name, adapter)
            adapters.append(adapter)
    if train_pos_embed:
        adapter = PositionDelta(visual.positional_embedding)
        parametrize.register_parametrization(visual, "positional_embedding", adapter)
        adapters.append(adapter)
    return adapters


def delta_penalty(adapters) -> torch.Tensor:
    """Sum of squared Frobenius norms of the deltas: ||merged - pretrained||^2, zero at init."""
    return sum(a.delta().pow(2).sum() for a in adapters)


def merge_lora(model: nn.Module) -> None:
    """Fold every delta into its weight; the model becomes a plain open_clip module again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
