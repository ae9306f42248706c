"""docker/entrypoint.sh: whom the image's command runs as, given the output folder's owner.

The script runs here as it runs in the image, with `id`, `stat` and `setpriv` replaced by fakes on
PATH (the facts of a container: started as root or with --user, a host folder owned by root or by a
user) that record what they were asked; the command is a fake run_train.sh that prints how it ran."""
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


@pytest.fixture
def fakes(tmp_path):
    """A bin folder of fakes; returns run(args, uid=, owner=) -> (stdout lines, stat's paths)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "stat.log"
    scripts = {
        "id": '#!/bin/sh\n[ "$1" = -u ] && echo "$FAKE_UID"\n',
        "stat": f'#!/bin/sh\nfor a; do last="$a"; done\necho "$last" >> {log}\necho "$FAKE_OWNER"\n',
        # the real setpriv changes identity; the fake says what it was asked, then runs the command
        "setpriv": '#!/bin/sh\necho "setpriv $*"\nwhile [ "$1" != -- ]; do shift; done\nshift\nexec "$@"\n',
        "run_train.sh": '#!/bin/sh\necho "ran run_train.sh $* HOME=$HOME"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(args, uid, owner="0:0"):
        log.unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_UID=str(uid), FAKE_OWNER=owner,
                   HOME="/root")
        out = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines(), (log.read_text().split() if log.exists() else [])
    return run


def test_started_as_root_on_a_root_owned_folder_the_command_runs_as_root(fakes, tmp_path):
    lines, asked = fakes(["run_train.sh", "/data/train", str(tmp_path)], uid=0, owner="0:0")
    assert lines == [f"ran run_train.sh /data/train {tmp_path} HOME=/root"]      # no setpriv
    assert asked == [str(tmp_path)]


def test_started_as_root_on_a_users_folder_the_command_runs_as_that_user(fakes, tmp_path):
    lines, asked = fakes(["run_train.sh", "/data/train", str(tmp_path)], uid=0, owner="4321:8765")
    assert lines == [f"setpriv --reuid=4321 --regid=8765 --clear-groups -- run_train.sh /data/train {tmp_path}",
                     f"ran run_train.sh /data/train {tmp_path} HOME=/tmp"]      # uid without a passwd entry
    assert asked == [str(tmp_path)]


def test_an_output_folder_still_to_be_made_takes_its_nearest_existing_folders_owner(fakes, tmp_path):
    lines, asked = fakes(["run_train.sh", "/data/train", str(tmp_path / "run1" / "a")], uid=0, owner="1000:1000")
    assert asked == [str(tmp_path)]
    assert lines[0].startswith("setpriv --reuid=1000 --regid=1000 ")


def test_without_an_out_dir_argument_the_owner_of_outputs_decides(fakes):
    # run_train.sh TRAIN_DIR --options: OUT_DIR is /outputs (or its nearest existing folder, here)
    expected = next(str(p) for p in (Path("/outputs"), Path("/")) if p.is_dir())
    lines, asked = fakes(["run_train.sh", "/data/train", "--epochs", "1"], uid=0, owner="0:0")
    assert asked == [expected]
    assert lines == ["ran run_train.sh /data/train --epochs 1 HOME=/root"]
    _, asked = fakes(["bash", "-c", "true"], uid=0, owner="0:0")                  # any other command
    assert asked == [expected]


def test_started_with_user_the_command_runs_unchanged(fakes, tmp_path):
    lines, asked = fakes(["run_train.sh", "/data/train", str(tmp_path)], uid=1000, owner="0:0")
    assert lines == [f"ran run_train.sh /data/train {tmp_path} HOME=/root"]
    assert asked == []                                                            # nothing looked up


def test_the_image_uses_the_entrypoint_and_starts_as_root():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in dockerfile
    assert "COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh" in dockerfile
    assert not [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert "!docker/entrypoint.sh" in (ROOT / ".dockerignore").read_text().splitlines()
    assert os.access(ENTRYPOINT, os.X_OK)
