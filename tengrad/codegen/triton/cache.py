"""Generated modules live in files: ``@triton.jit`` reads a kernel's source with ``inspect.getsource``,
so exec'd strings do not work.

The file name is a hash of the source (which is rendered from the plan: spec, sizes, dtype,
precision, configs), so equal plans share one file across processes and a changed plan never
reads a stale one. Directory: ``$TENGRAD_CACHE`` or ``~/.cache/tengrad/triton``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_LOADED: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("TENGRAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tengrad", "triton")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def key_of(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def path_for(source: str) -> Path:
    return cache_dir() / f"tengrad_{key_of(source)}.py"


def load(source: str) -> ModuleType:
    """Write ``source`` to its cache file (atomically, once) and import it."""
    key = key_of(source)
    if key in _LOADED:
        return _LOADED[key]
    path = path_for(source)
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    name = f"tengrad_triton_generated_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    _LOADED[key] = module
    return module
