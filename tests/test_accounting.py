"""The ledger and σ calibration against Opacus' accountants used directly (the oracle)."""

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from dptrain import ConfigError, PrivacyBudgetExceeded, PrivacyLedger, calibrate_noise_multiplier, epsilon_after


def opacus_epsilon(kind, sigma, q, steps, delta):
    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("kind", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_reproduces_target_epsilon(kind, target):
    q, steps, delta = 0.02, 300, 1e-5
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps,
                                       accountant=kind)
    eps = opacus_epsilon(kind, sigma, q, steps, delta)
    assert target - 0.02 <= eps <= target  # never above the target, and not wastefully below
    # a 2% smaller σ would overspend: the calibration is tight
    assert opacus_epsilon(kind, sigma * 0.98, q, steps, delta) > target


def test_prv_is_tighter_than_rdp():
    assert epsilon_after(1.0, 0.01, 1000, 1e-5, "prv") < epsilon_after(1.0, 0.01, 1000, 1e-5, "rdp")


def test_ledger_matches_opacus_step_by_step_and_across_segments():
    ledger = PrivacyLedger(delta=1e-5, accountant="prv")
    ref = PRVAccountant()
    for sigma, q, n in [(1.1, 0.01, 40), (0.9, 0.02, 25)]:
        for _ in range(n):
            ledger.record_step(sigma, q)
            ref.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.steps == 65
    assert ledger.history == [(1.1, 0.01, 40), (0.9, 0.02, 25)]
    assert ledger.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_ledger_refuses_a_step_past_the_target():
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=20)
    ledger = PrivacyLedger(delta=1e-5, target_epsilon=2.0)
    ledger.reserve(sigma, 0.05, 20)
    for _ in range(20):
        ledger.check_step(sigma, 0.05)
        ledger.record_step(sigma, 0.05)
    assert ledger.epsilon() <= 2.0
    with pytest.raises(PrivacyBudgetExceeded, match="past the target 2"):
        ledger.check_step(sigma, 0.05)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.check_step(sigma * 0.5, 0.05)  # a cheaper-looking change of σ is checked too


def test_ledger_state_survives_a_restart():
    ledger = PrivacyLedger(delta=1e-6, accountant="rdp", target_epsilon=5.0)
    for _ in range(30):
        ledger.record_step(1.0, 0.03)
    restored = PrivacyLedger(delta=1e-6, accountant="rdp", target_epsilon=5.0)
    restored.load_state_dict(ledger.state_dict())
    assert restored.steps == 30 and restored.epsilon() == ledger.epsilon()
    with pytest.raises(ConfigError, match="saved privacy ledger is for accountant 'rdp'"):
        PrivacyLedger(delta=1e-6, accountant="prv").load_state_dict(ledger.state_dict())
    bad = ledger.state_dict() | {"history": [[1.0, 3.0, 5]]}
    with pytest.raises(ConfigError, match="invalid segment"):
        restored.load_state_dict(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_epsilon=0.0), "epsilon must be a finite number > 0"),
    (dict(delta=1.0), "delta must be in"),
    (dict(sample_rate=0.0), "sample rate must be in"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(accountant="gdp"), "accountant must be one of prv, rdp"),
])
def test_calibration_rejects_bad_arguments(kwargs, message):
    args = dict(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=10) | kwargs
    with pytest.raises(ConfigError, match=message):
        calibrate_noise_multiplier(**args)


def test_a_meaningless_target_epsilon_is_refused_at_once():
    """ε = 1000 once made the PRV calibration run for minutes in 13 GB; now one line."""
    with pytest.raises(ConfigError, match="use epsilon inf"):
        calibrate_noise_multiplier(target_epsilon=1000.0, delta=1e-5, sample_rate=0.01, steps=100)
