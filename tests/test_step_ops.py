"""bench/step_ops.py: the operators of one optimisation step at 4 images a device (the 8-GPU case of
the global batch 32), under DDP, on ViT-B/32's 12 blocks and 12 heads (narrow: width 96, the same
operators as width 768). The per-block LoRA design (one parametrization with its own A/B, delta and
penalty per weight, a host index per q/k/v packing, AdamW and the weight average per tensor)
issued 4,562 operators on this step (bench/results/step_ops/before-narrow.json); the grouped design
must issue at most half of that."""
from bench.step_ops import count_step_ops

PER_BLOCK_DESIGN = 4562


def test_one_step_issues_at_most_half_the_operators_of_the_per_block_design():
    r = count_step_ops(arch="narrow", image_size=64, batch=4, ddp=True)
    assert r["images_per_device"] == 4 and r["ddp"]
    assert r["adapters"] == 4 + 1                  # in_proj, out_proj, c_fc, c_proj groups + position delta
    assert r["trained_tensors"] == 2 * 4 + 1 + 2    # A and B per group, the position delta, the head
    assert 0 < r["operators"] <= PER_BLOCK_DESIGN // 2, r["most_frequent"]
