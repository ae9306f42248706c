"""app/launch.py's decisions with the machine's facts faked: how many processes, a small /dev/shm
with several GPUs (NCCL_SHM_DISABLE where the GPUs reach each other directly, else one process; one
line either way), and run_infer.sh's refusal of GPUs that torch cannot use."""
import os
import subprocess
import sys

import pytest
import torch

from app import launch
from tests.conftest import ROOT, app_env

MB = 2 ** 20


class Exec(Exception):
    """Raised by _execv: the launcher would be replaced by the program; args[0] is what would run."""


def _execv(path, args):
    raise Exec(args)


@pytest.fixture
def no_nccl_shm_setting(monkeypatch):
    # whatever the test's environment holds, NCCL_SHM_DISABLE is unset during the test and restored after
    monkeypatch.setenv("NCCL_SHM_DISABLE", "placeholder")
    monkeypatch.delenv("NCCL_SHM_DISABLE")


@pytest.fixture
def gpus(monkeypatch):
    """fake(seen, usable): nvidia-smi lists `seen` GPUs; torch can use `usable` of them."""
    def fake(seen, usable):
        monkeypatch.setattr(launch, "gpus_seen", lambda: (seen, "550.54.15" if seen else ""))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: usable > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: usable)
    return fake


@pytest.mark.parametrize("seen, usable, num_gpus, expected", [
    (8, 8, "", 8), (4, 4, "2", 2), (0, 0, "", 1), (1, 1, "", 1), (8, 8, "0", 1), (0, 0, "2", 2)])
def test_plan_processes(gpus, seen, usable, num_gpus, expected):
    gpus(seen, usable)
    assert launch.plan_processes({"NUM_GPUS": num_gpus} if num_gpus else {}) == expected


def test_plan_processes_refuses_more_processes_than_gpus_and_gpus_torch_cannot_use(gpus):
    gpus(4, 4)
    with pytest.raises(SystemExit, match="NUM_GPUS=5 but torch sees 4 GPU"):
        launch.plan_processes({"NUM_GPUS": "5"})
    gpus(8, 0)                                   # e.g. a driver older than torch's CUDA build needs
    with pytest.raises(SystemExit, match="nvidia-smi lists 8 GPU.* but torch cannot use CUDA"):
        launch.plan_processes({})
    assert launch.plan_processes({"NUM_GPUS": "0"}) == 1          # the CPU, on purpose


# `nvidia-smi topo -m` and `nvidia-smi topo -p2p r` as printed on three kinds of servers (the header
# underlined with escape codes, as nvidia-smi does on a terminal; NIC columns after the GPUs)
TOPO_NVLINK = ("\x1b[4m\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
               "GPU0\t X \tNV18\tNV18\tNV18\tPXB\t0-55\t0\t\tN/A\n"
               "GPU1\tNV18\t X \tNV18\tNV18\tPXB\t0-55\t0\t\tN/A\n"
               "GPU2\tNV18\tNV18\t X \tNV18\tSYS\t56-111\t1\t\tN/A\n"
               "GPU3\tNV18\tNV18\tNV18\t X \tSYS\t56-111\t1\t\tN/A\n"
               "NIC0\tPXB\tPXB\tSYS\tSYS\t X \n\nLegend:\n\n  X    = Self\n  NV#  = Connection traversing a "
               "bonded set of # NVLinks\n")
P2P_OK_4 = (" \tGPU0\tGPU1\tGPU2\tGPU3\t\n" + "".join(
    f" GPU{i}\t" + "\t".join("X" if i == j else "OK" for j in range(4)) + "\t\n" for i in range(4))
    + "\nLegend:\n\n  X    = Self\n  OK   = Status Ok\n")
TOPO_PHB = ("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
            "GPU0\t X \tPHB\t0-63\t0\t\tN/A\nGPU1\tPHB\t X \t0-63\t0\t\tN/A\n\nLegend:\n")
P2P_GNS_2 = " \tGPU0\tGPU1\t\n GPU0\tX\tGNS\t\n GPU1\tGNS\tX\t\n\nLegend:\n  GNS  = GPU not supported\n"
TOPO_PIX = ("\tGPU0\tGPU1\tCPU Affinity\n"
            "GPU0\t X \tPIX\t0-31\nGPU1\tPIX\t X \t0-31\n")
