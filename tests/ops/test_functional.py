"""Closed forms of the small math pieces against autograd (float64, tolerance 1e-10)."""

import pytest
import torch

from ttt.ops.functional import (
    gelu_tanh,
    gelu_tanh_backward,
    gelu_tanh_grad,
    layer_norm,
    ln_l2_grad,
    ln_l2_grad_closed_form,
    rope_adjacent,
    token_coefficients,
)


def test_ln_l2_grad_matches_autograd_and_closed_form() -> None:
    z = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 16, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(3, 1, 16, dtype=torch.float64)
    b = 0.3 * torch.randn(3, 1, 16, dtype=torch.float64)
    loss = 0.5 * ((layer_norm(z, w, b) - t) ** 2).sum()
    (auto,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(ln_l2_grad(z, t, w, b), auto, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ln_l2_grad_closed_form(z, t, w, b), auto, rtol=1e-10, atol=1e-10)


def test_ln_l2_grad_is_differentiable() -> None:
    args = [torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args += [torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(ln_l2_grad, args)


def test_gelu_derivatives() -> None:
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    torch.testing.assert_close(gelu_tanh_grad(x), auto, rtol=1e-12, atol=1e-12)
    g = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh_backward(g, x), g * auto, rtol=1e-12, atol=1e-12)


def test_rope_rotates_adjacent_pairs() -> None:
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 5]])
    y = rope_adjacent(x, pos, theta=10000.0)
    torch.testing.assert_close(y[0, 0, 0], x[0, 0, 0])  # position 0: identity
    for t, p in enumerate([0, 1, 5]):
        for i in range(2):
            ang = torch.tensor(p * 10000.0 ** (-2 * i / 4), dtype=torch.float64)
            a, c = x[0, 0, t, 2 * i], x[0, 0, t, 2 * i + 1]
            expect = torch.stack([a * ang.cos() - c * ang.sin(), a * ang.sin() + c * ang.cos()])
            torch.testing.assert_close(y[0, 0, t, 2 * i : 2 * i + 2], expect)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_token_coefficients() -> None:
    delta = torch.tensor([0.0, 0.5, -1.0, 0.0])
    torch.testing.assert_close(token_coefficients(delta), torch.tensor([1.0, 1.0, 0.0, 0.25]))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_rope_table_equals_direct(dtype, tol) -> None:
    """The per-position table (``period``) gives the same rotation as computing every angle."""
    x = torch.randn(2, 3, 37, 16, dtype=torch.float64).to(dtype)
    pos = (torch.arange(37).view(1, 37) + torch.tensor([[0], [5]])) % 8
    torch.testing.assert_close(rope_adjacent(x, pos, period=8), rope_adjacent(x, pos), rtol=tol, atol=tol)
