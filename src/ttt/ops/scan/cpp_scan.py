"""The compiled CPU scan backend: the whole scan (forward and reverse-scan backward) in C++.

The sources in ``csrc/`` are compiled on first use through :mod:`torch.utils.cpp_extension` (ninja) into
a cache directory keyed by a hash of the sources, the compiler flags, the compiler, the torch and
Python versions and the CPU (``-march=native``), so a machine builds it once. Several processes (e.g.
pytest-xdist workers) starting at once are serialised by a file lock; each build happens in a private
temporary directory and is moved into place atomically, so an interrupted build never leaves a broken
library behind. Without a working compiler :func:`load` raises, and the dispatcher in
:mod:`ttt.ops.scan` warns once and uses the PyTorch scan. Design notes: ``docs/scan-backward.md``.

Environment: ``TTT_EXTENSIONS_DIR`` (cache directory, default ``~/.cache/ttt/extensions``, shared with
:mod:`ttt.ops.extension`), ``CXX`` (compiler, default ``c++``), ``TTT_CPP_VERBOSE=1`` (show the build).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..extension import extensions_dir

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("scan_ops.cpp", "scan_linear.cpp", "scan_mlp.cpp")
HEADERS = ("scan_api.h", "scan_driver.h", "scan_kernels.h")
CACHE_ENV = "TTT_EXTENSIONS_DIR"
NAME = "ttt_scan_cpp"

_loaded_from: Path | None = None


def cflags() -> list[str]:
    """Compiler flags: ``-O3`` and the build machine's own instruction set (it builds where it runs)."""
    flags = ["-O3", "-DNDEBUG", "-fno-math-errno"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags.append("-march=native")
    elif machine in ("arm64", "aarch64"):
        flags.append("-mcpu=native")
    return flags


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_id() -> str:
    """The CPU, for the cache key (``-march=native`` code runs only on its own kind of CPU)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_root() -> Path:
    """Where built libraries are kept: the package's extension cache (``$TTT_EXTENSIONS_DIR``)."""
    return extensions_dir()


def cache_key() -> str:
    """Hash of everything the built library depends on."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    for part in (" ".join(cflags()), _compiler(), torch.__version__, sys.version, _cpu_id()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def library_path(root: Path | None = None) -> Path:
    """The cached library for the current sources, compiler and machine (it may not exist yet)."""
    return (root or cache_root()) / f"scan-{cache_key()}" / f"{NAME}.so"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes, released by the OS if the holder dies (no stale locks)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (builds go to private directories anyway)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_compiler() -> None:
    cxx = _compiler()
    exe = shlex.split(cxx)[0] if cxx.strip() else ""
    if not exe or shutil.which(exe) is None:
        raise RuntimeError(f"no C++ compiler found (CXX={cxx!r}); install one (e.g. g++ or clang++)")


def _build_into(target: Path) -> None:
    """Compile the sources and move the library to ``target`` (loading it into this process)."""
    from torch.utils import cpp_extension

    _check_compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    old_path = os.environ.get("PATH", "")
    try:
        try:  # the pip `ninja` package puts its binary next to the venv's python, maybe not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old_path
        except ImportError:
            pass
        try:
            cpp_extension.load(name=NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=cflags(),
                               extra_include_paths=[str(CSRC)], build_directory=str(tmp),
                               is_python_module=False, verbose=os.environ.get("TTT_CPP_VERBOSE") == "1")
        except Exception as exc:
            log = target.parent / "build-error.log"
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"building the C++ scan failed ({first[:200]}); full log: {log}") from exc
        built = sorted(tmp.glob(f"{NAME}*.so"))
        if not built:
            raise RuntimeError(f"building the C++ scan produced no library in {tmp}")
        os.replace(built[0], target)
    finally:
        os.environ["PATH"] = old_path
        shutil.rmtree(tmp, ignore_errors=True)


def load_library(root: Path | None = None) -> Path:
    """Load the compiled scan into this process (building it first if needed); returns its path."""
    global _loaded_from
    if _loaded_from is not None:
        return _loaded_from
    target = library_path(root)
    if not target.exists():
        with _file_lock(target.parent.with_suffix(".lock")):
            if not target.exists():
                _build_into(target)  # also loads it
                _loaded_from = target
                return target
    torch.ops.load_library(str(target))
    _loaded_from = target
    return target


class CppBackend:
    """The compiled CPU scan (fp32/fp64, CPU tensors); see :class:`ttt.ops.scan.ScanBackend`."""

    name = "cpp"

    def unsupported(self, k: Tensor, ln_w: Tensor | None, state: tuple[Tensor, ...]) -> str | None:
        if k.device.type != "cpu":
            return f"inputs on {k.device}, it runs on the CPU"
        if k.dtype not in (torch.float32, torch.float64):
            return f"dtype {k.dtype}, it runs float32/float64"
        if any(t.dtype != k.dtype or t.device != k.device for t in state):
            return "the state's dtype or device differs from the inputs'"
        return None

    def forward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                n_complete: Tensor, state: tuple[Tensor, ...], group: int, save: bool
                ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        out = torch.ops.ttt_scan.forward(
            k.contiguous(), q.contiguous(), s.contiguous(), lr.contiguous(), coef.contiguous(),
            None if ln_w is None else ln_w.contiguous(), n_complete.to(torch.long).contiguous(),
            [t.contiguous() for t in state], int(group), bool(save))
        ns = len(state)
        return out[0], tuple(out[1:1 + ns]), tuple(out[1 + ns:])

    def backward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                 n_complete: Tensor, saved: tuple[Tensor, ...], group: int, d_zbar: Tensor,
                 d_final: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        out = torch.ops.ttt_scan.backward(
            k.contiguous(), q.contiguous(), s.contiguous(), lr.contiguous(), coef.contiguous(),
            None if ln_w is None else ln_w.contiguous(), n_complete.to(torch.long).contiguous(),
            [t.contiguous() for t in saved], int(group), d_zbar.contiguous(),
            [t.contiguous() for t in d_final])
        dk, dq, ds, dlr, dcoef_rows, dlnw, *d_state = out
        return (dk, dq, ds, dlr, dcoef_rows.sum(0), None if ln_w is None else dlnw, *d_state)


def load() -> CppBackend:
    """Build/load the compiled scan; raises (with a one-line reason) when it cannot."""
    load_library()
    return CppBackend()
