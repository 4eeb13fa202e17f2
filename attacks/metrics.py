"""How well an attack separates members from non-members: ROC, AUC, advantage, TPR at low FPR.

Convention: a higher score means "more likely a member" (negate losses first). Every figure comes
from scikit-learn's ROC curve over all thresholds; nothing is interpolated. TPR at a target FPR f is
the best TPR of any threshold whose false positives number at most floor(f · n_nonmembers), and that
number is reported beside it: with 1000 non-members, "TPR at 0.1% FPR" rests on at most one false
positive, and a reader should see that (Carlini et al. 2022, "Membership inference attacks from
first principles", argue for these low-FPR figures and against reading AUC alone).

This module uses numpy and scikit-learn only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from attacks.audit import as_scores

DEFAULT_FPR_TARGETS = (0.001, 0.01, 0.1)


@dataclasses.dataclass(frozen=True)
class AttackMetrics:
    """Membership-inference metrics of one attack; see :func:`evaluate_attack`.

    Attributes:
      auc: area under the ROC curve (ties count one half).
      balanced_accuracy: best (TPR + TNR)/2 over thresholds, = (1 + advantage)/2.
      advantage: best TPR − FPR over thresholds (Yeom et al. 2018); ≤ e^ε − 1 under ε-DP.
      tpr_at_fpr: target FPR f → the best TPR with at most floor(f · n_nonmembers) false positives.
      false_positives_at_fpr: f → false positives at that operating point (the fewest with which
        that TPR is reached): the negatives the TPR figure rests on.
      max_false_positives_at_fpr: f → floor(f · n_nonmembers), the false positives f allows; 0
        means the figure is really a TPR at FPR 0.
      n_members, n_nonmembers: sample sizes.
      fpr, tpr, thresholds: the full ROC curve (``thresholds[0]`` is +inf), left out of
        :meth:`to_dict` unless asked for.
    """

    auc: float
    balanced_accuracy: float
    advantage: float
    tpr_at_fpr: dict[float, float]
    false_positives_at_fpr: dict[float, int]
    max_false_positives_at_fpr: dict[float, int]
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray = dataclasses.field(repr=False, compare=False)
    tpr: np.ndarray = dataclasses.field(repr=False, compare=False)
    thresholds: np.ndarray = dataclasses.field(repr=False, compare=False)

    def to_dict(self, *, include_curve: bool = False) -> dict[str, Any]:
        """Plain floats, ints, lists and string keys, ready for ``json.dumps``.

        FPR targets become string keys (``"0.001"``). With ``include_curve`` the ROC arrays are
        added as lists; the infinite first threshold becomes None (JSON has no Infinity).
        """
        out: dict[str, Any] = {
            "auc": float(self.auc),
            "balanced_accuracy": float(self.balanced_accuracy),
            "advantage": float(self.advantage),
            "tpr_at_fpr": {fpr_key(f): float(v) for f, v in self.tpr_at_fpr.items()},
            "false_positives_at_fpr": {
                fpr_key(f): int(v) for f, v in self.false_positives_at_fpr.items()
            },
            "max_false_positives_at_fpr": {
                fpr_key(f): int(v) for f, v in self.max_false_positives_at_fpr.items()
            },
            "n_members": int(self.n_members),
            "n_nonmembers": int(self.n_nonmembers),
        }
        if include_curve:
            out["fpr"] = [float(x) for x in self.fpr]
            out["tpr"] = [float(x) for x in self.tpr]
            out["thresholds"] = [float(x) if math.isfinite(x) else None for x in self.thresholds]
        return out


def fpr_key(f: float) -> str:
    """The JSON key of a false-positive rate in ``tpr_at_fpr`` and its siblings.

    >>> fpr_key(0.01)
    '0.01'
    """
    return repr(float(f))


def _check_fpr_targets(fpr_targets: Sequence[float]) -> tuple[float, ...]:
    try:
        targets = tuple(float(f) for f in fpr_targets)
    except (TypeError, ValueError):
        raise ValueError(
            f"fpr_targets must be a non-empty sequence of numbers in (0, 1), got {fpr_targets!r}."
        ) from None
    if not targets:
        raise ValueError("fpr_targets must be a non-empty sequence of numbers in (0, 1), got ().")
    for f in targets:
        if not 0 < f < 1:
            raise ValueError(f"fpr_targets must be in (0, 1), got {f}.")
    return targets


def evaluate_attack(
    member_scores: Any,
    nonmember_scores: Any,
    fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS,
) -> AttackMetrics:
    """Metrics of an attack from its scores on members and non-members (higher = member).

    >>> m = evaluate_attack([0.9, 0.8, 0.4], [0.1, 0.5, 0.3, 0.2])
    >>> round(m.auc, 4), m.advantage, round(m.tpr_at_fpr[0.1], 4), m.max_false_positives_at_fpr[0.1]
    (0.9167, 0.75, 0.6667, 0)
    """
    members = as_scores(member_scores, "member_scores")
    nonmembers = as_scores(nonmember_scores, "nonmember_scores")
    targets = _check_fpr_targets(fpr_targets)

    labels = np.concatenate([np.ones(members.size, bool), np.zeros(nonmembers.size, bool)])
    scores = np.concatenate([members, nonmembers])
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    auc = float(roc_auc_score(labels, scores))
    # Integer false-positive counts: comparing counts, not rates, avoids 0.29·100 = 28.999… traps.
    fp_counts = np.rint(fpr * nonmembers.size).astype(np.int64)
    advantage = float(np.max(tpr - fpr))

    tpr_at, fp_at, budget_at = {}, {}, {}
    for f in targets:
        budget = math.floor(f * nonmembers.size + 1e-9)
        best = int(np.flatnonzero(fp_counts <= budget)[-1])  # the curve ascends: last fit is best
        i = int(np.searchsorted(tpr, tpr[best], side="left"))  # same TPR, fewest false positives
        tpr_at[f], fp_at[f], budget_at[f] = float(tpr[i]), int(fp_counts[i]), budget

    for array in (fpr, tpr, thresholds):
        array.setflags(write=False)
    return AttackMetrics(
        auc=auc,
        balanced_accuracy=0.5 * (1.0 + advantage),
        advantage=advantage,
        tpr_at_fpr=tpr_at,
        false_positives_at_fpr=fp_at,
        max_false_positives_at_fpr=budget_at,
        n_members=int(members.size),
        n_nonmembers=int(nonmembers.size),
        fpr=fpr,
        tpr=tpr,
        thresholds=thresholds,
    )
