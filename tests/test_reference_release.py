"""Independent reference test: nothing a private run releases depends on the private training-set
size N except through what the accountant covers.

Written from the stated definitions only (add/remove adjacency on the training split; the public
size M is declared or a Gaussian count M = max(2, round(N + Z)), Z ~ N(0, 20^2), composed into the
same accountant; q = B / M, steps = round(epochs / q), delta = min(1e-5, 1 / (10 M)), the noisy
sum divided by B). The accountant is checked against Google's ``dp_accounting``, not against the
toolkit's own accounting code.

Neighbouring datasets D (N training rows) and D' (N + 1 training rows) share the same validation
and test rows, the same flags and the same seeds (including ``--dp-seed``), so any difference in
the released files is a function of the one added training example.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

N_TRAIN = 137          # |D|; D' has N_TRAIN + 1 training rows
EPOCHS = 1
EPSILON = 4.0
SEED = 0
DP_SEED = 7
SIZE_NOISE = 20.0
BASE_FLAGS = ["--model", "tiny", "--epsilon", str(EPSILON), "--epochs", str(EPOCHS),
              "--seed", str(SEED), "--dp-seed", str(DP_SEED), "--max-length", "16", "--quiet"]

_TEMPLATES = {
    "balance": ["what is my balance", "show my account balance", "how much money do i have",
                "balance of my checking account"],
    "transfer": ["send money to my friend", "transfer funds now", "move cash to savings",
                 "pay my sister ten dollars"],
    "weather": ["what is the weather today", "will it rain tomorrow", "is it sunny outside",
                "how cold is it this morning"],
    "alarm": ["set an alarm for seven", "wake me up early", "cancel my alarm",
              "alarm at six please"],
}


def _rows(n_train: int, extra: bool) -> list[tuple[str, str, str]]:
    rng = random.Random(1234)
    labels = sorted(_TEMPLATES)
    rows = []
    # Held-out splits first, from their own stream: identical in D and D'.
    held = random.Random(99)
    for split, n in (("validation", 12), ("test", 12)):
        for i in range(n):
            label = labels[i % len(labels)]
            rows.append((held.choice(_TEMPLATES[label]), label, split))
    for i in range(n_train):
        label = labels[i % len(labels)]
        rows.append((rng.choice(_TEMPLATES[label]), label, "train"))
    if extra:
        rows.append(("zebra quantum lighthouse cancel my alarm", "alarm", "train"))
    return rows


def _write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "split"])
        writer.writerows(rows)


def _launch(cwd: Path, out: str, extra_flags: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # Same relative --data path in every run: the recipe (config.json) must not differ by the path.
    cmd = [sys.executable, "-m", "dptrain", "train", "--data", "data.csv", "--out", out,
           *BASE_FLAGS, *extra_flags]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs: dict[str, subprocess.Popen]) -> None:
    failures = []
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{name}: rc={proc.returncode}\n{output[-3000:]}")
    assert not failures, "\n".join(failures)


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Five runs, all reading the SAME absolute path (config.json records it), which holds D or D'
    in turn: counted (prv) and counted (rdp) on D; then counted on D' and declared --dataset-size M
    on D', with M = the count released by the counted run on D; then declared M on D. The declared
    pair is the add/remove distinguisher at a public M; declared-on-D' vs counted-on-D (same M)
    shows the recipe after the count is a function of M alone."""
    root = tmp_path_factory.mktemp("ref_release")
    data = root / "data.csv"
    d_rows, dprime_rows = _rows(N_TRAIN, extra=False), _rows(N_TRAIN, extra=True)

    _write_csv(data, d_rows)
    _wait({
        "counted_D": _launch(root, "counted_D", []),
        "rdp_D": _launch(root, "rdp_D", ["--accountant", "rdp"]),
    })
    m_counted = _load(root / "counted_D" / "privacy.json")["dataset_size"]
    assert isinstance(m_counted, int)
    # The declared size must be a number other than N and N + 1, so that finding N in a released
    # file is evidence of a leak. (Deterministic given --dp-seed; change DP_SEED if this trips.)
    m_declared = m_counted if m_counted not in (N_TRAIN, N_TRAIN + 1) else N_TRAIN + 40
    flags = ["--dataset-size", str(m_declared)]
    _write_csv(data, dprime_rows)
    _wait({
        "counted_Dp": _launch(root, "counted_Dp", []),
        "declared_Dp": _launch(root, "declared_Dp", flags),
    })
    _write_csv(data, d_rows)
    _wait({"declared_D": _launch(root, "declared_D", flags)})
    out = {name: root / name for name in
           ("counted_D", "counted_Dp", "rdp_D", "declared_D", "declared_Dp")}
    out.update(m_declared=m_declared, m_counted=m_counted)
    return out


