"""accelerate data parallelism: 2 CPU processes x batch 4 train the same model as 1 x batch 8."""
import json
import subprocess
import sys

import torch

from tests.conftest import FAST, ROOT, app_env


def _train(tiny, out, launcher, batch):
    cmd = [*launcher, "-m", "app", "train", str(tiny / "train"), str(out),
           "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone", *FAST,
           "--set", f"finetune.batch_size={batch}", "--set", "noise.enabled=false"]
    run = subprocess.run(cmd, env=app_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "model.pt", weights_only=True), json.loads((out / "train_report.json").read_text())


def test_two_processes_match_one_process_with_the_same_global_batch(tiny, tmp_path):
    # accelerate's `--cpu` launcher spawns several processes only through MPI; its torch launcher
    # (`--multi_gpu`, what run_train.sh uses for N GPUs) spawns them anywhere, and without CUDA the
    # program joins them over gloo: the same code path as N GPUs, on a CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    two, report = _train(tiny, tmp_path / "two", launch, batch=4)
    one, _ = _train(tiny, tmp_path / "one", [sys.executable], batch=8)
    assert report["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pt")) == ["model.pt"]   # one model file
    assert torch.allclose(two["head_weight"], one["head_weight"], atol=1e-4)
    for k, v in one["visual_state"].items():
        assert torch.allclose(two["visual_state"][k], v, atol=1e-4), k
    # and fine-tuning did change the weights (the comparison is not trivially true)
    base = torch.load(tiny / "tiny_backbone.pt", weights_only=True)["visual"]
    moved = max((one["visual_state"][k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-5
