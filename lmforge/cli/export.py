"""`lmforge export gguf`: write a model and its tokenizer to one GGUF file for llama.cpp and friends.

GGUF holds the weights (optionally quantized into 8- or 4-bit blocks), the architecture as
metadata and the whole tokenizer, chat template included, so one file is all a runtime needs.
Any Llama-family decoder lmforge loads can be exported: an embedded model, an HF folder or
another GGUF file (re-quantizing an already quantized file compounds its rounding error).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import note
from lmforge.errors import CheckpointError
from lmforge.sources import DEFAULT_MODEL

TYPES = ("f32", "f16", "q8_0", "q4_0")

EXAMPLES = """examples:
  lmforge export gguf --out smollm2-q8_0.gguf --type q8_0
  lmforge export gguf path/to/hf-folder --out model-f16.gguf
  lmforge export gguf path/to/trained-folder --tokenizer smollm2-135m-instruct --out tuned.gguf --type q4_0

types (1-D tensors such as norms always stay f32):
  f32   exact, 4 bytes per weight
  f16   2 bytes per weight, the usual lossless-enough choice (default)
  q8_0  blocks of 32 int8 weights + one fp16 scale: 8.5 bits per weight
  q4_0  blocks of 32 4-bit weights + one fp16 scale: 4.5 bits per weight; the output head stays q8_0
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a model to another format (GGUF)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser("gguf", help="one GGUF v3 file: weights, config and tokenizer", description=__doc__,
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    gguf.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                      help=f"embedded short name, HF model folder or .gguf file (default: {DEFAULT_MODEL})")
    gguf.add_argument("--out", required=True, metavar="FILE", help="the .gguf file to write (replaced if it exists)")
    gguf.add_argument("--type", choices=TYPES, default="f16", help="how matrices are stored (default: f16)")
    gguf.add_argument("--tokenizer", metavar="MODEL",
                      help="take the tokenizer from this model reference instead (default: the model's own)")
    gguf.add_argument("--name", help="general.name written into the file (default: the model's name)")
    gguf.set_defaults(handler=run_gguf)


def run_gguf(args: argparse.Namespace) -> int:
    from lmforge import AutoModelForCausalLM
    from lmforge.checkpoint.gguf_export import (
        check_exportable,
        export_gguf,
        output_path,
    )
    from lmforge.sources import is_gguf, load_config, resolve
    from lmforge.tokenizer import Tokenizer

    output_path(args.out)  # every check that needs no weights comes before loading them
    check_exportable(load_config(args.model), str(args.model))  # before any weight is read
    tokenizer_ref = args.tokenizer or args.model
    tokenizer_source = resolve(tokenizer_ref)
    if not is_gguf(tokenizer_source) and not (tokenizer_source / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{tokenizer_source} has no tokenizer.json, and a GGUF file carries its tokenizer. Save the tokenizer "
            "next to the weights (tokenizer.save_pretrained(folder)) or name one with --tokenizer MODEL."
        )
    tokenizer = Tokenizer.from_pretrained(tokenizer_ref)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    name = args.name or Path(str(args.model)).name.removesuffix(".gguf")
    result = export_gguf(model, tokenizer, args.out, args.type, name=name, progress=True)
    types = ", ".join(f"{kind} x{count}" for kind, count in result.tensor_types.items())
    note(f"wrote {result.path} ({result.size / 1e6:,.1f} MB; {types}) in {result.seconds:.1f}s")
    return 0
