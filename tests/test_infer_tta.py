"""Test-time options of run_infer.sh: `--tta flip|multiscale` average one model's logits over views of
each image; `--balance-test-prior` fits a class bias on the test logits (a rule risk, warned). Off by
default, the single-forward path is unchanged; every test image keeps exactly one row."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import app.infer
from app.__main__ import main
from app.backbone import Backbone, resample_visual
from app.config import load_config
from app.data import ImageDataset, eval_transform, normalize
from app.infer import fit_uniform_prior_bias, predict_logits, tta_sizes
from app.model import Classifier, load_model_file, log_class_prior, save_model_file
from app.runtime import make_accelerator
from tests.fixtures import CLASSES, TINY, tiny_visual


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny model (32 px, patch 8) whose head is random, not zero: its logits differ between an
    image and its mirror, and between input sizes."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    visual = tiny_visual()
    backbone = Backbone(visual=visual, config=dict(TINY, act="gelu"), arch="tiny test ViT", sha256="0" * 64,
                        source="tests")
    model = Classifier(visual, len(CLASSES), log_class_prior(torch.tensor([5.0, 3.0, 1.0])))
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=3.0)
    save_model_file(path, model, backbone, CLASSES, {"test": True}, "test")
    return path


def _cfg(**infer):
    cfg = load_config(None, {"num_workers": 0})
    cfg["infer"].update(infer)
    return cfg


def _logits(model_file, paths, **infer):
    model, meta = load_model_file(model_file)
    cfg = _cfg(**infer)
    logits, ok, sizes = predict_logits(model, meta, paths, cfg, make_accelerator(cfg))
    assert ok.all()
    return logits, sizes


def _submission(out) -> dict:
    rows = (out / "submission.csv").read_text().splitlines()
    return dict(row.split(", ") for row in rows)


def _readable(tiny) -> list:
    return sorted(p for p in (tiny / "test").iterdir() if p.name != "broken.jpg")


def test_default_is_one_plain_forward_pass_per_image(tiny, model_file, tmp_path):
    out = tmp_path / "out"
    assert main(["infer", str(tiny / "test"), str(out), "--model", str(model_file), "--num-workers", "0"]) == 0
    model, meta = load_model_file(model_file)
    paths = _readable(tiny)
    dataset = ImageDataset(paths, eval_transform(meta["preprocess"]), 32)
    x = normalize(torch.stack([dataset[i][0] for i in range(len(paths))]), dataset.stats)
    with torch.no_grad():
        expected = model.balanced_logits(x, 1.0).argmax(1)
    rows = _submission(out)
    assert len(rows) == 10 and [rows[p.name] for p in paths] == [CLASSES[i] for i in expected]
    report = json.loads((out / "infer_report.json").read_text())
    assert (report["tta"], report["tta_sizes"], report["tta_views"]) == ("none", [32], 1)
    assert report["balance_test_prior"] is False and report["test_prior_bias"] is None


def test_flip_averages_the_logits_of_the_image_and_its_mirror(tiny, model_file, tmp_path):
    mirrors = []
    for p in _readable(tiny):       # the mirror images as files: an independent route to their logits
        mirrors.append(tmp_path / "mirror" / f"{p.name}.png")
        mirrors[-1].parent.mkdir(exist_ok=True)
        Image.open(p).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrors[-1])
    plain, _ = _logits(model_file, _readable(tiny))
    mirrored, _ = _logits(model_file, mirrors)
    flip, sizes = _logits(model_file, _readable(tiny), tta="flip")
    assert sizes == [32] and np.abs(plain - mirrored).max() > 0.05        # the mirror changes the logits
    np.testing.assert_allclose(flip, 0.5 * (plain + mirrored), atol=1e-5)

    out = tmp_path / "out"
    assert main(["infer", str(tiny / "test"), str(out), "--model", str(model_file), "--num-workers", "0",
                 "--tta", "flip"]) == 0
    rows = _submission(out)
    assert len(rows) == 10 and [rows[p.name] for p in _readable(tiny)] == [CLASSES[i] for i in flip.argmax(1)]
    report = json.loads((out / "infer_report.json").read_text())
    assert (report["tta"], report["tta_sizes"], report["tta_views"]) == ("flip", [32], 2)


def test_multiscale_runs_the_tower_at_each_size(tiny, model_file, tmp_path, monkeypatch):
    seen = []

    def spy(visual, config, size):      # the real resampling, recording the input size of every forward
        tower, new_config = resample_visual(visual, config, size)
        tower.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
        return tower, new_config

    monkeypatch.setattr(app.infer, "resample_visual", spy)
    out = tmp_path / "out"
    assert main(["infer", str(tiny / "test"), str(out), "--model", str(model_file), "--num-workers", "0",
                 "--tta", "multiscale", "--set", "infer.tta_scales=[0.5, 1.0, 1.5]"]) == 0
    assert sorted(set(seen)) == [(16, 16), (32, 32), (48, 48)]
    assert len(_submission(out)) == 10
    report = json.loads((out / "infer_report.json").read_text())
    assert (report["tta"], report["tta_sizes"], report["tta_views"]) == ("multiscale", [16, 32, 48], 6)
    assert report["trained_image_size"] == 32 and report["rows_written"] == report["test_images"] == 10

    flip, _ = _logits(model_file, _readable(tiny), tta="flip")
    multiscale, _ = _logits(model_file, _readable(tiny), tta="multiscale", tta_scales=[0.5, 1.0, 1.5])
    assert np.abs(multiscale - flip).max() > 0.01        # the other sizes count


def test_multiscale_sizes_are_whole_patches_of_the_trained_size():
    def sizes(image_size, patch_size, tta="multiscale", scales=(0.875, 1.0, 1.125)):
        meta = {"visual_config": {"image_size": image_size, "patch_size": patch_size}}
        return tta_sizes({"tta": tta, "tta_scales": list(scales)}, meta)
    assert sizes(448, 32) == [384, 448, 512]
    assert sizes(224, 32) == [192, 224, 256]
    assert sizes(32, 8) == [32, 40]                      # 3.5 patches -> 4 (halves up): seen once
    assert sizes(448, 32, scales=[0.01]) == [32]         # at least one patch
    assert sizes(448, 32, tta="flip") == sizes(448, 32, tta="none") == [448]


def test_test_prior_bias_makes_skewed_predictions_uniform():
    rng = np.random.default_rng(0)
    n, classes = 3000, 10
    truth = np.arange(n) % classes
    skew = np.linspace(3.0, 0.0, classes)               # a model that favours the first classes
    logits = 3.0 * np.eye(classes)[truth] + rng.normal(0, 1.0, (n, classes)) + skew
    before = np.bincount(logits.argmax(1), minlength=classes)
    assert before.max() > 3 * before.min()
    bias, iterations = fit_uniform_prior_bias(logits.astype(np.float32))
    after = np.bincount((logits + bias).argmax(1), minlength=classes)
    assert np.abs(after - n / classes).max() < 0.1 * n / classes, after
    assert iterations < 1000 and abs(bias.sum()) < 1e-9
    assert np.corrcoef(bias, -skew)[0, 1] > 0.99         # it undoes the skew
    soft = torch.softmax(torch.as_tensor(logits + bias), 1).mean(0).numpy()
    np.testing.assert_allclose(soft, 1 / classes, rtol=1e-4)
    np.testing.assert_array_equal(bias, fit_uniform_prior_bias(logits.astype(np.float32))[0])   # deterministic


def test_balance_test_prior_warns_and_is_reported(tiny, model_file, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="app"):
        assert main(["infer", str(tiny / "test"), str(out), "--model", str(model_file), "--num-workers", "0",
                     "--balance-test-prior"]) == 0
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "rule 3" in r.getMessage()]
    assert warning and "test images" in warning[0] and "rule risk" in warning[0] and "off by default" in warning[0]
    report = json.loads((out / "infer_report.json").read_text())
    assert report["balance_test_prior"] is True and report["test_prior_bias"]["max_minus_min"] > 0
    assert report["test_prior_bias"]["fitted_on_images"] == 9            # broken.jpg's blank input left out
    assert len(_submission(out)) == 10


def test_unknown_tta_mode_stops_before_the_model_is_read(tiny, tmp_path, capsys):
    model = tmp_path / "model.pt"
    model.write_bytes(b"not a model: reading it would fail")
    code = main(["infer", str(tiny / "test"), str(tmp_path / "out"), "--model", str(model),
                 "--set", "infer.tta=both"])
    assert code == 1 and """infer.tta="both": expected 'none', 'flip' or 'multiscale'""" in capsys.readouterr().err
