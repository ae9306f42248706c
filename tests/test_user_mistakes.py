"""What a new user gets wrong, each answered in seconds with one line that says what to do: wrong
settings (before any work), a resume with other settings, Ctrl-C and `kill`, a finished resume's
reports, the train folder given as TEST_DIR, retraining into a used OUT_DIR, OUT_DIR that is a file,
no weights and no network, commands run from another folder, an estimate too uncertain to use."""
import json
import logging
import resource
import shlex
import signal
import subprocess
import sys
import time

import pytest

from app import validation
from app.__main__ import main
from app.config import load_config
from app.infer import infer
from tests.conftest import ROOT, app_env, tiny_train_args
from tests.test_outputs import save_tiny_model

SECONDS = 30          # a settings mistake is told within this long of the command's start


def _cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _app(*args, cwd=ROOT, env=None, timeout=240, cpu=False):
    """(the finished command, its wall seconds; with `cpu`, its processor seconds instead: what a check
    after importing torch costs, whatever else the machine runs)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    run = subprocess.run([sys.executable, "-m", "app", *map(str, args)], env=env or app_env(), cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)
    return run, (_cpu_seconds() - c0) if cpu else time.perf_counter() - t0


def _one_error_line(run, code: int = 1) -> str:
    """The command failed with `code`, and said why in exactly one `error:` line, without a traceback."""
    assert run.returncode == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("extra, says", [
    (["--set", "finetune.epochs=two"], 'error: finetune.epochs="two": expected a valid integer (default 10'),
    (["--set", "noise.enabled=flase"], 'error: noise.enabled="flase": expected true or false (default true'),
    (["--epochs", "-1"], "error: finetune.epochs=-1: expected greater than or equal to 1"),
    (["--epochs", "0"], "error: finetune.epochs=0: expected greater than or equal to 1"),
    (["--set", "finetune.epoch=3"], "error: unknown setting 'finetune.epoch' (did you mean finetune.epochs?)"),
])
def test_a_settings_mistake_is_one_line_in_seconds_before_any_work(tiny, tmp_path, extra, says):
    out = tmp_path / "out"
    run, seconds = _app(*tiny_train_args(tiny, out, *extra))
    assert _one_error_line(run).startswith(says) and run.stderr.strip() == _one_error_line(run)
    assert seconds < SECONDS and not out.exists()


def test_a_linear_probe_is_asked_for_by_name_and_said_at_the_start(tiny, tmp_path):
    run, _ = _app("train", tmp_path / "no-train-dir", tmp_path / "out", "--set", "finetune.tune=none",
                  "--num-workers", "0", "--weights", tiny / "tiny_backbone.pt", "--allow-nonstandard-backbone")
    assert "finetune.tune=none: no fine-tuning; model.pt will be the warmup's linear head" in run.stderr
    assert _one_error_line(run).startswith("error: train folder not found")


def test_an_input_size_off_the_patch_grid_stops_before_the_scan_and_the_frozen_pass(tiny, tmp_path):
    out = tmp_path / "out"
    run, seconds = _app(*tiny_train_args(tiny, out, "--image-size", "100"), cpu=True)
    assert _one_error_line(run) == ("error: input.image_size=100 is not a multiple of the backbone's patch (8 px): "
                                    "use 96 or 104, or native (32 px)")
    assert seconds < SECONDS
    assert not (out / "cache").exists() and not (out / "work" / "scan.csv").exists()


def _wait_for(path, proc, seconds=240):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def test_ctrl_c_resume_with_other_settings_a_finished_resume_and_a_retrain(tiny, tmp_path):
    out, log_file = tmp_path / "out", tmp_path / "interrupted.log"
    args = [str(a) for a in tiny_train_args(tiny, out, "--set", "finetune.epochs=12")]
    with open(log_file, "w") as stderr:
        # a shell's background job (a CI script's `... &`) starts with SIGINT ignored, which Python
        # keeps: the child gets the terminal's default, as a user's Ctrl-C finds it
        proc = subprocess.Popen([sys.executable, "-m", "app", *args], env=app_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for(out / "checkpoints" / "latest.txt", proc)
        proc.send_signal(signal.SIGINT)                           # Ctrl-C
        t0 = time.perf_counter()
        proc.wait(timeout=60)
    stopped_in, said = time.perf_counter() - t0, log_file.read_text()
    # one line: what was saved and the exact command that resumes; no traceback
    assert proc.returncode == 130 and "Traceback" not in said, said[-3000:]
    last = said.strip().splitlines()[-1]
    assert last.startswith("interrupted: the training state after epoch ") and stopped_in < 15, last
    assert f"is saved in {out / 'checkpoints'}/epoch-" in last
    resume = shlex.split(last.split("Resume with: ", 1)[1])
    assert resume == ["python", "-m", "app", *args, "--resume"]
    # the settings that shape the model must be the checkpoint's: one line naming the difference
    other, seconds = _app(*args, "--resume", "--set", "lora.rank=8", "--set", "noise.enabled=false", cpu=True)
    line = _one_error_line(other)
    assert "lora.rank 32 -> 8; noise.enabled true -> false" in line and "without --resume" in line, line
    assert "scan: hashing" not in other.stderr and seconds < SECONDS
    # a speed setting may change; the resumed run's reports keep the first run's warmup and stage seconds
    first_stages = json.loads((out / "work" / "stage_seconds.json").read_text())["stages"]
    resumed, _ = _app(*resume[3:], "--set", "features.batch_size=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["resumed"] is True and len(report["finetune_epochs"]) == 12
    assert len(report["warmup_losses"]) == 20                    # FAST: warmup.epochs=20
    for stage in ("scan", "features", "noise", "warmup"):
        assert report["stage_seconds"][stage] >= first_stages[stage] > 0, stage
    assert report["total_seconds"] >= sum(first_stages.values())
    # the console shows the user's own settings; the report holds every one
    assert "settings that differ from app/defaults.yaml: " in resumed.stderr
    assert "finetune.epochs=12" in resumed.stderr and "features.batch_size=8" in resumed.stderr
    assert report["config"]["finetune"]["epochs"] == 12 and report["config"]["lora"]["rank"] == 32
    # the validation split's progress bar says so; one held-out image: too uncertain, said and reported
    assert "infer: validation split at 64 px" in resumed.stderr and "infer: test images" not in resumed.stderr
    assert "the estimate is too uncertain to use" in report["estimate_too_uncertain"]
    assert "WARNING estimated test top-1: the estimate is too uncertain to use" in resumed.stderr

    # a new training run into the used OUT_DIR: the earlier model's outputs are moved aside, not left stale
    (out / "submission.csv").write_text("t00.jpg, 0000\n")
    (out / "infer_report.json").write_text("{}")
    retrain, _ = _app(*args[:-2], "--set", "finetune.epochs=1")
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    earlier = list(out.glob("earlier-run-*"))
    assert len(earlier) == 1 and "held the outputs of an earlier model" in retrain.stderr
    assert {"model.pt", "submission.csv", "infer_report.json", "checkpoints", "train_report.json"} <= \
        {p.name for p in earlier[0].iterdir()}
    assert not (out / "submission.csv").exists() and not (out / "infer_report.json").exists()
    assert json.loads((out / "train_report.json").read_text())["resumed"] is False and (out / "model.pt").exists()


def test_kill_before_the_first_epoch_says_how_to_run_again(tiny, tmp_path):
    """SIGTERM (`docker stop`, kill) like Ctrl-C, through run_train.sh: its command is the one to rerun."""
    out, log_file = tmp_path / "out", tmp_path / "killed.log"
    args = [str(a) for a in tiny_train_args(tiny, out)[1:]]
    with open(log_file, "w") as stderr:
        proc = subprocess.Popen([str(ROOT / "run_train.sh"), *args], env=app_env(), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        _wait_for(out / "work" / "scan.csv", proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    said = log_file.read_text()
    assert proc.returncode == 130 and "Traceback" not in said, said[-3000:]
    last = said.strip().splitlines()[-1]
    assert last.startswith("interrupted"), last
    again = f"{ROOT / 'run_train.sh'} {shlex.join(args)}"
    assert last.endswith(f"Run again: {again}") or last.endswith(f"Resume with: {again} --resume"), last


def test_a_train_folder_given_as_test_dir_is_warned_about(tiny, tmp_path, caplog):
    model = tmp_path / "model.pt"
    save_tiny_model(model)
    cfg = load_config(None, {"num_workers": 0})
    with caplog.at_level(logging.WARNING, logger="app"):
        infer(tiny / "train", tmp_path / "out", cfg, model_path=model)
    warned = [r.getMessage() for r in caplog.records if "looks like a training folder" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"TEST_DIR {tiny / 'train'} looks like a training folder")
    assert "3 sub-folders ('0000/', '0001/', '0002/')" in warned[0], warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"):
        infer(tiny / "test", tmp_path / "out", cfg, model_path=model)
    assert not any("training folder" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("command", ["train", "infer"])
def test_an_out_dir_that_is_a_file_says_so(tiny, tmp_path, capsys, command):
    out = tmp_path / "outputs"
    out.write_text("not a folder")
    assert main([command, str(tiny / "train"), str(out), "--num-workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: output folder {out} is a file, not a folder: pass a folder (it is created if "
                       "missing), or move the file away.")
    assert main([command, str(tiny / "train"), str(out / "sub"), "--num-workers", "0"]) == 1
    assert f"{out} is a file, not a folder" in capsys.readouterr().err


def test_no_weights_and_no_network_fails_in_seconds_with_the_good_message(tiny, tmp_path):
    env = app_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))   # a closed port: no hub
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "CLIP_WEIGHTS_FILE"):
        env.pop(name, None)
    run, seconds = _app("train", tiny / "train", tmp_path / "out", env=env, cpu=True)
    line = _one_error_line(run, code=2)
    assert "could not obtain ViT-B-32 'openai' weights" in line
    assert "--weights FILE" in line and "CLIP_WEIGHTS_FILE" in line
    assert "Retrying" not in run.stderr and seconds < SECONDS


def test_commands_and_relative_configs_work_from_another_folder(tiny, tmp_path):
    """`python -m app` with the repository on PYTHONPATH (run_train.sh sets it), from any folder: a
    --config path relative to the repository is found there."""
    env = app_env()
    run, _ = _app("train", tiny / "train", tmp_path / "out", "--config", "configs/proxy-cpu.yaml", "--set",
                  "finetune.epochs=two", cwd=tmp_path, env=env)
    assert _one_error_line(run).startswith('error: finetune.epochs="two"')
    run, _ = _app("train", tiny / "train", tmp_path / "out", "--config", "configs/nope.yaml", cwd=tmp_path, env=env)
    assert _one_error_line(run) == (f"error: --config configs/nope.yaml: file not found (looked in {tmp_path} "
                                    f"and in {ROOT})")


def test_an_interval_wider_than_ten_points_says_how_to_narrow_it():
    vcfg = load_config()["validation"]
    ten_images = {"split_images": 10, "classes": 10, "held_out_images": 10, "held_out_share": 0.02}
    said = validation.too_uncertain([0.40, 0.80], ten_images, vcfg)
    assert said.startswith("the estimate is too uncertain to use: its 95% interval is +-20 points (10 held-out "
                           "images), wider than +-10. About 40 held-out images would narrow it")
    assert "--set validation.per_class=4 --set validation.max_fraction=0.08" in said
    assert validation.too_uncertain([0.62, 0.72], ten_images, vcfg) is None
