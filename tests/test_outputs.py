"""Outputs that cannot be written: found at the start (unwritable OUT_DIR), or, when the disk fills
mid-run, a clear error naming the file and never a truncated file left as if complete."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from app.backbone import Backbone
from app.model import Classifier, log_class_prior, save_model_file
from app.outputs import OutputError, atomic_write
from tests.conftest import ROOT, app_env
from tests.fixtures import TINY, tiny_visual

CLASSES = ["0000", "0001", "0002"]


def save_tiny_model(path) -> None:
    """A loadable model file around a tiny random tower, without training."""
    visual = tiny_visual()
    backbone = Backbone(visual=visual, config=dict(TINY, act="gelu"), arch="tiny test ViT", sha256="0" * 64,
                        source="tests")
    model = Classifier(visual, len(CLASSES), log_class_prior(torch.tensor([5.0, 3.0, 1.0])))
    save_model_file(path, model, backbone, CLASSES, {"test": True}, "test")


# Runs in a child process whose file-size limit (RLIMIT_FSIZE) makes writes past LIMIT bytes fail with
# EFBIG, as a full disk fails them with ENOSPC; Python already ignores SIGXFSZ, said again here.
FULL_DISK_CHILD = """
import json, resource, signal, sys
from pathlib import Path
import pandas as pd
from app.infer import write_submission
from app.outputs import OutputError
from tests.test_outputs import save_tiny_model

limit, paths = int(sys.argv[1]), map(Path, sys.argv[2:])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
errors = []
for path in paths:
    try:
        if path.name == "model.pt":
            save_tiny_model(path)
        else:
            names = [f"test_image_{i:05d}.jpg" for i in range(10000)]
            write_submission(pd.DataFrame({"image": names, "label": "0001"}), path)
        errors.append(None)
    except OutputError as e:
        errors.append(str(e))
print(json.dumps(errors))
"""


def test_a_full_disk_leaves_no_partial_file_and_names_the_path(tmp_path):
    """model.pt and submission.csv, each written where there was none and over a complete one."""
    limit = 64 * 1024             # the tiny model file is ~0.5 MB, the 10,000-row CSV ~0.2 MB
    old = b"an earlier, complete file\n"
    paths = []
    for name in ("model.pt", "submission.csv"):
        for case in ("fresh", "over_old"):
            (tmp_path / case / name).parent.mkdir(exist_ok=True)
            paths.append(tmp_path / case / name)
            if case == "over_old":
                paths[-1].write_bytes(old)
    run = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(limit), *map(str, paths)],
                         env=app_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for path, error in zip(paths, json.loads(run.stdout.splitlines()[-1])):
        assert error is not None, f"writing {path} past the size limit did not fail"
        assert str(path) in error and "no space" in error, error
        assert not list(path.parent.glob("*.tmp")), "temp file left behind"
        if path.parent.name == "fresh":
            assert not path.exists() and "nothing was written there" in error     # no truncated file
        else:
            assert path.read_bytes() == old and "previous file there is unchanged" in error   # not clobbered


def test_atomic_write_is_whole_or_nothing(tmp_path):
    path = tmp_path / "report.json"
    with atomic_write(path) as f:
        f.write("first\n")
    assert path.read_text() == "first\n"
    with pytest.raises(RuntimeError, match="serialiser bug"):     # not an OS error: passed on as is
        with atomic_write(path) as f:
            f.write("half of the second")
            raise RuntimeError("serialiser bug")
    assert path.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'missing' / 'x.json'}"):
        with atomic_write(tmp_path / "missing" / "x.json") as f:
            f.write("{}")


# `python -m app ARGS...`, as the user DEMOTE_TO when it is given: the program is imported first, as
# the current user, so that a root-only Python installation (CI's venv lies in a 0700 mktemp folder)
# still runs after the switch. Loading the settings once imports what pydantic imports lazily.
AS_USER_CHILD = """
import os, sys
import app.__main__, app.infer, app.config
app.config.load_config(None)
uid = int(os.environ.get("DEMOTE_TO", "-1"))
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
sys.exit(app.__main__.main(sys.argv[1:]))
"""


def test_unwritable_out_dir_stops_infer_before_anything_else(tmp_path):
    """A root-owned /outputs mounted into a non-root container: the message says what to do, and
    comes first (the test folder and the model do not even exist here)."""
    out = tempfile.mkdtemp(prefix="root-owned-outputs-")        # in /tmp, which every user can reach
    try:
        if os.geteuid() == 0:        # root may write anywhere: run the command as nobody instead
            os.chmod(out, 0o755)
            uid, env = 65534, app_env(DEMOTE_TO="65534")
        else:
            os.chmod(out, 0o555)
            uid, env = os.getuid(), app_env()
        run = subprocess.run([sys.executable, "-c", AS_USER_CHILD, "infer", str(tmp_path / "no-such-test-dir"),
                              out], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(out, 0o755)
        shutil.rmtree(out)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"error: output folder {out}" in run.stderr and f"uid {uid}" in run.stderr, run.stderr
    assert 'docker run --user "$(id -u):$(id -g)"' in run.stderr and "chmod" in run.stderr
    assert "Traceback" not in run.stderr and "test folder" not in run.stderr
