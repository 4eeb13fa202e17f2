"""Errors a user can act on.

Every error the command line turns into one line on stderr and exit code 2 derives from
:class:`DPTrainError`. Messages follow one voice: what is wrong, what is allowed, what came in —
e.g. ``"epsilon must be > 0, got -1.0."``. Anything else that escapes is a bug and keeps its
traceback.
"""

from __future__ import annotations


class DPTrainError(Exception):
    """Base class of the errors caused by input, configuration or budget, not by a bug."""


class DataError(DPTrainError, ValueError):
    """A data file or split cannot be used: missing, malformed, empty, or with unknown labels."""


class ModelError(DPTrainError, ValueError):
    """A model cannot be resolved, loaded, or made private (e.g. it contains BatchNorm)."""


class ConfigError(DPTrainError, ValueError):
    """An option is out of range or options contradict each other (e.g. epsilon <= 0)."""


class PrivacyBudgetExceeded(DPTrainError, RuntimeError):
    """Taking another step would spend more than the target epsilon."""


class OutputError(DPTrainError):
    """An output cannot be written (read-only file system, no permission, disk full)."""


class TrainingDiverged(DPTrainError, RuntimeError):
    """The loss became NaN or infinite (typically a learning rate far too high)."""
