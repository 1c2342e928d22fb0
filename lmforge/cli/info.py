"""`lmforge info`: what a model reference resolves to and where its parameters live.

A transformer's parameters sit in a few kinds of modules: the token (and position)
embeddings, attention (q/k/v/o projections), the feed-forward MLPs, the norms, and the
output head. Counting them per kind shows where the size of a model comes from, e.g.
that a small model's vocabulary embedding can outweigh all its attention layers.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from lmforge.errors import CheckpointError
from lmforge.explain.architecture import describe
from lmforge.sources import DEFAULT_MODEL

EXAMPLES = """examples:
  lmforge info
  lmforge info all-minilm-l6-v2 --json
  lmforge info path/to/model.gguf --modules
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show a model's architecture, size per component and tokenizer",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"embedded short name, HF model folder or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of text")
    parser.add_argument("--modules", action="store_true", help="also print the module tree")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge import AutoTokenizer
    from lmforge.sources import load_config, resolve

    source, config = resolve(args.model), load_config(args.model)
    model = model_class_for(config).from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except CheckpointError:  # a model folder without tokenizer files still has weights worth describing
        tokenizer = None
    info = {"model": args.model, "source": str(source), **describe(model, tokenizer), "config": config}
    if source.suffix == ".gguf":
        info["file_tensor_types"] = gguf_tensor_types(source)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print_text(info)
    if args.modules:
        print(model)
    return 0


def gguf_tensor_types(path) -> dict[str, int]:
    """How many tensors of each storage type (Q4_1, Q8_0, F32, ...) a GGUF file holds."""
    from lmforge.checkpoint.gguf import open_gguf

    gguf = open_gguf(path)
    return dict(Counter(gguf.tensor_type(name) for name in gguf.tensor_names).most_common())


def model_class_for(config: dict[str, Any]) -> type:
    """The registered class named in config["architectures"] (its head included), else the bare backbone."""
    from lmforge.registry import MODEL_REGISTRY, model_class

    model_type, wanted = config.get("model_type"), config.get("architectures") or []
    base = model_class(model_type, "base")  # an unknown architecture fails here, with the list of supported ones
    return next((cls for cls in MODEL_REGISTRY[model_type].values() if cls.hf_architecture in wanted), base)


def print_text(info: dict[str, Any]) -> None:
    rows = [("model", info["model"]), ("source", info["source"]), ("architecture", info["architecture"]),
            ("class", info["class"]), ("dtype", info["dtype"]),
            ("context length", f"{info['context_length']:,} tokens"),
            ("vocabulary", f"{info['vocab_size']:,} tokens" if info["vocab_size"] else "-"),
            ("blocks", str(info["blocks"]))]
    tokenizer = info.get("tokenizer")
    if tokenizer is None:
        rows.append(("tokenizer", "none (no tokenizer files next to the weights)"))
    else:
        rows.append(("chat template", "yes" if tokenizer["chat_template"] else "no"))
        rows.append(("special tokens", ", ".join(f"{role} {t['token']!r} ({t['id']})"
                                                 for role, t in tokenizer["special_tokens"].items()) or "none"))
    formats = ", ".join(f"{name} x{count}" if count > 1 else name for name, count in info["weight_formats"].items())
    rows.append(("weights", f"{info['weight_bytes'] / 1e6:,.1f} MB in memory ({formats})"))
    if "file_tensor_types" in info:
        types = ", ".join(f"{kind} x{count}" for kind, count in info["file_tensor_types"].items())
        rows.append(("file tensors", types))
    rows.append(("parameters", f"{info['parameters']:,}"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for component, entry in info["components"].items():
        modules = ", ".join(f"{name} x{count}" if count > 1 else name for name, count in entry["modules"].items())
        print(f"  {component:<{width - 2}}  {entry['parameters']:>13,}  {entry['share']:6.1%}  {modules}")
    for alias, name in info["tied"].items():
        print(f"  {'tied':<{width - 2}}  {alias} shares {name} (counted once)")
