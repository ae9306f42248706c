"""A run interrupted mid-epoch and resumed ends with the same weights as an uninterrupted one."""
import subprocess
import sys

import torch

from tests.conftest import FAST, ROOT, app_env


def _train(tiny, out, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "app", "train", str(tiny / "train"), str(out),
                           "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone",
                           *FAST, "--set", "finetune.epochs=3", "--set", "noise.enabled=false", *extra],
                          env=env or app_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_resume_after_interrupted_epoch_gives_the_same_weights(tiny, tmp_path):
    full = _train(tiny, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    # 37 images / batch 8 = 4 full steps per epoch (drop_last): crash in the middle of epoch 2.
    crashed = _train(tiny, tmp_path / "resumed", env=app_env(APP_FAIL_AFTER_STEPS="7"))
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert not (tmp_path / "resumed" / "model.pt").exists()
    resumed = _train(tiny, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for key in ("head_weight", "head_bias"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    for k, v in a["visual_state"].items():
        assert torch.allclose(v, b["visual_state"][k], atol=1e-6), k
    assert not torch.equal(a["head_weight"], torch.zeros_like(a["head_weight"]))
