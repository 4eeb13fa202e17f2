"""dptrain: differentially private fine-tuning of text classifiers at the cost of ordinary training.

The small API (see README): :func:`make_private` for a whole DP-SGD setup, or its parts —
:class:`PerSampleClipper`, :class:`DPOptimizer`, :class:`PrivacyLedger`, :class:`PoissonSampler`.
Names are imported on first use, so ``import dptrain.data`` or ``dptrain --help`` does not pay
for torch and Opacus.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "PrivacyLedger": "accounting", "calibrate_noise_multiplier": "accounting",
    "epsilon_after": "accounting",
    "PerSampleClipper": "engine",
    "DPOptimizer": "optimizer",
    "PrivateTraining": "private_training", "make_private": "private_training",
    "PoissonSampler": "sampling", "physical_batches": "sampling",
    "ConfigError": "errors", "DataError": "errors", "DPTrainError": "errors", "ModelError": "errors",
    "PrivacyBudgetExceeded": "errors", "OutputError": "errors",
    "TrainConfig": "trainer", "train_run": "trainer",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