P2P_OK_2 = " \tGPU0\tGPU1\t\n GPU0\tX\tOK\t\n GPU1\tOK\tX\t\n"


@pytest.fixture
def topo(monkeypatch):
    """fake(links, peer): what `nvidia-smi topo -m` and `nvidia-smi topo -p2p r` print."""
    def fake(links, peer):
        def run(cmd, **kwargs):
            assert cmd[:2] == ["nvidia-smi", "topo"]
            out = links if cmd[2:] == ["-m"] else peer if cmd[2:] == ["-p2p", "r"] else ""
            return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")
        monkeypatch.setattr(launch.subprocess, "run", run)
    return fake


@pytest.mark.parametrize("links, peer, count, expected", [
    (TOPO_NVLINK, P2P_OK_4, 4, True),      # NVLink (H100 SXM): direct
    (TOPO_NVLINK, P2P_OK_4, 2, True),      # NUM_GPUS=2 of them
    (TOPO_PIX, P2P_OK_2, 2, True),         # one PCIe switch, peer access on
    (TOPO_PHB, P2P_GNS_2, 2, False),       # through the CPU, no peer access (e.g. two RTX 5090)
    (TOPO_PIX, P2P_GNS_2, 2, False),       # a switch, but peer access off
    (TOPO_PHB, P2P_OK_2, 2, False),        # peer access, but beyond NCCL's default P2P level
    (TOPO_NVLINK, P2P_OK_4, 8, None),      # fewer GPUs listed than asked: cannot tell
    ("", "", 2, None),                     # nvidia-smi printed nothing
])
def test_gpus_peer_to_peer(topo, links, peer, count, expected):
    topo(links, peer)
    assert launch.gpus_peer_to_peer(count) is expected


@pytest.mark.parametrize("processes, cuda, shm_free, direct, expected, shm_off", [
    (8, True, 64 * MB, True, 8, True),        # Docker's default /dev/shm, 8 NVLinked GPUs
    (4, True, 64 * MB, False, 1, False),      # 4 GPUs without peer-to-peer access: one GPU
    (4, True, 64 * MB, None, 1, False),       # nvidia-smi cannot tell: one GPU
    (2, True, 900 * MB, True, 2, True),
    (2, True, 16 * 1024 * MB, False, 2, False),   # --shm-size=16g: nothing to do
    (1, True, 64 * MB, False, 1, False),      # one GPU: no NCCL
    (2, False, 64 * MB, False, 2, False),     # CPU processes: gloo, no NCCL
    (2, True, None, False, 2, False),         # no /dev/shm at all
])
def test_small_shm_plan(processes, cuda, shm_free, direct, expected, shm_off):
    env = {}
    asked = []
    num, line = launch.small_shm_plan(processes, cuda, shm_free, lambda: asked.append(1) or direct, env)
    assert num == expected
    assert (env == {"NCCL_SHM_DISABLE": "1"}) == shm_off
    changed = shm_off or num != processes
    assert (line is not None) == changed
    if changed:
        assert line.startswith(f"warning: /dev/shm has {shm_free // MB} MB free")
        assert "--shm-size=16g" in line and "--ipc=host" in line and "\n" not in line
        assert ("NCCL_SHM_DISABLE=1" in line) == shm_off
        assert (f"runs on 1 GPU instead of {processes}" in line) == (num == 1)
    else:
        assert asked == []                    # the topology is read only where it matters


def test_small_shm_plan_leaves_a_users_nccl_setting_alone():
    env = {"NCCL_SHM_DISABLE": "0"}
    assert launch.small_shm_plan(8, True, 64 * MB, lambda: False, env) == (8, None)
    assert env == {"NCCL_SHM_DISABLE": "0"}


