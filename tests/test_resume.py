"""A run interrupted mid-epoch and resumed ends with the same weights as an uninterrupted one; the
resumed run reuses the scan and noise stage, and refuses a train folder that changed."""
import os
import re
import shutil
import subprocess
import sys

import torch

from tests.conftest import FAST, ROOT, app_env


def _train(train_dir, backbone, out, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "app", "train", str(train_dir), str(out),
                           "--weights", str(backbone), "--allow-nonstandard-backbone",
                           *FAST, "--set", "finetune.epochs=3", *extra],
                          env=env or app_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_resume_after_interrupted_epoch_gives_the_same_weights(tiny, tmp_path):
    train, backbone = tiny / "train", tiny / "tiny_backbone.pt"
    full = _train(train, backbone, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    # 37 images / batch 8 = 4 full steps per epoch (drop_last): crash in the middle of epoch 2.
    crashed = _train(train, backbone, tmp_path / "resumed", env=app_env(APP_FAIL_AFTER_STEPS="7"))
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert not (tmp_path / "resumed" / "model.pt").exists()
    noise_before = os.stat(tmp_path / "resumed" / "work" / "noise.csv").st_mtime_ns
    resumed = _train(train, backbone, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    # the scan (hashing) and the noise stage were not run again
    assert "reusing the scan and the noise stage" in resumed.stderr
    assert "scan: hashing" not in resumed.stderr
    assert os.stat(tmp_path / "resumed" / "work" / "noise.csv").st_mtime_ns == noise_before
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for key in ("head_weight", "head_bias"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    for k, v in a["visual_state"].items():
        assert torch.allclose(v, b["visual_state"][k], atol=1e-6), k
    assert not torch.equal(a["head_weight"], torch.zeros_like(a["head_weight"]))


def test_resume_refuses_a_train_folder_that_changed(tiny, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(tiny / "train", train)
    out = tmp_path / "out"
    crashed = _train(train, tiny / "tiny_backbone.pt", out, "--set", "noise.enabled=false",
                     env=app_env(APP_FAIL_AFTER_STEPS="5"))
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    shutil.copy(train / "0001" / "img00.jpg", train / "0002" / "new.jpg")
    again = _train(train, tiny / "tiny_backbone.pt", out, "--set", "noise.enabled=false", "--resume")
    assert again.returncode == 1
    assert "the train folder changed since the interrupted run (1 files added" in again.stderr
    assert "0002/new.jpg" in again.stderr and not (out / "model.pt").exists()
    # without OUT_DIR/work the folder is scanned afresh; the checkpoint's data digest still refuses
    shutil.rmtree(out / "work")
    again = _train(train, tiny / "tiny_backbone.pt", out, "--set", "noise.enabled=false", "--resume")
    assert again.returncode == 1 and "was trained on other data" in again.stderr
    counts = [int(n) for n in re.findall(r"'images': (\d+)", again.stderr)]
    assert len(counts) == 2 and counts[1] == counts[0] + 1, again.stderr[-500:]     # the checkpoint's, this run's
