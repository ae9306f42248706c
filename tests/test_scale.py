"""bench/scale.py (issue 11's scale study) at a tiny size: the generator's long tail and web oddities, the
growth-exponent fit, and one end-to-end run_train.sh + run_infer.sh on ~300 images with the report."""
import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from app.config import load_config
from bench import scale
from tests.conftest import ROOT

TINY = scale.Spec(classes=6, train=300, test=30, lo=5, hi=100, dup_frac=0.05, truncated_frac=0.02,
                  garbage_frac=0.02, empty_frac=0.01, test_garbage_frac=0.1)


def test_class_counts_long_tail():
    spec = scale.Spec()
    counts = scale.class_counts(spec)
    assert len(counts) == 1500 and counts.sum() == spec.train >= 150_000
    assert counts.min() == spec.lo and spec.hi - 2 <= counts.max() <= spec.hi + 2
    assert np.median(counts) < counts.mean()          # a tail: most classes below the mean
    assert (scale.class_counts(spec) == counts).all()  # seeded


def test_generator_files_and_oddities(tmp_path):
    info = scale.generate(tmp_path, TINY, processes=1)
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == info["train_files"] == 300 and len(list((tmp_path / "test").iterdir())) == 30
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"{c:04d}" for c in range(6)]
    kinds = info["train_kinds"]
    assert kinds["plain"] > 200 and kinds.get("duplicate", 0) > 0 and kinds.get("garbage", 0) > 0
    digests = {}
    for p in files:
        digests.setdefault(hashlib.sha1(p.read_bytes()).hexdigest(), []).append(p)
    copies = [ps for ps in digests.values() if len(ps) > 1 and ps[0].stat().st_size > 0]
    assert copies and all(len({p.parent.name for p in ps}) > 1 for ps in copies)  # across classes
    unreadable = 0
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception:  # noqa: BLE001
            unreadable += 1
    assert unreadable >= kinds.get("garbage", 0) + kinds.get("empty", 0)
    mtime = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert scale.generate(tmp_path, TINY, processes=1) == info            # reused, not rewritten
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == mtime
    train, test, n, n_test = scale.subset(tmp_path, TINY, 100)
    per_class = [len(list(d.iterdir())) for d in sorted(train.iterdir())]
    assert len(per_class) == 6 and min(per_class) >= 1 and abs(n - 100) <= 6 and n == sum(per_class)
    assert len(list(test.iterdir())) == n_test == 10


def test_fit_exponent_and_flags():
    n = np.array([15_000, 50_000, 150_000])
    a, b = scale.fit_exponent(n, 3e-4 * n ** 1.5)
    assert b == pytest.approx(1.5, abs=1e-9) and a == pytest.approx(3e-4, rel=1e-6)
    run = lambda k, t: {"train_files": k, "images_used": k, "test_files": k // 10,  # noqa: E731
                        "stage_seconds": {"scan": t, "noise": 1e-7 * k ** 1.6}, "train_total_seconds": 2 * t,
                        "stage_cpu_seconds": {"scan": t, "noise": 1e-7 * k ** 1.6}, "train_total_cpu_seconds": 2 * t,
                        "infer_seconds": t / 10, "infer_cpu_seconds": t / 10, "train_peak_rss_gib": 1.0}
    table = scale.growth_table([run(k, 1e-3 * k) for k in n])
    assert table["scan"]["b"] == pytest.approx(1.0, abs=1e-6) and not table["scan"]["faster_than_nlogn"]
    assert table["noise"]["faster_than_nlogn"] and table["noise"]["cpu_b"] == pytest.approx(1.6, abs=1e-6)
    assert not table["train peak RSS (GiB)"]["faster_than_nlogn"]


