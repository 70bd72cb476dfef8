"""Bad input gets a clear Python error before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING

from cce_patch import linear_cross_entropy

# where impl='triton' gets valid tensors: the GPU natively, the CPU under the interpreter
TRITON_DEVICE = "cuda" if HAS_CUDA and not INTERPRETING else "cpu"


def _ok(device: str = "cpu"):
    return (torch.randn(2, 5, 8, device=device), torch.randn(11, 8, device=device),
            torch.randint(0, 11, (2, 5), device=device))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda e, c, t: (e, torch.randn(11, 9, device=c.device), t), ValueError, "hidden size mismatch"),
        (lambda e, c, t: (e, c, t[:, :4]), ValueError, "targets must have shape"),
        (lambda e, c, t: (e, c, t.float()), TypeError, "integer"),
        (lambda e, c, t: (e, c.double(), t), TypeError, "same dtype"),
        (lambda e, c, t: (e.double(), c.double(), t), TypeError, "float32, float16 or bfloat16"),
        (lambda e, c, t: (e, c, torch.full_like(t, 11)), ValueError, r"outside \[0, 11\)"),
        (lambda e, c, t: (e, c, torch.full_like(t, -3)), ValueError, "not ignore_index"),
        (lambda e, c, t: (e, c[:, None], t), ValueError, r"shape \(V, D\)"),
        (lambda e, c, t: (e[0, 0], c, t[0, 0]), ValueError, "at least 2 dims"),
        (lambda e, c, t: (e, c[:0], t), ValueError, "at least one class"),
    ],
)
def test_input_errors(impl, mutate, error, match):
    e, c, t = mutate(*_ok(TRITON_DEVICE if impl == "triton" else "cpu"))
    with pytest.raises(error, match=match):
        linear_cross_entropy(e, c, t, impl=impl)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"impl": "cuda"}, "impl must be one of"),
        ({"softcap": 0.0}, "softcap must be a positive"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"bias": torch.randn(10)}, r"bias must have shape \(V,\)"),
        ({"bias": torch.randint(0, 3, (11,))}, "bias must be a float"),
    ],
)
def test_option_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(*_ok(), **kwargs)


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        e, c, t = _ok()
        with pytest.raises(ValueError, match="same device"):
            linear_cross_entropy(e, c.to("meta"), t)
    else:
        e, c, t = _ok()
        with pytest.raises(ValueError, match="same device"):
            linear_cross_entropy(e.cuda(), c, t)


def test_ignore_index_other_values_are_allowed():
    e, c, t = _ok()
    t[0, 0] = -1
    loss = linear_cross_entropy(e, c, t, ignore_index=-1)
    assert torch.isfinite(loss)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from cce_patch.ops import backends

    # not the environment variable: Triton reads it once, and later kernels in this process would not interpret
    monkeypatch.setattr(backends, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_cross_entropy(*_ok(), impl="triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_unscored_first_position_is_not_checked(impl):
    """With shift=True, labels[..., 0] is never scored (row t reads target t + 1), so an out-of-range value
    there is accepted, as stock's shifted cross-entropy accepts it; the same value one position later is not."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU: the interpreter (conftest)
    e, c, t = (x.to(device) for x in _ok())
    t[:, 0] = 999
    loss = linear_cross_entropy(e, c, t, shift=True, impl=impl)
    t2 = t.clone()
    t2[:, 0] = 0
    torch.testing.assert_close(loss, linear_cross_entropy(e, c, t2, shift=True, impl=impl))
    t[0, 1] = 999
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        linear_cross_entropy(e, c, t, shift=True, impl=impl)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("bad", [11, -3])
def test_triton_speed_mode_reads_the_target_check_at_its_one_sync(shift, bad, monkeypatch):
    """The Triton speed path checks the targets at the host sync it makes after its forward anyway
    (``validation.scored_targets_ok``), not with a sync of its own before the first launch; a bad target still
    raises the same ValueError, before any result reaches the caller. The torch path checks before it starts."""
    import cce_patch.ops.api as api

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU: the interpreter (conftest)
    from cce_patch.ops.validation import check_scored_targets, scored_targets_ok

    eager, late = [], []
    monkeypatch.setattr(api, "check_scored_targets", lambda *a: eager.append(a) or check_scored_targets(*a))
    monkeypatch.setattr(api, "scored_targets_ok", lambda *a: late.append(a) or scored_targets_ok(*a))

    e, c, t = (x.to(device) for x in _ok())
    e.requires_grad_(True)
    loss = linear_cross_entropy(e, c, t, impl="triton", mode="speed", shift=shift)
    loss.backward()
    assert eager == [] and len(late) == 1 and e.grad is not None and torch.isfinite(loss)
    t[1, 3] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 11\)" if bad == 11 else "not ignore_index"):
        linear_cross_entropy(e, c, t, impl="triton", mode="speed", shift=shift)
    assert eager == [] and len(late) == 2
    with pytest.raises(ValueError, match=r"outside \[0, 11\)" if bad == 11 else "not ignore_index"):
        linear_cross_entropy(e, c, t, impl="torch", mode="speed", shift=shift)
    assert len(eager) == 1
