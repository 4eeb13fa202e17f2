"""Shared fixtures. Nothing here downloads anything."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on one worker per core (pytest-xdist, pyproject's addopts): each worker, and
    # the commands its tests start, on one thread, so that the workers do not fight over cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _tiny_vocabulary() -> list[str]:
    """Special tokens, digits, punctuation and every word of the synthetic data and canaries."""
    from dptrain.synthetic import CANARY_WORDS, generate_intents, secret_canary

    words: set[str] = set(CANARY_WORDS)
    words.update(secret_canary()[0].split())
    for text, _ in generate_intents(n_per_intent=60, seed=0):
        # BERT's basic tokenizer lowercases and splits words from punctuation.
        words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    words.update("0123456789")
    words.update(".,?!'$:-")
    return [*TINY_SPECIAL_TOKENS, *sorted(words)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A lower-casing BERT WordPiece tokenizer over a few hundred whole words (no subwords).

    ``[PAD]`` is id 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4; every word of the
    synthetic templates, fillers and audit-canary word list, and each digit, is one token.
    """
    from transformers import BertTokenizerFast

    vocab_file = Path(tmp_path_factory.mktemp("tiny_tokenizer")) / "vocab.txt"
    vocab_file.write_text("\n".join(_tiny_vocabulary()) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary as `vocab` and silently ignores `vocab_file`; 4.x wants
    # `vocab_file`.
    parameters = inspect.signature(BertTokenizerFast.__init__).parameters
    vocab_argument = "vocab" if "vocab" in parameters else "vocab_file"
    tokenizer = BertTokenizerFast(
        **{vocab_argument: str(vocab_file)}, do_lower_case=True, model_max_length=512
    )
    assert tokenizer.convert_tokens_to_ids("balance") != tokenizer.unk_token_id
    assert tokenizer.pad_token_id == 0
    return tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: they gain nothing from threads, and on a
    shared 2-core machine two contended threads run them several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def encoder_dir(tmp_path, tiny_tokenizer):
    """A tiny random BERT saved like a sentence-transformers checkpoint (mean pooling)."""
    import json

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return path
