"""Building and caching the package's C++ operator libraries (compiled on first use with ninja).

A library is built from its sources by :mod:`torch.utils.cpp_extension` into a cache directory keyed
by a hash of everything the binary depends on (sources, headers, compiler flags, compiler, torch and
Python versions, and the CPU, since the code is built for the machine's own instruction set), so a
machine builds it once. Processes starting at once (e.g. pytest-xdist workers) are serialised by a
file lock; each build happens in a private temporary directory and is moved into place atomically, so
an interrupted build never leaves a broken library behind. The libraries register their operators with
``TORCH_LIBRARY`` (``torch.ops.<namespace>.<op>``). Without a working compiler :func:`load_library`
raises with a one-line reason; callers then fall back to their PyTorch path with a one-time warning.

Environment: ``TTT_EXTENSIONS_DIR`` (cache directory, default ``$XDG_CACHE_HOME/ttt/extensions`` or
``~/.cache/ttt/extensions``), ``CXX`` (compiler, default ``c++``), ``TTT_CPP_VERBOSE=1`` (show builds).
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
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "TTT_EXTENSIONS_DIR"
_LOADED: dict[str, Path] = {}


def cflags() -> list[str]:
    """``-O3`` and the build machine's own instruction set (the build runs where it is used)."""
    # -funroll-loops: the kernels' row loops run over runtime widths (head dim, hidden dim), which -O3
    # alone leaves rolled (~3% of the compiled scan, 1 thread)
    flags = ["-O3", "-DNDEBUG", "-fno-math-errno", "-funroll-loops"]
    if _openmp():
        flags.append("-fopenmp")
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        # 512-bit vectors for the loops the compiler vectorises, where the CPU has them (its default
        # is 256-bit): ~5% of the compiled scan on an AVX-512 machine
        flags += ["-march=native", "-mprefer-vector-width=512"]
    elif machine in ("arm64", "aarch64"):
        flags.append("-mcpu=native")
    return flags


def _openmp() -> bool:
    """Whether to compile with ``-fopenmp``: with torch's OpenMP backend, ``at::parallel_for`` is a header
    template that runs serially unless the library itself is compiled with OpenMP."""
    return "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_id() -> str:
    """A description of the CPU, for the cache key (``-march=native`` code runs only on its own kind)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_root() -> Path:
    """Where built libraries are kept (``$TTT_EXTENSIONS_DIR`` or the user cache directory)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ttt" / "extensions"


def cache_key(files: Sequence[Path]) -> str:
    """Hash of everything a library built from ``files`` depends on."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (" ".join(cflags()), _compiler(), torch.__version__, sys.version, _cpu_id()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def library_path(name: str, sources: Sequence[Path], headers: Sequence[Path] = (),
                 root: Path | None = None) -> Path:
    """The cached library for these sources, compiler and machine (it may not exist yet)."""
    return (root or cache_root()) / f"{name}-{cache_key([*sources, *headers])}" / f"{name}.so"


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


def _build_into(name: str, sources: Sequence[Path], include_dirs: Sequence[Path], target: Path) -> None:
    """Compile ``sources`` and move the library to ``target`` (loading it into this process)."""
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
            cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=cflags(),
                               extra_ldflags=["-fopenmp"] if _openmp() else [],
                               extra_include_paths=[str(d) for d in include_dirs], build_directory=str(tmp),
                               is_python_module=False, verbose=os.environ.get("TTT_CPP_VERBOSE") == "1")
        except Exception as exc:
            log = target.parent / "build-error.log"
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"building {name} failed ({first[:200]}); full log: {log}") from exc
        built = sorted(tmp.glob(f"{name}*.so"))
        if not built:
            raise RuntimeError(f"building {name} produced no library in {tmp}")
        os.replace(built[0], target)
    finally:
        os.environ["PATH"] = old_path
        shutil.rmtree(tmp, ignore_errors=True)


def load_library(name: str, sources: Sequence[Path], headers: Sequence[Path] = (),
                 root: Path | None = None) -> Path:
    """Load the operator library ``name`` into this process (building it first if needed).

    Returns the path of the loaded library. ``headers`` count for the cache key and their directories
    are on the include path.
    """
    if name in _LOADED:
        return _LOADED[name]
    target = library_path(name, sources, headers, root)
    include_dirs = sorted({h.parent for h in headers})
    if not target.exists():
        with _file_lock(target.parent.with_suffix(".lock")):
            if not target.exists():
                _build_into(name, sources, include_dirs, target)  # also loads it
                _LOADED[name] = target
                return target
    torch.ops.load_library(str(target))
    _LOADED[name] = target
    return target


def load_or_warn(name: str, sources: Sequence[Path], headers: Sequence[Path] = (), *, what: str,
                 fallback: str, stacklevel: int = 4) -> Any | None:
    """``torch.ops.<name>`` (building the library first if needed), or ``None`` where it cannot be built
    (no compiler or ninja, a build error), with one ``RuntimeWarning``: "<what> unavailable (<reason>);
    using <fallback>", attributed ``stacklevel`` frames up (the user's call). Callers cache the result,
    so a machine warns once per library."""
    try:
        load_library(name, sources, headers)
        return getattr(torch.ops, name)
    except Exception as exc:  # the caller runs its PyTorch path instead
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"{what} unavailable ({reason}); using {fallback}", RuntimeWarning,
                      stacklevel=stacklevel)
        return None
