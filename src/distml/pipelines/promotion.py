"""When a candidate replaces production, and the number that decides it.

Shared by the main job's `select` (end_to_end) and the watch's `promote` (continuous): both
measure a model on the data set's fixed test split (the holdout) with `test_accuracy`, and
move `@production` only when `decide` says the candidate beats it by more than the margin.
"""

from __future__ import annotations

from typing import Any


def test_accuracy(ws: Any, model: Any, dataset: Any) -> float:
    """Accuracy of `model` (a model's ref, or the model loaded) on `dataset`'s test split, on cpu."""
    import torch

    from distml.models.artifact import load_model
    from distml.train.worker import evaluate

    if isinstance(model, str):
        model, _ = load_model(ws, model)
    return evaluate(model, dataset, torch.device("cpu"), ws)


test_accuracy.__test__ = False  # not a pytest test, whatever imports it


def decide(evaluation: dict, margin: float) -> tuple[bool, str]:
    """Promote when there is no production model, or the candidate's holdout accuracy is above
    production's by more than `margin`; the reason gives the numbers either way."""
    cand = evaluation["candidate"]["holdout"]
    if evaluation["production"] is None:
        return True, f"first model: holdout {cand:.4f}"
    prod = evaluation["production"]["holdout"]
    if cand > prod + margin:
        return True, f"holdout {cand:.4f} > production {prod:.4f} + margin {margin:g}"
    return False, f"holdout {cand:.4f} is not above production {prod:.4f} + margin {margin:g}"
