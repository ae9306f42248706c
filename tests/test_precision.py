"""Mixed precision: bf16 only on GPUs that run it natively, fp16 with accelerate's grad scaler
elsewhere (CUDA facts faked on the CPU); logits in fp32 whatever the autocast."""
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from app import runtime
from app.data import PixelTransform
from app.finetune import train_step
from app.model import Classifier, log_class_prior
from tests.fixtures import tiny_visual


def test_auto_precision_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # V100 / T4: bf16 only emulated; torch's default (including_emulation=True) says "supported"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.resolve_precision("auto") == "fp16"
    # A100 / H100: native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.resolve_precision("auto") == "bf16"
    assert runtime.resolve_precision("no") == "no" and runtime.resolve_precision("fp16") == "fp16"


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    stats = PixelTransform([], [0.5] * 3, [0.5] * 3).stats.numpy()
    return images, torch.arange(n), torch.ones(n, dtype=torch.bool), stats


def _clip_norms_under_scale(monkeypatch, init_scale: float):
    """One fp16 train_step through an accelerator holding a grad scaler (on the CPU: what accelerate
    builds for mixed_precision='fp16' on a GPU), recording each scaler call and the gradient norm
    that clipping sees."""
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=init_scale), True
    calls, norms = [], []
    for name in ("scale", "unscale_", "step"):
        original = getattr(acc.scaler, name)
        monkeypatch.setattr(acc.scaler, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, *a, **k):
        parameters = list(parameters)
        grads = [p.grad.norm() for p in parameters if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return clip(parameters, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    torch.manual_seed(0)
    model = Classifier(tiny_visual(), 3, log_class_prior(torch.tensor([3.0, 2.0, 1.0])))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    fcfg = {"loss": "ce", "label_smoothing": 0.1, "reg_lambda": 0.0, "grad_clip": 1.0}
    targets, weights = torch.tensor([0, 1, 2, 0]), torch.ones(4)
    train_step(model, [], optimizer, [_batch(seed=1), _batch(seed=2)], targets, weights, fcfg, acc)
    return calls, norms, acc.scaler


def test_fp16_training_step_goes_through_the_grad_scaler(monkeypatch):
    """The loss is scaled in accelerator.backward (each micro-batch), unscaled before clipping (so the
    clip sees true gradients, whatever the scale) and the step is the scaler's (skipped on inf)."""
    calls, norms, _ = _clip_norms_under_scale(monkeypatch, 2.0 ** 12)
    assert calls == ["scale", "scale", "unscale_", "step"]
    AcceleratorState._reset_state(True)
    _, unscaled, _ = _clip_norms_under_scale(monkeypatch, 1.0)
    assert norms[0] == pytest.approx(unscaled[0], rel=1e-2)     # the same gradient norm at scale 4096 and 1
    AcceleratorState._reset_state(True)
    _, _, scaler = _clip_norms_under_scale(monkeypatch, 2.0 ** 40)     # overflows fp16: inf gradients
    assert scaler.get_scale() < 2.0 ** 40                       # step skipped, scale backed off


def _near_tie_model():
    """A tiny classifier whose logits for one image are ~8 (bf16 steps of 0.0625 there) and whose
    balanced logits put class 1 ahead of class 0 by 0.01."""
    torch.manual_seed(0)
    prior = log_class_prior(torch.tensor([30.0, 10.0, 5.0]))
    model = Classifier(tiny_visual(), 3, prior).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.balanced_logits(x, 1.0)[0].float()
    with torch.no_grad():
        bias = torch.full((3,), 8.0) - z
        bias[1] += 0.01
        model.head.bias += bias
    return model, x


def test_logits_are_fp32_under_bf16_autocast_and_near_ties_keep_their_order():
    model, x = _near_tie_model()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            balanced = model.balanced_logits(x, 1.0)
            feature = model.visual(x)             # the tower itself runs in bf16
        assert feature.dtype == torch.bfloat16
        assert logits.dtype == balanced.dtype == torch.float32
        expected = torch.nn.functional.normalize(feature.float(), dim=-1) @ model.head.weight.T + model.head.bias
        assert torch.allclose(logits, expected + model.log_prior, rtol=0, atol=1e-6)
        assert torch.allclose(balanced, expected, rtol=0, atol=1e-6)
    gap = balanced[0, 1] - balanced[0, 0]
    assert gap == pytest.approx(0.01, abs=1e-4) and balanced.argmax(1).item() == 1
    # rounded to bf16 (what a bf16 head returns) the two classes tie at 8.0 and the tie goes to class 0
    assert np.argmax(balanced.bfloat16().float().numpy()[0]) == 0
