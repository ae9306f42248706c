"""LoRA on the visual tower, as weight parametrizations (peft's idea, plain torch):

    W_effective = W_pretrained + (alpha / rank) * B @ A,   B = 0 at the start,

on the projection weights of every block (or the last N). The adapters of one kind of weight (say
every adapted block's attention in_proj_weight) form one LoRAGroup: their factors are stacked over
the blocks, so one batched matmul forms all of that kind's deltas, and the optimizer, the gradient
clipping and the weight average handle a few large tensors instead of one pair per block. The
resampled position embeddings get a full delta of their own (PositionDelta). Every delta is
explicit, so the regulariser toward pretrained CLIP is exactly ||merged - pretrained||^2 and merging
is torch's own `remove_parametrizations(leave_parametrized=True)`.

Inside `deltas_once(adapters)` (one training micro-batch: its forward pass, penalty and backward)
each group forms its deltas once, the forward pass and the penalty share them, and each adapted
weight is formed once however often the model reads it; outside, every weight forms its own delta.
No step copies an index from the host: q/k/v row blocks are placed with a device index buffer.
"""
import contextlib
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
GROUPS = "lora_groups"          # the tower's submodule that holds the LoRAGroups while adapted


def _full_precision(device: torch.device):
    """Deltas are formed in the weights' own precision, not autocast's: the merged weight is exact,
    and autocast casts it for the matmul that uses it."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LoRAGroup(nn.Module):
    """The low-rank deltas of one kind of weight in `count` blocks: delta[b] = (alpha / rank) *
    B[b] @ A[b] in the row blocks `row_blocks` of the weight (q, k, v thirds of in_proj_weight; None:
    the whole matrix). lora_A: (count * n, rank, in), lora_B: (count * n, rows, rank), n row blocks
    per weight, blocks in order."""

    def __init__(self, weights: list[torch.Tensor], rank: int, alpha: float, row_blocks: list | None,
                 generator: torch.Generator | None = None):
        super().__init__()
        out_features, in_features = weights[0].shape
        self.count = len(weights)
        self.per_weight = len(row_blocks) if row_blocks else 1
        self.block_rows = out_features // 3 if row_blocks else out_features
        self.shape = (out_features, in_features)
        self.scale = alpha / rank
        like = dict(device=weights[0].device, dtype=weights[0].dtype)
        # drawn on the CPU (from the stage's generator): the same start on any device. Each (rank, in)
        # matrix as nn.Linear's default init (kaiming uniform, a=sqrt(5), fan_in = in)
        a = torch.empty(self.count * self.per_weight * rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.view(-1, rank, in_features).to(**like))
        self.lora_B = nn.Parameter(torch.zeros(self.count * self.per_weight, self.block_rows, rank, **like))
        partial = row_blocks is not None and len(row_blocks) < 3
        # where the row blocks go among q, k, v when not all three: an index on the weights' device
        self.register_buffer("rows", torch.tensor(row_blocks, device=like["device"]) if partial else None,
                             persistent=False)
        self._shared = None

    def _pack(self, parts: torch.Tensor, count: int) -> torch.Tensor:
        """(count * n, rows, in) products -> (count, out, in) deltas."""
        if self.rows is None:
            return parts.view(count, *self.shape)
        parts = parts.view(count, self.per_weight, self.block_rows, -1)
        full = parts.new_zeros(count, 3, self.block_rows, parts.shape[-1])
        return full.index_copy(1, self.rows, parts).view(count, *self.shape)

    def deltas(self) -> torch.Tensor:
        """(count, out, in): every block's delta (shared inside deltas_once)."""
        if self._shared is not None and "all" in self._shared:
            return self._shared["all"]
        with _full_precision(self.lora_A.device):
            stacked = self._pack(torch.bmm(self.lora_B, self.lora_A) * self.scale, self.count)
        if self._shared is not None:
            self._shared["all"], self._shared["each"] = stacked, stacked.unbind(0)
        return stacked

    def delta(self, index: int) -> torch.Tensor:
        """Block `index`'s delta: a view of the shared stack inside deltas_once, else its own."""
        if self._shared is not None:
            self.deltas()
            return self._shared["each"][index]
        rows = slice(index * self.per_weight, (index + 1) * self.per_weight)
        with _full_precision(self.lora_A.device):
            return self._pack(torch.bmm(self.lora_B[rows], self.lora_A[rows]) * self.scale, 1)[0]

    def squared_norm(self) -> torch.Tensor:
        return self.deltas().pow(2).sum()


