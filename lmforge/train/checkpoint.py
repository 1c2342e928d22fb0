"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder holds the model (`save_pretrained` layout, so it also loads
for inference), the optimizer's moment tensors (safetensors) with their structure
(JSON), and in `trainer_state.json` the scheduler, the random-number generators
and the position in the data. Nothing is pickled: a checkpoint can be opened
safely whoever made it. The folder is written under a temporary name and renamed
when complete, so a crash mid-save never damages the previous checkpoint.
Data-parallel runs write the same files (gathered from every process's shards) and
resume from them with any number of processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint.hf import load_hf_weights
from lmforge.distributed.data_parallel import is_sharded, load_full_model_state, load_full_optimizer_state
from lmforge.errors import CheckpointError

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_LAYOUT = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `output_dir`, or None."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if _NAME.fullmatch(p.name) and p.is_dir()]
    folders = [p for p in folders if (p / TRAINER_STATE).is_file()]
    return max(folders, key=lambda p: int(_NAME.fullmatch(p.name).group(1)), default=None)


# ----- optimizer state: tensors to safetensors, the rest to JSON ---------------------------------


def optimizer_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an `optimizer.state_dict()` into flat tensors ("state.<param>.<name>") and a JSON layout."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the `state_dict` that `optimizer_to_files` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in layout["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}


# ----- random-number generators --------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as JSON-friendly lists."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----- save and load ----------------------------------------------------------------------------


def save_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer, scheduler,
                    trainer_state: dict[str, Any], model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint to `folder` atomically: into `.<name>.tmp`, then one rename.

    `model_state` and `optimizer_state` replace the model's and optimizer's own state dicts
    (full states gathered from shards). If anything fails before the rename, the temporary
    folder is removed and an existing checkpoint of the same name, or any earlier one, is untouched.
    """
    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)  # left over by a crash during an earlier save
    try:
        model.save_pretrained(temporary, state=model_state)
        tensors, layout = optimizer_to_files(optimizer.state_dict() if optimizer_state is None else optimizer_state)
        save_file(tensors, temporary / OPTIMIZER_TENSORS)
        (temporary / OPTIMIZER_LAYOUT).write_text(json.dumps(layout))
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()}
        (temporary / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        if folder.exists():  # re-saving the same step: move the old copy aside only now that the new one is whole
            retired = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(folder, retired)
            os.replace(temporary, folder)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def load_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from `folder`; return the trainer state.

    A model sharded by FSDP receives the full state, each process keeping its own shards.
    """
    folder = Path(folder)
    missing = [name for name in (OPTIMIZER_TENSORS, OPTIMIZER_LAYOUT, TRAINER_STATE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a complete training checkpoint (missing {', '.join(missing)}); "
                              "resume from a checkpoint-NNNNNN folder that the Trainer wrote, or from 'latest'.")
    if is_sharded(model):
        load_full_model_state(model, model.state_from_hf(load_hf_weights(folder)))
    else:
        model.load_hf_state_dict(load_hf_weights(folder), str(folder), strict=True)
    layout = json.loads((folder / OPTIMIZER_LAYOUT).read_text())
    try:
        load_full_optimizer_state(model, optimizer,
                                  optimizer_from_files(load_file(folder / OPTIMIZER_TENSORS), layout))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: the optimizer state does not fit this model's trainable parameters "
                              f"({exc}); resume with the same model and the same frozen parameters.") from exc
    state = json.loads((folder / TRAINER_STATE).read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(state.pop("rng"))
    return state
