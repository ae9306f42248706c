import torch

from app.lora import add_lora, delta_penalty, merge_lora
from tests.fixtures import tiny_visual


def _adapted(targets=("q", "k", "v", "out", "fc", "proj")):
    visual = tiny_visual(seed=1).float().eval()
    adapters = add_lora(visual, rank=4, alpha=8, last_blocks=2, targets=list(targets))
    return visual, adapters


def test_lora_is_identity_at_init_and_penalty_is_zero():
    reference = tiny_visual(seed=1).eval()
    visual, adapters = _adapted()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(visual(x), reference(x))
    assert delta_penalty(adapters).item() == 0.0
    assert all(p.requires_grad for a in adapters for p in a.parameters())
    assert not any(p.requires_grad for n, p in visual.named_parameters() if "lora_" not in n)


def test_penalty_is_squared_distance_to_pretrained_and_grows_with_delta():
    reference = tiny_visual(seed=1)
    visual, adapters = _adapted()
    for a in adapters:
        torch.nn.init.normal_(a.lora_B, std=0.02)
    merged_state = {}
    p1 = delta_penalty(adapters).item()
    assert p1 > 0
    for a in adapters:
        a.lora_B.data *= 2
    assert abs(delta_penalty(adapters).item() - 4 * p1) < 1e-4 * p1
    # ||merged - pretrained||^2 computed from the weights themselves
    merge_lora(visual)
    merged_state = visual.state_dict()
    direct = sum((merged_state[k] - v).pow(2).sum() for k, v in reference.state_dict().items())
    assert abs(direct.item() - 4 * p1) < 1e-3 * p1


def test_merged_weights_give_the_adapter_outputs():
    visual, adapters = _adapted(("q", "v", "out", "fc"))
    for a in adapters:
        torch.nn.init.normal_(a.lora_B, std=0.05)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        adapted = visual(x)
        merge_lora(visual)
        merged = visual(x)
    assert not any("lora_" in k for k in visual.state_dict())
    assert (adapted - merged).abs().max().item() <= 1e-4


def test_only_selected_qkv_rows_change():
    visual, adapters = _adapted(("v",))
    for a in adapters:
        torch.nn.init.normal_(a.lora_B, std=0.05)
    attn = visual.transformer.resblocks[-1].attn
    w0 = attn.parametrizations.in_proj_weight.original
    d = attn.in_proj_weight - w0
    third = w0.shape[0] // 3
    assert d[: 2 * third].abs().max() == 0 and d[2 * third:].abs().max() > 0


