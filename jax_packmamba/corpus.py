"""The embedded default corpus: the Python standard library's own source files.

Real text with naturally variable lengths (a few hundred bytes to a few hundred kilobytes), on
every machine that has Python, with no download. Bytes are tokens (ids 0..255). The files come
from the running interpreter, so their exact content follows its version.
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np


def stdlib_source_files() -> list[pathlib.Path]:
    """Sorted .py files of the standard library (site-packages excluded)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def stdlib_documents(max_documents: int | None = None) -> list[np.ndarray]:
    """Each source file as a uint8 token array, in path order; empty files are skipped.

    max_documents caps how many files are read (the first ones in path order).
    """
    docs = []
    for path in stdlib_source_files():
        data = path.read_bytes()
        if not data:
            continue
        docs.append(np.frombuffer(data, dtype=np.uint8))
        if max_documents is not None and len(docs) >= max_documents:
            break
    if not docs:
        raise FileNotFoundError(f"no .py files found under {sysconfig.get_paths()['stdlib']}")
    return docs