class BlockDelta(nn.Module):
    """The parametrization of one block's weight: weight + its group's delta for that block. The
    group is referenced, not owned: its parameters belong to the tower once (GROUPS)."""

    def __init__(self, group: LoRAGroup, index: int):
        super().__init__()
        self.group = (group,)
        self.index = index

    def forward(self, weight):
        return weight + self.group[0].delta(self.index)


class PositionDelta(nn.Module):
    """Parametrization adding a full trainable delta (zero at the start) to the position embeddings:
    after resampling to a new input size they need to move, and the pull keeps them near the
    resampled pretrained ones."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros_like(weight))

    def squared_norm(self) -> torch.Tensor:
        return self.offset.pow(2).sum()

    def forward(self, weight):
        return weight + self.offset


def add_lora(visual: nn.Module, rank: int, alpha: float, last_blocks, targets,
             train_pos_embed: bool = False, generator: torch.Generator | None = None) -> list[nn.Module]:
    """Freeze the tower, register LoRA on `targets` of its last `last_blocks` blocks (`all`: every
    block) and, with `train_pos_embed`, a PositionDelta on the position embeddings. The A factors
    are drawn from `generator` (None: torch's default one). Returns the adapters: one LoRAGroup per
    adapted kind of weight (+ the PositionDelta)."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {list(TARGETS)}")
    visual.requires_grad_(False)
    blocks = visual.transformer.resblocks
    grouped = {}                            # (module path, weight name) -> q/k/v row blocks
    for t in targets:
        path, name, row = TARGETS[t]
        grouped.setdefault((path, name), []).append(row)
    first = 0 if last_blocks == "all" else max(0, len(blocks) - int(last_blocks))
    adapted = list(blocks)[first:]
    groups = nn.ModuleDict()
    for (path, name), rows in grouped.items():
        modules = [block.get_submodule(path) for block in adapted]
        rows = None if rows == [None] else sorted(rows)
        group = LoRAGroup([getattr(m, name) for m in modules], rank, alpha, rows, generator)
        for index, module in enumerate(modules):
            parametrize.register_parametrization(module, name, BlockDelta(group, index))
        groups[f"{path}.{name}".replace(".", "_")] = group
    setattr(visual, GROUPS, groups)
    adapters = list(groups.values())
    if train_pos_embed:
        adapter = PositionDelta(visual.positional_embedding)
        parametrize.register_parametrization(visual, "positional_embedding", adapter)
        adapters.append(adapter)
    return adapters


@contextlib.contextmanager
def deltas_once(adapters):
    """For one autograd graph (a training micro-batch's forward, penalty and backward): each group
    forms its deltas once, and every adapted weight is formed once (torch's parametrize.cached).
    Leave it before the parameters change (the optimizer step): its tensors belong to this graph."""
    groups = [a for a in adapters if isinstance(a, LoRAGroup)]
    for g in groups:
        g._shared = {}
    try:
        with parametrize.cached():
            yield
    finally:
        for g in groups:
            g._shared = None


def delta_penalty(adapters) -> torch.Tensor:
    """Sum of squared Frobenius norms of the deltas: ||merged - pretrained||^2, zero at init."""
    return torch.stack([a.squared_norm() for a in adapters]).sum()


def merge_lora(model: nn.Module) -> None:
    """Fold every delta into its weight; the model becomes a plain open_clip module again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for module in list(model.modules()):
        if GROUPS in module._modules:
            delattr(module, GROUPS)
