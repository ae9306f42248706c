"""`python -m app bench` on the tiny dataset: arms run through the product under a config profile,
results are scored, summarised and reused; the arm's own overrides beat the user's; an infer-only
arm infers the recipe's model of the same seed instead of training one."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from app.__main__ import main
from app.studies.bench import ARMS, _reusable, estimate_agreement, override_sets, score, summarise
from app.config import load_config
from tests.conftest import FAST, ROOT, app_env


@pytest.fixture(scope="module")
def truth(tiny):
    """A truth file for the tiny dataset: every 5th image called 'symmetric' noise."""
    rows = [(f"train/{c.name}/{f.name}", c.name, c.name, "clean")
            for c in sorted((tiny / "train").iterdir()) for f in sorted(c.iterdir())]
    df = pd.DataFrame(rows, columns=["path", "given_label", "true_label", "noise"])
    df.loc[df.index[::5], "noise"] = "symmetric"
    df.to_csv(tiny / "train_truth.csv", index=False)
    return df


def test_bench_runs_arms_and_reuses_them(tiny, truth, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    profile = tmp_path / "profile.yaml"       # the profile every arm starts from (the bench's --config)
    profile.write_text("lora:\n  rank: 4\n")
    # recipe-tta_flip without recipe: the bench adds the recipe, whose model it infers
    # `python -m app bench` in this process (each arm is run_train.sh / run_infer.sh, as always)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cmd = ["bench", "--data", str(tiny), "--weights", str(tiny / "tiny_backbone.pt"),
           "--allow-nonstandard-backbone", "--config", str(profile),
           "--arms", "linear_probe_ce,recipe-tta_flip,clean_oracle", "--seeds", "0",
           "--out", str(out), "--set", "num_workers=0", "--set", "validation.per_class=2",   # a validation split
           "--set", "validation.max_fraction=0.4"] + [x for k, v in zip(FAST[::2], FAST[1::2]) if k == "--set"
                                                      for x in (k, v)]
    assert main(cmd) == 0
    said = capsys.readouterr().err
    assert "recipe-tta_flip infers with the model of recipe: recipe added" in said
    results = json.loads((out / "bench_results.json").read_text())
    assert [r["arm"] for r in results["summary"]] == ["linear_probe_ce", "recipe", "recipe-tta_flip", "clean_oracle"]
    assert results["claims"]["best_baseline"] == "linear_probe_ce"
    assert "gap_closed_vs_linear_probe_ce" in results["claims"] or \
        results["summary"][3]["top1"] == results["summary"][0]["top1"]
    assert (out / "bench_results.png").stat().st_size > 1000
    assert "| `recipe` |" in (out / "bench_results.md").read_text()
    for r in results["runs"]:
        assert 0 <= r["top1"] <= 1 and r["missing_rows"] == 0 and r["peak_rss_gib"] > 0
        assert len(r["backbone_sha256"]) == 64
        assert 0 <= r["estimated_test_top1"] <= 1 and 0 <= r["noisy_split_top1"] <= 1    # each model's own
    # the estimates beside the measured top-1, and how well they agree over the 3 trained models
    md = (out / "bench_results.md").read_text()
    assert "| top-1 % | estimate % | noisy split % |" in md and "over 3 trained models" in md
    assert results["estimate_agreement"]["models"] == 3
    assert (out / "bench_estimate.png").stat().st_size > 1000
    by_arm = {r["arm"]: r for r in results["runs"]}
    assert by_arm["recipe-tta_flip"]["estimated_test_top1"] == by_arm["recipe"]["estimated_test_top1"]

    # the arm's overrides win over --set: the linear probe never fine-tunes, and has no prior
    probe = torch.load(out / "linear_probe_ce" / "seed0" / "model.pt", map_location="cpu", weights_only=True)
    assert probe["config"]["finetune"]["tune"] == "none" and not probe["config"]["noise"]["enabled"]
    assert torch.count_nonzero(probe["log_prior"]) == 0
    recipe = torch.load(out / "recipe" / "seed0" / "model.pt", map_location="cpu", weights_only=True)
    assert recipe["config"]["finetune"]["epochs"] == 2 and torch.count_nonzero(recipe["log_prior"]) > 0
    assert recipe["config"]["lora"]["rank"] == 4 and probe["config"]["lora"]["rank"] == 4     # the profile
    # no fine-tuning: the probe is the frozen tower at the size its head was fitted on (the features'
    # native 32 px), not at input.image_size as the fine-tuned recipe is
    assert probe["visual_config"]["image_size"] == 32 and recipe["visual_config"]["image_size"] == 64

    # the infer-only arm trained nothing: it inferred the recipe's model of the same seed, with its option
    flip = out / "recipe-tta_flip" / "seed0"
    assert sorted(p.name for p in flip.iterdir()) == ["infer.log", "infer_report.json", "result.json",
                                                      "submission.csv"]
    assert "recipe-tta_flip seed 0: inference only" in said
    flip_report = json.loads((flip / "infer_report.json").read_text())
    assert flip_report["model"] == str(out / "recipe" / "seed0" / "model.pt") and flip_report["tta"] == "flip"
    assert flip_report["rows_written"] == len(list((tiny / "test").iterdir())) == 10
    flip_result = json.loads((flip / "result.json").read_text())
    assert flip_result["model"] == "recipe/seed0/model.pt" and flip_result["train_seconds"] == 0
    assert flip_result["missing_rows"] == 0 and "| `recipe-tta_flip` |" in (out / "bench_results.md").read_text()

    # the oracle trains on the clean images only, under their true classes
    oracle = sorted(p.relative_to(out / "oracle_train").as_posix() for p in (out / "oracle_train").rglob("*.*"))
    clean = truth[truth["noise"] == "clean"]
    assert oracle == sorted(f"{t}/{p.split('/')[-1]}" for p, t in zip(clean["path"], clean["true_label"]))
    assert json.loads((out / "clean_oracle" / "seed0" / "train_report.json").read_text())["images"]["used"] \
        < json.loads((out / "recipe" / "seed0" / "train_report.json").read_text())["images"]["used"]

    # a second call reuses the finished runs instead of training again; --publish copies the summary
    # files to a kept folder and --update-report fills the report's block, linking the chart there
    stamp = (out / "recipe" / "seed0" / "model.pt").stat().st_mtime_ns
    report = tmp_path / "REPORT.md"
    report.write_text("# r\nbefore\n<!-- bench_results.md: begin -->\nold\n<!-- bench_results.md: end -->\nafter\n")
    publish = tmp_path / "kept" / "results"
    assert main(cmd + ["--publish", str(publish), "--update-report", str(report)]) == 0
    assert (out / "recipe" / "seed0" / "model.pt").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in publish.iterdir()) == ["bench_estimate.png", "bench_results.json", "bench_results.md",
                                                         "bench_results.png"]
    text = report.read_text()
    assert "old" not in text and text.startswith("# r\nbefore\n") and text.endswith("after\n")
    assert (publish / "bench_results.md").read_text() in text
    assert "![test top-1 by arm](kept/results/bench_results.png)" in text
    assert "![estimated against measured test top-1](kept/results/bench_estimate.png)" in text


def test_unknown_arm_is_refused(tiny, tmp_path):
    run = subprocess.run([sys.executable, "-m", "app", "bench", "--data", str(tiny), "--arms", "recipe,magic",
                          "--out", str(tmp_path)], env=app_env(), capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert run.returncode == 1 and "error: unknown arms ['magic']" in run.stderr


def test_score_and_summary(tmp_path):
    labels = pd.DataFrame({"image": [f"{i}.jpg" for i in range(6)], "label": ["a", "a", "b", "b", "c", "c"]})
    (tmp_path / "s.csv").write_text("0.jpg, a\n1.jpg, b\n2.jpg, b\n3.jpg, b\n4.jpg, a\n")   # 5.jpg missing
    s = score(tmp_path / "s.csv", labels, tail={"c"})
    assert s == {"top1": 0.5, "macro": 0.5, "tail_third": 0.0, "missing_rows": 1}
    runs = pd.DataFrame([
        {"arm": a, "seed": k, "top1": t, "macro": t, "tail_third": t, "train_seconds": 1.0,
         "infer_seconds": 1.0, "peak_rss_gib": 1.0}
        for a, ts in {"full_ft_ce": [0.30, 0.32], "lora_ce": [0.40, 0.40], "recipe": [0.50, 0.52],
                      "clean_oracle": [0.60, 0.62]}.items() for k, t in enumerate(ts)])
    agg, claims = summarise(runs)
    assert agg.loc["recipe", "top1"] == pytest.approx(0.51) and agg.loc["lora_ce", "top1_sd"] == 0
    assert claims["best_baseline"] == "lora_ce"
    assert claims["recipe_minus_best_baseline"] == pytest.approx(0.11)
    assert claims["gap_closed_vs_full_ft_ce"] == pytest.approx(0.2 / 0.3)
    assert claims["gap_closed_vs_lora_ce"] == pytest.approx(0.11 / 0.21)
    assert pd.isna(agg.loc["recipe", "estimate"])               # runs without a validation split: no estimate


def test_estimate_agreement_over_the_trained_models():
    """Spearman and mean absolute error of each training-time figure against the measured top-1; the
    infer-only arms (another arm's model and estimate) are left out; fewer than 3 models: none."""
    runs = pd.DataFrame([
        {"arm": "linear_probe_ce", "top1": 0.30, "estimated_test_top1": 0.32, "noisy_split_top1": 0.50},
        {"arm": "lora_ce", "top1": 0.40, "estimated_test_top1": 0.38, "noisy_split_top1": 0.45},
        {"arm": "recipe", "top1": 0.50, "estimated_test_top1": 0.53, "noisy_split_top1": 0.47},
        {"arm": "recipe-tta_flip", "top1": 0.90, "estimated_test_top1": 0.53, "noisy_split_top1": 0.47}])
    a = estimate_agreement(runs)
    assert a["models"] == 3
    assert a["estimated_test_top1"] == {"spearman": 1.0, "mae_points": pytest.approx(2.33, abs=0.01),
                                        "mean_error_points": pytest.approx(1.0)}
    assert a["noisy_split_top1"]["spearman"] == pytest.approx(-0.5)     # ranks 3,1,2 against 1,2,3
    assert a["noisy_split_top1"]["mae_points"] == pytest.approx((20 + 5 + 3) / 3, abs=0.01)
    assert estimate_agreement(runs.iloc[1:]) is None


def test_arm_overrides_reach_the_config_exactly():
    """Every arm's overrides, as the --set strings the bench passes, give exactly its values (3e-5 is
    a float, not the string '3e-05'; lists stay lists) and name keys of app/defaults.yaml."""
    for name, arm in ARMS.items():
        cfg = load_config(None, sets=override_sets(arm.overrides))
        for key, value in arm.overrides.items():
            section, _, leaf = key.rpartition(".")
            got = cfg[section][leaf] if section else cfg[leaf]
            assert got == value and type(got) is type(value), (name, key, got)
        assert arm.model_of is None or (ARMS[arm.model_of].model_of is None
                                        and all(k.startswith("infer.") for k in arm.overrides)), name
    full = ARMS["full_ft_ce"].overrides
    assert full["finetune.tune"] == "full" and full["finetune.lr"] == 3e-5 and full["finetune.reg_lambda"] == 0
    for baseline in ("linear_probe_ce", "full_ft_ce", "lora_ce"):
        plain = ARMS[baseline].overrides
        assert plain["finetune.label_smoothing"] == plain["finetune.ema_decay"] == 0 and not plain["noise.enabled"]


def test_an_infer_only_result_is_stale_once_its_model_is_trained_again(tmp_path):
    model, result = tmp_path / "model.pt", tmp_path / "result.json"
    model.write_bytes(b"m")
    result.write_text("{}")
    os.utime(model, ns=(1_000_000_000, 1_000_000_000))
    assert _reusable(result, model)
    os.utime(model, ns=(result.stat().st_mtime_ns + 1, result.stat().st_mtime_ns + 1))
    assert not _reusable(result, model) and not _reusable(tmp_path / "none.json", model)
