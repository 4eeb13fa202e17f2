"""``dptrain train --task joint|slots``: intent + slot models (or slots alone) under DP-SGD.

The same run directory, loop, sampler, clipping, noise, accountant and checkpoints as the
intent classifier (:mod:`dptrain.trainer`, :mod:`dptrain.loop`); what differs is the data
(:mod:`dptrain.slot_data`), the model and its per-utterance loss (:mod:`dptrain.joint_model`:
one clipped gradient per utterance, over all its tokens and both heads) and the metrics
(:mod:`dptrain.slot_metrics`: intent accuracy, entity-level slot F1, frame accuracy, F1 per slot
type). The model is saved as ``model/encoder/`` (an ordinary HF encoder), ``model/heads.
safetensors`` and ``model/dptrain_joint.json`` (task, pooling, intents, tags); load it with
:func:`load_joint`.

Defaults: the intent recipe (:func:`dptrain.trainer.recipe`) with more epochs. For a pretrained
encoder the two heads alone train (``--trainable auto`` → ``head``) on cached token states
(:class:`dptrain.features.JointFeatureHead`: the frozen encoder runs once per utterance),
``JOINT_HEAD_EPOCHS`` = 200 epochs, lr ``JOINT_HEAD_LR`` = 4e-2, no head dropout, and four
choices measured under DP (``python -m experiments.tune_joint``: full runs on the synthetic
slots, chosen on validation slot F1 at ε = 8, 3 noise seeds each):

* the tag head predicts slot types, B- and I- rebuilt from adjacent words (``--tag-scheme io``,
  :class:`~dptrain.joint_model.TagSet`): 0.868 → 0.881;
* it reads the mean of the encoder's last ``JOINT_TAG_LAYERS`` = 5 hidden states
  (``--tag-layers``; the intent head still pools the last one): a sentence-transformers
  checkpoint's last layer is tuned for sentence embeddings, earlier layers keep more of each
  word (last 3 / 4 / 5 / 6 / 7 of MiniLM's 7: 0.910 / 0.921 / 0.928 / 0.926 / 0.929);
* an intent-tag bias (``--intent-tag-bias``): which slot types an intent takes, from the gold
  intent in training and the predicted one in use (slot gating, Goo et al. 2018);
* logical batch N/4 (``JOINT_HEAD_BATCH_DIVISOR``; the intent recipe's is N/8): with the
  three above, 0.928 → 0.934 (N/2: 0.932, N/16: 0.908; at ε = 1: 0.456 → 0.485; SNIPS
  validation, one seed: 0.824 → 0.824 at ε = 8, 0.672 → 0.686 at ε = 1). With it lr 4e-2
  and 6e-2 tie on slot F1 over 6 seeds (0.933 / 0.932); 4e-2 keeps 0.5 point more validation
  intent accuracy (0.976 / 0.971), so it is the default (lr 0.1: 0.925).

Without the middle two (and lr 3e-2, batch N/8): 0.881. lr 0.1 and 300 epochs were
worse; README "Intent + slot models" has the test numbers. LoRA r8 reached only 0.341 without
noise. ``tiny`` trains whole (batch min(256, N/4), 3 epochs, lr 1e-3, last state, no bias).
``tiny`` uses [CLS] pooling, sentence-transformers checkpoints (``minilm``) the mean of the
token states.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rundir
from .errors import ConfigError
from .joint_model import JointIntentSlotModel, align, collate, word_predictions

JOINT_FORMAT = "dptrain_joint.json"
HEADS = ("tag_head", "intent_head", "intent_tag_bias")  # what heads.safetensors holds
JOINT_HEAD_EPOCHS = 200.0  # the heads recipe's epochs (module docstring)
JOINT_HEAD_BATCH_DIVISOR = 4  # the heads recipe's logical batch: N/4 (sampling rate q = 1/4)
JOINT_HEAD_LR = 4e-2  # the heads recipe's AdamW learning rate
JOINT_TAG_LAYERS = 5  # the heads recipe's tag head reads the mean of the last 5 hidden states


@dataclasses.dataclass(frozen=True)
class EncodedSlots:
    ids: list
    tags: list
    intents: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class SlotBatches:
    """Model inputs by split and index, on the run's device (the ``Batches`` of the loop).

    With ``cache_features`` (the encoder is frozen: :func:`dptrain.features.cacheable`) the
    encoder runs once per utterance, in eval mode, and ``net`` is the two heads on the cached
    states (:class:`dptrain.features.JointFeatureHead`): each step then costs the heads alone.
    """

    def __init__(self, model, enc: dict, pad: int, device, cache_features: bool = False,
                 progress: bool = False):
        self.net, self.enc, self.pad, self.device = model, enc, pad, device
        self.features = None  # None: the loop cuts logical batches by physical_batch_size
        if cache_features:
            from .features import joint_feature_head, token_states
            from .joint_model import IGNORE
            from .models import weights_sha256
            from .trainer import _bar

            self.net = joint_feature_head(model)
            bar = _bar(progress, sum(len(e) for e in enc.values()), "encoding (once)", "utt")
            sha = weights_sha256(model.encoder)
            self.features = {}
            for name, e in enc.items():
                states = token_states(model.encoder, e.ids, e.lengths, pad, encoder_sha256=sha,
                                      device=device, progress=bar.update if bar else None,
                                      tag_layers=model.tag_layers)
                if model.pooling == "cls":
                    pooled = torch.stack([s[0] for s, _ in states]) if states else torch.empty(0)
                else:
                    pooled = torch.stack([s.mean(0) for s, _ in states]) if states else torch.empty(0)
                kept = [torch.as_tensor(t) != IGNORE for t in e.tags]
                self.features[name] = {
                    "pooled": pooled,
                    "words": [s[k] for (_, s), k in zip(states, kept)],
                    "tags": [torch.as_tensor(t)[k] for t, k in zip(e.tags, kept)],
                }
            if bar is not None:
                bar.close()

    def batch(self, split: str, idx) -> dict[str, torch.Tensor]:
        e = self.enc[split]
        idx = [int(i) for i in idx]
        if self.features is None:
            return {k: v.to(self.device) for k, v in
                    collate(e.ids, e.tags, e.intents, self.pad, idx).items()}
        from torch.nn.utils.rnn import pad_sequence

        from .joint_model import IGNORE

        f = self.features[split]
        dtype = self.net.tag_head.weight.dtype
        d = f["pooled"].shape[-1] if len(f["pooled"]) else self.net.tag_head.in_features
        words = [f["words"][i] for i in idx] or [torch.zeros(0, d)]
        tags = [f["tags"][i] for i in idx] or [torch.zeros(0, dtype=torch.long)]
        batch = {"pooled": f["pooled"][idx].reshape(len(idx), d),
                 "word_states": pad_sequence(words, batch_first=True)[:len(idx)],
                 "tag_labels": pad_sequence(tags, batch_first=True, padding_value=IGNORE)[:len(idx)],
                 "labels": torch.as_tensor(e.intents[idx], dtype=torch.long)}
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in batch.items()}

    def forward(self, split: str, idx):
        return self.net(**self.batch(split, idx))


def load_encoder(name: str):
    """(encoder, tokenizer, pooling) of ``tiny``, a packaged encoder (``minilm``, ``mpnet``) or a
    local directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from .encoders import PACKAGED, packaged_path
    from .errors import ModelError
    from .models import TINY, UNREADABLE, _QuietHF, _load_encoder, \
        _sentence_transformer_pooling, refuse_pickled_weights, tiny_tokenizer

    if name == TINY:
        tokenizer = tiny_tokenizer()
        encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128,
                                       max_position_embeddings=128), add_pooling_layer=False)
        return encoder, tokenizer, "cls"
    path = Path(packaged_path(name) if name in PACKAGED else name)
    if not path.is_dir():
        raise ConfigError(f"model {name!r} not found: give tiny, minilm, mpnet or a local directory.")
    refuse_pickled_weights(path)
    try:
        with _QuietHF():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                      add_prefix_space=True)
            encoder = _load_encoder(path)
    except UNREADABLE as exc:
        raise ModelError(f"cannot load model {name!r} as an encoder: "
                         f"{' '.join(str(exc).split())}") from None
    return encoder, tokenizer, _sentence_transformer_pooling(path) or "cls"


