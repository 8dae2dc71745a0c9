"""Orbax checkpoints and the model exports beside them.

A checkpoint (RUN/checkpoints/<step>/) holds the full train state (params, optimizer, step,
RNG) as item "state" and JSON metadata as item "meta": {"step", "data": the data position,
"config": TrainConfig.to_dict(), "model_config": the resolved model config} (see
train.config.model_record), which a resume compares with its own config before it writes
anything. Checkpoints are written every N steps and at the end, keeping the last K.

The state is stored as a flat dict of its leaves ("000000", "000001", ... in tree order), so
restoring needs only the abstract state of the same config, with its shardings: each array is
read straight into its sharded layout. Orbax writes into a temporary directory
(<step>.orbax-checkpoint-tmp-<time>) and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest and the temporary directory is no step.

A model export (RUN/models/<step>/, see jax_packmamba.run_layout) is the same step's parameters
written by jax_packmamba.save_pretrained into a temporary folder, then renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from jax_packmamba.pretrained import save_pretrained

# A reason longer than this is cut (with "...") so that a report stays one line.
MAX_REASON_CHARS = 300


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be read; the message says which and how to go on."""


def _flat(state) -> dict:
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def error_reason(err: BaseException) -> str:
    """One line saying why reading failed: the innermost cause (orbax wraps tensorstore's
    error, e.g. OUT_OF_RANGE for a truncated data file, in a generic one)."""
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    lines = str(root).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def broken_json_files(step_dir: pathlib.Path) -> list[str]:
    """The small JSON files of a checkpoint folder that do not parse (orbax's JSONDecodeError
    does not say which file it read), relative to step_dir."""
    broken = []
    for file in sorted(step_dir.rglob("*")):
        rel = file.relative_to(step_dir)
        in_data = any(part == "d" or part.startswith("ocdbt") for part in rel.parts)
        if not file.is_file() or in_data or file.suffix == ".txt" or file.suffix == ".ocdbt":
            continue
        try:
            json.loads(file.read_bytes())
        except (OSError, ValueError):
            broken.append(str(rel))
    return broken


@contextlib.contextmanager
def _quiet_asyncio():
    """Orbax's reads run in asyncio tasks; when one fails, asyncio logs every sibling task's
    failure with its traceback (hundreds of lines). The caller reports the error itself."""
    logger = logging.getLogger("asyncio")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an asynchronous save (device->host copy happens before this returns)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(state)), meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        """The metadata of `step` alone (no arrays are read)."""
        with _quiet_asyncio():
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, step: int, abstract_state, shardings):
        """(state, meta) of `step`, arrays placed with `shardings` (a tree like the state)."""
        leaves, treedef = jax.tree.flatten(abstract_state)
        target = {f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                  for i, (x, s) in enumerate(zip(leaves, jax.tree.leaves(shardings)))}
        with _quiet_asyncio():
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        flat = out["state"]
        state = jax.tree.unflatten(treedef, [flat[k] for k in sorted(flat)])
        return state, out["meta"]

    def set_aside(self, step: int, destination: pathlib.Path) -> pathlib.Path:
        """Moves checkpoint `step` (unreadable) to destination/<step> (or <step>-2, ...), so a
        resumed run can write that step again; returns where it went. Nothing is deleted."""
        target = _free_name(destination, str(step))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.directory / str(step), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _free_name(folder: pathlib.Path, name: str) -> pathlib.Path:
    target, n = folder / name, 1
    while target.exists():
        n += 1
        target = folder / f"{name}-{n}"
    return target


# ------------------------------------------------------------------------------------------------
# Model exports: RUN/models/<step>/.

TMP_PREFIX = ".tmp-"


def export_model(model, tokenizer, models_dir: pathlib.Path, step: int) -> pathlib.Path:
    """Writes models_dir/<step>/ with save_pretrained: into a temporary folder first, renamed
    when complete, so a folder named by a step is always a whole model. An older export of the
    same step (a run that went back to an earlier checkpoint) is replaced."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / str(step)
    tmp = models_dir / f"{TMP_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    if final.exists():
        old = models_dir / f"{TMP_PREFIX}{step}-replaced-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def prune_exports(models_dir: pathlib.Path, keep: int) -> None:
    """Keeps the newest `keep` exports (as orbax keeps the newest checkpoints) and removes the
    temporary folders of exports that a killed run left unfinished."""
    if not models_dir.is_dir():
        return
    steps = sorted(int(p.name) for p in models_dir.iterdir() if p.name.isdigit())
    for step in steps[:-keep]:
        shutil.rmtree(models_dir / str(step))
    for p in models_dir.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p)
