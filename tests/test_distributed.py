"""Processes and batches: the same model on 1 or N processes for the same global batch, the process
groups' timeouts, the wait for the main process' stages, and the launcher's errors
(run_train.sh -> app/launch.py)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from app.__main__ import main
from app.finetune import batch_plan
from tests.conftest import FAST, ROOT, app_env, tiny_train_args


def _train(tiny, out, processes, *extra, env=None):
    # NUM_GPUS=2 without CUDA: accelerate's multi-GPU launcher starts 2 processes that join over
    # gloo, the same code path as 2 GPUs.
    cmd = [str(ROOT / "run_train.sh"), str(tiny / "train"), str(out), "--weights", str(tiny / "tiny_backbone.pt"),
           "--allow-nonstandard-backbone", *FAST, "--set", "noise.enabled=false", *extra]
    return subprocess.run(cmd, env=app_env(NUM_GPUS=str(processes), **(env or {})), capture_output=True,
                          text=True, timeout=400, cwd=ROOT)


def _model(tiny, out, processes, *extra):
    if processes == 1:           # in this process, through the program's entry point: what 1 GPU runs
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                    # as each of the 2 processes (OMP_NUM_THREADS=1)
        try:
            assert main(tiny_train_args(tiny, out, "--set", "noise.enabled=false", *extra)) == 0
        finally:
            torch.set_num_threads(threads)
    else:
        run = _train(tiny, out, processes, *extra)
        assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "model.pt", weights_only=True), json.loads((out / "train_report.json").read_text())


def _assert_same_weights(a, b):
    assert torch.allclose(a["head_weight"], b["head_weight"], atol=1e-4)
    for k, v in a["visual_state"].items():
        assert torch.allclose(b["visual_state"][k], v, atol=1e-4), k


def test_the_global_batch_gives_the_same_model_on_one_or_two_processes(tiny, tmp_path):
    # finetune.batch_size is the global batch: 2 processes x 4, 1 x 8, and 1 x 4 x 2 accumulation
    # steps all train on the same 8 images per step. A validation split is held out and scored (the
    # processes share its images out and gather the logits): the same split and estimate everywhere.
    # fp32 (--precision no): the identity is exact only without autocast. precision auto picks bf16 on
    # a CPU where bf16 matmuls measure faster (AVX512-BF16, as on some AMD EPYC CI machines),
    # and bf16 rounds the 1- and 2-process sums apart by more than the 1e-4 compared here.
    split = ["--set", "finetune.batch_size=8", "--set", "validation.per_class=2",
             "--set", "validation.max_fraction=0.4", "--precision", "no"]
    two, report = _model(tiny, tmp_path / "two", 2, *split)
    one, one_report = _model(tiny, tmp_path / "one", 1, *split)
    accum, _ = _model(tiny, tmp_path / "accum", 1, *split, "--set", "finetune.max_device_batch=4")
    assert report["processes"] == 2
    assert report["validation"]["split_images"] == 6 and report["images"]["held_out"] == 6
    for key in ("estimated_test_top1", "estimated_test_top1_interval95", "noisy_split_top1"):
        assert report[key] == one_report[key], key
    assert [e["estimated_test_top1"] for e in report["finetune_epochs"]] == \
        [e["estimated_test_top1"] for e in one_report["finetune_epochs"]]
    assert (tmp_path / "two" / "validation_split.csv").read_text() == \
        (tmp_path / "one" / "validation_split.csv").read_text()
    # the groups' real timeouts, from the config: the training collectives' and the wait for the
    # stages the main process runs alone
    assert report["process_group_timeout_s"] == {"collectives": 60 * 30, "main_process_wait": 60 * 720}
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pt")) == ["model.pt"]   # one model file
    _assert_same_weights(one, two)
    _assert_same_weights(one, accum)
    # and fine-tuning did change the weights (the comparison is not trivially true)
    base = torch.load(tiny / "tiny_backbone.pt", weights_only=True)["visual"]
    moved = max((one["visual_state"][k] - base[k]).abs().max().item() for k in base
                if k != "positional_embedding")                        # resampled to 64 px: another shape
    assert moved > 1e-5


@pytest.mark.parametrize("n, batch, processes, max_device, expected", [
    (1000, 64, 1, 128, (64, 64, 1)),
    (1000, 64, 8, 128, (64, 8, 1)),
    (1000, 64, 1, 16, (64, 16, 4)),
    (1000, 64, 2, 24, (64, 16, 2)),        # 32 per process in 2 equal micro-batches of 16
    (1000, 64, 3, 128, (63, 21, 1)),       # 64 cannot be shared by 3: the nearest that can
    (44, 64, 1, 128, (44, 44, 1)),         # a small dataset is not an error: a batch that fits
    (44, 64, 8, 128, (40, 5, 1)),
])
def test_batch_plan(n, batch, processes, max_device, expected):
    plan = batch_plan(n, batch, processes, max_device)
    assert (plan.global_batch, plan.device_batch, plan.accumulation) == expected
    assert plan.device_batch * plan.accumulation * processes == plan.global_batch


def test_fewer_images_than_processes_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        batch_plan(3, 64, 8, 128)


def test_a_failed_multi_process_run_ends_with_the_products_message(tiny, tmp_path):
    run = subprocess.run(
        [str(ROOT / "run_train.sh"), str(tmp_path / "missing"), str(tmp_path / "out"),
         "--weights", str(tiny / "tiny_backbone.pt"), "--allow-nonstandard-backbone"],
        env=app_env(NUM_GPUS="2"), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 1
    assert run.stderr.rstrip().splitlines()[-1].startswith("error: train folder not found")
    assert "Traceback" not in run.stderr and "CalledProcessError" not in run.stderr


def test_gpus_listed_but_unusable_stop_the_run(tmp_path):
    # nvidia-smi sees a GPU, torch (here: no CUDA at all) cannot use it: a message, not a CPU run.
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncase "$1" in -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)";;\n'
                    '*) echo "535.183.01";; esac\n')
    fake.chmod(0o755)
    env = app_env(PATH=f"{fake.parent}:{app_env()['PATH']}")
    run = subprocess.run([sys.executable, "-m", "app.launch", "train", str(tmp_path), str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1
    assert "nvidia-smi lists 1 GPU(s) (driver 535.183.01) but torch cannot use CUDA" in run.stderr
    assert "NUM_GPUS=0" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


# Two gloo processes (torchrun): the training collectives' timeout is 3 s, the wait for the main
# process' stages 60 s. The other process waits 6 s for a stage (twice the collectives' timeout),
# asleep; an error in a stage reaches it as OtherProcessFailed; a wedged process then fails the
# next training collective after the short timeout instead of hanging it.
WAIT_PROBE = textwrap.dedent("""
    import json, sys, time
    import torch, torch.distributed as dist
    from app.config import load_config
    from app.runtime import (OtherProcessFailed, close_process_group, make_accelerator, on_main_process,
                             process_group_timeout_s)
    cfg = load_config(overrides={"process_group_timeout_min": 0.05, "main_process_wait_min": 1,
                                 "precision": "no"})
    acc = make_accelerator(cfg)
    rank = acc.process_index
    result = {"rank": rank, "timeouts": process_group_timeout_s(acc)}
    def failing():
        raise ValueError("stage failed on purpose")
    try:
        on_main_process(acc, failing)
        result["failing"] = "no error"
    except OtherProcessFailed:
        result["failing"] = "OtherProcessFailed"
    except ValueError as e:
        result["failing"] = str(e)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    on_main_process(acc, lambda: time.sleep(6))
    result["wait_cpu_s"] = time.process_time() - cpu0
    result["wait_wall_s"] = time.perf_counter() - wall0
    t = torch.ones(1)
    dist.all_reduce(t)
    result["all_reduce"] = t.item()
    if rank == 1:
        time.sleep(8)                                 # wedged
    t0 = time.perf_counter()
    try:
        dist.all_reduce(t)
        result["after_wedge"] = "completed"
    except RuntimeError:
        result["after_wedge"] = "RuntimeError"
    result["after_wedge_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)
    close_process_group()
""")


def test_other_processes_sleep_through_the_main_process_stages_and_collectives_time_out(tmp_path):
    probe = tmp_path / "wait_probe.py"
    probe.write_text(WAIT_PROBE)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(probe)], env=app_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    results = {r["rank"]: r for r in (json.loads(line.split("RESULT ", 1)[1])
                                      for line in run.stdout.splitlines() if line.startswith("RESULT "))}
    assert sorted(results) == [0, 1], run.stdout[-2000:] + run.stderr[-3000:]
    main, other = results[0], results[1]
    for r in (main, other):
        assert r["timeouts"] == {"collectives": 3.0, "main_process_wait": 60.0}
        assert r["all_reduce"] == 2.0                 # the training group still works after the waits
    assert main["failing"] == "stage failed on purpose" and other["failing"] == "OtherProcessFailed"
    # waited past the collectives' 3 s timeout, without a core spinning (a busy wait: ~6 s of CPU)
    assert other["wait_wall_s"] > 5.5
    assert other["wait_cpu_s"] < 1.0
    # the main process' next collective fails after about 3 s, not after the 60 s wait timeout
    assert main["after_wedge"] == "RuntimeError" and 2.5 < main["after_wedge_s"] < 8
