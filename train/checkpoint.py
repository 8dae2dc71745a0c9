"""Orbax checkpoints and the model exports beside them.

A checkpoint (RUN/checkpoints/<step>/) holds the full train state (params, optimizer, step,
RNG) as item "state" and JSON metadata as item "meta": {"step", "data": the data position,
"config": TrainConfig.to_dict(), "model_config": the resolved model config} (see
train.config.model_record), which a resume compares with its own config before it writes
anything. Checkpoints are written every N steps and at the end, keeping the last K.

The state is stored as a tree of its names ("params/embedding/embedding",
"opt_state/1/0/mu/layers/mixer/A_log", ...), so restoring needs only the abstract state of the
same config, with its shardings: each array is read by its name straight into its sharded
layout, and a name or shape that differs is an error naming the parameter, never a silent swap.
Checkpoints written before (at e5a3f65 and earlier) hold the leaves in tree order ("000000",
"000001", ...); they are read in the order of the tree that wrote them (`legacy_tree`: layers
one by one) and restacked (`migrate_legacy`). Orbax writes into a temporary directory
(<step>.orbax-checkpoint-tmp-<time>) and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest and the temporary directory is no step.

A model export (RUN/models/<step>/, see jax_packmamba.run_layout) is the same step's parameters
written by jax_packmamba.save_pretrained into a temporary folder, then renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jax_packmamba.pretrained import save_pretrained

# A reason longer than this is cut (with "...") so that a report stays one line.
MAX_REASON_CHARS = 300


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be read; the message says which and how to go on."""


def leaf_names(tree) -> list[str]:
    """Each leaf's path as "a/b/c", in tree order (dict keys, sequence indices, attributes)."""
    return [
        "/".join(_key_name(k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _nested(names, leaves) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}: the tree orbax writes, one folder level per name."""
    out: dict = {}
    for name, leaf in zip(names, leaves):
        *parents, last = name.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return out


def _flat_metadata(tree, prefix=()) -> dict:
    """orbax's metadata tree -> {"a/b": (shape, dtype)}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_metadata(value, prefix + (key,)))
        else:
            out["/".join(prefix + (key,))] = (tuple(value.shape), value.dtype)
    return out


def _is_legacy(saved: dict) -> bool:
    return bool(saved) and all(len(k) == 6 and k.isdigit() for k in saved)


def legacy_tree(tree):
    """The tree the trainer wrote leaf by leaf at e5a3f65: every "layers" entry of the state,
    stacked on a leading layer axis now, as a dict of one subtree per layer {0: ..., 1: ...}
    (leaves without the layer axis; shardings of per-layer slices)."""

    def unstack(layers):
        if not _stacked(layers):
            return layers
        num = jax.tree.leaves(layers)[0].shape[0]
        return {i: jax.tree.map(lambda x: _layer_slice(x, i), layers) for i in range(num)}

    return _map_layers(tree, unstack)


def migrate_legacy(per_layer):
    """legacy_tree's inverse: per-layer subtrees stacked on a leading layer axis."""

    def stack(layers):
        if _stacked(layers):
            return layers
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])

    return _map_layers(per_layer, stack)


def _map_layers(tree, fn):
    """`tree` with fn applied to the value of every dict entry named "layers"."""
    if isinstance(tree, dict):
        return {k: fn(v) if k == "layers" else _map_layers(v, fn) for k, v in tree.items()}
    if hasattr(tree, "_fields"):  # optax's NamedTuple states
        return type(tree)(*(_map_layers(v, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_layers(v, fn) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(
            tree,
            **{f.name: _map_layers(getattr(tree, f.name), fn) for f in dataclasses.fields(tree)},
        )
    return tree


def _stacked(layers) -> bool:
    """Whether a "layers" entry is stacked (named subtrees), not one subtree per layer index."""
    return not (isinstance(layers, dict) and layers and all(isinstance(k, int) for k in layers))


def _layer_slice(x, i):
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:])
            )
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
    return x[i]


def error_reason(err: BaseException) -> str:
    """One line saying why reading failed: the innermost cause (orbax wraps tensorstore's
    error, e.g. OUT_OF_RANGE for a truncated data file, in a generic one)."""
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    lines = str(root).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


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
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an asynchronous save (device->host copy happens before this returns)."""
        named = _nested(leaf_names(state), jax.tree.leaves(state))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(named), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict:
        """The metadata of `step` alone (no arrays are read)."""
        with _quiet_asyncio():
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, step: int, abstract_state, shardings):
        """(state, meta) of `step`, arrays placed with `shardings` (a tree like the state).

        Raises CheckpointError naming the first parameter whose name or shape differs."""
        leaves, treedef = jax.tree.flatten(abstract_state)
        target = [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            for x, s in zip(leaves, jax.tree.leaves(shardings))
        ]
        with _quiet_asyncio():
            saved = _flat_metadata(self.manager.item_metadata(step)["state"].tree)
        legacy = _is_legacy(saved)
        if legacy:  # leaf order: the per-layer tree of e5a3f65, read by position
            target = legacy_tree(jax.tree.unflatten(treedef, target))
            names = leaf_names(target)
            target = jax.tree.leaves(target)
            keys = [f"{i:06d}" for i in range(len(target))]
            if len(saved) != len(target):
                raise CheckpointError(
                    f"checkpoint step {step} holds {len(saved)} arrays in leaf order, this model's "
                    f"state has {len(target)}: it was written for another model"
                )
        else:
            names = keys = leaf_names(abstract_state)
        for key, name, x in zip(keys, names, target):
            if key not in saved:
                raise CheckpointError(
                    f"checkpoint step {step} has no {name}: it was written for another model"
                )
            if saved[key][0] != tuple(x.shape):
                raise CheckpointError(
                    f"checkpoint step {step}: {name} has shape {saved[key][0]}, "
                    f"this model's is {tuple(x.shape)}"
                )
        if not legacy and set(saved) != set(names):
            extra = sorted(set(saved) - set(names))
            raise CheckpointError(
                f"checkpoint step {step} holds {extra[0]}, which this model "
                f"lacks ({len(extra)} such): it was written for another model"
            )
        with _quiet_asyncio():
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_nested(keys, target)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        restored = _flat_of(out["state"])
        arrays = [restored[k] for k in keys]
        if legacy:
            per_layer = jax.tree.unflatten(jax.tree.structure(legacy_tree(abstract_state)), arrays)
            if jax.tree.structure(per_layer) != treedef:  # stacked layers since
                per_layer = jax.tree.map(jax.device_put, migrate_legacy(per_layer), shardings)
            state = per_layer
        else:
            state = jax.tree.unflatten(treedef, arrays)
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


def _flat_of(tree, prefix=()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_of(value, prefix + (key,)))
        else:
            out["/".join(prefix + (key,))] = value
    return out


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
