"""The tengrad package as it was at a git ref, importable beside the working tree's under another name.

``load(ref)`` writes ``git archive ref tengrad`` into a temporary folder as the package
``tengrad_<short sha>`` (every ``tengrad.`` / ``from tengrad`` import inside it renamed; the IR,
``tengrad_ir``, is shared) and imports it. ``benchmarks/step.py --baseline REF`` then times that
TENGraD as one more configuration in the same round robin as the current one and SGD, so a change's
cost is a ratio measured in one process on one machine.
"""
from __future__ import annotations

import importlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(ref: str):
    """The package at ``ref`` as a module (``tengrad_<sha>``); raises if git cannot find the ref."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    name = f"tengrad_{sha}"
    if name in sys.modules:
        return sys.modules[name]
    blob = subprocess.run(["git", "archive", "--format=tar", ref, "tengrad"], cwd=ROOT, capture_output=True,
                          check=True).stdout
    where = tempfile.mkdtemp(prefix="tengrad-baseline-")
    pattern = re.compile(r"\btengrad(?=[.\s])(?!_ir)")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            path = os.path.join(where, name + member.name[len("tengrad"):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = tar.extractfile(member).read()
            if member.name.endswith(".py"):
                text = data.decode()
                text = "\n".join(pattern.sub(name, line) if re.match(r"\s*(from|import)\s", line) else line
                                 for line in text.split("\n"))
                data = text.encode()
            with open(path, "wb") as f:
                f.write(data)
    sys.path.insert(0, where)
    return importlib.import_module(name)
