"""The ``trust_remote_code`` bundle of an exported model, generated from this package's own modules.

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` imports the classes named by the
config's ``auto_map`` from ``.py`` files next to the weights, and follows only flat relative imports
(``from .name import x``) between them. This package is nested (``ttt.models``, ``ttt.layers``,
``ttt.ops``, ``ttt.ops.scan``), so :func:`write_remote_code` copies the modules the model needs, found
by following the relative imports of :data:`ENTRY_MODULES`, into one flat folder and rewrites each
relative import to the flat file name (``ttt.layers.ttt_layer`` -> ``layers_ttt_layer.py``). Nothing is
maintained by hand: the bundle is the package's current source, so it cannot drift.

Only pure PyTorch ships. The compiled paths are switched off in the copies, by definitions appended to
them (:data:`_OVERRIDES`) and imports replaced by stubs (:data:`_STUBS`), so a machine without a
compiler, Triton or the C++ sources neither builds, warns nor fails:

* the scan dispatcher (``ops/scan``) gets a ``resolve_backend`` that always returns the PyTorch backend;
* the causal conv (``ops/conv.py``) gets an ``_extension`` that returns ``None``, so it always runs
  :func:`ttt.ops.conv.causal_conv1d_reference`, and its import of the extension builder
  (``ops/extension.py``) is replaced by a stub, so the builder is not bundled;
* the normalisations (``ops/norm.py``) and the SwiGLU gate (``ops/swiglu.py``) likewise get an
  ``_extension`` that returns ``None`` (their PyTorch references run) and the builder stub;
* the packed GEMM (``ops/linear.py``) likewise gets an ``_extension`` that returns ``None`` (so the
  layers keep ``F.linear``) and the builder stub;
* the decode step (``ops/decode.py``) gets a ``_fused_decoder`` that returns ``None`` (the PyTorch step).

Each hook names what it replaces; if the package's module no longer defines it, generating the bundle
fails with :class:`RemoteCodeError` instead of shipping a copy that would build or warn.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from ..util.files import atomic_write_text

#: the modules named by ``auto_map``; everything they import from this package is bundled with them
ENTRY_MODULES = ("ttt.models.configuration_ttt", "ttt.models.modeling_ttt")
AUTO_MAP = {
    "AutoConfig": "configuration_ttt.TTTConfig",
    "AutoModel": "modeling_ttt.TTTModel",
    "AutoModelForCausalLM": "modeling_ttt.TTTForCausalLM",
}
#: package ``__init__`` modules whose import has side effects (Auto-class registration): never bundled
_NOT_BUNDLED = ("ttt", "ttt.models")
_BANNER = "\n\n# ---- exported model: pure PyTorch only (added by ttt.models.remote_code) ----\n"
#: module -> (definitions its source must hold, text appended to its copy, overriding them)
_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "ttt.ops.scan": (("def resolve_backend(", "def get_backend("), _BANNER + '''\
def resolve_backend(k, ln_w, state, backend=None):
    """The exported copy always runs the PyTorch scan (the compiled backends are not bundled)."""
    return get_backend("torch")
'''),
    "ttt.ops.conv": (("def _extension(", "def causal_conv1d_reference(", "_extension() is None"),
                     _BANNER + '''\
def _extension():
    """The exported copy never builds the compiled conv: causal_conv1d runs causal_conv1d_reference."""
    return None
'''),
    "ttt.ops.norm": (("def _extension(", "def rms_norm_reference(", "def gated_layer_norm_reference("),
                     _BANNER + '''\
def _extension():
    """The exported copy never builds the compiled normalisations: the PyTorch references run."""
    return None
'''),
    "ttt.ops.swiglu": (("def _extension(", "def swiglu_reference(", "if ext is None:"), _BANNER + '''\
def _extension():
    """The exported copy never builds the compiled SwiGLU: the PyTorch reference runs."""
    return None
'''),
    "ttt.ops.linear": (("def _extension(", "def packing_available(", "def pack_weight("), _BANNER + '''\
def _extension():
    """The exported copy never builds the packed GEMM: pack_weight returns None, layers use F.linear."""
    return None
'''),
    "ttt.ops.decode": (("def _fused_decoder(", "fused = _fused_decoder("), _BANNER + '''\
def _fused_decoder(xq, tensors, state):
    """The exported copy always takes the PyTorch decode step (the Triton kernels are not bundled)."""
    return None
'''),
}
#: (module, imported module) -> the stub that replaces ``from .imported import ...`` in the copy
_NO_BUILDER = '''\
def load_or_warn(*args, **kwargs):  # exported model: the extension builder is not bundled
    return None
'''
_STUBS: dict[tuple[str, str], str] = {
    ("ttt.ops.conv", "ttt.ops.extension"): _NO_BUILDER,
    ("ttt.ops.norm", "ttt.ops.extension"): _NO_BUILDER,
    ("ttt.ops.swiglu", "ttt.ops.extension"): _NO_BUILDER,
    ("ttt.ops.linear", "ttt.ops.extension"): _NO_BUILDER,
}


class RemoteCodeError(RuntimeError):
    """A module cannot be bundled (an absolute ``ttt`` import, a side-effect package, ...)."""


def flat_name(module: str) -> str:
    """The bundle's file stem for a ``ttt`` module: ``ttt.models.x`` -> ``x``, ``ttt.a.b`` -> ``a_b``."""
    parts = module.split(".")
    if parts[0] != "ttt" or module in _NOT_BUNDLED:
        raise RemoteCodeError(f"module {module!r} cannot be part of an exported model's code")
    parts = parts[1:]
    if parts[0] == "models":
        parts = parts[1:]
    return "_".join(parts)


