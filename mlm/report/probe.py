"""The downstream probe's fit: a cross-validated linear model on the encoder's features, by scikit-learn (the
`probe` extra). Every row is predicted once, by the model fitted on the other folds; the figures are computed on
those out-of-fold predictions. The folds are fixed by the seed, so the same features give the same figures.

Classes: logistic regression on standardised features; accuracy and macro-F1. Numbers: ridge regression with its
penalty chosen by efficient leave-one-out inside each training fold; RMSE and Pearson's r."""

from __future__ import annotations

import math

import numpy as np

from mlm.common.cli import UserError
from mlm.data.probe import CLASSIFICATION

# The figure that picks best/ under --metric_for_best_model probe, and whether higher is better.
SELECTION = {"classification": ("macro_f1", True), "regression": ("rmse", False)}
FIGURE_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "rmse": "RMSE", "pearson": "Pearson r"}
RIDGE_ALPHAS = np.logspace(-2, 4, 13)


def require_sklearn() -> None:
    """A one-line error, before any work, when the probe's library is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UserError(
            "--probe_file needs scikit-learn, which is not installed; pip install 'mlm-ddp[probe]' "
            "(or pip install scikit-learn)"
        ) from None


def fit_probe(features: np.ndarray, targets: np.ndarray, task: str, folds: int, seed: int) -> dict[str, float]:
    """Out-of-fold figures of a linear probe on features [N, H] for targets [N]."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.astype(np.float64)
    if task == CLASSIFICATION:
        y = targets.astype(np.int64)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        predicted = cross_val_predict(model, x, y, cv=split)
        return {
            "accuracy": float(accuracy_score(y, predicted)),
            "macro_f1": float(f1_score(y, predicted, average="macro")),
        }
    y = targets.astype(np.float64)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    predicted = cross_val_predict(model, x, y, cv=KFold(n_splits=folds, shuffle=True, random_state=seed))
    rmse = math.sqrt(float(np.mean((predicted - y) ** 2)))
    pearson = float(np.corrcoef(predicted, y)[0, 1]) if np.std(predicted) > 0 else 0.0
    return {"rmse": rmse, "pearson": pearson}


def describe(figures: dict[str, float]) -> str:
    """ "accuracy 0.8125 macro-F1 0.8010" or "RMSE 0.512 Pearson r 0.731"."""
    return " ".join(f"{FIGURE_NAMES[k]} {v:.4f}" for k, v in figures.items() if k in FIGURE_NAMES)


def selection_value(figures: dict[str, float], task: str) -> tuple[float, bool]:
    """(the figure that picks best/, whether higher is better)."""
    name, higher = SELECTION[task]
    return figures[name], higher
