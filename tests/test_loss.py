"""The step's loss and right-prediction count: compiled (the fast path's) against eager (its reference twin)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fastcnn.data import DeviceLoader, synthetic_dataset
from fastcnn.engine import Trainer, loss_and_correct
from fastcnn.models import build_model

compiled_loss_and_correct = torch.compile(loss_and_correct, dynamic=False)


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each case compiles afresh: past dynamo's recompile limit (8 entries per function) calls would silently run
    eagerly, and the comparison would be eager against eager."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def assert_compiled_once():
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _logits(rows: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    logits = torch.randn(rows, classes, generator=torch.Generator().manual_seed(rows)) * 4
    logits[::3, :4] = 2.0  # ties for the first place: the first index counts, in both
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_compiled_loss_and_correct_match_eager(rows, dtype):
    smoothing = 0.1 if rows == 7 else 0.0
    labels = torch.randint(0, 10, (rows,), generator=torch.Generator().manual_seed(1))
    labels[::3] = torch.tensor([0, 1, 3, 0, 2, 1, 0, 3, 1, 2, 0, 1, 0, 2, 3, 0, 1, 0, 2, 1, 0, 3])[:labels[::3].numel()]
    results = []
    for fn in (loss_and_correct, compiled_loss_and_correct):
        logits = _logits(rows, 10, dtype).requires_grad_()
        loss, correct = fn(logits, labels, smoothing)
        loss.backward()
        results.append((loss.detach(), correct, logits.grad))
    assert_compiled_once()
    (loss_e, correct_e, grad_e), (loss_c, correct_c, grad_c) = results
    assert correct_c.dtype == torch.int64 and torch.equal(correct_c, correct_e)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss_c, loss_e, **tolerance)
    torch.testing.assert_close(grad_c, grad_e, **tolerance)


def test_compiled_loss_under_bf16_autocast_matches_eager():
    # The step computes its loss inside autocast: cross-entropy runs in float32 on bfloat16 logits in both.
    logits = _logits(33, 10, torch.bfloat16)
    labels = torch.randint(0, 10, (33,), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e, correct_e = loss_and_correct(logits, labels)
        loss_c, correct_c = compiled_loss_and_correct(logits, labels)
    assert_compiled_once()
    assert loss_c.dtype == loss_e.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert torch.equal(correct_c, correct_e)


def test_compiled_trainer_steps_match_eager_trainer_steps():
    torch.manual_seed(0)
    model = build_model("simplecnn", kernel="aten")
    loader = DeviceLoader(synthetic_dataset(3 * 32 + 5), 32, mean=0.13, std=0.31)
    eager = Trainer(copy.deepcopy(model), device=torch.device("cpu"), label_smoothing=0.1)
    compiled = Trainer(copy.deepcopy(model), device=torch.device("cpu"), label_smoothing=0.1, compile=True)
    for images, labels in loader:  # three full batches and a smaller last one
        loss_e, correct_e = eager.train_step(images, labels)
        loss_c, correct_c = compiled.train_step(images, labels)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert torch.equal(correct_c, correct_e)
    for (name, p_e), p_c in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-6, msg=name)


# torch < 2.12 turns a 0-dim CPU tensor input of a compiled function into a symbolic scalar and then drops an in-place
# add to it (float64; int64 is fine). fastcnn adds to its sums only on a GPU (in a CUDA graph), where that does not
# happen; the GPU test of graph-replayed epochs with compile covers that case.
@pytest.mark.skipif(tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 12),
                    reason="torch < 2.12 drops in-place adds to 0-dim CPU float64 inputs of compiled functions")
@pytest.mark.parametrize("rows", [1, 64])
def test_compiled_running_sums_match_eager(rows):
    # What a CUDA graph's step does: add the batch's loss * rows (float64) and right predictions to running sums,
    # in place, inside the compiled function (one graph, no break), as the epoch loop's eager adds would.
    labels = torch.randint(0, 10, (rows,), generator=torch.Generator().manual_seed(3))
    sums = {}
    for name, fn in (("eager", loss_and_correct), ("compiled", compiled_loss_and_correct)):
        loss_sum = torch.tensor(1.25, dtype=torch.float64)
        correct_sum = torch.tensor(7, dtype=torch.int64)
        logits = _logits(rows, 10, torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):
                loss, correct = fn(logits, labels, 0.0, (loss_sum, correct_sum))
        loss.backward()
        sums[name] = (loss_sum, correct_sum, logits.grad)
        expected_sum = torch.tensor(1.25, dtype=torch.float64).add_(loss.detach(), alpha=rows)
        expected_sum.add_(loss.detach(), alpha=rows).add_(loss.detach(), alpha=rows)
        assert torch.equal(loss_sum, expected_sum) and int(correct_sum) == 7 + 3 * int(correct)
    assert_compiled_once()
    torch.testing.assert_close(sums["compiled"][0], sums["eager"][0], rtol=1e-6, atol=0)
    assert torch.equal(sums["compiled"][1], sums["eager"][1])
    torch.testing.assert_close(sums["compiled"][2], sums["eager"][2], rtol=1e-2, atol=1e-2)
