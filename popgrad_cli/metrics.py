"""Classification metrics computed on the device from predicted and true labels."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Return the (true class, predicted class) count matrix."""
    index = targets.long() * num_classes + predictions.long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def accuracy_and_macro_f1(confusion: Tensor) -> tuple[float, float]:
    """Return accuracy and macro F1 from a confusion matrix.

    Macro F1 averages over the classes that occur in the targets or the
    predictions, and a class with no true positives scores 0, which matches
    scikit-learn's ``f1_score(average="macro")``.
    """
    confusion = confusion.double()
    total = confusion.sum()
    if total == 0:
        return float("nan"), float("nan")
    true_positives = confusion.diagonal()
    actual = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    denominator = actual + predicted
    present = denominator > 0
    f1 = torch.where(present, 2 * true_positives / denominator.clamp(min=1), torch.zeros_like(denominator))
    accuracy = true_positives.sum() / total
    return float(accuracy), float(f1[present].mean())
