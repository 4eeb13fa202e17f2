"""Independent reference for reading a run's privacy record back (``dptrain.release.read_privacy``).

What must hold, from the maths rather than from dptrain's code:

* A private record's segments — ``prior`` (Gaussian counts, q = 1, one release each) then
  ``history`` (``n`` DP-SGD steps of a Poisson-subsampled Gaussian with multiplier σ and rate q),
  or, for records written before those keys existed, the single segment
  (``noise_multiplier``, ``sample_rate``, ``steps``) — spend some ε at the recorded δ under
  add/remove adjacency. The ε read back must never be below that spend, a stored ε noticeably below
  it must be refused, and a conservative (larger) stored ε must be kept.
* The reference spend is computed here with Google's ``dp_accounting`` (never with Opacus, which
  dptrain uses internally):

  - PLD (privacy-loss distributions, connect-the-dots): the *pessimistic* discretisation gives an
    upper bound on the true ε, the *optimistic* one a lower bound, so the true spend lies in
    ``[pld_lo, pld_hi]``; the width of that bracket is about ``n·Δ/2`` for ``n`` compositions
    at discretisation interval ``Δ``, and each case picks Δ so that it stays a few percent.
  - RDP: an upper bound whose value depends on the grid of orders; the grid used here is the
    conventional DP-SGD one (orders 1.1 … 10.9 by 0.1, then 11 … 64).

Tolerances (see ``_check_case``):

* refusal: a claim of ``0.97 · pld_lo`` is at least 3 % below the *true* spend, for any accountant:
  it must be refused. A claim of ``0.9 ·`` the accountant's reference is refused too (the brief).
* acceptance, "prv" records: the PRV accountant (Gopi et al. 2021) reports an upper bound that may
  exceed the tight ε by its ε-error, an *absolute* quantity (0.01 by default in common
  implementations) plus ~1 % of discretisation; a claim of ``1.02 · pld_hi + 0.012`` is above any
  such value and must be accepted (and kept, not lowered).
* acceptance, "rdp" records: RDP-to-DP conversions differ between implementations only by the grid
  of orders (each order gives a valid bound); on comparable grids the minimum moves by well under
  3 %, so a claim of ``1.03 · rdp`` must be accepted.
* a claim of 1.5 × the reference is conservative: returned with ε ≥ the claim.

The end-to-end case trains a tiny run through the command line (it starts in the background when
the module starts, so the synthetic cases run while it trains), checks its ε against the reference,
then lowers that ε and checks that ``train --resume`` refuses it (exit 2, one line, nothing changed)
and that ``RunSummary.load`` refuses it too.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dp_accounting
from dp_accounting import rdp as dp_rdp
from dp_accounting.pld import privacy_loss_distribution as dp_pld

from dptrain.errors import DPTrainError
from dptrain.release import read_privacy

REPO = Path(__file__).resolve().parents[1]
PRIOR = [[20.0, 1.0, 1]]  # a Gaussian count of the dataset size, sigma 20, sensitivity 1
RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 65))

PRV_RELATIVE, PRV_ABSOLUTE = 0.02, 0.012  # PRV's upper bound may sit above the tight ε by this
RDP_RELATIVE = 0.03                       # RDP grids of orders differ by less than this
REFUSE_BELOW_TRUE = 0.97                  # a claim 3 % below the certified lower bound
REFUSE_BRIEF = 0.9                        # a claim 10 % below the accountant's reference

E2E_TEST = "test_cli_resume_refuses_a_lowered_epsilon_and_changes_nothing"
E2E_ARGS = ["train", "--model", "tiny", "--data", "synthetic", "--synthetic-per-intent", "12",
            "--epochs", "2", "--batch-size", "32", "--physical-batch-size", "16", "--quiet",
            "--epsilon", "8"]

# dp_accounting's RDP logs a warning per order whose series does not converge; not our concern.
logging.getLogger("absl").setLevel(logging.ERROR)


# ---------------------------------------------------------------- reference accountants


def _pld(segments, pessimistic: bool, interval: float):
    total = None
    for sigma, q, n in segments:
        one = dp_pld.from_gaussian_mechanism(
            float(sigma), sampling_prob=float(q), pessimistic_estimate=pessimistic,
            value_discretization_interval=interval,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        if int(n) > 1:
            one = one.self_compose(int(n))
        total = one if total is None else total.compose(one)
    return total


def pld_bracket(segments, delta: float, interval: float) -> tuple[float, float]:
    """(lower, upper) bounds on the ε that ``segments`` spend at ``delta`` (add/remove)."""
    segments = [tuple(s) for s in segments]
    return _pld_bracket(tuple(segments), float(delta), float(interval))


@functools.lru_cache(maxsize=None)
def _pld_bracket(segments, delta, interval):
    lo = _pld(segments, False, interval).get_epsilon_for_delta(delta)
    hi = _pld(segments, True, interval).get_epsilon_for_delta(delta)
    assert lo <= hi * (1 + 1e-9), (lo, hi)
    return lo, hi


def _event(sigma: float, q: float):
    gaussian = dp_accounting.GaussianDpEvent(float(sigma))
    return gaussian if float(q) == 1.0 else dp_accounting.PoissonSampledDpEvent(float(q), gaussian)


@functools.lru_cache(maxsize=None)
def _rdp(segments, delta):
    accountant = dp_rdp.RdpAccountant(RDP_ORDERS)  # add/remove adjacency is its default
    accountant.compose(dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(_event(s, q), int(n)) for s, q, n in segments]))
    return accountant.get_epsilon(delta)


def rdp_epsilon(segments, delta: float) -> float:
    return _rdp(tuple(tuple(s) for s in segments), float(delta))


def test_reference_accountants_agree_with_closed_forms():
    """The reference itself: one Gaussian release with q = 1 has the analytic ε of Balle & Wang
    (2018) inside the PLD bracket, and RDP (an upper bound) is never below that bracket."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    sigma, delta = 2.0, 1e-5

    def gaussian_delta(eps):  # exact δ(ε) of the Gaussian mechanism, sensitivity 1
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    exact = brentq(lambda e: gaussian_delta(e) - delta, 1e-6, 50)
    lo, hi = pld_bracket([[sigma, 1.0, 1]], delta, 1e-3)
    assert lo - 1e-6 <= exact <= hi + 1e-6 and hi - lo < 2e-3, (lo, exact, hi)
    assert rdp_epsilon([[sigma, 1.0, 1]], delta) >= hi
    # composition: 4 releases at σ equal one at σ/2 (Gaussian mechanisms compose exactly)
    lo4, hi4 = pld_bracket([[sigma, 1.0, 4]], delta, 1e-3)
    lo1, hi1 = pld_bracket([[sigma / 2, 1.0, 1]], delta, 1e-3)
    assert max(lo4, lo1) <= min(hi4, hi1) and max(hi4, hi1) - min(lo4, lo1) < 5e-3, (lo4, hi4, lo1, hi1)


