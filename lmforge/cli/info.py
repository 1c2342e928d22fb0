"""`lmforge info`: what a model reference resolves to and how the model is built."""

from __future__ import annotations

import argparse
import json

from lmforge.sources import DEFAULT_MODEL


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show a model's source, config and parameter counts",
                                   description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"embedded name, HF folder or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--modules", action="store_true", help="also print the module tree")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge import AutoModel
    from lmforge.sources import load_config, resolve

    print(f"source: {resolve(args.model)}")
    print(json.dumps(load_config(args.model), indent=2, sort_keys=True))
    model = AutoModel.from_pretrained(args.model)
    print(f"{type(model).__name__}: {model.num_parameters():,} parameters")
    if args.modules:
        print(model)
    return 0
