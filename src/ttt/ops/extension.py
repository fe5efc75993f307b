"""Building and caching the package's C++ extensions (compiled on first use with ninja).

Each extension is built once per (sources, compiler flags, torch version, Python version) into
``$TTT_EXTENSIONS_DIR`` (default ``~/.cache/ttt/extensions``) and reused from there; concurrent first
uses (e.g. pytest-xdist workers) wait on PyTorch's build lock instead of building twice. Without a C++
compiler the build raises, and callers fall back to their pure-PyTorch path with a one-line warning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
ENV_DIR = "TTT_EXTENSIONS_DIR"
_CACHE: dict[str, ModuleType] = {}


def extensions_dir() -> Path:
    """Where built extensions are kept (``$TTT_EXTENSIONS_DIR`` or ``~/.cache/ttt/extensions``)."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path.home() / ".cache" / "ttt" / "extensions"


def load_extension(name: str, sources: Sequence[Path], extra_cflags: Sequence[str] = ()) -> ModuleType:
    """Import the extension ``name`` built from ``sources``, compiling it first if needed."""
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    for src in sorted(sources):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for extra in (*extra_cflags, torch.__version__, sys.version, sys.platform):
        h.update(str(extra).encode())
    tag = f"{name}_{h.hexdigest()[:12]}"
    if tag in _CACHE:
        return _CACHE[tag]
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) found on PATH")
    build_dir = extensions_dir() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(name=tag, sources=[str(s) for s in sources], build_directory=str(build_dir),
                                extra_cflags=["-O3", *extra_cflags], verbose=False)
    _CACHE[tag] = module
    return module
