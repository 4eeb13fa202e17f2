"""Exposure of a planted secret (Carlini et al. 2019, "The Secret Sharer"), for classifiers.

The attacker knows a secret's prefix, its length n, the candidate set C and its label y, and
scores every candidate c ∈ Cⁿ by the model's confidence in y for the text "prefix c":
s(c) = log p_θ(y | prefix c) − log(1 − p_θ(y | prefix c)) (monotone in the probability, so the
ranking is the probability's; unlike log p it does not saturate near p = 1). The true secret's rank among all |C|ⁿ candidates (1 = the
highest score) gives its exposure

    exposure = log₂ |C|ⁿ − log₂ rank,

from 0 (the model prefers every other candidate) to log₂ |C|ⁿ (it prefers the secret over all
of them: 13.3 bits for a 4-digit PIN). A secret the model never saw has a uniformly random rank,
and its expected exposure is about 1/ln 2 ≈ 1.44 bits whatever the space: that is chance level.

The rank is exact when the whole space is enumerated (batched forward passes: 10⁴ candidates in
seconds, 10⁶ in minutes on a CPU with MiniLM). Beyond that it is estimated from M uniform random
candidates: with k of them scoring above the secret, rank ≈ 1 + (k/M)(|C|ⁿ − 1), with an exact
Clopper–Pearson interval on k/M carried over to the rank (a plain sample-rank estimate rather
than the paper's skew-normal extrapolation: it assumes nothing about the score distribution).

Scores can also be *calibrated*: s(c) − s_ref(c) under a reference model trained without the
secrets, which removes what any model of the data prefers ("1 2 3 4") and keeps what this
model memorized.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from dptrain.errors import ConfigError

_POOLED: dict[tuple, torch.Tensor] = {}  # (encoder sha256, token ids) → pooled state
_POOLED_MAX = 200_000  # ~300 MB of 384-d states

CHANCE_EXPOSURE = 1.0 / math.log(2.0)
"""Expected exposure (bits) of a secret the model never saw, for large spaces."""


class SecretScorer:
    """s(c) = φ(label | prefix c) under one classifier, for batches of candidate tuples, where
    φ = log p_y − log(1 − p_y) is the logit of the label's probability (LiRA's statistic).
    It orders candidates exactly as log p_y does (it is monotone in p_y), but it does not
    saturate where p_y → 1, which the relaxation's gradients and calibrated differences need.

    Candidates are placed directly as token ids (each is exactly one token after the prefix,
    :func:`dptrain.secret_canaries.candidate_ids` checks it), so scoring needs no tokenizer
    call per candidate. ``relaxed_log_prob`` is the same function on *mixtures* of candidate
    embeddings, fed through ``inputs_embeds`` (what the ModIvA relaxation optimizes).
    """

    def __init__(self, model, tokenizer, prefix: str, candidates: Sequence[str], length: int,
                 label_id: int):
        from dptrain.secret_canaries import candidate_ids

        if length < 1:
            raise ConfigError(f"secret length must be >= 1, got {length}.")
        prefix_ids, cand_ids = candidate_ids(tokenizer, prefix, candidates)
        # The text with the first candidate everywhere, tokenized as training tokenized it
        # (special tokens included); the secret occupies the n slots after the prefix.
        filler = " ".join([str(candidates[0])] * length)
        template = list(tokenizer(f"{prefix} {filler}")["input_ids"])
        body = prefix_ids + [cand_ids[0]] * length
        starts = [i for i in range(len(template) - len(body) + 1) if template[i:i + len(body)] == body]
        if not starts:
            raise ConfigError(f"the secret after {prefix!r} does not tokenize into the prefix's "
                              "tokens followed by one token per candidate.")
        first = starts[0] + len(prefix_ids)
        self.positions = torch.arange(first, first + length)
        self.template = torch.tensor(template)
        self.candidate_ids = torch.tensor(cand_ids)
        self.candidates, self.length, self.label_id = tuple(candidates), int(length), int(label_id)
        num_labels = int(model.config.num_labels)
        if not 0 <= self.label_id < num_labels:
            raise ConfigError(f"label id {label_id} is outside the model's {num_labels} labels.")
        self.model = model.eval()
        for p in model.parameters():  # the attack optimizes inputs, never the weights
            p.requires_grad_(False)
        self._embedding = model.get_input_embeddings()
        from dptrain.models import MeanPoolingClassifier, weights_sha256

        self._encoder_key = (weights_sha256(model.encoder) if isinstance(model, MeanPoolingClassifier)
                             else None)

    @property
    def space_size(self) -> int:
        return len(self.candidates) ** self.length

    def ids(self, indices: np.ndarray) -> torch.Tensor:
        """Token ids of the texts "prefix c" for candidate index tuples ``indices`` [M, n]."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1, self.length)
        ids = self.template.repeat(len(idx), 1)
        ids[:, self.positions] = self.candidate_ids[idx]
        return ids

    @torch.no_grad()
    def score(self, indices: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """s(c) = φ for each row of ``indices`` (candidate indices, [M, n]) as float64."""
        ids = self.ids(indices)
        out = np.empty(len(ids), dtype=np.float64)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            out[start:start + len(chunk)] = self._scores(chunk).numpy()
        return out

    def _scores(self, ids: torch.Tensor) -> torch.Tensor:
        """s of full candidate texts (token ids [M, T])."""
        if self._encoder_key is not None:  # a mean-pooling classifier: encoder, then head
            logits = self.model.classifier(self._pooled(ids))
        else:
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return self._confidence(logits)

    def _pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder states of full-length candidate texts, remembered per encoder
        (by the sha256 of its weights): the head-only models of a sweep and their reference
        share one frozen encoder, so a space is encoded once, not once per model and secret."""
        keys = [(self._encoder_key, row) for row in map(tuple, ids.tolist())]
        missing = [i for i, k in enumerate(keys) if k not in _POOLED]
        if missing:
            sub = ids[missing]
            states = self.model.encoder(input_ids=sub, attention_mask=torch.ones_like(sub)).last_hidden_state
            for i, row in zip(missing, states.mean(dim=1)):
                _POOLED[keys[i]] = row
        if len(_POOLED) > _POOLED_MAX:  # bounded memory: forget all but this batch
            kept = {k: _POOLED[k] for k in keys}
            _POOLED.clear()
            _POOLED.update(kept)
        return torch.stack([_POOLED[k] for k in keys])

    def relaxed_log_prob(self, weights: torch.Tensor) -> torch.Tensor:
        """s(prefix, w @ E_C) for mixing weights ``weights`` [R, n, |C|]: the secret positions
        hold convex combinations of the candidates' input embeddings (differentiable)."""
        logits = self.model(**self._mixed_inputs(weights)).logits
        return self._confidence(logits)

    def _mixed_inputs(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``inputs_embeds`` of the template with the secret positions holding ``weights`` @
        E_C, and its attention mask."""
        table = self._embedding.weight
        base = table[self.template].unsqueeze(0).expand(len(weights), -1, -1).clone()
        base[:, self.positions] = weights.to(table.dtype) @ table[self.candidate_ids]
        return {"inputs_embeds": base, "attention_mask": torch.ones(base.shape[:2], dtype=torch.long)}

    def _confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """φ = log p_y − log(1 − p_y) = z_y − logsumexp_{j≠y} z_j, in float64."""
        return _logit_confidence(logits, torch.full((len(logits),), self.label_id, dtype=torch.long))


def flat_index(indices: np.ndarray, n_candidates: int) -> np.ndarray:
    """Mixed-radix index of candidate tuples, the first token most significant (4,0,7,2 → 4072):
    an int for one tuple, an [M] array for [M, n]."""
    indices = np.asarray(indices, dtype=np.int64)
    flat = np.ravel_multi_index(tuple(indices.reshape(-1, indices.shape[-1]).T),
                                (n_candidates,) * indices.shape[-1])
    return int(flat[0]) if indices.ndim == 1 else flat


def unflatten(flat: np.ndarray, n_candidates: int, length: int) -> np.ndarray:
    """The inverse of :func:`flat_index`: [M] → [M, length]."""
    return np.stack(np.unravel_index(np.asarray(flat, dtype=np.int64), (n_candidates,) * length), -1)


def enumerate_scores(scorer: SecretScorer, batch_size: int = 4096,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """s(c) for every candidate of the space, in :func:`flat_index` order."""
    size, c, n = scorer.space_size, len(scorer.candidates), scorer.length
    out = np.empty(size, dtype=np.float64)
    for start in range(0, size, batch_size):
        flat = np.arange(start, min(size, start + batch_size))
        out[flat] = scorer.score(unflatten(flat, c, n), batch_size=batch_size)
        if progress is not None:
            progress(len(flat))
    return out


def rank_of(scores: np.ndarray, true_flat: int) -> float:
    """1 + #(candidates scoring above the secret) + ½ #(others tied with it): the mid-rank."""
    scores = np.asarray(scores)
    s = scores[true_flat]
    return 1.0 + float(np.sum(scores > s)) + 0.5 * float(np.sum(scores == s) - 1)


def exposure(space_size: int, rank: float) -> float:
    """log₂ |space| − log₂ rank (bits)."""
    return math.log2(space_size) - math.log2(rank)


def calibrated_score(scorer: SecretScorer, reference: SecretScorer | None,
                     indices: np.ndarray) -> np.ndarray:
    """s(c), or s(c) − s_ref(c) with a reference model, for each row of ``indices``."""
    value = scorer.score(indices)
    return value if reference is None else value - reference.score(indices)


def sampled_rank(scorer: SecretScorer, true_indices: Sequence[int], samples: int, seed: int,
                 confidence: float = 0.95, reference: SecretScorer | None = None) -> dict:
    """The rank estimated from ``samples`` uniform random candidates, with an exact interval.

    k of M samples score above the secret: rank ≈ 1 + (k/M)(S − 1), and the Clopper–Pearson
    interval of k/M at ``confidence`` maps to [low, high] the same way.
    """
    from scipy.stats import binomtest

    rng = np.random.default_rng(seed)
    c = len(scorer.candidates)
    drawn = rng.integers(0, c, size=(samples, scorer.length))
    true = np.asarray(true_indices, dtype=np.int64).reshape(1, -1)
    s = calibrated_score(scorer, reference, drawn)
    t = calibrated_score(scorer, reference, true)[0]
    k = int(np.sum(s > t))
    ci = binomtest(k, samples).proportion_ci(confidence_level=confidence, method="exact")
    size = scorer.space_size
    return {"rank": 1.0 + k / samples * (size - 1), "low": 1.0 + ci.low * (size - 1),
            "high": 1.0 + ci.high * (size - 1), "samples": samples, "above": k,
            "confidence": confidence}


def _logit_confidence(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """φ = z_y − logsumexp_{j≠y} z_j over the last axis, for targets broadcast to logits[..., 0]."""
    z = logits.double()
    z_y = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, target.unsqueeze(-1), float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


class SlotSecretScorer:
    """The frame score of a secret planted as a slot value in a joint intent + slot model (or a
    slots-only model): the attacker knows the carrier phrase, the slot type (so the tags
    ``B-slot I-slot …`` of the value) and the intent, and scores a candidate value c by

        s(c) = φ(intent | prefix c) + Σ_j φ(tag_j | prefix c, word j of the value),

    φ the logit of each probability (as :class:`SecretScorer`; no intent term for a slots-only
    model). The same interface as :class:`SecretScorer`, so enumeration, ranks, exposure and the
    relaxation attack apply unchanged. Texts are tokenized word by word, as training aligned them.
    """

    def __init__(self, model, tokenizer, prefix: str, candidates: Sequence[str], length: int,
                 label_id: int | None, tag_ids: Sequence[int], max_length: int = 512):
        from dptrain.joint_model import IGNORE, align
        from dptrain.secret_canaries import candidate_ids

        if length < 1:
            raise ConfigError(f"secret length must be >= 1, got {length}.")
        if len(tag_ids) != length:
            raise ConfigError(f"{len(tag_ids)} tags for a secret of {length} tokens.")
        _, cand_ids = candidate_ids(tokenizer, prefix, candidates)
        words = prefix.split() + [str(candidates[0])] * length
        ids, labels = align(tokenizer, [words], [list(range(len(words)))], max_length)
        firsts = [i for i, w in enumerate(labels[0]) if w != IGNORE and w >= len(prefix.split())]
        if len(firsts) != length or any(ids[0][i] != cand_ids[0] for i in firsts):
            raise ConfigError(f"the secret after {prefix!r} does not tokenize into one token per "
                              "candidate word.")
        self.positions = torch.tensor(firsts)
        self.template = torch.tensor(ids[0])
        self.candidate_ids = torch.tensor(cand_ids)
        self.candidates, self.length = tuple(candidates), int(length)
        self.tag_ids = torch.as_tensor(list(tag_ids), dtype=torch.long)
        self.label_id = None if model.intent_head is None or label_id is None else int(label_id)
        if self.label_id is not None and not 0 <= self.label_id < model.intent_head.out_features:
            raise ConfigError(f"intent id {label_id} is outside the model's intents.")
        if int(self.tag_ids.max()) >= model.tag_head.out_features or int(self.tag_ids.min()) < 0:
            raise ConfigError("a secret tag is outside the model's tags.")
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._embedding = model.encoder.get_input_embeddings()

    space_size = SecretScorer.space_size
    ids = SecretScorer.ids
    _mixed_inputs = SecretScorer._mixed_inputs

    def _frame(self, out) -> torch.Tensor:
        tags = out.tag_logits[:, self.positions]  # [M, n, K]
        s = _logit_confidence(tags, self.tag_ids.expand(len(tags), -1)).sum(-1)
        if self.label_id is not None:
            target = torch.full((len(tags),), self.label_id, dtype=torch.long)
            s = s + _logit_confidence(out.intent_logits, target)
        return s

    score = SecretScorer.score

    def _scores(self, ids: torch.Tensor) -> torch.Tensor:
        return self._frame(self.model(input_ids=ids, attention_mask=torch.ones_like(ids)))

    def relaxed_log_prob(self, weights: torch.Tensor) -> torch.Tensor:
        """s on mixtures of the candidates' input embeddings at the value's positions."""
        return self._frame(self.model(**self._mixed_inputs(weights)))