def test_end_to_end_tiny(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # as the other pipeline tests: no thread contention
    scale.generate(tmp_path / "data", TINY, processes=1)
    out = tmp_path / "results"
    fast = ["--num-workers", "0", "--set", "warmup.epochs=3", "--set", "features.batch_size=64",
            "--set", "finetune.batch_size=16"]
    if "input" in load_config():                     # the backbone's own 32 px, not a resampled 448
        fast += ["--set", "input.image_size=native"]
    runs = scale.run_sizes(tmp_path / "data", TINY, [0], 1, ROOT, out, fast)   # one real run: ~15 s
    assert [r["train_files"] for r in runs] == [300]
    big = runs[-1]
    assert big["images_used"] + big["images_skipped"] == 300 and big["classes"] == 6
    assert {"scan", "features", "noise", "warmup", "finetune"} <= set(big["stage_seconds"])
    assert big["train_peak_rss_gib"] > 0 and big["infer_unreadable"] >= 1 and big["test_files"] == 30
    assert big["warmup_epochs"] == 3 and big["test_top1_sanity"] >= 0
    assert big["stage_cpu_seconds"].keys() == big["stage_seconds"].keys()
    assert 0 < big["train_total_cpu_seconds"] <= big["train_process"]["cpu_seconds"] + 1
    # the report needs two sizes: a second record, made up at half the size, stands in for a second run
    half = json.loads(json.dumps(big))
    half.update(train_files=150, images_used=big["images_used"] // 2, test_files=15)
    for key in ("stage_seconds", "stage_cpu_seconds"):
        half[key] = {k: v / 2 for k, v in big[key].items()}
    runs_json = json.loads((out / "runs.json").read_text())
    (out / "runs.json").write_text(json.dumps({**runs_json, "runs": [half, big]}))
    result = scale.report(out)
    assert set(scale.STAGES) <= set(result["growth"]) and result["memory_ok"]
    assert json.loads((out / "scale.json").read_text())["runs"][-1]["train_files"] == 300
    assert (out / "scale.png").stat().st_size > 0 and "b (CPU)" in (out / "scale.md").read_text()
    assert (out / "reports" / "n300_train_report.json").exists()
    assert time.perf_counter() - t0 < 60            # ~15 s on 2 idle cores; slack for a busy machine


def test_projection_from_synthetic_inputs():
    from bench import project_gpu_time as proj
    ms = {"eval_224": 4.0, "train_224": 4.0, "eval_448": 8.0, "train_448": 8.0}
    decode = {"variants": {"web-500": {"mean_bytes": 40_000, **{k: {"cpu_ms_per_image": v} for k, v in ms.items()}}},
              "cpu": "test", "sha1_mb_per_s_per_core": 1000.0}
    row = {"n": [15_000, 50_000, 150_000], "cpu_a": 1e-3, "cpu_b": 0.8, "cpu_values": [10.0, 25.0, 60.0],
           "cpu_local_slopes": [0.76, 0.8]}
    scale_json = {"growth": {k: dict(row) for k in ("scan", "noise", "warmup")}, "runs": [{"warmup_epochs": 60}]}
    p = proj.project(decode, scale_json, load_config())
    rows = p["rows"]
    assert {r["gpus"] for r in rows} == {1, 8} and {r["px"] for r in rows} >= {224, 448}
    by = {(r["images"], r["recipe"], r["gpus"]): r["total_seconds"] for r in rows}
    for (n, recipe, gpus), t in by.items():
        if gpus == 1:
            assert by[(n, recipe, 8)] < t                      # eight GPUs are faster
            assert by[(297_282, recipe, 1)] > by[(148_695, recipe, 1)]
    assert all(r["total_minutes_if_decode_1.5x"] >= r["total_minutes"] for r in rows)
    # sub-linear fits are not trusted beyond the data: linear from the largest run
    assert proj.cpu_stage(scale_json["growth"], "noise", 300_000) == pytest.approx(120.0)
    assert "PROJECTION" in proj.markdown(p)
    # the host floor: 2,000 operators at 8 us = 16 ms a step of 32 images, whatever the GPU count
    ops = {"after": {"operators": 2000, "images_per_device": 4, "code": "test", "cpu": "test", "torch": "x"}}
    floor = proj.project(decode, scale_json, load_config(), step_ops=ops)["rows"]
    eight = [r for r in floor if r["gpus"] == 8 and r["px"] == 448][0]
    assert eight["bound_by_stage"]["finetune"] == "host" and eight["finetune_step_ms"]["host"] == pytest.approx(16.0)
    assert eight["rates_img_s"]["model"]["finetune"] == pytest.approx(32 / 0.016, rel=1e-3)
    assert eight["seconds"]["finetune"] > [r for r in rows if r["gpus"] == 8 and r["px"] == 448][0]["seconds"]["finetune"] * 0.99
