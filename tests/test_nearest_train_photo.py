"""bench/nearest_train_photo.py (issue 13's near-duplicate check): the held-out photos and their
byte copies leave the pool, a test photo copied from the pool is found at cosine 1, and with --truth
the held-out-minus-dev-test top-1 is the run's predictions scored against the true labels."""
import json
import shutil
import subprocess
import sys

import pandas as pd

from tests.conftest import ROOT, app_env


def test_nearest_train_photo(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny / "train", data / "train")
    shutil.copytree(tiny / "test", data / "test")
    train = sorted(p for p in (data / "train").rglob("*.jpg") if p.stat().st_size > 0)
    held, kept = train[0], train[-1]
    shutil.copy(held, held.with_name("copy_of_held.jpg"))        # a byte copy: must leave the pool too
    for p in list((data / "test").iterdir()):
        p.unlink()
    shutil.copy(kept, data / "test" / "copy_of_kept.jpg")         # a leak: nearest training photo at 1
    n_files = sum(1 for p in (data / "train").rglob("*")            # the files training reads
                  if p.is_file() and not p.name.startswith(".") and p.stat().st_size > 0)
    run = tmp_path / "run"
    run.mkdir()
    held_path = held.relative_to(data / "train").as_posix()
    # --truth: the held-out photo predicted right against its true label, the test photo wrong
    pd.DataFrame({"path": [held_path], "given_label": [held.parent.name], "predicted": [held.parent.name]}).to_csv(
        run / "validation_split.csv", index=False)
    wrong = next(c for c in ("0000", "0001", "0002") if c != kept.parent.name)
    (run / "submission.csv").write_text(f"copy_of_kept.jpg, {wrong}\n")
    (data / "test_labels.csv").write_text(f"image,label\ncopy_of_kept.jpg,{kept.parent.name}\n")
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"path": [held_path], "given_label": [held.parent.name], "true_label": [held.parent.name],
                  "noise": ["clean"]}).to_csv(truth, index=False)
    out = tmp_path / "nn.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "nearest_train_photo.py"), "--data", str(data),
                    "--weights", str(tiny / "tiny_backbone.pt"), "--run", str(run), "--out", str(out),
                    "--truth", str(truth)], check=True, env=app_env(), cwd=tmp_path)
    r = json.loads(out.read_text())[str(run)]
    assert r["test"]["n"] == 1 and r["test"]["median"] > 0.999
    assert r["held_out"]["n"] == 1 and r["other_train"]["n"] == n_files - 2   # held + its copy out
    shift = r["shift"]
    assert shift["held_out_true_top1"] == 100 and shift["dev_test_top1"] == 0 and shift["shift_points"] == 100


def test_training_pool_drops_the_split_and_its_copies():
    sys.path.insert(0, str(ROOT / "bench"))
    from nearest_train_photo import training_pool
    train = pd.DataFrame({"path": ["a/1.jpg", "b/2.jpg", "b/3.jpg", "c/4.jpg"], "hash": ["x", "x", "y", "z"]})
    assert training_pool(train, {"a/1.jpg"}).tolist() == [False, False, True, True]
    assert training_pool(train, set()).all()