def _source_of(module: str) -> tuple[Path, bool]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RemoteCodeError(f"cannot find the source of {module!r}")
    path = Path(spec.origin)
    return path, path.name == "__init__.py"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _rewrite(module: str) -> tuple[str, list[str]]:
    """The flat-import source of ``module`` and the ``ttt`` modules it imports."""
    path, is_pkg = _source_of(module)
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    needed: list[str] = []
    edits: list[tuple[int, int, str]] = []
    stubbed: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(a.name == "ttt" or a.name.startswith("ttt.") for a in node.names):
                raise RemoteCodeError(f"{module} imports this package absolutely (line {node.lineno}); "
                                      "use a relative import so it can be bundled")
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if node.module == "ttt" or (node.module or "").startswith("ttt."):
                raise RemoteCodeError(f"{module} imports this package absolutely (line {node.lineno}); "
                                      "use a relative import so it can be bundled")
            continue
        indent = lines[node.lineno - 1][: len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())]
        new: list[str] = []
        if node.module is not None and (module, _resolve(module, is_pkg, node.level, node.module)) in _STUBS:
            stubbed.add(_resolve(module, is_pkg, node.level, node.module))
            new.extend(_STUBS[(module, _resolve(module, is_pkg, node.level, node.module))].splitlines())
        elif node.module is not None:
            target = _resolve(module, is_pkg, node.level, node.module)
            names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
            new.append(f"from .{flat_name(target)} import {names}")
            needed.append(target)
        else:
            base = _resolve(module, is_pkg, node.level, None)
            for a in node.names:
                sub = f"{base}.{a.name}"
                bound = a.asname or a.name
                if _is_module(sub):
                    # ``from . import sub`` is invisible to transformers' file discovery: import a name
                    # from the file instead, then bind the module object
                    new.append(f"from .{flat_name(sub)} import __name__ as _{bound}_module_name")
                    new.append(f"{bound} = __import__('sys').modules[_{bound}_module_name]")
                    needed.append(sub)
                else:
                    new.append(f"from .{flat_name(base)} import {a.name}"
                               + (f" as {a.asname}" if a.asname else ""))
                    needed.append(base)
        edits.append((node.lineno, node.end_lineno or node.lineno, "".join(indent + n + "\n" for n in new)))
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1:end] = [text]
    out = "".join(lines)
    missing_stubs = sorted(t for (m, t) in _STUBS if m == module and t not in stubbed)
    if missing_stubs:
        raise RemoteCodeError(f"{module} no longer imports {missing_stubs} (stubbed in the exported copy); "
                              "update ttt.models.remote_code")
    if module in _OVERRIDES:
        required, text = _OVERRIDES[module]
        gone = [r for r in required if r not in source]
        if gone:
            raise RemoteCodeError(f"{module} no longer holds {gone} (overridden in the exported copy); "
                                  "update ttt.models.remote_code")
        out += text
    return out, needed


def bundle_sources() -> dict[str, str]:
    """``{file name: source}`` of the flat bundle (the entry modules and everything they import)."""
    files: dict[str, str] = {}
    todo, seen = list(ENTRY_MODULES), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        text, needed = _rewrite(module)
        header = f"# Generated from {module} by ttt.models.remote_code; edit the package, not this file.\n"
        files[f"{flat_name(module)}.py"] = header + text
        todo.extend(needed)
    return files


def write_remote_code(directory: str | Path) -> list[str]:
    """Write the bundle's ``.py`` files into ``directory`` (each atomically); returns their names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = bundle_sources()
    for name, text in files.items():
        atomic_write_text(directory / name, text)
    return sorted(files)


__all__ = ["AUTO_MAP", "ENTRY_MODULES", "RemoteCodeError", "bundle_sources", "flat_name", "write_remote_code"]