# ------------------------------------------------------------------------------------------------
# helpers over JSON trees

def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (str(k),))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (str(i),))
    else:
        yield path, obj


def _diff(a, b, path=()):
    """Paths (tuples) where two JSON trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(path + (str(k),))
            else:
                out.extend(_diff(a[k], b[k], path + (str(k),)))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [path]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(_diff(x, y, path + (str(i),)))
        return out
    return [] if a == b else [path]


def _get(obj, path):
    for p in path:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    return obj


_SIZE_KEY = re.compile(r"size|num|count|n_train|members|examples|^n$|train", re.IGNORECASE)


def _released_json_files(run: Path) -> dict[str, object]:
    files = {name: _load(run / name) for name in
             ("privacy.json", "config.json", "curves.json", "metrics.json")}
    for p in sorted((run / "model").glob("*.json")):
        files[f"model/{p.name}"] = _load(p)
    return files


def _mentions_of(n: int, files: dict[str, object], *, strict_files: tuple[str, ...]):
    """Where the integer n appears in the released JSON: any numeric leaf or a whole-word number
    in a string, in `strict_files`; any size-like key holding n in every file."""
    hits = []
    word = re.compile(rf"(?<![\d.]){n}(?![\d.])")
    for name, tree in files.items():
        for path, value in _leaves(tree):
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and value == n
            textual = isinstance(value, str) and bool(word.search(value))
            if name in strict_files and (numeric or textual):
                hits.append((name, "/".join(path), value))
            elif numeric and any(_SIZE_KEY.search(p) for p in path if not p.isdigit()):
                hits.append((name, "/".join(path), value))
    return hits


# ------------------------------------------------------------------------------------------------
# 1. declared size: D and D' release the same privacy.json, config.json and curves

STRICT = ("privacy.json", "config.json", "curves.json", "model/config.json")


def test_declared_size_release_does_not_depend_on_n(runs):
    a, b = runs["declared_D"], runs["declared_Dp"]
    m = runs["m_declared"]
    pa, pb = _load(a / "privacy.json"), _load(b / "privacy.json")
    print(f"\nRESULT declared: M={m} N={N_TRAIN}/{N_TRAIN + 1} epsilon={pa['epsilon']:.6f}/"
          f"{pb['epsilon']:.6f} sigma={pa['noise_multiplier']} q={pa['sample_rate']} "
          f"steps={pa['steps']} B={pa['expected_batch_size']} delta={pa['delta']} "
          f"prior={pa.get('prior')}")
    differing = ["/".join(p) + f": {_get(pa, p)!r} vs {_get(pb, p)!r}"
                 if all(_has(x, p) for x in (pa, pb)) else "/".join(p) + " (missing in one)"
                 for p in _diff(pa, pb)]
    assert not differing, f"privacy.json differs between N and N+1 with declared M: {differing}"
    assert pa["dataset_size"] == m
    assert pa["semantics"]["dataset_size"]["value"] == m
    assert pa["prior"] == [], pa["prior"]

    ca, cb = _load(a / "config.json"), _load(b / "config.json")
    cfg_diff = ["/".join(p) for p in _diff(ca["config"], cb["config"])]
    assert not cfg_diff, f"config.json's config differs: {cfg_diff}"
    whole_diff = ["/".join(p) for p in _diff(ca, cb)]
    print(f"RESULT declared: config.json differing paths (whole file): {whole_diff}")
    assert not whole_diff, f"config.json differs between N and N+1: {whole_diff}"

    ma, mb = _load(a / "model" / "config.json"), _load(b / "model" / "config.json")
    assert not _diff(ma, mb), f"model/config.json differs: {_diff(ma, mb)}"

    cur_a, cur_b = _load(a / "curves.json"), _load(b / "curves.json")
    assert len(cur_a) == len(cur_b) > 0
    for pt in cur_a + cur_b:
        bad = [k for k in pt if "train" in k.lower() or k.lower() in ("loss", "grad_norm")]
        assert not bad, f"curves.json releases a training-side field: {bad}"
    for x, y in zip(cur_a, cur_b):
        for k in ("step", "epoch", "epsilon"):
            assert x[k] == y[k], f"curves.json {k}: {x[k]} vs {y[k]}"
    print(f"RESULT declared: curves keys={sorted(cur_a[0])} points={len(cur_a)}")

    # Neither N nor N+1 anywhere in the strictly-public files; nowhere as a size field at all.
    for run, n in ((a, N_TRAIN), (b, N_TRAIN + 1)):
        hits = _mentions_of(n, _released_json_files(run), strict_files=STRICT)
        assert not hits, f"the private training size {n} appears in released files: {hits}"

    # The private side does know N.
    mem_a, mem_b = _load(a / "private" / "members.json"), _load(b / "private" / "members.json")
    sizes = (len(mem_a["member_ids"]), len(mem_b["member_ids"]))
    print(f"RESULT declared: private members sizes={sizes} num_members="
          f"{mem_a.get('num_members')}/{mem_b.get('num_members')}")
    assert sizes == (N_TRAIN, N_TRAIN + 1)
    if "num_members" in mem_a:
        assert (mem_a["num_members"], mem_b["num_members"]) == (N_TRAIN, N_TRAIN + 1)


def _has(obj, path):
    try:
        _get(obj, path)
        return True
    except (KeyError, IndexError, TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------
# 2. counted size: only dataset_size and functions of it may differ

ALLOWED_COUNTED = {"dataset_size", "sample_rate", "steps", "planned_steps", "noise_multiplier",
                   "delta", "expected_batch_size", "epsilon", "history"}


def _check_public_formulas(priv: dict, label: str) -> None:
    m = priv["dataset_size"]
    b = priv["expected_batch_size"]
    q = priv["sample_rate"]
    steps = priv["steps"]
    assert m >= 2
    assert q == pytest.approx(b / m, rel=1e-12, abs=1e-15), f"{label}: q={q} but B/M={b / m}"
    assert steps == round(EPOCHS / q), f"{label}: steps={steps} but round(epochs/q)={round(EPOCHS / q)}"
    assert priv["delta"] == pytest.approx(min(1e-5, 1 / (10 * m)), rel=1e-12), (
        f"{label}: delta={priv['delta']} but min(1e-5, 1/(10M))={min(1e-5, 1 / (10 * m))}")
    assert priv["history"][-1] == pytest.approx([priv["noise_multiplier"], q, steps]), priv["history"]


def test_counted_size_release_depends_on_n_only_through_the_count(runs):
    a, b = runs["counted_D"], runs["counted_Dp"]
    pa, pb = _load(a / "privacy.json"), _load(b / "privacy.json")
    ma, mb = pa["dataset_size"], pb["dataset_size"]
    print(f"\nRESULT counted: N={N_TRAIN} -> M={ma}; N+1 -> M={mb}")
    for p, label in ((pa, "D"), (pb, "D'")):
        print(f"RESULT counted {label}: M={p['dataset_size']} B={p['expected_batch_size']} "
              f"q={p['sample_rate']} steps={p['steps']} sigma={p['noise_multiplier']} "
              f"delta={p['delta']} eps={p['epsilon']:.6f} prior={p['prior']} "
              f"how={p['semantics']['dataset_size']['how']!r}")
        assert p["semantics"]["dataset_size"]["value"] == p["dataset_size"]
        assert [list(map(float, s)) for s in p["prior"]] == [[SIZE_NOISE, 1.0, 1.0]], p["prior"]
        _check_public_formulas(p, f"counted {label}")

    bad = []
    for path in _diff(pa, pb):
        if path[0] in ALLOWED_COUNTED or path == ("semantics", "dataset_size", "value"):
            continue
        va = _get(pa, path) if _has(pa, path) else None
        vb = _get(pb, path) if _has(pb, path) else None
        # A string may differ only by quoting the (public) count itself.
        if isinstance(va, str) and isinstance(vb, str) and \
                va.replace(str(ma), "<M>") == vb.replace(str(mb), "<M>"):
            continue
        bad.append(("/".join(path), va, vb))
    assert not bad, f"privacy.json fields that differ between N and N+1 beyond the count: {bad}"

    # Released config/curves differ at most through M as well.
    ca, cb = _load(a / "config.json"), _load(b / "config.json")
    cfg_bad = [("/".join(p), _get(ca, p) if _has(ca, p) else None, _get(cb, p) if _has(cb, p) else None)
               for p in _diff(ca, cb)]
    print(f"RESULT counted: config.json differing paths: {cfg_bad}")
    if ma == mb:
        assert not cfg_bad and not _diff(pa, pb), "same M, yet the release differs"
    for run, n in ((a, N_TRAIN), (b, N_TRAIN + 1)):
        files = _released_json_files(run)
        m = _load(run / "privacy.json")["dataset_size"]
        if m != n:
            hits = _mentions_of(n, files, strict_files=STRICT)
            assert not hits, f"the private training size {n} appears in released files: {hits}"


def test_counted_recipe_equals_declared_recipe_at_the_same_m(runs):
    """The recipe after the count is a function of M: the counted run on D (N = 120, count M) and a
    run that declares --dataset-size M on D (or D', N = 121) release the same B, q, steps, delta
    and config (σ differs only because the count's cost is in the counted budget)."""
    if runs["m_declared"] != runs["m_counted"]:
        pytest.skip("the count happened to equal N or N+1; change DP_SEED")
    counted = _load(runs["counted_D"] / "privacy.json")
    for key in ("declared_D", "declared_Dp"):
        declared = _load(runs[key] / "privacy.json")
        for field in ("dataset_size", "expected_batch_size", "sample_rate", "steps", "delta"):
            assert counted[field] == declared[field], (
                f"{field}: counted {counted[field]} vs declared({key}) {declared[field]}")
        cc = _load(runs["counted_D"] / "config.json")["config"]
        cd = _load(runs[key] / "config.json")["config"]
        diff = ["/".join(p) for p in _diff(cc, cd) if p != ("dataset_size",)]
        assert not diff, f"counted vs declared recipe at the same M differ: {diff}"
    print(f"\nRESULT recipe at M={counted['dataset_size']}: B={counted['expected_batch_size']} "
          f"q={counted['sample_rate']} steps={counted['steps']} — identical counted vs declared")


# ------------------------------------------------------------------------------------------------
# 3. accountant reference (Google dp_accounting)

def _pld_epsilon(sigma, q, steps, delta, count_sigma):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.privacy_accountant import NeighboringRelation

    acc = pld_privacy_accountant.PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    if count_sigma is not None:
        acc.compose(dp_event.GaussianDpEvent(count_sigma))
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def _rdp_epsilon(sigma, q, steps, delta, count_sigma):
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    if count_sigma is not None:
        acc.compose(dp_event.GaussianDpEvent(count_sigma))
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_accountant_matches_reference_pld_with_the_count(runs):
    p = _load(runs["counted_D"] / "privacy.json")
    assert p["accountant"] == "prv"
    sigma, q, steps, delta = p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"]
    assert len(p["history"]) >= 1
    ref = _pld_epsilon(sigma, q, steps, delta, SIZE_NOISE)
    ref_no_count = _pld_epsilon(sigma, q, steps, delta, None)
    reported = p["epsilon"]
    print(f"\nRESULT pld: sigma={sigma} q={q} steps={steps} delta={delta} count_sigma={SIZE_NOISE} "
          f"reported={reported:.6f} pld_with_count={ref:.6f} pld_without_count={ref_no_count:.6f} "
          f"rel_gap={(reported - ref) / ref:+.4%}")
    assert reported >= ref - 1e-3, f"reported ε {reported} below the PLD reference {ref}"
    assert abs(reported - ref) <= 0.03 * ref, f"reported ε {reported} vs PLD {ref}: > 3% apart"
    # Wrong reference told apart. At σ_c = 20 and ε = 4 the count costs only ~0.005 in ε, less than
    # the PRV bound's own slack over the PLD value, so `reported >= ref - 1e-3` alone would also
    # accept a toolkit that forgot the count. Decisive check: the slack of the PRV report over the
    # exact PLD value is the same whether or not the count is in the composition, so compare the
    # counted run's slack (against PLD *with* the count) with the declared run's slack (same M,
    # no count, against PLD without it). Forgetting the count would shift the counted slack by
    # -(ref - ref_no_count).
    count_cost = ref - ref_no_count
    declared = _load(runs["declared_D"] / "privacy.json")
    assert declared["prior"] == [] and declared["dataset_size"] == p["dataset_size"]
    ref_declared = _pld_epsilon(declared["noise_multiplier"], declared["sample_rate"],
                                declared["steps"], declared["delta"], None)
    slack_counted = reported - ref
    slack_declared = declared["epsilon"] - ref_declared
    print(f"RESULT pld: count cost (PLD) = {count_cost:.6f}; PRV slack counted={slack_counted:.6f} "
          f"declared={slack_declared:.6f} (declared run: sigma={declared['noise_multiplier']} "
          f"reported={declared['epsilon']:.6f} pld={ref_declared:.6f}); a forgotten count would "
          f"give counted slack ≈ {slack_counted - count_cost:.6f}")
    assert ref_no_count < reported
    assert count_cost > 2e-3, f"the count's cost {count_cost} is too small to be told apart"
    assert abs(slack_counted - slack_declared) < count_cost / 3, (
        f"PRV slack with the count {slack_counted} vs without {slack_declared}: the count "
        f"(PLD cost {count_cost}) is not composed as Gaussian(σ=20) once")
    # The curve's last ε is the reported one.
    curves = _load(runs["counted_D"] / "curves.json")
    assert curves[-1]["epsilon"] == pytest.approx(reported, rel=1e-9)


def test_accountant_matches_reference_rdp_with_the_count(runs):
    p = _load(runs["rdp_D"] / "privacy.json")
    assert p["accountant"] == "rdp"
    assert [list(map(float, s)) for s in p["prior"]] == [[SIZE_NOISE, 1.0, 1.0]], p["prior"]
    _check_public_formulas(p, "rdp D")
    sigma, q, steps, delta = p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"]
    ref = _rdp_epsilon(sigma, q, steps, delta, SIZE_NOISE)
    ref_no_count = _rdp_epsilon(sigma, q, steps, delta, None)
    reported = p["epsilon"]
    print(f"\nRESULT rdp: M={p['dataset_size']} sigma={sigma} q={q} steps={steps} delta={delta} "
          f"reported={reported:.6f} rdp_with_count={ref:.6f} rdp_without_count={ref_no_count:.6f} "
          f"rel_gap={(reported - ref) / ref:+.4%}")
    assert reported >= ref - 1e-3, f"reported ε {reported} below the RDP reference {ref}"
    assert abs(reported - ref) <= 0.10 * ref, f"reported ε {reported} vs RDP {ref}: > 10% apart"
    # Forgetting the count would give ≈ ref_no_count, which must fail the `>= ref - 1e-3` check.
    assert ref - ref_no_count > 2e-3, (ref, ref_no_count)
    assert ref_no_count < reported


# ------------------------------------------------------------------------------------------------
# 4. the released noise scale is σC/B, a function of the public B and M, never of N

SIGMA, CLIP, BATCH, PUBLIC_M = 1.5, 0.7, 100, 1000


def _update_std(num_examples: int) -> float:
    import torch
    from torch import nn

    from dptrain import make_private

    torch.manual_seed(0)
    model = nn.Linear(2000, 50)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(num_examples, 2000)
    dp = make_private(model, opt, num_examples=num_examples, batch_size=BATCH, steps=1,
                      noise_multiplier=SIGMA, max_grad_norm=CLIP, seed=num_examples,
                      public_size=PUBLIC_M, delta=1e-6)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()]).double()
    seen = 0
    for logical in dp.batches(physical_batch_size=64):
        for idx in logical:
            idx = torch.as_tensor(idx, dtype=torch.long)
            if idx.numel() == 0:
                continue
            seen += idx.numel()
            (0.0 * model(x[idx]).sum()).backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad()
        break
    after = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    delta = after - before
    assert delta.abs().max() > 0, "no noise was added"
    std = float(delta.std())
    print(f"RESULT noise: N={num_examples} M={PUBLIC_M} B={BATCH} logical batch={seen} "
          f"coords={delta.numel()} mean={float(delta.mean()):+.2e} std={std:.6f}")
    return std


def test_noise_scale_is_sigma_c_over_public_b(one_thread):
    expected = SIGMA * CLIP / BATCH
    print(f"\nRESULT noise: expected σC/B = {expected:.6f}")
    stds = {n: _update_std(n) for n in (PUBLIC_M, PUBLIC_M + 1, PUBLIC_M + 17, PUBLIC_M // 2)}
    for n, s in stds.items():
        assert s == pytest.approx(expected, rel=0.02), f"N={n}: std {s} vs σC/B {expected}"
    base = stds[PUBLIC_M]
    for n in (PUBLIC_M + 1, PUBLIC_M + 17, PUBLIC_M // 2):
        assert abs(stds[n] - base) <= 0.02 * base, f"N={n}: std {stds[n]} vs N={PUBLIC_M}: {base}"
    # Wrong reference told apart: dividing by the private expected batch q·N with N = M/2.
    n = PUBLIC_M // 2
    wrong = SIGMA * CLIP / (BATCH * n / PUBLIC_M)
    print(f"RESULT noise: N={n}: measured {stds[n]:.6f}, σC/B {expected:.6f}, σC/(qN) {wrong:.6f}")
    assert abs(stds[n] - wrong) > 0.20 * wrong
