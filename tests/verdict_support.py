"""Predictions with chosen probabilities, for verdict tests."""

from __future__ import annotations

from sorter.domain import ALL_LABELS, Prediction


def prediction_of(**values: float) -> Prediction:
    """A prediction whose probabilities are ``values`` by label name (0 for the others)."""
    probabilities = {label: values.get(label.value, 0.0) for label in ALL_LABELS}
    ranked = sorted(probabilities.items(), key=lambda kv: kv[1], reverse=True)
    return Prediction(ranked[0][0], ranked[0][1], ranked[1][0], ranked[1][1], probabilities)
