"""`lmforge quantize`: save a quantized copy of a model as a self-contained model folder.

The model is loaded in float32, each Linear layer's weight is rounded to 8 or 4 bits plus scales
(see docs/quantization.md), and the folder gets the packed weights, a config.json that records
the method and the quantized layers, and the tokenizer. It loads back quantized, bit for bit,
wherever a model folder is accepted: `lmforge generate --model DIR`, `lmforge info DIR`, `LLM(DIR)`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.cli.common import note
from lmforge.errors import CheckpointError
from lmforge.quant.formats import FORMATS

EXAMPLES = """examples:
  lmforge quantize smollm2-135m-instruct --method int8 --out smollm2-int8
  lmforge generate "What is the capital of France?" --model smollm2-int8
  lmforge quantize path/to/model.gguf --method int4 --group-size 64 --out model-int4
  lmforge quantize path/to/hf-folder --method nf4 --double-quant --out model-nf4 --force
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="quantize a model's Linear layers and save it as a folder",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="embedded short name, HF model folder or .gguf file (loaded in float32)")
    parser.add_argument("--method", required=True, choices=list(FORMATS),
                        help="int8: 8 bits per weight, near lossless; int4: 4 bits + a scale and offset per group; "
                             "nf4: QLoRA's normal-float 4 bits")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="input columns sharing one scale, for methods with groups: 32, 64 or 128 "
                             "(default: the method's own, 32 for int4)")
    parser.add_argument("--double-quant", action="store_true",
                        help="nf4: store the block scales in 8 bits too (QLoRA double quantization)")
    parser.add_argument("--float-tied-head", action="store_true",
                        help="keep a head tied to the token embedding in float32 (default: int8 with one scale "
                             "per row, read by the token lookups too, whatever --method is)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists and is not empty")
    parser.set_defaults(handler=handle)


def load_float_model(ref: str):
    """The model `ref` names (its head included) in float32, and its tokenizer (None when it has none)."""
    from lmforge import AutoTokenizer
    from lmforge.cli.info import model_class_for
    from lmforge.sources import load_config

    model = model_class_for(load_config(ref)).from_pretrained(ref, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except CheckpointError:
        tokenizer = None
        note(f"{ref} has no tokenizer files; the folder will hold the weights and config only")
    return model, tokenizer


def handle(args: argparse.Namespace) -> int:
    from lmforge.explain.architecture import weight_memory
    from lmforge.quant import quantize_model
    from lmforge.quant.checkpoint import (
        check_output_folder,
        format_options,
        save_quantized,
    )

    options = {"group_size": args.group_size, "double_quant": args.double_quant or None}
    options = {name: value for name, value in options.items() if value is not None}
    format_options(args.method, options)  # bad options and an occupied --out fail before the model loads
    check_output_folder(args.out, args.force)

    start = time.perf_counter()
    model, tokenizer = load_float_model(args.model)
    loaded = time.perf_counter()
    bytes_before, _ = weight_memory(model)
    names = quantize_model(model, args.method, progress=True, tied_head=not args.float_tied_head, **options)
    quantized = time.perf_counter()
    bytes_after, _ = weight_memory(model)
    folder = save_quantized(model, args.out, tokenizer, force=args.force)
    saved = time.perf_counter()

    kept = sum(type(module) is torch.nn.Linear for module in model.modules())
    files = sorted(folder.iterdir())
    settings = ", ".join(f"{name}={value}" for name, value in model.config.extra["quantization"]["options"].items()
                         if value is not None)
    print(f"{args.model} -> {folder} ({args.method}{f', {settings}' if settings else ''})")
    print(f"layers   {len(names)} Linear layers quantized"
          + (f", {kept} kept in float32 (their weight is the token embedding's)" if kept else "")
          + (", the tied head as int8 per row" if "tied_head" in model.config.extra["quantization"] else ""))
    print(f"weights  {bytes_before / 1e6:,.1f} MB -> {bytes_after / 1e6:,.1f} MB in memory "
          f"({bytes_before / bytes_after:.1f}x smaller)")
    print(f"folder   {sum(f.stat().st_size for f in files) / 1e6:,.1f} MB: {', '.join(f.name for f in files)}")
    print(f"time     load {loaded - start:.1f} s, quantize {quantized - loaded:.1f} s, save {saved - quantized:.1f} s")
    return 0
