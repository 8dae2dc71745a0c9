"""Orbax checkpoints: the full train state (params, optimizer, step, RNG) plus JSON metadata
(data position, config), every N steps and at the end, keeping the last K.

The state is stored as a flat dict of its leaves ("000000", "000001", ... in tree order), so
restoring needs only the abstract state of the same config, with its shardings: each array is
read straight into its sharded layout. Orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


def _flat(state) -> dict:
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


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

    def restore(self, step: int, abstract_state, shardings):
        """(state, meta) of `step`, arrays placed with `shardings` (a tree like the state)."""
        leaves, treedef = jax.tree.flatten(abstract_state)
        target = {f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                  for i, (x, s) in enumerate(zip(leaves, jax.tree.leaves(shardings)))}
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        flat = out["state"]
        state = jax.tree.unflatten(treedef, [flat[k] for k in sorted(flat)])
        return state, out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
