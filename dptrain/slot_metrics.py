"""Slot-filling metrics: entity-level precision/recall/F1 with exact span match (the CoNLL-2000
convention that ``seqeval`` implements), per slot type, intent accuracy and frame accuracy.

A predicted slot counts only if its type, first word and last word all equal a gold slot's.
Predicted ``I-`` tags that continue nothing open a slot (as in conlleval). Frame accuracy: the
fraction of utterances whose intent and whole set of slots are exactly right — what a voice
assistant needs to act correctly. seqeval itself (last release 2020, source-only) is not a
dependency: span extraction is also what the data checks and the slot-value secrets use
(:func:`dptrain.slot_data.spans`), and the F1 on top is a few lines.

>>> r = slot_report([["B-time", "I-time", "O"]], [["B-time", "O", "O"]])
>>> r["precision"], r["recall"], r["f1"]
(0.0, 0.0, 0.0)
"""

from __future__ import annotations

from typing import Sequence

from .slot_data import spans


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "support": n_gold}


def slot_report(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                gold_intents: Sequence[str] | None = None,
                predicted_intents: Sequence[str] | None = None) -> dict:
    """Micro entity-level P/R/F1, the same per slot type, and (with intents) intent and frame
    accuracy, over utterances given as BIO tag sequences."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold and {len(predicted)} predicted utterances.")
    tp = n_pred = n_gold = 0
    by_type: dict[str, list[int]] = {}
    frames = 0
    for i, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"utterance {i}: {len(g)} gold and {len(p)} predicted tags.")
        gs, ps = set(spans(g)), set(spans(p))
        tp += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
        for kind, *_ in gs | ps:
            by_type.setdefault(kind, [0, 0, 0])
        for s in gs & ps:
            by_type[s[0]][0] += 1
        for s in ps:
            by_type[s[0]][1] += 1
        for s in gs:
            by_type[s[0]][2] += 1
        intent_ok = gold_intents is None or gold_intents[i] == predicted_intents[i]
        frames += int(gs == ps and intent_ok)
    report = {**_prf(tp, n_pred, n_gold),
              "per_type": {k: _prf(*v) for k, v in sorted(by_type.items())}}
    if gold_intents is not None:
        report["intent_accuracy"] = (sum(a == b for a, b in zip(gold_intents, predicted_intents))
                                     / max(len(gold_intents), 1))
    report["frame_accuracy"] = frames / max(len(gold), 1)
    return report
