"""bench/photo_shift.py (issue 13's train-vs-test photo check): byte copies share a fold and every
class is spread over the folds; the top-1 is class-balanced; re-weighting to the test photos'
nearest-photo cosines changes nothing when the two sets have the same cosines, and follows them
when they differ."""
import numpy as np

from bench.photo_shift import class_balanced, folds_by_hash, reweighted_to


def test_byte_copies_share_a_fold_and_classes_spread_over_the_folds():
    labels = np.repeat([0, 1, 2], [10, 7, 5])
    hashes = np.array([f"h{i}" for i in range(len(labels))], dtype=object)
    hashes[3] = hashes[12] = "copy"                        # one photo filed under classes 0 and 1
    hashes[4] = hashes[5] = "twin"                         # and one twice in class 0
    fold = folds_by_hash(hashes, labels, k=3, seed=0)
    assert fold[3] == fold[12] and fold[4] == fold[5]
    for c in range(3):
        assert len(set(fold[labels == c])) == 3            # every class in every fold
    assert np.array_equal(fold, folds_by_hash(hashes, labels, k=3, seed=0))


def test_the_top1_is_class_balanced():
    labels = np.array([0] * 9 + [1])
    right = np.array([True] * 9 + [False])
    assert class_balanced(right, labels, 3) == 0.5         # a class of 9 right and one of 1 wrong


def test_reweighting_to_the_test_cosines():
    rng = np.random.default_rng(0)
    nn = rng.uniform(0.5, 1.0, 4000)
    labels = rng.integers(0, 4, len(nn))
    right = rng.random(len(nn)) < nn                       # closer siblings: more often right
    plain = class_balanced(right, labels, 4)
    assert abs(reweighted_to(nn, rng.uniform(0.5, 1.0, 2000), right, labels, 4) - plain) < 0.02
    far = reweighted_to(nn, rng.uniform(0.5, 0.75, 2000), right, labels, 4)    # test photos farther away
    assert far < plain - 0.1 and abs(far - 0.625) < 0.03
