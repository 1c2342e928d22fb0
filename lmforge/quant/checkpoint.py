"""Quantized model folders: the packed weights on disk, and loading them back without re-quantizing.

A quantized folder is an ordinary model folder (config.json, model.safetensors, tokenizer files)
with two differences. model.safetensors holds each quantized layer's packed tensors under the
layer's name plus the format's field name (`model.layers.0.mlp.down_proj.q`, `.scale` for int8)
instead of a float `.weight`; everything else is stored as usual. config.json gains a
"quantization" block — method, complete options, the quantized layers and a format version —
from which `from_pretrained` rebuilds the same QuantizedLinear layers, empty, before filling
them from the file: loading is a copy of bits, never a second rounding.
"""

from __future__ import annotations

import copy
import inspect
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError, InputError
from lmforge.nn.inject import replace_modules
from lmforge.quant.embedding import tied_modules, use_quantized_head
from lmforge.quant.formats import FORMATS
from lmforge.quant.linear import QuantizedLinear

QUANTIZATION_KEY = "quantization"  # the config.json block
FORMAT_VERSION = 1  # bumped whenever a format's packed tensors change meaning, so old folders fail loudly
TIED_HEAD_METHOD = "int8"  # a quantized tied head: int8 with one scale per row, i.e. per token (see quant.apply)


