"""The downstream probe's fit: a cross-validated linear model on the encoder's features, by scikit-learn (the
`probe` extra). Every row is predicted once, by the model fitted on the other folds; the figures are computed on
those out-of-fold predictions. The folds are fixed by the seed, so the same features give the same figures, and
the model as loaded and best/ are scored on the same folds: compare() counts the folds where best/ did better.

Classes: logistic regression on standardised features; accuracy and macro-F1. Numbers: ridge regression with its
penalty chosen by efficient leave-one-out inside each training fold; RMSE and Pearson's r."""

from __future__ import annotations

import math
from typing import Any

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


def fit_probe(features: np.ndarray, targets: np.ndarray, task: str, folds: int, seed: int) -> dict[str, Any]:
    """Out-of-fold figures of a linear probe on features [N, H] for targets [N], and the figure that picks best/
    on each fold ("macro_f1_by_fold", "rmse_by_fold")."""
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
            "macro_f1_by_fold": [
                float(f1_score(y[held], predicted[held], average="macro")) for _, held in split.split(x, y)
            ],
        }
    y = targets.astype(np.float64)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    split = KFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(model, x, y, cv=split)
    pearson = float(np.corrcoef(predicted, y)[0, 1]) if np.std(predicted) > 0 else 0.0
    return {
        "rmse": _rmse(predicted, y),
        "pearson": pearson,
        "rmse_by_fold": [_rmse(predicted[held], y[held]) for _, held in split.split(x, y)],
    }


def _rmse(predicted: np.ndarray, y: np.ndarray) -> float:
    return math.sqrt(float(np.mean((predicted - y) ** 2)))


def scalars(figures: dict[str, Any]) -> dict[str, float]:
    """The figures without the per-fold lists: what W&B logs as probe/*."""
    return {k: v for k, v in figures.items() if not isinstance(v, list)}


def describe(figures: dict[str, float]) -> str:
    """ "accuracy 0.8125 macro-F1 0.8010" or "RMSE 0.512 Pearson r 0.731"."""
    return " ".join(f"{FIGURE_NAMES[k]} {v:.4f}" for k, v in figures.items() if k in FIGURE_NAMES)


def selection_value(figures: dict[str, float], task: str) -> tuple[float, bool]:
    """(the figure that picks best/, whether higher is better)."""
    name, higher = SELECTION[task]
    return figures[name], higher


def compare(base: dict[str, Any], best: dict[str, Any], task: str, best_step: int) -> str:
    """Did the adaptation help the task: best/'s figure that picks best/ against the model as loaded's, overall
    and fold by fold. "macro-F1 0.7216 as loaded -> 0.7451 at best/ (step 400), +0.0235; better in all 5 folds:
    the adaptation helped this task". Every fold better (or worse) is the verdict; a mixed count is no clear
    change, whatever the overall difference."""
    name, higher = SELECTION[task]
    before, after = base[name], best[name]
    text = f"{FIGURE_NAMES[name]} {before:.4f} as loaded -> {after:.4f} at best/ (step {best_step}), "
    if best_step == 0:
        return text + "the same model: best/ is the model as loaded, no step of training improved on it"
    folds_before, folds_after = base.get(f"{name}_by_fold"), best.get(f"{name}_by_fold")
    text += f"{after - before:+.4f}; "
    if not folds_before or not folds_after or len(folds_before) != len(folds_after):
        return text + "the model as loaded was probed before per-fold figures were kept, so no fold count"
    sign = 1.0 if higher else -1.0
    better = sum(sign * (a - b) > 0 for b, a in zip(folds_before, folds_after))
    worse = sum(sign * (a - b) < 0 for b, a in zip(folds_before, folds_after))
    n = len(folds_before)
    if better == n:
        return text + f"better in all {n} folds: the adaptation helped this task"
    if worse == n:
        return text + f"worse in all {n} folds: the adaptation hurt this task"
    return text + f"better in {better} of {n} folds: no clear change for this task"
