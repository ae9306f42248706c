"""Logit adjustment / balanced prior, and the submission CSV."""
import numpy as np
import pandas as pd
import pytest
import torch

from app.infer import validate_submission, write_submission
from app.model import Classifier, log_class_prior
from app.warmup import train_head
from tests.fixtures import tiny_visual


def test_balanced_logits_subtract_tau_log_prior():
    counts = torch.tensor([100.0, 10.0, 1.0, 0.0])
    lp = log_class_prior(counts)
    assert torch.isfinite(lp).all() and torch.allclose(lp.exp().sum(), torch.tensor(1.0))
    model = Classifier(tiny_visual(), 4, lp).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = model(x)
        assert torch.allclose(model.balanced_logits(x, 0.0), raw)
        assert torch.allclose(model.balanced_logits(x, 1.0), raw - lp)
        assert torch.allclose(model.balanced_logits(x, 0.5), raw - 0.5 * lp)


def test_logit_adjusted_head_is_better_on_a_balanced_test():
    """Long-tailed training data, balanced test: tau=1 must beat predicting the training prior."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 8)) * 0.6
    sizes = [400, 40, 10]
    x = np.concatenate([rng.normal(means[c], 1.0, size=(n, 8)) for c, n in enumerate(sizes)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    lp = log_class_prior(torch.tensor(np.bincount(y), dtype=torch.float64))
    w, b, hist = train_head(x.astype(np.float32), y, np.ones(len(y)), lp,
                            dict(epochs=100, batch_size=128, lr=0.05, weight_decay=0.0), seed=0,
                            show_progress=False)
    assert hist[-1] < hist[0]
    xt = np.concatenate([rng.normal(means[c], 1.0, size=(500, 8)) for c in range(3)])
    yt = np.repeat(np.arange(3), 500)
    balanced = torch.from_numpy(xt).float() @ w.T + b          # tau = 1
    train_dist = balanced + lp                                 # tau = 0
    acc = lambda z: (z.argmax(1).numpy() == yt).mean()  # noqa: E731
    assert acc(balanced) > acc(train_dist) + 0.05


def test_submission_form_and_checks(tmp_path):
    table = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "label": ["0001", "0000"]})
    validate_submission(table, ["a.jpg", "b.jpg"], ["0000", "0001"])
    path = tmp_path / "submission.csv"
    write_submission(table, path)
    assert path.read_text() == "a.jpg, 0001\nb.jpg, 0000\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]   # no temp file left
    with pytest.raises(ValueError, match="rows"):
        validate_submission(table, ["a.jpg", "b.jpg", "c.jpg"], ["0000", "0001"])
    with pytest.raises(ValueError, match="unknown labels"):
        validate_submission(table.assign(label=["0001", "0009"]), ["a.jpg", "b.jpg"], ["0000", "0001"])
    dup = pd.DataFrame({"image": ["a.jpg", "a.jpg"], "label": ["0001", "0000"]})
    with pytest.raises(ValueError):
        validate_submission(dup, ["a.jpg", "a.jpg"], ["0000", "0001"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("old, 0000\n")

    class Boom(pd.DataFrame):
        def __getitem__(self, key):
            if key == "label":
                raise RuntimeError("disk full")
            return super().__getitem__(key)
    with pytest.raises(RuntimeError):
        write_submission(Boom({"image": ["a.jpg"], "label": ["0001"]}), path)
    assert path.read_text() == "old, 0000\n"
