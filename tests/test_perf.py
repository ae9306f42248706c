"""`python -m app perf` on a tiny random ViT and a handful of tiny JPEGs; the 300k memory
measurement at a small synthetic size."""
import argparse
import json
import time

import numpy as np
import pytest
from PIL import Image

from app.studies import perf


def _jpegs(root, n=6):
    rng = np.random.default_rng(0)
    for k in range(n):
        d = root / f"{k % 2:04d}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, size=(40 + k, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{k}.jpg", "JPEG")
    return root


def test_perf_run_tiny(tmp_path):
    t0 = time.perf_counter()
    p = argparse.ArgumentParser()
    perf.add_arguments(p)
    out = tmp_path / "perf"
    args = p.parse_args(["--arch", "tiny", "--images", "24", "--batch-size", "8", "--train-steps", "2",
                         "--skip-memory", "--data", str(_jpegs(tmp_path / "data")), "--out", str(out)])
    result = perf.run(args)

    saved = json.loads((out / "perf.json").read_text())
    assert saved.keys() == {"machine", "rates", "forward_by_precision", "ratios", "peak_memory", "memory",
                            "seconds"}
    assert set(saved["forward_by_precision"]) == {"fp32", "bf16_autocast"}
    assert all(v > 0 for v in saved["forward_by_precision"].values())
    assert saved["memory"] is None
    for key in ("cpu", "cores", "torch", "device", "precision", "torch_threads", "num_workers",
                "batch_size", "images", "train_steps"):
        assert key in saved["machine"], key
    assert saved["machine"]["images"] == 24 and saved["machine"]["batch_size"] == 8
    rates = saved["rates"]
    assert set(rates) == {"a_features", "b_finetune_step", "c_infer"}
    for r in rates.values():
        assert set(r) == {"naive", "product", "model_only"} and all(v > 0 for v in r.values())
    a, b, c = rates["a_features"], rates["b_finetune_step"], rates["c_infer"]
    expected = {"a_vs_naive": a["product"] / a["naive"], "a_vs_model_only": a["product"] / a["model_only"],
                "b_vs_naive_full_ft": b["product"] / b["naive"], "c_vs_naive": c["product"] / c["naive"]}
    assert saved["ratios"] == pytest.approx(expected, rel=1e-9)
    assert saved["peak_memory"]["rss_self_gib"] > 0
    assert (out / "perf.png").stat().st_size > 0
    assert result["ratios"] == saved["ratios"]
    assert time.perf_counter() - t0 < 60


def test_memory_at_small_scale():
    t0 = time.perf_counter()
    m = perf.memory_at_scale(rows=5_000, classes=50, dim=64)
    assert m["rows"] == 5_000
    for phase in ("cache_write", "cache_read"):
        assert 0 < m[phase]["rss_after_imports_gib"] <= m[phase]["peak_rss_gib"]
    assert m["peak_gib"] == max(m["cache_write"]["peak_rss_gib"], m["cache_read"]["peak_rss_gib"])
    assert m["under_4_gib"] is True
    assert time.perf_counter() - t0 < 60


def test_data_path_study_tiny(tmp_path, monkeypatch):
    """`perf --data-path`: images/s into the training process, float32 against uint8 batches, under
    each /dev/shm figure; the uint8 path's prefetch decision counts uint8 bytes (at 64 MB shared by
    8 processes a 448-px float32 batch of 2 goes through a pipe, its uint8 form through /dev/shm)."""
    from app import runtime
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)          # one decoding worker
    t0 = time.perf_counter()
    p = argparse.ArgumentParser()
    perf.add_arguments(p)
    out = tmp_path / "dp"
    args = p.parse_args(["--data-path", "--images", "6", "--batch-size", "2", "--size", "448",
                         "--data", str(_jpegs(tmp_path / "data")), "--out", str(out)])
    result = perf.run(args)
    saved = json.loads((out / "data_path.json").read_text())
    assert saved["rows"] == result["rows"] and (out / "data_path.png").stat().st_size > 0
    assert saved["machine"]["cpu"] and saved["workers"] == 1 and saved["image_size"] == 448
    rows = {(r["shm"], r["mode"], r["path"]): r for r in saved["rows"]}
    assert set(rows) == {(s, m, p) for s in perf.SHM_SETTINGS for m in ("decode", "transfer")
                         for p in ("float32", "uint8")}
    assert all(r["images_per_s"] > 0 and r["images_per_s_as_they_arrive"] > 0 for r in rows.values())
    for mode in ("decode", "transfer"):
        assert rows[("64MB_8_processes", mode, "float32")]["transport"] == "pipe"
        assert rows[("64MB_8_processes", mode, "uint8")]["transport"] == "shm"
        assert rows[("large", mode, "uint8")]["prefetch_depth"] == runtime.MAX_PREFETCH
        assert rows[("large", mode, "uint8")]["batch_bytes"] == 2 * 3 * 448 * 448
        assert rows[("large", mode, "float32")]["batch_bytes"] == 4 * 2 * 3 * 448 * 448
    assert rows[("large", "transfer", "uint8")]["images"] == 6 * perf.TRANSFER_REPEATS
    assert time.perf_counter() - t0 < 60
