"""Bad input gets a clear Python error before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from cce_patch import linear_cross_entropy


def _ok():
    return torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda e, c, t: (e, torch.randn(11, 9), t), ValueError, "hidden size mismatch"),
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
    e, c, t = mutate(*_ok())
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