def format_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` checked against what `method`'s quantize() accepts, with its defaults filled in.

    Folders record the complete options, so they load the same even if a default changes later.
    """
    if method not in FORMATS:
        raise ConfigError(f"unknown quantization method {method!r}; use one of: {', '.join(FORMATS)}.")
    parameters = list(inspect.signature(FORMATS[method].quantize).parameters.values())[1:]  # after the weight
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"{method} quantization has no option {', '.join(unknown)}; its options are: "
                          f"{', '.join(defaults) or 'none'}.")
    return {**defaults, **options}


def quantization_block(method: str, options: dict[str, Any], modules: list[str],
                       tied_head: str | None = None) -> dict[str, Any]:
    """The config.json record of a quantization: `modules` are names in lmforge's module tree; `tied_head`
    names a head tied to the token embedding that is stored as TIED_HEAD_METHOD (absent: kept float)."""
    block = {"format_version": FORMAT_VERSION, "method": method, "options": dict(options), "modules": list(modules)}
    if tied_head is not None:
        block["tied_head"] = {"module": tied_head, "method": TIED_HEAD_METHOD}
    return block


def read_quantization_block(block: Any, source: str) -> tuple[str, dict[str, Any], list[str]]:
    """(method, options, modules) of a config.json quantization block, checked (see `read_tied_head`)."""
    fix = "re-create the folder from the floating-point model with `lmforge quantize`."
    if not isinstance(block, dict):
        raise CheckpointError(f"{source}: config.json's {QUANTIZATION_KEY!r} must be an object; {fix}")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: quantized with format version {version!r}, but this lmforge reads "
                              f"version {FORMAT_VERSION}; {fix}")
    method, options, modules = block.get("method"), block.get("options", {}), block.get("modules")
    if not isinstance(options, dict) or not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{source}: config.json's {QUANTIZATION_KEY!r} needs 'options' (an object) and "
                              f"'modules' (a list of layer names); {fix}")
    try:
        return method, format_options(method, options), modules
    except ConfigError as exc:
        raise CheckpointError(f"{source}: config.json's {QUANTIZATION_KEY!r}: {exc}") from None


def read_tied_head(block: dict[str, Any], source: str) -> str | None:
    """The module name of a block's quantized tied head, checked, or None when the head stayed float."""
    tied = block.get("tied_head")
    if tied is None:
        return None
    if not isinstance(tied, dict) or not isinstance(tied.get("module"), str) or tied.get("method") != TIED_HEAD_METHOD:
        raise CheckpointError(f"{source}: config.json's {QUANTIZATION_KEY!r} has a 'tied_head' this lmforge cannot "
                              f"read (expected {{'module': NAME, 'method': {TIED_HEAD_METHOD!r}}}); re-create the "
                              "folder from the floating-point model with `lmforge quantize`.")
    return tied["module"]


def meta_quantized_linear(linear: nn.Linear, method: str, **options) -> QuantizedLinear:
    """A QuantizedLinear shaped like `linear` quantized with `method`, on the meta device.

    The format quantizes a stand-in that has shapes and dtypes but no data, so its buffers come out
    exactly as quantizing would make them, without reading or computing a single weight.
    """
    with torch.device("meta"):
        stand_in = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             dtype=linear.weight.dtype)
        return QuantizedLinear.from_linear(stand_in, method, **options)


def prepare_quantized_layers(model: nn.Module, block: Any, source: str) -> list[str]:
    """Swap the Linear layers a quantization block lists for QuantizedLinear layers with uninitialised
    buffers; returns their names. Loading the checkpoint afterwards (strictly) fills every buffer.
    """
    method, options, names = read_quantization_block(block, source)
    modules = dict(model.named_modules())
    for name in names:
        if type(modules.get(name)) is not nn.Linear:
            raise CheckpointError(f"{source}: config.json lists {name!r} as a quantized layer, but "
                                  f"{type(model).__name__} has no Linear layer of that name; load the folder with "
                                  "the class that saved it (config.json 'architectures').")
    templates: dict[tuple, QuantizedLinear] = {}  # one meta quantization per layer shape: each costs ~10 ms

    def build(name: str, linear: nn.Linear) -> QuantizedLinear:
        shape = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        if shape not in templates:
            templates[shape] = meta_quantized_linear(linear, method, **options)
        return copy.deepcopy(templates[shape]).to_empty(device=linear.weight.device)

    wanted = set(names)
    replaced = replace_modules(model, lambda name, module: name in wanted, build)
    head = read_tied_head(block, source)
    if head is not None:
        if head not in tied_modules(model) or type(modules[head]) is not nn.Linear:
            raise CheckpointError(f"{source}: config.json names {head!r} as a quantized tied head, but "
                                  f"{type(model).__name__} has no head of that name tied to its embedding; load the "
                                  "folder with the class that saved it (config.json 'architectures').")
        linear = modules[head]
        use_quantized_head(model, head, meta_quantized_linear(linear, TIED_HEAD_METHOD).to_empty(
            device=linear.weight.device))
        replaced.append(head)
    return replaced


def packed_tensor_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Tensors only a quantized layer holds: 8-bit integer codes of a module that has no `weight`.

    (A quantized layer keeps its bias in floating point, so a `bias` is never one of them.)
    """
    return [name for name, tensor in state.items()
            if tensor.dtype in (torch.int8, torch.uint8) and not name.endswith(".bias")
            and f"{name.rpartition('.')[0]}.weight" not in state]


def reject_packed_tensors(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse quantized tensors in a checkpoint whose config does not say how to read them."""
    packed = packed_tensor_names(state)
    if packed:
        raise CheckpointError(
            f"{source}: the weights hold quantized tensors (e.g. {packed[:3]}) but config.json has no "
            f"{QUANTIZATION_KEY!r} block saying how to read them; restore the config.json that "
            "`lmforge quantize` wrote next to them, or quantize the floating-point model again.")


def check_output_folder(folder: str | Path, force: bool = False) -> Path:
    """`folder` as a Path if a model may be written there: absent, empty, or replaced with `force`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; choose a folder to write the model into.")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise InputError(f"{folder} already exists and is not empty; choose another output folder, or pass "
                         "force=True (--force) to replace it.")
    return folder


def save_quantized(model: nn.Module, folder: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Write a quantized model (and its tokenizer) as a self-contained folder, atomically.

    Everything goes into a hidden folder next to `folder` that is renamed into place at the end, so
    an error or Ctrl-C never leaves a half-written model. An existing non-empty `folder` is replaced
    only with `force`.
    """
    if QUANTIZATION_KEY not in getattr(model.config, "extra", {}):
        raise ConfigError("this model is not quantized; quantize it first with quantize_model(model, method).")
    folder = check_output_folder(folder, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if folder.exists():
            replaced = staging.with_name(staging.name.replace(".partial-", ".replaced-"))
            folder.rename(replaced)
            staging.rename(folder)
            shutil.rmtree(replaced)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
