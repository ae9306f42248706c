import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach a hub
os.environ.pop("CLIP_WEIGHTS_FILE", None)

from tests.fixtures import make_dataset, save_proxy_format  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed at its first mixed precision (a second
    Accelerator with another one is refused): every test starts and leaves with none, as a new
    `python -m app` process does."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The generated dataset with oddities + a tiny random backbone in the proxy format."""
    root = tmp_path_factory.mktemp("tiny")
    make_dataset(root)
    save_proxy_format(root / "tiny_backbone.pt")
    return root


def app_env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


# Small and fast everywhere: the tiny model trains in seconds.
FAST = ["--set", "warmup.epochs=20", "--set", "finetune.batch_size=8", "--set", "finetune.epochs=2",
        "--set", "input.image_size=64",     # 2x the tiny tower's 32 px: resampled position embeddings
        "--num-workers", "0", "--set", "features.batch_size=16"]


def tiny_train_args(tiny, out, *extra) -> list[str]:
    """`python -m app train` on the tiny set with its random backbone, at the FAST budgets."""
    return ["train", str(tiny / "train"), str(out), "--weights", str(tiny / "tiny_backbone.pt"),
            "--allow-nonstandard-backbone", *FAST, *map(str, extra)]