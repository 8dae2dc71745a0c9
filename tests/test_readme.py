"""README.md as a user reads it: every ```python block runs as written (on CPU, in an empty
folder), and every function its API table names exists."""

from __future__ import annotations

import importlib
import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.M | re.S)


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    assert BLOCKS, "README.md has no python block"
    monkeypatch.chdir(tmp_path)  # the blocks write files (save_pretrained)
    for i, block in enumerate(BLOCKS, 1):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "readme"})


def test_api_table_names_what_exists():
    modules = [
        importlib.import_module(m)
        for m in ("jax_packmamba", "jax_packmamba.tokenizer", "jax_packmamba.generation")
    ]
    rows = [line.split(" | ") for line in README.splitlines() if line.startswith("| `")]
    # What the API column names, and every call written anywhere in the table.
    names = {
        n
        for api, *rest in rows
        for n in re.findall(r"`(\w+)[`(]", api) + re.findall(r"`(\w+)\(", " ".join(rest))
    } - {"jax_packmamba"}
    assert len(names) > 20, names
    missing = sorted(n for n in names if not any(hasattr(m, n) for m in modules))
    assert not missing, missing