def encode_slots(tokenizer, utterances, intents, tags, max_length: int) -> EncodedSlots:
    """Token ids and aligned tag-class ids (``tags``: a :class:`~dptrain.joint_model.TagSet`, or
    a list of tags read as BIO classes) and intent ids."""
    from .joint_model import tag_set

    tagset = tag_set(tags)
    ids, labels = align(tokenizer, [u.tokens for u in utterances],
                        [[tagset.id(t) for t in u.tags] for u in utterances], max_length)
    intent_id = {t: i for i, t in enumerate(intents)}
    return EncodedSlots(ids, labels, np.asarray([intent_id[u.intent] for u in utterances]),
                        np.asarray([len(r) for r in ids]))


def evaluate_slots(net, batches: SlotBatches, split: str, tags, intents, utterances,
                   batch_size: int = 128) -> dict[str, Any]:
    """Loss, intent accuracy, entity-level slot F1 and frame accuracy on ``split``; for the
    loop, ``accuracy`` is the intent accuracy (joint) or the slot F1 (slots)."""
    from .joint_model import tag_set
    from .slot_metrics import slot_report

    tagset = tag_set(tags)
    was = net.training
    net.eval()
    n = len(batches.enc[split])
    loss_sum, gold, pred, gold_i, pred_i = 0.0, [], [], [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            b = batches.batch(split, idx)
            out = net(**b)
            loss_sum += float(out.loss) * len(idx)
            for j, words in zip(idx, word_predictions(out.tag_logits, b["tag_labels"])):
                kept = len(words)  # words cut off by max_length count as predicted O
                gold.append(list(utterances[j].tags))
                pred.append(tagset.decode(words) + ["O"] * (len(utterances[j].tags) - kept))
            if out.intent_logits is not None:
                gold_i += [utterances[j].intent for j in idx]
                pred_i += [intents[k] for k in out.intent_logits.argmax(-1).tolist()]
    net.train(was)
    report = slot_report(gold, pred, gold_i or None, pred_i or None)
    report["loss"] = loss_sum / max(n, 1)
    report["slot_f1"] = report["f1"]
    report["accuracy"] = report.get("intent_accuracy", report["f1"])
    return report


def save_joint(model: JointIntentSlotModel, tokenizer, path: Path, intents, tags) -> None:
    """``tags``: the :class:`~dptrain.joint_model.TagSet` of the tag head."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(path / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(path)
    heads = {f"{name}.{k}": v for name in HEADS if getattr(model, name) is not None
             for k, v in getattr(model, name).state_dict().items()}
    save_file({k: v.detach().contiguous() for k, v in heads.items()}, path / "heads.safetensors")
    (path / JOINT_FORMAT).write_text(json.dumps({
        "format": "dptrain joint intent+slot model, version 1", "task": model.task,
        "pooling": model.pooling, "dropout": model.dropout.p, "intents": list(intents),
        "tags": list(tags.tags), "tag_scheme": tags.scheme,
        "tag_head_classes": list(tags.classes), "tag_layers": model.tag_layers,
        "intent_tag_bias": model.intent_tag_bias is not None}, indent=2) + "\n")


def load_joint(path: str | Path):
    """(model, tokenizer, meta) of a saved joint model, in eval mode (safetensors only); a
    damaged one is refused in one line."""
    from .errors import ModelError
    from .models import UNREADABLE

    try:
        return _load_joint(Path(path))
    except UNREADABLE as exc:
        raise ModelError(f"cannot load the joint model in {path}: "
                         f"{' '.join(str(exc).split())}") from None


def _load_joint(path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    meta = rundir.read_json(path / JOINT_FORMAT)
    meta["tagset"] = tags_of(meta)
    from .models import _QuietHF

    with _QuietHF():  # the saved encoder has no pooler (unused), which HF would report as missing
        encoder = AutoModel.from_pretrained(path / "encoder", local_files_only=True,
                                            use_safetensors=True)
    model = JointIntentSlotModel(encoder, max(len(meta["intents"]), 1), len(meta["tagset"].classes),
                                 task=meta["task"], pooling=meta["pooling"], dropout=meta["dropout"],
                                 tag_layers=meta.get("tag_layers", 1),
                                 intent_tag_bias=meta.get("intent_tag_bias", False))
    state = load_file(path / "heads.safetensors")
    for name in HEADS:
        if getattr(model, name) is not None:
            getattr(model, name).load_state_dict(
                {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer, meta


def tags_of(meta: dict):
    """The :class:`~dptrain.joint_model.TagSet` of a saved model's ``dptrain_joint.json``."""
    from .joint_model import TagSet

    return TagSet(meta["tags"], meta.get("tag_scheme", "bio"))


def train_slots_run(config, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                    on_step=None, data=None, member_ids=None, extra_info=None,
                    gradient_canaries=None):
    """Train a joint (or slots-only) model and write its run directory; see the module docstring.

    ``data``: a :class:`~dptrain.slot_data.SlotData` to train on instead of loading
    ``config.data`` (shadow models pass half of the population); ``member_ids``: the training
    utterances' ids in that population, for members.json (default 0..N-1); ``extra_info``: more
    for config.json; ``gradient_canaries``: a white-box audit's canaries
    (:func:`dptrain.trainer.insert_gradient_canaries`; such a run is not resumed)."""
    from .device import resolve
    from .loop import Run, TrainingLoop
    from .models import set_trainable
    from .slot_data import load_slot_data
    from .trainer import (RunSummary, _config_and_checkpoint, _diverged, _privacy_record,
                          _progress, finish_bookkeeping, finished_run, fingerprint,
                          insert_gradient_canaries, note_planted, optimization, plan_steps, prepare_out_dir,
                          public_size, recipe, set_encoder_dropout, write_curves)

    started = time.monotonic()
    out = Path(out_dir)
    if prepare_out_dir(out, resume):
        return finished_run(out)
    config, state = _config_and_checkpoint(config, out, resume, data)
    torch.manual_seed(config.seed)
    if data is None:
        data = load_slot_data(config.data, seed=config.seed,
                              synthetic_per_intent=config.synthetic_per_intent)
    texts = [" ".join(u.tokens) for u in data.train]
    train_print = fingerprint(texts, [data.intents.index(u.intent) for u in data.train])
    if state is not None and state["fingerprint"] != train_print:
        raise ConfigError(f"the training data of {out} changed since the run started; resume "
                          "needs the same data.")
    device, precision = resolve(config.device, config.precision, config.private)
    encoder, tokenizer, pooling = load_encoder(config.model)
    if config.dropout is not None:  # as for intents: every dropout layer inside the encoder
        set_encoder_dropout(encoder, config.dropout)
    if config.pooling != "auto":
        pooling = config.pooling
    n_natural = len(data.train)
    planted = None
    if config.secrets is not None:  # after the natural data's fingerprint: attacks reload that
        from .secret_canaries import insert_slot_secrets, parse_spec, plant_secrets, read_secrets

        if state is not None:
            planted = read_secrets(out)
        else:
            from .secret_canaries import DEFAULT_SLOT

            planted = [dataclasses.replace(s, slot=s.slot or DEFAULT_SLOT) for s in plant_secrets(
                parse_spec(config.secrets), data.intents, tokenizer, config.max_length,
                config.dp_seed)]
        data = insert_slot_secrets(data, planted)
    n = len(data.train)
    if state is None:
        note_planted(n_natural, n)
    # Every released number comes from the public size, never from n (dptrain.release).
    config, size, spent = public_size(config, n, state)
    trainable = config.trainable
    if trainable == "auto":  # as for intents: the heads of a pretrained encoder, all of tiny
        trainable = "all" if config.model == "tiny" else "head"
    given = {k: getattr(config, k) is not None for k in ("epochs", "lr", "batch_size")}
    if config.head_init == "labels":
        raise ConfigError("--head-init labels starts an intent classifier's head; joint and slot "
                          "models start theirs at random.")
    config = recipe(config, trainable, size, mean_pooling=True)
    if trainable == "head" and not given["epochs"]:
        config = dataclasses.replace(config, epochs=JOINT_HEAD_EPOCHS)
    if trainable == "head" and not given["batch_size"]:
        config = dataclasses.replace(config, batch_size=max(2, size // JOINT_HEAD_BATCH_DIVISOR))
    measured = trainable == "head" and config.model != "tiny"  # the heads recipe (docstring)
    if measured and not given["lr"]:
        config = dataclasses.replace(config, lr=JOINT_HEAD_LR)
    if config.tag_layers is None:  # (the model refuses more than the encoder's hidden states)
        states = encoder.config.num_hidden_layers + 1
        config = dataclasses.replace(config, tag_layers=min(JOINT_TAG_LAYERS, states) if measured
                                     else 1)
    if config.intent_tag_bias == "auto":
        config = dataclasses.replace(
            config, intent_tag_bias="on" if measured and config.task == "joint" else "off")
    from .joint_model import TagSet

    tagset = TagSet(data.tags, config.tag_scheme)
    model = JointIntentSlotModel(encoder, len(data.intents), len(tagset.classes), task=config.task,
                                 pooling=pooling, dropout=config.head_dropout,
                                 tag_layers=config.tag_layers,
                                 intent_tag_bias=config.intent_tag_bias == "on")
    if trainable == "lora":
        from .models import apply_lora

        apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
    n_trainable = set_trainable(model, trainable)
    model.to(device)
    enc = {name: encode_slots(tokenizer, split, data.intents, tagset, config.max_length)
           for name, split in data.splits.items()}
    sample_rate, steps = plan_steps(config, n, size)
    from .features import cacheable

    batches = SlotBatches(model, enc, tokenizer.pad_token_id, device,
                          cache_features=cacheable(model), progress=progress)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, step_optimizer, sampler, dp, scheduler = optimization(
        config, batches.net, params, n, steps, None, size, spent)
    run = Run(config=config, out=out, data=data, enc=enc, model=model, tokenizer=tokenizer,
              batches=batches, params=params, optimizer=optimizer, step_optimizer=step_optimizer,
              scheduler=scheduler, sampler=sampler, dp=dp, dist=None, device=device,
              precision=precision, sample_rate=sample_rate, steps=steps,
              train_fingerprint=train_print, state=state)
    canary_hook = (None if gradient_canaries is None
                   else insert_gradient_canaries(gradient_canaries, run))
    if not resume:
        rundir.make_dir(out)
        rundir.write_bytes_atomic(out / rundir.README, rundir.README_TEXT.encode())
        rundir.write_json(out / rundir.CONFIG, {
            "config": config.to_dict(),
            "data": {"source": data.source, "intents": list(data.intents), "tags": list(data.tags),
                     "label_names": list(data.intents),
                     # the training split's size and fingerprint: private/members.json
                     "sizes": {k: len(v) for k, v in data.splits.items() if k != "train"}},
            "model": {"class": type(model).__name__, "task": config.task,
                      "trainable_parameters": n_trainable,
                      "total_parameters": sum(p.numel() for p in model.parameters())},
            **({"extra": extra_info} if extra_info else {}),
        })
        rundir.write_json(out / rundir.MEMBERS, {
            "description": "identifiers of the utterances in the training set (members)",
            "data": data.source, "num_members": n_natural,
            "member_ids": (list(range(n_natural)) if member_ids is None
                           else [int(i) for i in member_ids]),
            "num_train_rows": len(data.train), "train_fingerprint": train_print})
        if planted is not None:
            from .secret_canaries import write_secrets

            write_secrets(out, planted, config.secrets)

    def evaluate(net, b, split):
        return evaluate_slots(net, b, split, tagset, data.intents, data.splits[split])

    loop = TrainingLoop(run, evaluate=evaluate, on_step=on_step, started=started,
                        on_divergence=lambda done, loss: _diverged(out, config, dp, done, loss))
    if canary_hook is not None:
        loop.before_release.append(canary_hook)
    if state is not None:
        loop.resume_from(state)
    loop.bar = _progress(progress, total=steps, initial=loop.done, private=dp is not None)
    loop()
    if dp is not None:
        dp.detach()
    privacy = _privacy_record(config, dp, sample_rate, steps, loop.done)
    privacy["unit"] = "one utterance (all its tokens and both heads)"
    test, val = evaluate(batches.net, batches, "test"), evaluate(batches.net, batches, "validation")
    metrics = {"task": config.task, **{k: test[k] for k in (
        "loss", "precision", "recall", "f1", "frame_accuracy", "per_type") if k in test},
        "slot_f1": test["f1"], "validation_slot_f1": val["f1"],
        "num_test": len(data.test), "num_validation": len(data.validation)}
    if config.task == "joint":
        metrics["intent_accuracy"] = metrics["accuracy"] = test["intent_accuracy"]
        metrics["validation_intent_accuracy"] = val["intent_accuracy"]
    seconds = time.monotonic() - started + (float(state.get("seconds", 0.0)) if state else 0.0)
    metrics["train_seconds"] = seconds
    from .models import _QuietHF

    shipped = _shipped(model, config)

    def write_model(tmp: Path) -> None:
        with _QuietHF():  # no "Writing model shards" bar
            save_joint(shipped, tokenizer, tmp, data.intents, tagset)

    rundir.replace_dir(out / rundir.MODEL, write_model)
    write_curves(out, loop.curves, config)
    rundir.write_json(out / rundir.METRICS, metrics)
    rundir.write_json(out / rundir.PRIVACY, privacy)  # last: the commit point
    finish_bookkeeping(out)
    return RunSummary(out, config, privacy, metrics, seconds)


def _shipped(model, config):
    if config.trainable != "lora":
        return model
    import copy

    from .models import merge_lora

    return merge_lora(copy.deepcopy(model))
