"""A run interrupted mid-epoch and resumed ends with the same weights as an uninterrupted one; the
resumed run reuses the scan and noise stage, and refuses a train folder that changed. The commands
run in this process through the program's entry point (`python -m app` without the import)."""
import logging
import os
import re
import shutil

import pytest
import torch

from app.__main__ import main
from app.finetune import FAIL_ENV
from tests.conftest import FAST


def _train(train_dir, backbone, out, *extra) -> int:
    return main(["train", str(train_dir), str(out), "--weights", str(backbone), "--allow-nonstandard-backbone",
                 *FAST, "--set", "finetune.epochs=3", *extra])


def test_resume_after_interrupted_epoch_gives_the_same_weights(tiny, tmp_path, monkeypatch, capsys, caplog):
    train, backbone = tiny / "train", tiny / "tiny_backbone.pt"
    assert _train(train, backbone, tmp_path / "full") == 0
    # 37 images / batch 8 = 4 full steps per epoch (drop_last): crash in the middle of epoch 2.
    monkeypatch.setenv(FAIL_ENV, "7")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(train, backbone, tmp_path / "resumed")
    monkeypatch.delenv(FAIL_ENV)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    noise_before = os.stat(tmp_path / "resumed" / "work" / "noise.csv").st_mtime_ns
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="app"):
        assert _train(train, backbone, tmp_path / "resumed", "--resume") == 0
    said = caplog.text + capsys.readouterr().err          # the log and the progress bars
    assert "resumed from" in said
    # the scan (hashing) and the noise stage were not run again
    assert "reusing the scan and the noise stage" in said
    assert "scan: hashing" not in said
    assert os.stat(tmp_path / "resumed" / "work" / "noise.csv").st_mtime_ns == noise_before
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for key in ("head_weight", "head_bias"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    for k, v in a["visual_state"].items():
        assert torch.allclose(v, b["visual_state"][k], atol=1e-6), k
    assert not torch.equal(a["head_weight"], torch.zeros_like(a["head_weight"]))


def test_resume_refuses_a_train_folder_that_changed(tiny, tmp_path, monkeypatch, capsys):
    train = tmp_path / "train"
    shutil.copytree(tiny / "train", train)
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_ENV, "5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(train, tiny / "tiny_backbone.pt", out, "--set", "noise.enabled=false")
    monkeypatch.delenv(FAIL_ENV)
    shutil.copy(train / "0001" / "img00.jpg", train / "0002" / "new.jpg")
    capsys.readouterr()
    assert _train(train, tiny / "tiny_backbone.pt", out, "--set", "noise.enabled=false", "--resume") == 1
    err = capsys.readouterr().err
    assert "the train folder changed since the interrupted run (1 files added" in err
    assert "0002/new.jpg" in err and not (out / "model.pt").exists()
    # without OUT_DIR/work the folder is scanned afresh; the checkpoint's data digest still refuses
    shutil.rmtree(out / "work")
    assert _train(train, tiny / "tiny_backbone.pt", out, "--set", "noise.enabled=false", "--resume") == 1
    err = capsys.readouterr().err
    assert "was trained on other data" in err
    counts = [int(n) for n in re.findall(r"'images': (\d+)", err)]
    assert len(counts) == 2 and counts[1] == counts[0] + 1, err[-500:]     # the checkpoint's, this run's