# ---------------------------------------------------------------- records


def make_record(accountant: str, prior, history, delta: float, epsilon: float) -> dict:
    """A private record; ``prior=None`` writes an older record without ``history``/``prior``."""
    sigma, q, _ = history[-1]
    record = {"private": True, "epsilon": float(epsilon), "target_epsilon": float(epsilon),
              "delta": float(delta), "accountant": accountant, "noise_multiplier": float(sigma),
              "sample_rate": float(q), "steps": int(sum(n for _, _, n in history))}
    if prior is not None:
        record["history"] = [list(s) for s in history]
        record["prior"] = [list(s) for s in prior]
    return record


def segments_of(prior, history):
    return [*(prior or []), *history]


_counter = iter(range(10**9))


def write_record(root: Path, record: dict) -> Path:
    """Each record in its own directory, so no reader can confuse two of them."""
    path = root / f"r{next(_counter):03d}" / "privacy.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def assert_refused(path: Path, why: str):
    try:
        got = read_privacy(path)
    except DPTrainError:
        return
    record = json.loads(path.read_text())
    pytest.fail(f"read_privacy accepted a record it must refuse ({why}): stored "
                f"{record.get('epsilon')!r}, returned {got.get('epsilon')!r}; record {record}")


# case id, accountant, prior (None: older record without history/prior), history, δ, PLD interval
CASES = [
    ("prv-s0.8-q0.01-n1000-prior", "prv", PRIOR, [[0.8, 0.01, 1000]], 1e-5, 1.5e-4),
    ("prv-s1.5-q0.1-n50-split-delta1e-6", "prv", [], [[1.5, 0.1, 30], [1.5, 0.1, 20]], 1e-6, 5e-4),
    ("prv-s4-q0.01-n1000-prior-split", "prv", PRIOR, [[4.0, 0.01, 600], [4.0, 0.01, 400]], 1e-5, 1.5e-5),
    ("prv-mixed-segments-prior", "prv", PRIOR, [[1.5, 0.01, 300], [4.0, 0.1, 100]], 1e-5, 1e-4),
    ("prv-legacy-s0.8-q0.1-n50", "prv", None, [[0.8, 0.1, 50]], 1e-5, 5e-4),
    ("rdp-s1.5-q0.01-n50-prior-split", "rdp", PRIOR, [[1.5, 0.01, 20], [1.5, 0.01, 30]], 1e-5, 2e-4),
    ("rdp-s4-q0.1-n1000-prior", "rdp", PRIOR, [[4.0, 0.1, 1000]], 1e-5, 1.5e-4),
    ("rdp-s0.8-q0.01-n1000", "rdp", [], [[0.8, 0.01, 1000]], 1e-5, None),
    ("rdp-legacy-s4-q0.01-n50", "rdp", None, [[4.0, 0.01, 50]], 1e-5, 5e-5),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_read_privacy_against_dp_accounting(case, tmp_path):
    name, accountant, prior, history, delta, interval = case
    segments = segments_of(prior, history)
    rdp = rdp_epsilon(segments, delta)
    lo = hi = None
    if interval is not None:  # PLD where affordable (for "rdp" cases only a cross-check)
        lo, hi = pld_bracket(segments, delta, interval)
        assert hi <= rdp * (1 + 1e-6), f"reference: PLD {hi} above RDP {rdp}"
    if accountant == "prv":
        reference, accept = hi, hi * (1 + PRV_RELATIVE) + PRV_ABSOLUTE
    else:
        reference, accept = rdp, rdp * (1 + RDP_RELATIVE)
    steps = sum(n for _, _, n in history)

    # Refused: 10 % below the accountant's reference, and 3 % below the certified lower bound of
    # the true spend. Only the larger (harder) of the two claims is read: a reader that refuses it
    # and accepts a smaller one would be absurd, and each read of a "prv" record costs ~0.2 s.
    refuse = [(REFUSE_BRIEF * reference, f"claim 0.9 x the {accountant} reference {reference:.6g}")]
    if lo is not None:
        refuse.append((REFUSE_BELOW_TRUE * lo,
                       f"claim 3% below the certified lower bound {lo:.6g} of the true spend"))
    claim, why = max(refuse)
    assert_refused(write_record(tmp_path, make_record(accountant, prior, history, delta, claim)),
                   f"{name}: {why} ({claim:.6g})")

    # Accepted and kept: just above what any sound, reasonably tight accountant gives; 1.5 x.
    for label, claim in (("within tolerance", accept), ("conservative 1.5 x", 1.5 * reference)):
        path = write_record(tmp_path, make_record(accountant, prior, history, delta, claim))
        try:
            got = read_privacy(path)
        except DPTrainError as e:
            pytest.fail(f"{name}: refused an honest record ({label}): claim {claim:.6g}, reference "
                        f"{accountant} {reference:.6g} (PLD [{lo}, {hi}], RDP {rdp:.6g}): {e}")
        eps = float(got["epsilon"])
        assert eps >= claim * (1 - 1e-12), f"{name}: lowered a claim ({label}): {claim} -> {eps}"
        if lo is not None:
            assert eps >= lo, f"{name}: returned ε {eps} below the true spend's lower bound {lo}"
        assert float(got["delta"]) == delta and int(got["steps"]) == steps, (name, got)
        assert got["private"] is True, (name, got)


# ---------------------------------------------------------------- consistency refusals


def _valid(epsilon=5.0, prior=PRIOR, history=((4.0, 0.1, 50),), accountant="prv") -> dict:
    # ε 5.0 is far above the spend (≈ 0.71) of this record, so only the mutations can be wrong.
    return make_record(accountant, prior, [list(h) for h in history], 1e-5, epsilon)


def _mutations():
    def edit(f):
        record = _valid()
        f(record)
        return record

    yield "steps one more than the history's sum", edit(lambda r: r.update(steps=51))
    yield "steps one less than the history's sum", edit(lambda r: r.update(steps=49))
    yield "steps not the sum of two segments", \
        _valid(history=((4.0, 0.1, 30), (4.0, 0.1, 20))) | {"steps": 30}
    yield "history sigma zero", edit(lambda r: r["history"][0].__setitem__(0, 0.0))
    yield "history sigma negative", edit(lambda r: r["history"][0].__setitem__(0, -4.0))
    yield "prior sigma zero", edit(lambda r: r["prior"][0].__setitem__(0, 0.0))
    yield "prior sigma negative", edit(lambda r: r["prior"][0].__setitem__(0, -20.0))
    yield "history q above 1", edit(lambda r: r["history"][0].__setitem__(1, 1.5))
    yield "older record, sigma negative", make_record("prv", None, [[-4.0, 0.1, 50]], 1e-5, 5.0)
    yield "older record, sigma zero", make_record("prv", None, [[0.0, 0.1, 50]], 1e-5, 5.0)
    yield "older record, q above 1", make_record("prv", None, [[4.0, 1.5, 50]], 1e-5, 5.0)
    yield "rdp record, sigma negative", _valid(accountant="rdp", history=((-4.0, 0.1, 50),))
    yield "not private but a finite epsilon", {"private": False, "epsilon": 3.0}
    yield "not private but a finite epsilon (string)", {"private": False, "epsilon": "3.0"}


MUTATIONS = list(_mutations())


def test_valid_base_records_are_accepted(tmp_path):
    """The unmutated records are read back (else every refusal below would prove nothing)."""
    for record in (_valid(), _valid(history=((4.0, 0.1, 30), (4.0, 0.1, 20))),
                   _valid(accountant="rdp"), make_record("prv", None, [[4.0, 0.1, 50]], 1e-5, 5.0)):
        got = read_privacy(write_record(tmp_path, record))
        assert float(got["epsilon"]) >= 5.0
    got = read_privacy(write_record(tmp_path, {"private": False, "epsilon": "inf"}))
    assert got["private"] is False and float(got["epsilon"]) == math.inf


@pytest.mark.parametrize("why,record", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_inconsistent_records_are_refused(why, record, tmp_path):
    assert_refused(write_record(tmp_path, record), why)


# ---------------------------------------------------------------- end to end through the CLI


# The tiny run trains while this process computes references: one thread each, since two
# contended threads on a shared 2-core machine run it about twice as slowly (measured 10 s vs 22 s).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "dptrain", *args]


@pytest.fixture(scope="module", autouse=True)
def background_run(request, tmp_path_factory):
    """Starts the tiny training run as soon as the module starts, if the e2e test is selected."""
    if not any(getattr(item, "originalname", item.name) == E2E_TEST and item.module is request.module
               for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = subprocess.Popen(_cli(*E2E_ARGS, "--out", str(out)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_cli_resume_refuses_a_lowered_epsilon_and_changes_nothing(background_run):
    from dptrain.trainer import RunSummary

    proc, run = background_run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{stdout}\n{stderr}"

    path = run / "privacy.json"
    record = json.loads(path.read_text())
    assert record["private"] is True
    history, prior = record["history"], record.get("prior", [])
    assert int(record["steps"]) == sum(int(n) for _, _, n in history) > 0
    assert all(float(q) == 1.0 and int(n) == 1 for _, q, n in prior), prior
    segments = segments_of(prior, history)
    delta, stored = float(record["delta"]), float(record["epsilon"])
    lo, hi = pld_bracket(segments, delta, 5e-4)
    if record["accountant"] == "prv":
        assert lo * (1 - 1e-3) <= stored <= hi * (1 + PRV_RELATIVE) + PRV_ABSOLUTE, (lo, stored, hi)
    else:
        assert record["accountant"] == "rdp", record["accountant"]
        rdp = rdp_epsilon(segments, delta)
        assert rdp * (1 - RDP_RELATIVE) <= stored <= rdp * (1 + RDP_RELATIVE), (rdp, stored)
    assert stored <= float(record["target_epsilon"]) * (1 + 1e-9), "spent more than the target"
    assert float(read_privacy(path)["epsilon"]) >= stored
    assert float(RunSummary.load(run).privacy["epsilon"]) >= stored

    record["epsilon"] = 0.1  # far below the ≈ lo it spends
    path.write_text(json.dumps(record, indent=2))
    before = _snapshot(run)
    resumed = subprocess.run(_cli("train", "--resume", "--out", str(run)), cwd=REPO,
                             capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    lines = resumed.stderr.strip().splitlines()
    assert resumed.returncode == 2, (resumed.returncode, resumed.stdout, resumed.stderr)
    assert len(lines) == 1 and "Traceback" not in resumed.stderr, resumed.stderr
    assert any(w in lines[0].lower() for w in ("epsilon", "privacy", "ε")), lines[0]
    after = _snapshot(run)
    assert after.keys() == before.keys(), set(after) ^ set(before)
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"--resume changed {changed}"

    with pytest.raises(DPTrainError):
        RunSummary.load(run)
    with pytest.raises(DPTrainError):
        read_privacy(path)
    assert _snapshot(run) == before
