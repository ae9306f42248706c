"""Train -> infer end to end through the two shell scripts, on the tiny dataset with oddities."""
import json
import re
import subprocess

import huggingface_hub.constants
import pandas as pd
import torch

from app.__main__ import main
from tests.conftest import FAST, ROOT, app_env


def test_train_then_infer_through_the_scripts(tiny, tmp_path):
    out = tmp_path / "out"
    train = subprocess.run([str(ROOT / "run_train.sh"), str(tiny / "train"), str(out),
                            "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone",
                            *FAST, "--set", "finetune.batch_size=64"],
                           env=app_env(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "settings that differ from app/defaults.yaml: " in train.stderr and "finetune.epochs=2" in train.stderr
    # 37 usable images, one held out for the estimate, and the global batch of 64: a batch that fits, warned
    assert "global batch 36 instead of finetune.batch_size=64" in train.stderr
    for name in ("model.pt", "train_report.json", "train_curves.png", "noise_scores.csv"):
        assert (out / name).is_file(), name

    report = json.loads((out / "train_report.json").read_text())
    skipped = {s["path"] for s in report["skipped_files"]}
    assert skipped == {"0002/empty.jpg", "0002/garbage.jpg", "0002/notes.txt"}
    assert report["images"]["used"] == 37 and report["images"]["empty_classes"] == ["0003"]
    assert len(report["finetune_epochs"]) == 2 and all("lr" in e for e in report["finetune_epochs"])
    assert set(report["stage_seconds"]) >= {"scan", "features", "noise", "warmup", "finetune"}
    scores = pd.read_csv(out / "noise_scores.csv", dtype=str)
    for odd in ("0000/grey.jpg", "0000/cmyk.jpg", "0000/palette.png", "0000/alpha.png",
                "0001/png_named.jpg", "0001/truncated.jpg", "0002/rotated.jpg"):
        assert odd in set(scores["path"]), odd    # decoded and used, not skipped

    model = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert model["classes"] == ["0000", "0001", "0002", "0003"]
    assert len(model["weights_sha256"]) == 64 and model["config"]["finetune"]["epochs"] == 2
    assert not any("lora" in k or "parametrizations" in k for k in model["visual_state"])  # merged
    # fine-tuned at 2x the tower's native 32 px: the model file records it, inference uses it
    assert model["visual_config"]["image_size"] == 64 and model["preprocess"]["image_size"] == 64
    assert model["visual_state"]["positional_embedding"].shape[0] == (64 // 8) ** 2 + 1

    infer = subprocess.run([str(ROOT / "run_infer.sh"), str(tiny / "test"), str(out)],
                           env=app_env(), capture_output=True, text=True, timeout=300)
    assert infer.returncode == 0, infer.stderr[-3000:]
    lines = (out / "submission.csv").read_text().splitlines()
    names = sorted(p.name for p in (tiny / "test").iterdir())
    assert [ln.split(", ")[0] for ln in lines] == names          # one row per image, sorted, no header
    assert all(re.fullmatch(r"[^,]+\.jpg, 000[0-3]", ln) for ln in lines)
    assert json.loads((out / "infer_report.json").read_text())["unreadable"] == ["broken.jpg"]
    truth = pd.read_csv(tiny / "test_labels.csv", dtype=str).set_index("image")["label"]
    pred = dict(ln.split(", ") for ln in lines)
    correct = sum(pred[n] == truth[n] for n in truth.index)
    assert correct >= 7, f"only {correct}/9 tiny test images right"


def test_missing_weights_fails_clearly(tiny, tmp_path, monkeypatch, capsys):
    # in this process, through the program's entry point (`python -m app` without the import)
    assert main(["train", str(tiny / "train"), str(tmp_path), "--weights", str(tmp_path / "nope.pt")]) != 0
    assert "--weights" in capsys.readouterr().err
    # No --weights and no network: never random weights, a message naming --weights instead.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at its import: set here
    assert main(["train", str(tiny / "train"), str(tmp_path)]) != 0
    assert "--weights" in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists()


def test_class_folders_without_a_file_are_refused_in_one_line(tiny, tmp_path, capsys):
    for name in ("0000", "0001"):
        (tmp_path / "train" / name).mkdir(parents=True)
    train = ["train", str(tmp_path / "train"), str(tmp_path / "out"), "--weights", str(tiny / "tiny_backbone.pt"),
             "--allow-nonstandard-backbone"]
    sweep = ["sweep", str(tmp_path / "train"), str(tmp_path / "sweep"), "--grid", "finetune.lr=1e-3"]
    for argv in (train, sweep, [*sweep, "--split-images", "0"]):
        assert main(argv) == 1
        assert capsys.readouterr().err.strip().splitlines() == \
            [f"error: no files in the 2 class folders of {tmp_path / 'train'}: expected TRAIN_DIR/<class>/<image>"]
    assert not (tmp_path / "out" / "model.pt").exists() and not (tmp_path / "sweep").exists()


def test_nonstandard_backbone_refused_without_flag(tiny, tmp_path, capsys):
    assert main(["train", str(tiny / "train"), str(tmp_path), "--weights", str(tiny / "tiny_backbone.pt")]) == 2
    err = capsys.readouterr().err
    assert "ViT-B/32 only" in err and "--allow-nonstandard-backbone" in err


def test_the_scripts_run_this_checkouts_code_from_any_working_directory(tmp_path):
    # `python -m app` puts the working directory first on sys.path: an unrelated `app` package
    # there must not be run instead of the product
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text('raise SystemExit("the wrong app package")\n')
    run = subprocess.run([str(ROOT / "run_infer.sh"), str(tmp_path / "test"), str(tmp_path / "out")],
                         env=app_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "the wrong app package" not in run.stderr
    assert run.returncode == 1 and "model file not found" in run.stderr
