"""Label metrics of eval.py against hand-computed numbers (DESIGN section 11)."""

import math

import numpy as np
import pytest

from eval import (accuracy, confusion_matrix, format_confusion_matrix, format_table, macro_f1,
                  per_class_prf, summarize_predictions)


# gold 0: predicted 0, 0, 1            -> row [2, 1, 0 | 0]
# gold 1: predicted 1, None (invalid)  -> row [0, 1, 0 | 1]
# gold 2: predicted 2, 0, -1 (invalid) -> row [1, 0, 1 | 1]
GOLD = [0, 0, 0, 1, 1, 2, 2, 2]
PRED = [0, 0, 1, 1, None, 2, 0, -1]


def test_confusion_matrix_by_hand_with_invalid_column():
    cm = confusion_matrix(GOLD, PRED, 3)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 1]]
    assert cm.shape == (3, 4) and cm.sum() == len(GOLD)


def test_metrics_by_hand():
    cm = confusion_matrix(GOLD, PRED, 3)
    assert accuracy(GOLD, PRED) == 4 / 8  # 2 + 1 + 1 on the diagonal; both invalid are wrong
    prf = per_class_prf(cm)
    # predicted counts per class (invalid excluded): 3, 2, 1; gold counts (invalid included): 3, 2, 3
    np.testing.assert_allclose(prf["precision"], [2 / 3, 1 / 2, 1 / 1])
    np.testing.assert_allclose(prf["recall"], [2 / 3, 1 / 2, 1 / 3])
    # f1 = 2tp / (2tp + fp + fn): 4/(4+1+1), 2/(2+1+1), 2/(2+0+2)
    np.testing.assert_allclose(prf["f1"], [2 / 3, 1 / 2, 1 / 2])
    assert prf["support"].tolist() == [3, 2, 3]
    assert macro_f1(cm) == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)  # 5/9


def test_f1_equals_harmonic_mean_of_precision_and_recall():
    prf = per_class_prf(confusion_matrix(GOLD, PRED, 3))
    p, r = prf["precision"], prf["recall"]
    np.testing.assert_allclose(prf["f1"], 2 * p * r / (p + r))


def test_class_never_predicted_scores_zero():
    # gold [0, 1, 2, 2], pred [0, 1, 1, 1]: class 2 is never predicted
    cm = confusion_matrix([0, 1, 2, 2], [0, 1, 1, 1], 3)
    assert cm.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]]
    prf = per_class_prf(cm)
    np.testing.assert_allclose(prf["precision"], [1, 1 / 3, 0])  # class 2: 0/0 -> 0
    np.testing.assert_allclose(prf["recall"], [1, 1, 0])
    np.testing.assert_allclose(prf["f1"], [1, 2 / (2 + 2 + 0), 0])
    assert macro_f1(cm) == pytest.approx((1 + 0.5 + 0) / 3)


def test_class_absent_from_gold_and_pred_counts_zero_in_macro_f1():
    cm = confusion_matrix([0, 1], [0, 1], 3)
    assert accuracy([0, 1], [0, 1]) == 1.0
    assert macro_f1(cm) == pytest.approx(2 / 3)  # mean over all K classes, class 2 has F1 0


def test_invalid_predictions_count_as_wrong():
    cm = confusion_matrix([0, 1], [0, None], 2)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert accuracy([0, 1], [0, None]) == 0.5
    prf = per_class_prf(cm)
    np.testing.assert_allclose(prf["precision"], [1, 0])  # no false positive from the invalid one
    np.testing.assert_allclose(prf["recall"], [1, 0])
    assert macro_f1(cm) == pytest.approx(0.5)
    all_invalid = summarize_predictions([0, 1, 1], [None, -1, None], 2)
    assert all_invalid["accuracy"] == 0 and all_invalid["macro_f1"] == 0 and all_invalid["invalid_rate"] == 1


def test_perfect_predictions():
    gold = [0, 1, 2, 3, 3]
    cm = confusion_matrix(gold, gold, 4)
    assert cm.tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 2, 0]]
    assert accuracy(gold, gold) == 1.0 and macro_f1(cm) == 1.0
    prf = per_class_prf(cm)
    assert prf["precision"].tolist() == [1, 1, 1, 1] and prf["recall"].tolist() == [1, 1, 1, 1]


def test_numpy_inputs_give_the_same_matrix():
    cm = confusion_matrix(np.array(GOLD), np.array([-1 if p is None else p for p in PRED]), 3)
    assert cm.tolist() == confusion_matrix(GOLD, PRED, 3).tolist()


def test_bad_inputs_name_the_item():
    with pytest.raises(ValueError, match=r"gold\[1\] = 4"):
        confusion_matrix([0, 4], [0, 0], 4)
    with pytest.raises(ValueError, match=r"pred\[0\] = 7"):
        confusion_matrix([0], [7], 4)
    with pytest.raises(ValueError, match="gold has 2 items, pred has 1"):
        confusion_matrix([0, 1], [0], 4)
    assert math.isnan(accuracy([], []))


def test_summarize_predictions():
    summary = summarize_predictions(GOLD, PRED, 3, ["irrelevant", "mismatch", "related"])
    assert summary["n"] == 8
    assert summary["accuracy"] == 0.5
    assert summary["macro_f1"] == pytest.approx(5 / 9)
    assert summary["invalid_rate"] == 2 / 8
    assert summary["per_class"]["related"] == {"precision": 1.0, "recall": pytest.approx(1 / 3),
                                               "f1": 0.5, "support": 3}
    assert summary["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 1]]
    assert summary["confusion_columns"] == ["irrelevant", "mismatch", "related", "invalid"]
    with pytest.raises(ValueError, match="2 label names for 3 classes"):
        summarize_predictions(GOLD, PRED, 3, ["a", "b"])


def test_format_table_markdown():
    rows = [{"run": "grpo", "acc": 0.5, "n": 8}, {"run": "graph|x", "acc": 0.75}]
    assert format_table(rows, ["run", "acc", "n"]) == "\n".join([
        "| run      |   acc |   n |",
        "| -------- | ----: | --: |",
        "| grpo     | 0.500 |   8 |",
        "| graph\\|x | 0.750 |   - |",
    ])


def test_format_confusion_matrix():
    cm = confusion_matrix([0, 1, 1], [0, 1, None], 2)
    assert format_confusion_matrix(cm, ["no", "yes"]) == "\n".join([
        "| gold \\ pred |  no | yes | invalid |",  # a column is at least 3 wide
        "| ----------- | --: | --: | ------: |",
        "| no          |   1 |   0 |       0 |",
        "| yes         |   0 |   1 |       1 |",
    ])
