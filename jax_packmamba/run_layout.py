"""Where a training run (`python -m train`) keeps models that can be used directly.

    RUN/                    --run.out_dir
      config.json           the TrainConfig of the latest run in this directory
      metrics.jsonl, summary.json, loss.png
      checkpoints/<step>/   orbax train state: params, optimizer, RNG, data position, config
      models/<step>/        the same step's parameters as a Hugging Face-layout model directory
                            (config.json with eos_token_id, model.safetensors, the tokenizer),
                            written to a temporary name and renamed, so a <step> folder is
                            complete; kept for the same steps as the checkpoints

`resolve_model_dir` turns any of RUN, RUN/checkpoints/<step> or a model directory into the
model directory to load; `jax_packmamba.from_pretrained` and the tokenizer lookup of the
generate command line call it first.
"""

from __future__ import annotations

import os
import pathlib

CONFIG_FILE = "config.json"
MODELS_DIR = "models"
CHECKPOINTS_DIR = "checkpoints"
# A run trained with --run.export_models=false, or before runs exported models, gets the export
# of the checkpoint it resumes from when it is run again.
_EXPORT_HINT = (
    "running `python -m train` on it again (same flags, --run.export_models=true) "
    "exports the checkpoint it resumes from"
)


def exported_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of RUN/models/<step> folders that hold a config.json, in increasing order
    (temporary folders of an export in progress have no step name)."""
    models = pathlib.Path(run_dir) / MODELS_DIR
    if not models.is_dir():
        return []
    return sorted(
        int(p.name) for p in models.iterdir() if p.name.isdigit() and (p / CONFIG_FILE).is_file()
    )


def resolve_model_dir(path: str | os.PathLike) -> pathlib.Path:
    """The model directory that `path` names.

    A training run directory (it has models/) is its newest complete export;
    RUN/checkpoints/<step> is RUN/models/<step>; another directory with a config.json is
    itself. Anything else (also a run with checkpoints but no exports) is a ValueError that
    names the path and what was looked for.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file"
        raise ValueError(
            f"checkpoint path {path} is not a directory ({what}); expected a model "
            f"directory, a training run directory or a run's checkpoints/<step>"
        )
    # A run directory has a config.json too (its training config), so it is recognised first.
    if (path / MODELS_DIR).is_dir():
        steps = exported_steps(path)
        if not steps:
            raise ValueError(
                f"training run {path} has no complete model export in "
                f"{path / MODELS_DIR} (no <step>/{CONFIG_FILE})"
            )
        return path / MODELS_DIR / str(steps[-1])
    if path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR:
        run_dir = path.parent.parent
        export = run_dir / MODELS_DIR / path.name
        if (export / CONFIG_FILE).is_file():
            return export
        have = exported_steps(run_dir)
        raise ValueError(
            f"{path} is a training checkpoint, but its model export {export} is "
            f"missing (exported steps: {have or 'none'}); {_EXPORT_HINT}"
        )
    if (path / CHECKPOINTS_DIR).is_dir():
        raise ValueError(
            f"training run {path} has {CHECKPOINTS_DIR}/ but no model exports in "
            f"{MODELS_DIR}/; {_EXPORT_HINT}"
        )
    if (path / CONFIG_FILE).is_file():
        return path
    raise ValueError(
        f"{path} has no {CONFIG_FILE}: expected a model directory ({CONFIG_FILE} and "
        f"weights), a training run directory (with {MODELS_DIR}/<step>/) or a run's "
        f"{CHECKPOINTS_DIR}/<step>"
    )
