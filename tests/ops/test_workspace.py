"""ttt.ops.workspace: reusable per-thread scratch buffers for inference intermediates."""

from __future__ import annotations

import threading

import pytest
import torch

from ttt.ops import workspace


@pytest.fixture(autouse=True)
def _fresh():
    workspace.release()
    yield
    workspace.release()


def test_shape_dtype_reuse_and_alignment() -> None:
    """The requested shape and dtype, contiguous on the CPU, from a 2 MiB boundary; the same slot reuses
    its memory for an equal or smaller request; another slot is separate memory."""
    a = workspace.scratch("a", (3, 5, 7), torch.float32)
    assert a.shape == (3, 5, 7) and a.dtype == torch.float32 and a.is_contiguous() and a.device.type == "cpu"
    assert a.data_ptr() % (1 << 21) == 0
    b = workspace.scratch("a", (10,), torch.float64)
    assert b.data_ptr() == a.data_ptr()
    c = workspace.scratch("c", (3, 5, 7), torch.float32)
    assert c.data_ptr() != a.data_ptr()
    c.fill_(1.0)
    a.fill_(2.0)
    assert bool((c == 1).all())


def test_growth_keeps_old_tensors_valid() -> None:
    """A larger request maps a new buffer; a tensor still holding the old one stays readable and writable."""
    old = workspace.scratch("g", (1000,), torch.float32)
    old.fill_(3.0)
    new = workspace.scratch("g", (5 << 20,), torch.float32)  # 20 MiB
    assert new.data_ptr() != old.data_ptr() and new.numel() == 5 << 20
    import gc

    gc.collect()
    old.add_(1.0)
    assert bool((old == 4).all())
    new.fill_(0.5)
    assert new.sum().item() == 0.5 * (5 << 20)


def test_inference_mode_gives_normal_tensors() -> None:
    """Asked for inside inference mode, the tensor is still a normal one (usable later under no_grad)."""
    with torch.inference_mode():
        t = workspace.scratch("i", (4, 4), torch.float32)
        torch.mm(torch.eye(4), torch.eye(4), out=t)
    assert not t.is_inference()
    with torch.no_grad():
        t.mul_(2.0)
    assert torch.equal(t, 2 * torch.eye(4))


def test_per_thread_buffers() -> None:
    """Each thread has its own buffers: concurrent callers never share memory."""
    held = []
    barrier = threading.Barrier(2)

    def work() -> None:
        held.append(workspace.scratch("t", (256,), torch.float32))  # kept alive past the thread's end
        barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    main = workspace.scratch("t", (256,), torch.float32).data_ptr()
    assert len({*(t.data_ptr() for t in held), main}) == 3


def test_large_requests_are_plain_allocations(monkeypatch) -> None:
    """Above MAX_BYTES a fresh tensor every time (nothing kept); release() drops the kept buffers."""
    monkeypatch.setattr(workspace, "MAX_BYTES", 1024)
    a = workspace.scratch("big", (512,), torch.float32)
    b = workspace.scratch("big", (512,), torch.float32)
    assert a.data_ptr() != b.data_ptr() and "big" not in workspace._buffers()
    workspace.scratch("small", (8,), torch.float32)
    assert "small" in workspace._buffers()
    workspace.release()
    assert not workspace._buffers()
