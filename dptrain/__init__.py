"""dptrain: differentially private fine-tuning of text classifiers at the cost of ordinary training.

The small API (see README): :func:`make_private` for a whole DP-SGD setup, or its parts —
:class:`PerSampleClipper`, :class:`DPOptimizer`, :class:`PrivacyLedger`, :class:`PoissonSampler`.
"""

from .accounting import PrivacyLedger, calibrate_noise_multiplier, epsilon_after
from .engine import PerSampleClipper
from .errors import ConfigError, DataError, DPTrainError, ModelError, PrivacyBudgetExceeded
from .optimizer import DPOptimizer
from .private_training import PrivateTraining, make_private
from .sampling import PoissonSampler, physical_batches

__version__ = "0.1.0"
