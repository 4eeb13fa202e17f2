"""Per-sample clipping attached to an ordinary model, in one backward pass per physical batch.

:class:`PerSampleClipper` hooks every module that owns trainable parameters:

* **forward**: while the module runs, its trainable parameters stop requiring grad, so autograd
  records the graph to the module's *input* but never forms the weight gradient; the rule keeps
  the input activations ``a`` (detached);
* **backward**: a hook on the module's output receives ``g = ∂L/∂output``;
* **end of backward**: per-sample squared norms are summed over layers, giving ||G_i||; the clip
  factor c_i = min(1, C/(||G_i|| + 1e-6)) — or c_i = 1/(||G_i|| + γ) for automatic clipping —
  weights each sample, and each rule adds Σ_i c_i G_i into ``p.grad`` (book-keeping, Bu et al.
  2023). The ordinary weight gradient is never computed, which pays for the norms.

``p.grad`` then holds the running clipped sum over the physical batches of one logical batch;
:class:`~dptrain.optimizer.DPOptimizer` adds the noise and divides by the expected batch size.

Fail-closed checks: BatchNorm and other sample-mixing layers, shared parameters, gradient
checkpointing, gradients reaching a trainable parameter outside its module's forward, two forward
passes before one backward, a batch axis that is not axis 0 of every clipped layer (verified once
on sub-batches, since shapes cannot tell positions from samples when T == B), a kept tensor
written in place before the backward pass reads it, and parameters frozen or unfrozen after
attaching all raise instead of giving a silently wrong guarantee.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .clipping import FALLBACK, NORM_METHODS, Call, ClipRule, FlushContext, refusal, rule_for
from .errors import ConfigError, DPTrainError, ModelError

AUTO_CLIP_GAMMA = 0.01  # stability constant γ of automatic clipping (Bu et al. 2023, AUTO-S)
LOSS_REDUCTIONS = ("mean", "sum")


class _EnableGrad(torch.autograd.Function):
    """Gives a module output that does not require grad (its inputs did not, and its parameters
    were hidden from autograd) a place in the graph, so that its gradient can be observed.

    ``expand_to`` also turns a broadcast output (batch axis 1, e.g. position embeddings of a
    [1, T] id buffer) into one row per sample, so its gradient stays per-sample instead of being
    summed over the batch by the broadcast.
    """

    @staticmethod
    def forward(ctx, x, anchor, expand_to):
        if expand_to is not None:
            x = x.expand(expand_to, *x.shape[1:])
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


class PerSampleClipper:
    """Clips per-sample gradients of ``model``'s trainable parameters and sums them into ``.grad``.

    Args:
        model: any ``nn.Module``; parameters with ``requires_grad=False`` when the clipper is
            created are frozen and cost nothing.
        max_grad_norm: the clipping bound C, or ``"auto"`` for automatic clipping (AUTO-S,
            Bu et al. 2023): c_i = 1/(||G_i|| + 0.01), every sample contributes a vector of norm
            < 1, so the sensitivity is 1 and nothing needs tuning (the learning rate absorbs C).
        loss_reduction: ``"mean"`` if the loss is the mean over the physical batch (HF's
            ``.loss``), ``"sum"`` if it is the sum of per-sample losses.
        norm_method: ``"auto"`` picks ghost norm or instantiation per layer by cost; ``"ghost"``
            and ``"instantiate"`` force one (for tests and benchmarks).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_grad_norm: float | str = 1.0,
        loss_reduction: str = "mean",
        norm_method: str = "auto",
        keep_norms: bool = False,
    ):
        if max_grad_norm != "auto" and not (
            isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm)
        ):
            raise ConfigError(f"max_grad_norm must be a finite number > 0 or 'auto', got {max_grad_norm!r}.")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {loss_reduction!r}.")
        if norm_method not in NORM_METHODS:
            raise ConfigError(f"norm_method must be one of {', '.join(NORM_METHODS)}, got {norm_method!r}.")
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self.norm_method = norm_method
        self.keep_norms = keep_norms
        self.last_norms: torch.Tensor | None = None  # per-sample norms of the last flush, if kept
        self.rows_clipped = 0  # samples clipped and summed since the last reset

        self._rules: dict[nn.Module, ClipRule] = {}
        self._trainable: dict[nn.Module, frozenset[str]] = {}
        self._names: dict[nn.Module, str] = {}
        self._calls: dict[nn.Module, list[Call]] = {}
        self._handles: list[Any] = []
        self._anchor = torch.zeros((), requires_grad=True)
        self._batch_size: int | None = None
        self._flush_queued = False
        self._suspended = False
        self._ctx: FlushContext | None = None  # per backward pass: batch size and caches
        self._norm_parts: dict[nn.Module, torch.Tensor] = {}  # per-module per-sample squared norms
        self._verified = False  # batch axis and sample independence checked (see _verify_batch_axis)
        self._attach()

    # ---------------------------------------------------------------- attach / detach
    @property
    def sensitivity(self) -> float:
        """Bound on each sample's clipped contribution: C, or 1 for automatic clipping."""
        return 1.0 if self.max_grad_norm == "auto" else float(self.max_grad_norm)

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters trained privately: module by module in model order, each module's own
        by name (so a layer's bias precedes its weight). Noise streams, the replay check and
        gradient canaries' ``param_index`` all use this order."""
        return [getattr(m, n) for m in self._rules for n in sorted(self._trainable[m])]

    def _attach(self) -> None:
        problems: list[str] = []
        if _checkpointing(self.model):
            problems.append("gradient checkpointing re-runs the forward inside backward; disable it")
        owners: dict[int, str] = {}
        for name, module in self.model.named_modules():
            label = name or type(self.model).__name__
            reason = refusal(module)
            if reason and module.training:
                problems.append(f"{label}: {reason}")
            own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            for n, p in module.named_parameters(recurse=False):
                full = f"{name}.{n}" if name else n
                if id(p) in owners:
                    if p.requires_grad:
                        problems.append(
                            f"{full} is the same trainable parameter as {owners[id(p)]} (weight "
                            "tying); per-sample norms of shared weights are not supported: untie or freeze it"
                        )
                else:
                    owners[id(p)] = full
            if not own:
                continue
            rule = rule_for(module) or FALLBACK
            reason = rule.check(module)
            if reason:
                problems.append(f"{label}: {reason}")
                continue
            self._rules[module] = rule
            self._trainable[module] = frozenset(own)
            self._names[module] = label
            self._calls[module] = []
        if problems:
            raise ModelError("cannot train this model privately: " + "; ".join(problems) + ".")
        if not self._rules:
            raise ModelError("the model has no trainable parameters (all have requires_grad=False).")

        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        for module in self._rules:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(
                module.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            )
            for n in self._trainable[module]:
                param = getattr(module, n)
                self._handles.append(param.register_post_accumulate_grad_hook(self._leak_hook(module, n)))

    def detach(self) -> None:
        """Remove every hook; the model is again an ordinary model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._drop_calls()

    # ---------------------------------------------------------------- hooks
    def _capturing(self) -> bool:
        return torch.is_grad_enabled() and not self._suspended

    def _root_pre_hook(self, module, args, kwargs):
        if not self._capturing():
            return None
        if any(self._calls.values()):
            # A previous forward was never backpropagated (e.g. a loss computed for logging):
            # forget it. If it is backpropagated later after all, its hooks raise (see below).
            self._drop_calls()
        self._check_trainable_set()
        self._batch_size = _leading_dim(args, kwargs)
        if not self._verified and self._batch_size is not None and self._batch_size >= 2:
            self._verify_batch_axis(args, kwargs, self._batch_size)
        return None

    def _check_trainable_set(self) -> None:
        """Refuse a model whose trainable parameters changed since the clipper was attached.

        A parameter unfrozen later would get autograd's raw gradient (neither clipped nor
        noised); one frozen later would silently keep training. Both are decided once, here.
        """
        private = {id(p) for p in self.parameters}
        advice = ("choose what trains before attaching (for gradual unfreezing, attach a new "
                  "PerSampleClipper and DPOptimizer that share the same PrivacyLedger)")
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in private:
                raise ModelError(
                    f"parameter {name} was unfrozen after per-sample clipping was attached; its "
                    f"gradient would be neither clipped nor noised: {advice}."
                )
        for module, names in self._trainable.items():
            for n in sorted(names):
                if not getattr(module, n).requires_grad:
                    raise ModelError(
                        f"parameter {self._names[module]}.{n} was frozen after per-sample clipping "
                        f"was attached: {advice}."
                    )

    def _verify_batch_axis(self, args: tuple, kwargs: dict, batch: int) -> None:
        """Check, once, that axis 0 of every clipped layer's input and output is the sample axis.

        Shapes alone cannot say so: a sequence-first layer ([T, B, d]) looks batch-first when
        T == B, and its "per-sample" gradients are then per position. So the model runs (eval
        mode, no grad, no capture) on the first k = min(B, 4) samples and on their two halves,
        with broadcast outputs expanded as in training; for every clipped layer, the halves'
        inputs and outputs stacked on axis 0 must equal the whole's. A layer that indexes
        samples on another axis fails on shape, one that mixes samples fails on value.
        """
        k = min(batch, 4)
        half = k // 2
        runs = [self._probe(args, kwargs, batch, lo, hi) for lo, hi in ((0, k), (0, k), (0, half), (half, k))]
        whole, again, first, second = runs
        for module, label in self._names.items():
            pairs = zip(whole.get(module, []), again.get(module, []))
            if not all(_close(x, y) for p, q in pairs for x, y in zip(p, q) if x is not None):
                raise ModelError(
                    f"{label} gives different results on the same samples in eval mode: the model "
                    "uses random operations even in eval mode (e.g. F.dropout(training=True)), so "
                    "dptrain cannot verify that axis 0 of every layer is the batch."
                )
        for module, label in self._names.items():
            calls = [whole.get(module, []), first.get(module, []), second.get(module, [])]
            if len({len(c) for c in calls}) != 1:
                raise ModelError(
                    f"{label} ran {len(calls[0])} time(s) on {k} samples but {len(calls[1])} and "
                    f"{len(calls[2])} on their halves; dptrain cannot verify that axis 0 is the batch."
                )
            for j, (w, a, b) in enumerate(zip(*calls)):
                for what, tw, ta, tb in zip(("input", "output"), w, a, b):
                    if tw is not None and not _stacks_to(tw, ta, tb):
                        raise ModelError(
                            f"the {what} of {label} (call {j + 1}, shape {tuple(tw.shape)} for {k} "
                            "samples) does not split by sample along axis 0: either the layer puts "
                            "the batch on another axis (sequence-first, e.g. batch_first=False) or "
                            "it mixes samples; per-sample clipping would clip the wrong rows. Put "
                            "the batch on axis 0 of every layer's input and output."
                        )
        self._verified = True

    def _probe(self, args: tuple, kwargs: dict, batch: int, lo: int, hi: int) -> dict:
        """Each clipped layer's (first input, output) per call, running samples lo:hi in eval mode."""
        seen, error, broadcast = self._run_probe(args, kwargs, batch, lo, hi)
        if error is None:
            return seen
        if broadcast:  # name the layers whose per-sample expansion the model cannot take
            candidates = self._run_probe(args, kwargs, batch, lo, hi, expand=frozenset())[2]
            culprits = [m for m in candidates
                        if self._run_probe(args, kwargs, batch, lo, hi, expand={m})[1] is not None]
            names = ", ".join(self._names[m] for m in culprits or broadcast)
            raise ModelError(
                f"the model fails when the output of {names} (one row shared by every sample, "
                "e.g. DeBERTa's relative-position projections) is expanded to one row per sample, "
                "which per-sample clipping needs to keep each sample's gradient apart: freeze "
                f"{'it' if len(culprits) == 1 else 'them'}. The model said: {error}"
            )
        raise ModelError(
            f"dptrain runs the model once on {hi - lo} of the batch's samples to verify that axis 0 "
            f"is the batch, and it failed: {error}"
        )

    def _run_probe(self, args, kwargs, batch, lo, hi, expand=None):
        """(records, error text or None, modules with a broadcast output); ``expand``: the
        modules whose broadcast output is expanded (default all, as in training)."""
        n = hi - lo

        def rows(v):
            return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v

        seen: dict[nn.Module, list] = {}
        broadcast: list[nn.Module] = []

        def record(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return None
            first = next((v for v in inputs if isinstance(v, torch.Tensor) and v.dim() > 0), None)
            seen.setdefault(module, []).append((first, output))
            if n > 1 and output.dim() > 0 and output.shape[0] == 1:
                if module not in broadcast:
                    broadcast.append(module)
                if expand is None or module in expand:
                    return output.expand(n, *output.shape[1:])  # as the training forward does
            return None

        flat, spec = tree_flatten((args, kwargs))
        p_args, p_kwargs = tree_unflatten([rows(v) for v in flat], spec)
        modes = {m: m.training for m in self.model.modules()}
        handles = [m.register_forward_hook(record) for m in self._rules]
        self._suspended = True
        error = None
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(*p_args, **p_kwargs)
        except DPTrainError:
            raise
        except Exception as exc:  # the model's own failure, reported in one line by the caller
            error = f"{type(exc).__name__}: {exc}".split("\n")[0]
        finally:
            self._suspended = False
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        return seen, error, broadcast

    def _pre_hook(self, module, args):
        if not self._capturing():
            return None
        for n in self._trainable[module]:
            getattr(module, n).requires_grad_(False)
        return None

    def _post_hook(self, module, args, kwargs, output):
        if self._suspended:
            return None
        for n in self._trainable[module]:
            getattr(module, n).requires_grad_(True)
        if output is None or not torch.is_grad_enabled():  # None: the forward raised
            return None
        if not isinstance(output, torch.Tensor):
            raise ModelError(
                f"{self._names[module]} ({type(module).__name__}) returned {type(output).__name__}; "
                "a layer with trainable parameters must return one tensor to be clipped per sample."
            )
        call = Call(self._rules[module].capture(module, args, kwargs))
        self._calls[module].append(call)
        batch = self._batch_size
        expand = batch if batch is not None and batch > 1 and output.dim() > 0 and output.shape[0] == 1 else None
        if not output.requires_grad:
            output = _EnableGrad.apply(output, self._anchor, expand)
        elif expand is not None:
            output = output.expand(expand, *output.shape[1:])

        def on_grad(grad: torch.Tensor) -> None:
            if call.state == "dropped":
                raise ModelError(
                    "a forward pass was backpropagated after a newer forward pass started: "
                    "per-sample clipping needs each forward followed by its own backward "
                    "(sum the losses of one forward, not of several)."
                )
            if call.state == "flushed" or call.grad is not None:
                raise ModelError(
                    f"{self._names[module]} received a second gradient for the same forward pass "
                    "(backward called twice, e.g. with retain_graph=True); run a new forward."
                )
            call.set_grad(grad)
            if not self._flush_queued:
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self._norm_eagerly(module)

        output.register_hook(on_grad)
        return output

    def _leak_hook(self, module: nn.Module, name: str):
        label = f"{self._names[module]}.{name}"

        def on_accumulate(param: torch.Tensor) -> None:
            raise ModelError(
                f"parameter {label} received a gradient from autograd outside its module's forward "
                "(weight tying or direct use of the tensor); its per-sample clipping cannot cover "
                "that use: freeze it or route the use through the module."
            )

        return on_accumulate

    # ---------------------------------------------------------------- clip and sum
    def _context(self, batch: int) -> FlushContext:
        if self._ctx is None:
            self._ctx = FlushContext(batch_size=batch, norm_method=self.norm_method,
                                     trainable=self._trainable)
        elif self._ctx.batch_size != batch:
            raise ModelError(
                f"layer outputs disagree on the batch size ({self._ctx.batch_size} and {batch}); "
                "per-sample clipping needs the batch on axis 0 of every layer's output."
            )
        return self._ctx

    def _norm_eagerly(self, module: nn.Module) -> None:
        """Add the module's per-sample squared norms as soon as all its calls have gradients.

        Done inside the backward pass, while the layer's activations and gradients are still in
        cache; a module called several times waits for its last call (its norm is over the sum).
        """
        rule = self._rules[module]
        calls = self._calls[module]
        if not rule.eager_norm or any(c.grad is None for c in calls) or calls[0].grad.shape[:1] == (0,):
            return  # (a batch of no rows adds nothing: see flush)
        self._check_unchanged(module, calls)
        ctx = self._context(calls[0].grad.shape[0])
        with torch.no_grad():
            part = rule.norm_sq(module, calls, ctx)
        self._norm_parts[module] = part

    def flush(self) -> None:
        """Clip and sum the per-sample gradients of the last backward pass into ``p.grad``.

        Runs by itself at the end of every backward pass; calling it again is harmless.
        """
        self._flush_queued = False
        active = [(m, [c for c in calls if c.grad is not None]) for m, calls in self._calls.items()]
        active = [(m, calls) for m, calls in active if calls]
        parts, ctx = self._norm_parts, self._ctx
        self._norm_parts, self._ctx = {}, None
        self._drop_calls("flushed")
        self._batch_size = None
        if not active or all(c.grad.dim() > 0 and c.grad.shape[0] == 0 for _, cs in active for c in cs):
            return  # no rows (e.g. this rank's empty part of a batch): the clipped sum is 0
        for m, calls in active:
            self._check_unchanged(m, calls)
            for c in calls:
                if c.grad.dim() == 0 or (ctx is not None and c.grad.shape[0] != ctx.batch_size):
                    raise ModelError(
                        "layer outputs disagree on the batch size; per-sample clipping needs the "
                        "batch on axis 0 of every layer's output."
                    )
        if ctx is None:
            ctx = FlushContext(batch_size=active[0][1][0].grad.shape[0], norm_method=self.norm_method,
                               trainable=self._trainable)
        batch = ctx.batch_size
        self._suspended = True
        try:
            with torch.no_grad():
                for m, calls in active:
                    if m not in parts:
                        parts[m] = self._rules[m].norm_sq(m, calls, ctx)
                norm_sq = self.total_norm_sq(parts)
                scale = float(batch) if self.loss_reduction == "mean" else 1.0
                norms = norm_sq.clamp(min=0).sqrt() * scale
                coef = self.clip_factors(norms) * scale
                for m, calls in active:
                    self._rules[m].accumulate(m, calls, coef, ctx)
        finally:
            self._suspended = False
        self.rows_clipped += batch
        self.last_norms = norms.detach().clone() if self.keep_norms else None

    def _check_unchanged(self, module: nn.Module, calls: list[Call]) -> None:
        if any(c.changed() for c in calls):
            name = self._names[module]
            raise ModelError(
                f"a tensor {name} read in the forward pass (its input) or its output gradient was "
                f"modified in place afterwards (e.g. x += y or x.mul_(2) after {name}(x)); "
                "per-sample clipping reads it in the backward pass: use an out-of-place op (x = x + y)."
            )

    @staticmethod
    def total_norm_sq(parts: dict[nn.Module, torch.Tensor]) -> torch.Tensor:
        """||G_i||² = Σ over layers of each layer's per-sample squared norm: the one place that
        combines layers, for data rows and gradient canaries alike."""
        return torch.stack(list(parts.values())).sum(dim=0)

    def clip_and_add_dirac(self, param_index: torch.Tensor, offset: torch.Tensor,
                           value: torch.Tensor) -> torch.Tensor:
        """Clip k single-coordinate gradients and add them to the running clipped sum.

        Row j is the gradient ``value[j]`` on element ``offset[j]`` (flattened) of parameter
        ``self.parameters[param_index[j]]`` and zero elsewhere: a white-box audit's Dirac canary
        (Nasr et al. 2023; Steinke, Nasr, Jagielski 2023). It takes the path of a data row from
        the per-layer norms on: the same combination over layers (:meth:`total_norm_sq`), the same
        clip factors, the same ``p.grad`` the noise is added to. Returns the added values c_j·value_j.
        """
        modules = list(self._rules)
        module_of = torch.tensor([k for k, m in enumerate(modules) for _ in self._trainable[m]],
                                 dtype=torch.long)  # same order as self.parameters
        row_module = module_of[param_index]
        value = value.detach().to(torch.float64)
        sq = value * value
        parts = {m: torch.where(row_module == k, sq, 0.0) for k, m in enumerate(modules)}
        with torch.no_grad():
            added = self.clip_factors(self.total_norm_sq(parts).sqrt()) * value
            add_at_coordinates(self.grads(), param_index, offset, added)
        return added

    def grads(self) -> list[torch.Tensor]:
        """``p.grad`` of every private parameter (zeros where none was formed yet), in the order
        of :attr:`parameters`: the running clipped sum the noise is added to."""
        params = self.parameters
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in params]

    def clip_factors(self, norms: torch.Tensor) -> torch.Tensor:
        """c_i = min(1, C/(||G_i|| + 1e-6)), or 1/(||G_i|| + γ) for automatic clipping."""
        if self.max_grad_norm == "auto":
            return 1.0 / (norms + AUTO_CLIP_GAMMA)
        return (float(self.max_grad_norm) / (norms + 1e-6)).clamp(max=1.0)

    def _drop_calls(self, state: str = "dropped") -> None:
        if state == "dropped":
            self._norm_parts, self._ctx = {}, None
        for calls in self._calls.values():
            for call in calls:
                call.state = state
            calls.clear()


