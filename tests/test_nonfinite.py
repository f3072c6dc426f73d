"""The non-finite guard: immediate reports name the culprit; deferred checks cancel the bad updates on the device."""
import pytest
import torch

from recon.nonfinite import NonFiniteGuard


def _step(opt, params, grads, guard, step, loss=1.0):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    terms = {"color": torch.tensor(loss), "alpha": torch.tensor(0.5)}
    terms["total"] = terms["color"] + terms["alpha"]
    report = guard.check(step, 1, opt, [(f"p{i}", p.grad) for i, p in enumerate(params)], terms)
    opt.step()
    return report


def test_immediate_reports_the_loss_terms_or_the_gradients():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p], lr=0.1)
    guard = NonFiniteGuard(every=1)
    assert _step(opt, [p], [torch.ones(4)], guard, 0) is None
    r = _step(opt, [p], [torch.ones(4)], guard, 1, loss=float("nan"))
    assert r.step == 1 and r.loss_terms["color"] != r.loss_terms["color"] and r.loss_terms["alpha"] == 0.5
    assert "non-finite loss at step 1 (pass 1: color=nan, alpha=0.5)" == r.message
    r = _step(opt, [p], [torch.tensor([1.0, float("inf"), 0, 0])], guard, 2)
    assert r.loss_terms is None and r.gradients == ["p0"] and r.message == "non-finite gradient at step 2 in p0"


def test_deferred_cancels_bad_updates_and_reports_the_first():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([a, b], lr=0.1, fused=True)  # fused: honours found_inf
    guard = NonFiniteGuard(every=4)
    good = [torch.ones(3), torch.ones(2)]
    assert _step(opt, [a, b], good, guard, 0) is None
    before = (a.detach().clone(), b.detach().clone(), opt.state[a]["exp_avg"].clone(), opt.state[a]["step"].clone())
    nan_b = [torch.ones(3), torch.tensor([float("nan"), 1.0])]
    assert _step(opt, [a, b], nan_b, guard, 1) is None  # nothing read yet
    assert _step(opt, [a, b], good, guard, 2, loss=float("inf")) is None
    after = (a.detach(), b.detach(), opt.state[a]["exp_avg"], opt.state[a]["step"])
    for x, y in zip(before, after):  # both bad updates cancelled: parameters, moments and step count untouched
        torch.testing.assert_close(x, y)
    assert _step(opt, [a, b], good, guard, 3) is None
    assert not torch.equal(a.detach(), before[0])  # a good step updates again
    r = guard.poll()
    assert (r.step, r.count, r.gradients, r.loss_terms) == (1, 2, ["p1"], None)
    assert r.message == "non-finite gradient at step 1 in p1; 2 non-finite steps in all"
    assert guard.poll() is None  # read once
    assert _step(opt, [a, b], good, guard, 4) is None and guard.poll() is None


def test_deferred_keeps_a_report_across_a_layout_change():
    a = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([a], lr=0.1, fused=True)
    guard = NonFiniteGuard(every=10)
    _step(opt, [a], [torch.ones(3)], guard, 0, loss=float("nan"))
    b = torch.nn.Parameter(torch.ones(2))  # the next pass optimises other parameters
    opt2 = torch.optim.Adam([b], lr=0.1, fused=True)
    _step(opt2, [b], [torch.ones(2)], guard, 1)
    r = guard.poll()
    assert r.step == 0 and r.loss_terms is not None and guard.poll() is None


def test_deferred_needs_a_fused_optimizer_else_checks_at_once():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], lr=0.1)  # not fused: no found_inf, so every step is read
    guard = NonFiniteGuard(every=50)
    assert not guard.deferred(opt)
    assert _step(opt, [p], [torch.tensor([float("nan"), 0.0])], guard, 0).gradients == ["p0"]
    with pytest.raises(ValueError, match="nonfinite_check_every=0"):
        NonFiniteGuard(every=0)
