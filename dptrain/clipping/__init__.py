"""Per-layer rules for per-sample gradient norms and clipped sums, keyed by module type.

Importing this package registers the built-in rules (Linear, HF Conv1D, Embedding, LayerNorm,
RMSNorm); any other module with trainable parameters falls back to ``torch.func``.
"""

from . import embedding, layernorm, linear  # noqa: F401  (registration side effects)
from .functorch import FALLBACK, refusal
from .registry import NORM_METHODS, Call, ClipRule, FlushContext, register_rule, rule_for