def add_at_coordinates(tensors: list[torch.Tensor], index: torch.Tensor, offset: torch.Tensor,
                       values: torch.Tensor) -> None:
    """``tensors[index[j]].flatten()[offset[j]] += values[j]`` for every j (in place)."""
    for i in np.unique(index.cpu().numpy()).tolist():
        rows = index == i
        target = tensors[i]
        target.view(-1).index_add_(0, offset[rows].to(target.device),
                                   values[rows].to(device=target.device, dtype=target.dtype))


def _checkpointing(model: nn.Module) -> bool:
    """Whether HF activation (gradient) checkpointing is on, across transformers versions."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(model)):
            return bool(getattr(model, attr))
    return False


def _stacks_to(whole: torch.Tensor, first: torch.Tensor | None, second: torch.Tensor | None) -> bool:
    """Whether ``first`` and ``second`` stacked on axis 0 equal ``whole``; a broadcast row
    (leading size 1) must be the same row in all three."""
    if first is None or second is None or whole.dim() == 0:
        return False
    if whole.shape[0] == 1 and first.shape[0] == 1 and second.shape[0] == 1:
        return _close(first, whole) and _close(second, whole)
    if first.shape[1:] != second.shape[1:]:
        return False
    return _close(torch.cat([first, second]), whole)


def _close(part: torch.Tensor | None, want: torch.Tensor) -> bool:
    """Equal shapes and values up to float round-off of batched kernels (relative to the
    largest magnitude; half precision gets a wider band)."""
    if part is None or part.shape != want.shape or part.dtype != want.dtype:
        return False
    if not part.is_floating_point():
        return torch.equal(part, want)
    if not want.numel():
        return True
    low = part.dtype in (torch.float16, torch.bfloat16)
    tol = (5e-2 if low else 1e-3) * max(float(want.abs().max()), 1e-12)
    return bool(((part.float() - want.float()).abs() <= tol).all())


def _leading_dim(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward call: leading dimension of its first tensor input."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None
