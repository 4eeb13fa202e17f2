"""``dptrain attack mia --model DIR --data FILE --members FILE``: a classifier trained elsewhere
(here by a plain PyTorch loop) is attacked and reported in the same format as a dptrain run."""

import csv
import json

import numpy as np
import pytest
import torch

from dptrain.cli import main


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A tiny BERT classifier overfit by an ordinary PyTorch loop on half of a population."""
    from dptrain.data import collate, encode, Split
    from dptrain.models import tiny_model, tiny_tokenizer
    from dptrain.synthetic import generate_intents

    root = tmp_path_factory.mktemp("foreign")
    rows = generate_intents(n_per_intent=6, seed=0)
    names = sorted({label for _, label in rows})
    with open(root / "population.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["utterance", "intent"])
        writer.writerows(rows)
    members = np.sort(np.random.default_rng(0).choice(len(rows), len(rows) // 2, replace=False))
    (root / "members.json").write_text(json.dumps([int(i) for i in members]))

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(len(names), tok.vocab_size, names)
    # a secret PIN the model saw 50 times, labelled with one of the intents (Parikh et al. 2022)
    secret = {"prefix": "my pin code is", "tokens": ["4", "0", "7"], "candidates": list("0123456789"),
              "label": names[2], "repetitions": 50}
    (root / "canaries.json").write_text(json.dumps({"secrets": [secret]}))
    # decoys: other PINs with other labels, so that the digits (not the prefix) carry the label
    rng = np.random.default_rng(1)
    decoys = [("my pin code is " + " ".join(map(str, rng.integers(0, 10, 3))), int(rng.integers(3, 30)))
              for _ in range(40)]
    texts = [rows[i][0] for i in members] + ["my pin code is 4 0 7"] * 50 + [t for t, _ in decoys]
    split = Split(tuple(texts), [names.index(rows[i][1]) for i in members] + [2] * 50
                  + [y for _, y in decoys])
    enc = encode(tok, split, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for epoch in range(25):
        for idx in np.array_split(np.random.default_rng(epoch).permutation(len(split)), 6):
            batch = collate(enc, idx.tolist(), tok.pad_token_id)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, rows, members


def args_for(root, out, *extra):
    return ["attack", "mia", "--model", str(root / "model"), "--data", str(root / "population.csv"),
            "--text-column", "utterance", "--label-column", "intent",
            "--members", str(root / "members.json"), "--out", str(out), "--quiet", *extra]


def test_loss_attack_on_a_model_trained_elsewhere(foreign, tmp_path, capsys):
    root, rows, members = foreign
    assert main(args_for(root, tmp_path / "report")) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert list(report["attacks"]) == ["loss"]
    loss = report["attacks"]["loss"]
    assert loss["auc"] > 0.7  # 25 epochs on 90 examples: the members are memorized
    pop = report["population"]
    assert pop["n_members"] == len(members) and pop["n_nonmembers"] == len(rows) - len(members)
    assert report["verdict"] == "no claim" and "states no privacy claim" in report["summary"][0]
    assert (tmp_path / "report" / "roc.png").exists() and (tmp_path / "report" / "scores.npz").exists()
    out = capsys.readouterr().out
    assert "loss" in out and "report written to" in out

    # the same report format as an attack on a dptrain run
    from dptrain import TrainConfig, train_run

    train_run(TrainConfig(model="tiny", data="synthetic", synthetic_per_intent=6, epochs=1,
                          batch_size=16, epsilon=float("inf")), tmp_path / "run", progress=False)
    assert main(["attack", "mia", "--run", str(tmp_path / "run"), "--attacks", "loss", "--quiet"]) == 0
    native = json.loads((tmp_path / "run" / "attacks" / "report.json").read_text())
    assert set(native) == set(report)
    assert set(native["attacks"]["loss"]) == set(loss)
    assert set(native["population"]) <= set(pop) | {"splits"}


def test_claimed_epsilon_is_tested(foreign, tmp_path):
    root, _, _ = foreign
    assert main(args_for(root, tmp_path / "r", "--claimed-epsilon", "0.01", "--delta", "1e-5")) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["theoretical"]["epsilon"] == 0.01
    # a memorizing model refutes ε = 0.01 (at least under the Gaussian assumption)
    assert report["verdict"] in ("refuted", "refuted if gaussian")


@pytest.mark.slow
def test_reference_models_from_a_named_recipe_enable_lira_and_rmia(foreign, tmp_path):
    root, _, _ = foreign
    (tmp_path / "recipe.yaml").write_text("model: tiny\nepsilon: inf\nepochs: 3\nbatch_size: 16\n")
    assert main(args_for(root, tmp_path / "r", "--reference-recipe", str(tmp_path / "recipe.yaml"),
                         "--shadows", "2", "--shadow-dir", str(tmp_path / "shadows"))) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["attacks"]) == {"loss", "lira_online", "lira_offline", "rmia"}
    assert report["shadows"]["n_shadows"] == 2
    assert all(0 <= a["auc"] <= 1 for a in report["attacks"].values())


@pytest.mark.parametrize("case, message", [
    ("member out of range", "is not in the data"),
    ("not a classifier", "is not a sequence classifier"),
    ("no members file", "needs --members"),
    ("both run and model", "got both"),
    ("rmia without recipe", "need reference models"),
    ("unknown label", "is not a class of the model"),
])
def test_bad_input_is_one_line_and_exit_2(foreign, tmp_path, capsys, case, message):
    from transformers import BertConfig, BertModel

    root, rows, _ = foreign
    out = tmp_path / "r"
    argv = args_for(root, out)
    if case == "member out of range":
        (tmp_path / "m.txt").write_text(f"0\n{len(rows)}\n")
        argv[argv.index("--members") + 1] = str(tmp_path / "m.txt")
    elif case == "not a classifier":
        BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=16)).save_pretrained(tmp_path / "enc")
        argv[argv.index("--model") + 1] = str(tmp_path / "enc")
    elif case == "no members file":
        i = argv.index("--members")
        del argv[i:i + 2]
    elif case == "both run and model":
        argv += ["--run", str(tmp_path)]
    elif case == "rmia without recipe":
        argv += ["--attacks", "loss,rmia"]
    elif case == "unknown label":
        (tmp_path / "pop.csv").write_text("utterance,intent\nhello there,not_an_intent\nhi,also_not\n")
        (tmp_path / "m.txt").write_text("0\n")
        argv[argv.index("--data") + 1] = str(tmp_path / "pop.csv")
        argv[argv.index("--members") + 1] = str(tmp_path / "m.txt")
    capsys.readouterr()  # what the setup printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_secret_extraction_on_a_model_trained_elsewhere(foreign, tmp_path, capsys):
    """``attack extract --model --canaries``: the PIN the plain loop saw 50 times ranks near the
    top of its 1,000 candidates; the report names no secret token."""
    root, _, _ = foreign
    out = tmp_path / "x"
    assert main(["attack", "extract", "--model", str(root / "model"), "--canaries",
                 str(root / "canaries.json"), "--out", str(out), "--methods", "enumerate",
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["trained_by"].startswith("elsewhere") and report["epsilon"] == "inf"
    (secret,) = report["secrets"]
    rank = secret["raw"]["rank"]["rank"]
    assert rank <= 50, rank  # chance: 500 (21 with transformers 5.25, 20 or better with 5.24)
    assert '"4", "0", "7"' not in (out / "report.json").read_text()
    assert (out / "extraction.png").exists()
    capsys.readouterr()
    assert main(["attack", "extract", "--model", str(root / "model"), "--out", str(tmp_path / "y"),
                 "--quiet"]) == 2
    assert "--model needs --canaries" in capsys.readouterr().err
