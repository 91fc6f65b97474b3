"""``fastcnn.lean_adam.LeanFusedAdam`` against its reference twin ``torch.optim.Adam(fused=True)``: the same
parameters and state bit for bit, step after step, with weight decay, maximize, a schedule changing the learning
rate and parameters without a gradient; the same state_dict both ways; torch's step wherever the short way does
not apply."""

import copy

import pytest
import torch

from fastcnn.lean_adam import LeanFusedAdam

SHAPES = [(32, 1, 3, 3), (32,), (10, 5408), (10,), (3, 7)]


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def _grads(step):
    generator = torch.Generator().manual_seed(100 + step)
    # the last parameter has no gradient on odd steps (a frozen or unused layer)
    return [None if (i == len(SHAPES) - 1 and step % 2) else torch.randn(shape, generator=generator)
            for i, shape in enumerate(SHAPES)]


def _run(optimizer, params, steps, schedule=None):
    for step in range(steps):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        if schedule is not None:
            schedule.step()


@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.01), dict(maximize=True, betas=(0.8, 0.95)),
                                     dict(eps=1e-6, lr=3e-3)], ids=["default", "decay", "maximize", "eps"])
def test_same_parameters_and_state_bit_for_bit(options):
    reference_params, lean_params = _params(), _params()
    options = {"lr": 1e-3, **options}
    reference = torch.optim.Adam(reference_params, fused=True, **options)
    lean = LeanFusedAdam(lean_params, **options)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options["lr"], total_steps=8) for opt in
                 (reference, lean)]
    _run(reference, reference_params, 7, schedules[0])
    _run(lean, lean_params, 7, schedules[1])
    for a, b in zip(reference_params, lean_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference_params, lean_params, strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(reference.state[a][key], lean.state[b][key]), key


def test_the_common_step_takes_the_short_way(monkeypatch):
    calls = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    params = _params()
    lean = LeanFusedAdam(params, lr=1e-3)
    _run(lean, params, 4)
    assert len(calls) == 1  # the first step, which creates the state; the next three go straight to the kernel


def test_state_dict_loads_both_ways():
    params, twin = _params(), _params()
    lean = LeanFusedAdam(params, lr=1e-3)
    _run(lean, params, 3)
    reference = torch.optim.Adam(twin, lr=1e-3, fused=True)
    with torch.no_grad():
        for a, b in zip(twin, params, strict=True):
            a.copy_(b)
    reference.load_state_dict(copy.deepcopy(lean.state_dict()))  # loading shares tensors of one dtype
    back = LeanFusedAdam(_params(), lr=1e-3)
    back.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert back.state_dict()["param_groups"] == lean.state_dict()["param_groups"]
    for p, g in zip(params, _grads(3), strict=True):
        p.grad = g
    for p, g in zip(twin, _grads(3), strict=True):
        p.grad = g
    lean.step()
    reference.step()
    for a, b in zip(params, twin, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [dict(amsgrad=True), dict(decoupled_weight_decay=True, weight_decay=0.1)],
                         ids=["amsgrad", "adamw"])
def test_what_the_short_way_does_not_cover_runs_torchs_step(options):
    reference_params, lean_params = _params(), _params()
    reference = torch.optim.Adam(reference_params, lr=1e-3, fused=True, **options)
    lean = LeanFusedAdam(lean_params, lr=1e-3, **options)
    _run(reference, reference_params, 4)
    _run(lean, lean_params, 4)
    for a, b in zip(reference_params, lean_params, strict=True):
        assert torch.equal(a, b)


def test_a_closure_is_called_and_its_loss_returned():
    params = _params()
    lean = LeanFusedAdam(params, lr=1e-3)

    def closure():
        lean.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    assert lean.step(closure) is not None and lean.step(closure) is not None


def test_a_grad_scaler_step_unscales_and_skips_as_torchs(monkeypatch):
    """GradScaler hands a fused optimizer its scale and inf flag as attributes: the step must honour them (here a
    scaled step with an inf in one gradient, which must be skipped, then a finite one)."""
    results = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), lambda ps: LeanFusedAdam(ps, lr=1e-3)):
        params = _params()
        optimizer = make(params)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(4):
            optimizer.zero_grad()
            loss = sum((p * g).sum() for p, g in zip(params, _grads(step), strict=True) if g is not None)
            if step == 1:
                loss = loss + params[0].sum() * float("inf")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_step_hooks_run_once_on_every_kind_of_step():
    torch.optim.Adam(_params(), lr=1e-3, fused=True)  # a plain Adam in the process: torch wraps Adam.step too
    params = _params()
    lean = LeanFusedAdam(params, lr=1e-3)
    calls = []
    lean.register_step_post_hook(lambda *args: calls.append(1))
    _run(lean, params, 3)  # the first step falls back to torch's (it creates the state), the others do not
    assert len(calls) == 3


def test_a_state_from_a_non_fused_adam_is_stepped_by_torch():
    reference_params, lean_params = _params(), _params()
    plain = torch.optim.Adam(reference_params, lr=1e-3)  # foreach, step counts on the CPU
    _run(plain, reference_params, 2)
    lean = LeanFusedAdam(lean_params, lr=1e-3)
    with torch.no_grad():
        for a, b in zip(lean_params, reference_params, strict=True):
            a.copy_(b)
    lean.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert lean.param_groups[0]["fused"] in (False, None)
    for optimizer, params in ((plain, reference_params), (lean, lean_params)):
        for p, g in zip(params, _grads(5), strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    for a, b in zip(reference_params, lean_params, strict=True):
        assert torch.equal(a, b)
