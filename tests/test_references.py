"""Training-free reference points (evaluate.references) on hand-made rankings, expected values by formula, and the
``ssnarec references`` command on a tiny dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluate.references import last_item_neighbour, popularity, train_part_counts


def test_train_part_counts_leave_out_validation_and_test_targets() -> None:
    counts = train_part_counts([np.array([0, 1, 2, 3]), np.array([1, 1, 3])], n_items=5)
    assert counts.tolist() == [1, 2, 0, 0, 0]          # [0, 1] and [1]: the last two of each are held out


def test_popularity_ranks_by_count_with_ties_against_the_target() -> None:
    counts = np.array([5.0, 3.0, 3.0, 0.0])
    targets = np.array([1, 3])
    histories = [np.array([0]), np.array([2])]
    kept = popularity(counts, targets, histories)
    # target 1 ties with item 2 and trails item 0: rank 3; target 3 trails every item: rank 4
    assert kept["N@10"].tolist() == pytest.approx([1 / math.log2(4), 1 / math.log2(5)])
    assert kept["R@10"].tolist() == [1.0, 1.0]
    excluded = popularity(counts, targets, histories, exclude_history=True)
    assert excluded["N@10"].tolist() == pytest.approx([1 / math.log2(3), 1 / math.log2(4)])


def test_last_item_neighbour_ranks_by_cosine_and_the_last_item_itself_first_unless_excluded() -> None:
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 2.0], [-1.0, 0.0]])
    targets = np.array([1, 2])
    histories = [np.array([3, 0]), np.array([2, 1])]   # last items 0 and 1
    kept = last_item_neighbour(vectors, targets, histories)
    # user 0: item 0 (cos 1) > item 1 (0.994): rank 2; user 1: item 1 (1) > item 0 (0.994) > item 2 (0.110): rank 3
    assert kept["N@10"].tolist() == pytest.approx([1 / math.log2(3), 1 / math.log2(4)])
    excluded = last_item_neighbour(vectors, targets, histories, exclude_history=True)
    # the history goes (the target stays a candidate even when it is in the history): ranks 1 and 2
    assert excluded["N@10"].tolist() == pytest.approx([1.0, 1 / math.log2(3)])
    with pytest.raises(ValueError, match="at least one item"):
        last_item_neighbour(vectors, targets, [np.array([0]), np.array([], dtype=np.int64)])
