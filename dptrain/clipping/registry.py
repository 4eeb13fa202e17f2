"""Per-layer clipping rules and the registry that maps a module type to its rule.

A rule knows, for one module type, how to turn what the forward and backward passes leave behind
(the layer's input activations ``a`` and the gradient ``g`` of the loss with respect to its output)
into

* the per-sample squared gradient norms ``||G_i||²`` of the module's trainable parameters, and
* the clipped sum ``Σ_i c_i G_i``, added into each parameter's ``.grad``,

without autograd ever forming the ordinary weight gradient (book-keeping, Bu et al. 2023,
"Differentially private optimization on large model at small cost", ICML).

A module may be called several times in one forward pass (a shared layer, ALBERT-style); each call
is one :class:`Call`, and a sample's gradient is the sum over its calls.

A user's own layer plugs in exactly like a built-in one::

    @register_rule(MyLayer)
    class MyLayerRule(ClipRule):
        def norm_sq(self, module, calls, ctx): ...
        def accumulate(self, module, calls, coef, ctx): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import ModelError

NORM_METHODS = ("auto", "ghost", "instantiate")


@dataclass
class Call:
    """What one forward call of a module left behind for per-sample clipping.

    ``inputs`` is what the rule's :meth:`ClipRule.capture` kept (detached), ``grad`` the gradient
    of the loss with respect to the call's output (``None`` until the backward pass reaches it).
    ``state`` is "pending" until the call is clipped ("flushed") or forgotten ("dropped").
    """

    inputs: Any
    grad: torch.Tensor | None = None
    state: str = "pending"
    versions: tuple[tuple[torch.Tensor, int], ...] = ()

    def __post_init__(self):
        self.versions = tuple((t, t._version) for t in _tensors(self.inputs))

    def set_grad(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach()
        self.versions += ((self.grad, self.grad._version),)

    def changed(self) -> bool:
        """Whether a kept tensor was written in place after it was kept (its version moved):
        the rule would then read values the layer never saw."""
        return any(t._version != v for t, v in self.versions)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(tree)[0] if isinstance(v, torch.Tensor)]


def fingerprint(x: torch.Tensor) -> tuple:
    """What identifies a tensor's contents while it is alive: storage address, layout, dtype,
    device and version counter (bumped by every in-place write)."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)


@dataclass
class FlushContext:
    """Shared state for one flush (one physical batch): batch size, options, and caches.

    ``gram`` and ``scaled`` cache per *source*: the captured input tensors of a module's calls,
    which the query, key and value projections of an attention block share. An entry keeps its
    sources alive, so no other tensor can take their address while the entry exists; keying a
    temporary (a concatenation, an fp32 upcast) by its address instead gives stale hits once it
    is freed and the address is reused.
    """

    batch_size: int
    norm_method: str = "auto"
    trainable: dict[nn.Module, frozenset[str]] = field(default_factory=dict)
    scratch: dict[Any, Any] = field(default_factory=dict)
    _cache: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = field(default_factory=dict)

    def gram(self, sources: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """``x xᵀ`` per sample (in at least fp32) for ``x`` [B, T, d] built from ``sources``."""

        def compute():
            up = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return torch.bmm(up, up.transpose(1, 2))

        return self._cached("gram", sources, compute)

    def scaled(self, sources: tuple[torch.Tensor, ...], x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``coef_i · x_i`` for ``x`` [B, ...] built from ``sources`` (one clip factor per flush),
        in at least fp32: a clip factor rounded to bf16 could let a sample exceed C by 0.4%."""

        def compute():
            up = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return up * coef.to(up.dtype).view(-1, *([1] * (up.dim() - 1)))

        return self._cached("scaled", sources, compute)

    def _cached(self, kind: str, sources: tuple[torch.Tensor, ...], compute) -> torch.Tensor:
        key = (kind, *(fingerprint(s) for s in sources))
        hit = self._cache.get(key)
        if hit is not None:
            return hit[1]
        value = compute()
        self._cache[key] = (tuple(sources), value)  # holding the sources pins their addresses
        return value

    def trains(self, module: nn.Module, name: str) -> bool:
        """Whether ``module.<name>`` is one of the parameters being trained privately."""
        return name in self.trainable.get(module, ())


class ClipRule:
    """Per-sample norms and clipped sums for one module type. Subclass and register.

    ``eager_norm``: the engine may call :meth:`norm_sq` inside the backward pass, as soon as the
    module's gradients arrive (set False for rules that must not run there).
    """

    eager_norm = True

    def check(self, module: nn.Module) -> str | None:
        """A reason this module cannot be trained privately, or None if it can."""
        return None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """What to keep from a forward call; by default the first positional input, detached."""
        if not args or not isinstance(args[0], torch.Tensor):
            raise ModelError(
                f"{type(module).__name__} was called without a tensor as its first positional "
                "input; its clipping rule needs it."
            )
        return args[0].detach()

    def norm_sq(self, module: nn.Module, calls: list[Call], ctx: FlushContext) -> torch.Tensor:
        """Per-sample squared gradient norm of the module's trainable parameters, shape [B]."""
        raise NotImplementedError

    def accumulate(
        self, module: nn.Module, calls: list[Call], coef: torch.Tensor, ctx: FlushContext
    ) -> None:
        """Add ``Σ_i coef_i G_i`` into ``p.grad`` for each trainable parameter ``p``."""
        raise NotImplementedError


_RULES: dict[type, ClipRule] = {}


def register_rule(*module_types: type, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: use this rule for these module types (exact type or subclasses).

    A second registration for the same type is refused unless ``replace=True``.
    """

    def decorate(rule_cls: type) -> type:
        rule = rule_cls()
        for module_type in module_types:
            if module_type in _RULES and not replace:
                raise ValueError(
                    f"a clipping rule for {module_type.__name__} is already registered "
                    f"({type(_RULES[module_type]).__name__}); pass replace=True to override it."
                )
            _RULES[module_type] = rule
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> ClipRule | None:
    """The rule registered for the module's type or its nearest registered base class."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def registered_types() -> Iterable[type]:
    return tuple(_RULES)


def batch_first(x: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """``x`` with its leading axis equal to the batch, expanding a broadcast leading axis of 1.

    HF encoders pass ``position_ids``/``token_type_ids`` as a [1, T] buffer broadcast over the
    batch; every sample then sees the same ids, which is what the expansion says.
    """
    if x.shape[0] == batch_size:
        return x
    if x.shape[0] == 1:
        return x.expand(batch_size, *x.shape[1:])
    raise ModelError(
        f"{what} has leading dimension {x.shape[0]} but the batch has {batch_size} samples; "
        "per-sample clipping needs the batch on axis 0 of every layer's input and output."
    )