def test_several_nvlinked_gpus_with_a_small_dev_shm_launch_with_nccl_shm_off_and_say_so_once(
        monkeypatch, capsys, topo, no_nccl_shm_setting):
    # 4 usable NVLinked GPUs, Docker's 64 MB /dev/shm: 4 processes start with NCCL_SHM_DISABLE=1
    monkeypatch.setattr(launch, "plan_processes", lambda: 4)
    monkeypatch.setattr(launch, "shm_free_bytes", lambda: 64 * MB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    topo(TOPO_NVLINK, P2P_OK_4)
    started = {}

    def fake_launch(args):
        started.update(processes=args.num_processes, nccl_shm=os.environ.get("NCCL_SHM_DISABLE"))
    import accelerate.commands.launch as accelerate_launch
    monkeypatch.setattr(accelerate_launch, "launch_command", fake_launch)
    try:
        assert launch.main(["train", "/data/train", "/outputs"]) == 0
    finally:
        os.environ.pop("NCCL_SHM_DISABLE", None)
    assert started == {"processes": 4, "nccl_shm": "1"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: /dev/shm has 64 MB free")


def test_gpus_without_peer_access_and_a_small_dev_shm_train_in_one_process(monkeypatch, capsys, topo,
                                                                           no_nccl_shm_setting):
    monkeypatch.setattr(launch, "plan_processes", lambda: 2)
    monkeypatch.setattr(launch, "shm_free_bytes", lambda: 64 * MB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    topo(TOPO_PHB, P2P_GNS_2)
    monkeypatch.setattr(launch.os, "execv", _execv)
    with pytest.raises(Exec) as ran:
        launch.main(["train", "/data/train", "/outputs"])
    assert ran.value.args[0] == [sys.executable, "-m", "app", "train", "/data/train", "/outputs"]  # no launcher
    assert "NCCL_SHM_DISABLE" not in os.environ
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs on 1 GPU instead of 2" in err[0]


def _fake_nvidia_smi(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncase "$1" in -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)";;\n'
                    '*) echo "535.183.01";; esac\n')
    fake.chmod(0o755)
    return fake.parent


def test_run_infer_refuses_gpus_that_torch_cannot_use(tmp_path):
    # nvidia-smi lists a GPU, torch (here: no CUDA) cannot use it: the same message as training,
    # before any work, instead of hours of inference on the CPU
    env = app_env(PATH=f"{_fake_nvidia_smi(tmp_path)}:{app_env()['PATH']}")
    env.pop("NUM_GPUS", None)
    run = subprocess.run([str(ROOT / "run_infer.sh"), str(tmp_path), str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1
    assert "nvidia-smi lists 1 GPU(s) (driver 535.183.01) but torch cannot use CUDA" in run.stderr
    assert "NUM_GPUS=0" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_infer_runs_the_program_in_one_process_unless_its_gpus_are_unusable(monkeypatch, gpus):
    monkeypatch.setattr(launch.os, "execv", _execv)
    program = [sys.executable, "-m", "app", "infer", "/data/test", "/outputs"]
    gpus(8, 8)
    monkeypatch.delenv("NUM_GPUS", raising=False)
    with pytest.raises(Exec) as ran:
        launch.main(["infer", "/data/test", "/outputs"])
    assert ran.value.args[0] == program
    gpus(8, 0)                                          # listed by nvidia-smi, unusable by torch
    with pytest.raises(SystemExit, match="but torch cannot use CUDA"):
        launch.main(["infer", "/data/test", "/outputs"])
    monkeypatch.setenv("NUM_GPUS", "0")                 # the CPU, on purpose
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")     # restored after the test
    with pytest.raises(Exec) as ran:
        launch.main(["infer", "/data/test", "/outputs"])
    assert ran.value.args[0] == program
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""     # torch in the program sees no GPU either


def test_a_settings_mistake_is_said_once_before_any_process_starts(monkeypatch, capsys):
    def must_not_run(*a, **k):
        raise AssertionError("processes planned for a command whose settings are wrong")
    monkeypatch.setattr(launch, "plan_processes", must_not_run)
    monkeypatch.setattr(launch, "usable_gpus", must_not_run)
    assert launch.main(["train", "/data/train", "/outputs", "--set", "finetune.lr=fast"]) == 1
    assert launch.main(["infer", "/data/test", "/outputs", "--set", "infer.tau=-"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith('error: finetune.lr="fast": expected')
    assert err[1].startswith("error: infer.tau=")


def test_ctrl_c_of_several_processes_ends_with_the_signals_status_not_a_traceback(monkeypatch, capsys):
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    monkeypatch.setattr(launch, "plan_processes", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def interrupted(args):
        raise SignalException("Process got signal: 2", sigval=signal.SIGINT)
    import accelerate.commands.launch as accelerate_launch
    monkeypatch.setattr(accelerate_launch, "launch_command", interrupted)
    assert launch.main(["train", "/data/train", "/outputs"]) == 130
    assert "Traceback" not in capsys.readouterr().err
