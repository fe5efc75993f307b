"""``python -m ttt.benchmarks.gpu`` without a GPU: one line, clean exit, no result files."""

from __future__ import annotations

import pytest
import torch

from ttt.benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_exits_cleanly_without_cuda(tmp_path, capsys) -> None:
    assert gpu.main(["--out", str(tmp_path)]) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not any(tmp_path.iterdir())
