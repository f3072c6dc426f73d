"""Non-finite losses and gradients: found, named, and kept out of the parameters, without a host sync every step.

A training step's loss terms and gradient norms are reduced on the device into one vector of finite flags. Read at
once (``every=1``), that costs one host synchronisation per step, which stalls a GPU whose step is bound by kernel
launches. With ``every > 1`` and a fused optimiser the flags stay on the device: the step's update is cancelled there
(``optimizer.found_inf``, the mechanism AMP's gradient scaler uses: parameters and Adam moments untouched), the first
bad step's flags and loss values are kept, and the host reads the record every ``every`` steps.
Plain torch: no Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NonFiniteReport:
    """Non-finite steps found by one check: ``count`` of them, the first at ``step`` (in ``pass_no``); ``loss_terms``
    (name -> value) when the loss was non-finite there, else ``gradients``, the parameters with a non-finite gradient."""

    step: int
    pass_no: int
    count: int
    loss_terms: dict[str, float] | None
    gradients: list[str]

    @property
    def message(self) -> str:
        if self.loss_terms is not None:
            values = ", ".join(f"{k}={v:.4g}" for k, v in self.loss_terms.items())
            what = f"non-finite loss at step {self.step} (pass {self.pass_no}: {values})"
        else:
            what = f"non-finite gradient at step {self.step} in {', '.join(self.gradients)}"
        return what if self.count <= 1 else f"{what}; {self.count} non-finite steps in all"


class NonFiniteGuard:
    """Checks each step's loss and gradients for NaN and infinity (see the module docstring).

    every: 1 reads the flags each step (``check`` returns the report at once); N > 1 defers the read to ``poll``,
    called every N steps, and needs an optimiser that honours ``found_inf`` (torch's fused Adam/AdamW/SGD).
    """

    def __init__(self, every: int = 1):
        if int(every) < 1:
            raise ValueError(f"model.optim.nonfinite_check_every={every} must be >= 1 (1: check every step).")
        self.every = int(every)
        self._key: tuple | None = None  # (pass, gradient names, loss-term names) the record is laid out for
        self._record: dict[str, Tensor] | None = None
        self._pending: NonFiniteReport | None = None  # read at a layout change, handed out by the next poll

    @staticmethod
    def supports(optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` cancels its update on ``found_inf`` (torch's fused implementations)."""
        return bool(optimizer.defaults.get("fused"))

    def deferred(self, optimizer: torch.optim.Optimizer) -> bool:
        return self.every > 1 and self.supports(optimizer)

    def check(self, step: int, pass_no: int, optimizer: torch.optim.Optimizer, grads: list[tuple[str, Tensor]],
              terms: dict[str, Tensor] | None) -> NonFiniteReport | None:
        """This step's gradients ``grads`` (name, grad) and loss ``terms`` (with ``total``), before the optimiser step.

        Immediate mode: the report of this step, or None when everything is finite (one host sync). Deferred mode:
        records on the device, cancels the coming update when something is non-finite and returns None."""
        term_names = [k for k in terms if k != "total"] if terms is not None else []
        flags = [torch.stack(torch._foreach_norm([g for _, g in grads]))] if grads else []
        if terms is not None:
            flags.append(terms["total"].detach().reshape(1))
        if not flags:
            return None
        finite = torch.cat(flags).isfinite()  # [gradients..., loss]
        if not self.deferred(optimizer):
            optimizer.__dict__.pop("found_inf", None)
            if bool(finite.all()):
                return None
            return self._report(step, pass_no, 1, finite.tolist(), [terms[k].item() for k in term_names] if terms else [],
                                [n for n, _ in grads], terms is not None, term_names)
        key = (pass_no, tuple(n for n, _ in grads), tuple(term_names), terms is not None)
        if key != self._key:  # a new layout (the pass switch): what the old record holds is read first
            self._pending = self.poll()
            self._key, self._record = key, None
        bad = ~finite.all()
        values = (torch.stack([terms[k].detach().float().reshape(()) for k in term_names]) if term_names
                  else finite.new_zeros(0, dtype=torch.float32))
        r = self._record
        if r is None:
            r = self._record = {"count": torch.zeros((), dtype=torch.int64, device=finite.device),
                                "first": torch.full((), -1, dtype=torch.int64, device=finite.device),
                                "flags": torch.ones_like(finite), "values": values.clone()}
        newly = bad & (r["first"] < 0)
        r["first"] = torch.where(newly, torch.full_like(r["first"], step), r["first"])
        r["flags"] = torch.where(newly, finite, r["flags"])
        r["values"] = torch.where(newly, values, r["values"])
        r["count"] = r["count"] + bad
        optimizer.found_inf = bad.float()  # the fused step leaves parameters and moments as they are
        return None

    def poll(self) -> NonFiniteReport | None:
        """Deferred mode: the report of the non-finite steps since the last poll (one host sync), or None."""
        pending, self._pending = self._pending, None
        r = self._record
        if r is None:
            return pending
        count, first = (int(v) for v in torch.stack([r["count"], r["first"]]).tolist())
        if count == 0:
            return pending
        pass_no, grad_names, term_names, has_loss = self._key
        report = self._report(first, pass_no, count, r["flags"].tolist(), r["values"].tolist(), list(grad_names),
                              has_loss, list(term_names))
        self._record = None
        return pending or report

    @staticmethod
    def _report(step: int, pass_no: int, count: int, finite: list[bool], values: list[float], grad_names: list[str],
                has_loss: bool, term_names: list[str]) -> NonFiniteReport:
        loss_bad = has_loss and not finite[-1]
        return NonFiniteReport(step=step, pass_no=pass_no, count=count,
                               loss_terms=dict(zip(term_names, values)) if loss_bad else None,
                               gradients=[n for n, ok in zip(grad_names, finite) if not ok])
