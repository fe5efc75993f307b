"""The scan A/B tool (benchmarks/tools/scan_ab) builds against the package's scan sources and runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "benchmarks" / "tools" / "scan_ab"
CSRC = ROOT / "src" / "ttt" / "ops" / "scan" / "csrc"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_scan_ab_builds_and_compares_a_build_with_itself(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    subprocess.run(["bash", str(TOOL / "build.sh"), str(CSRC), str(CSRC), str(tmp_path)], check=True, env=env,
                   capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "scan_ab"), "lin", "2", "2"], check=True, capture_output=True,
                         text=True).stdout
    assert re.search(r"TTT-Linear, 2 thread\(s\), 4 KiB pages, 2 rounds: A [\d.]+ ms, B [\d.]+ ms", out), out
    assert "max |out A - out B| 0," in out, out  # the same sources: the same arithmetic


def test_scan_ab_refuses_a_missing_folder(tmp_path) -> None:
    res = subprocess.run(["bash", str(TOOL / "build.sh"), str(CSRC), str(tmp_path / "nope"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no such folder" in res.stderr