def test_training_mode_matches_merged_model_and_only_adapters_learn():
    """Training mode (MultiheadAttention's slow path) gives the merged model's outputs, and only the
    adapters get gradients: the pretrained weights stay frozen."""
    visual, adapters = _adapted(("q", "v", "out", "fc", "proj"))
    for a in adapters:
        torch.nn.init.normal_(a.lora_B, std=0.05)
    visual.train()
    x = torch.randn(4, 3, 32, 32)
    y = visual(x)
    y.square().sum().backward()
    # every adapted block's A gets a gradient (B is random here)
    assert all((a.lora_A.grad.view(a.count, -1).abs().sum(1) > 0).all() for a in adapters)
    assert all(p.grad is None for n, p in visual.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        merge_lora(visual)
        assert (visual(x) - y).abs().max().item() <= 1e-4


def test_adapters_follow_the_towers_device_and_dtype():
    # The tower is on the accelerator (here: PyTorch's `meta` device stands in for CUDA) when
    # fine-tuning adds the adapters; a CPU adapter on a CUDA weight would stop the run.
    visual = tiny_visual(seed=1).to(device="meta", dtype=torch.float16)
    adapters = add_lora(visual, rank=4, alpha=8, last_blocks=2, targets=["q", "v", "fc"])
    for p in (p for a in adapters for p in a.parameters()):
        assert p.device.type == "meta" and p.dtype == torch.float16
    y = visual(torch.empty(2, 3, 32, 32, device="meta", dtype=torch.float16))
    assert y.device.type == "meta" and y.shape == (2, 32)


def test_position_delta_is_trained_pulled_and_merged():
    from app.lora import PositionDelta
    visual = tiny_visual(seed=1)
    base = visual.positional_embedding.detach().clone()
    adapters = add_lora(visual, rank=4, alpha=8, last_blocks="all", targets=["q"], train_pos_embed=True)
    assert len(adapters) == 1 + 1                           # q of both blocks (one group) + the position embeddings
    assert adapters[0].count == 2
    pos = [a for a in adapters if isinstance(a, PositionDelta)][0]
    assert pos.offset.requires_grad and torch.equal(visual.positional_embedding, base)
    with torch.no_grad():
        pos.offset.normal_(std=0.1)
    assert abs(delta_penalty([pos]).item() - pos.offset.pow(2).sum().item()) < 1e-6
    offset = pos.offset.detach().clone()
    merge_lora(visual)
    assert torch.allclose(visual.state_dict()["positional_embedding"], base + offset)


def test_weight_average_is_this_runs_ema_and_becomes_the_model():
    from app.finetune import WeightAverage
    p = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage([p], decay=0.5)
    expected = torch.zeros(3)
    for t in range(1, 6):
        with torch.no_grad():
            p.fill_(float(t))
        avg.update()
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * p.detach()
    assert torch.allclose(avg.average[0], expected)
    state = avg.state_dict()
    again = WeightAverage([p], decay=0.5)
    again.load_state_dict(state)
    assert again.steps == 5 and torch.allclose(again.average[0], expected)
    avg.copy_to_model()
    assert torch.allclose(p.detach(), expected)


def _loss(visual, adapters, x):
    return visual(x).square().sum() + delta_penalty(adapters)


def test_deltas_once_gives_the_same_loss_and_gradients_with_one_delta_per_group():
    """Inside deltas_once a group forms all its blocks' deltas with one matmul, shared by the
    forward pass and the penalty; the loss and the gradients are those of the per-weight deltas."""
    from torch.profiler import profile

    from app.lora import deltas_once
    visual, adapters = _adapted(("q", "v", "out", "fc", "proj"))
    for a in adapters:
        torch.nn.init.normal_(a.lora_B, std=0.05)
    visual.train()
    x = torch.randn(4, 3, 32, 32)
    plain = _loss(visual, adapters, x)
    plain.backward()
    expected = [p.grad.clone() for a in adapters for p in a.parameters()]
    for a in adapters:
        a.zero_grad(set_to_none=True)
    with profile() as prof, deltas_once(adapters):
        shared = _loss(visual, adapters, x)
        shared.backward()
    assert torch.allclose(shared, plain, rtol=1e-6)
    got = [p.grad for a in adapters for p in a.parameters()]
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item()) for g, e in zip(got, expected))
    bmm = sum(e.name == "aten::bmm" for e in prof.events() if e.cpu_parent is None)
    assert bmm == len(adapters)                 # forward pass and penalty: one delta matmul per group
    # no index copied from the host per call (a Python list index is lifted to a tensor and index_put)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::lift_fresh", "aten::index_put_"}
    # outside, the deltas are dropped: a later step sees the parameters as they are then
    with torch.no_grad():
        adapters[0].lora_B.mul_(2)
    assert not torch.equal(_loss(visual, adapters, x), plain)


def test_lora_init_is_a_function_of_its_generator():
    from app.seeds import stage_generator
    inits = []
    for noise_before in (0, 5):
        torch.randn(noise_before)              # draws from the global generator must not matter
        visual = tiny_visual(seed=1)
        adapters = add_lora(visual, rank=4, alpha=8, last_blocks=2, targets=["q", "fc"],
                            generator=stage_generator(3, "lora"))
        inits.append([a.lora_A.detach().clone() for a in adapters])
    assert all(torch.equal(a, b) for a, b in zip(*inits))
    other = add_lora(tiny_visual(seed=1), rank=4, alpha=8, last_blocks=2, targets=["q", "fc"],
                     generator=stage_generator(4, "lora"))
    assert not torch.equal(other[0].lora_A, inits[0][0])
