"""Macro F1 and accuracy against scikit-learn."""

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from popgrad_cli.metrics import accuracy_and_macro_f1, confusion_matrix


def scores(predictions, targets, num_classes):
    return accuracy_and_macro_f1(confusion_matrix(torch.tensor(predictions), torch.tensor(targets), num_classes))


@pytest.mark.parametrize("seed", range(5))
def test_random_predictions_match_sklearn(seed):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 7, (500,), generator=generator)
    predictions = torch.randint(0, 7, (500,), generator=generator)
    accuracy, f1 = scores(predictions, targets, 7)
    assert accuracy == pytest.approx(accuracy_score(targets, predictions))
    assert f1 == pytest.approx(f1_score(targets, predictions, average="macro"))


def test_class_never_predicted_scores_zero():
    targets = [0, 0, 1, 1, 2, 2]
    predictions = [0, 0, 1, 1, 1, 1]
    _, f1 = scores(predictions, targets, 3)
    assert f1 == pytest.approx(f1_score(targets, predictions, average="macro", zero_division=0))


def test_class_absent_from_both_is_ignored():
    targets = [0, 1, 1, 0]
    predictions = [0, 1, 0, 0]
    _, f1 = scores(predictions, targets, 10)
    assert f1 == pytest.approx(f1_score(targets, predictions, average="macro"))


def test_single_class_predicted_everywhere():
    targets = [0, 1, 2, 3]
    predictions = [2, 2, 2, 2]
    accuracy, f1 = scores(predictions, targets, 4)
    assert accuracy == pytest.approx(0.25)
    assert f1 == pytest.approx(f1_score(targets, predictions, average="macro", zero_division=0))


def test_empty_input_is_nan():
    accuracy, f1 = scores([], [], 3)
    assert accuracy != accuracy
    assert f1 != f1
