"""Write one named section of docs/benchmarks.md, leaving every other section as it is.

Each benchmark script owns a section delimited by HTML comments, so scripts can
be re-run in any order and the page always shows the latest table of each.
`median_seconds` is the scripts' shared timer; `run_isolated` runs one system of a script in a
fresh interpreter, so each system's peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
TITLE = "# Benchmarks\n\nEach section is written by the script named in it; re-run a script to refresh its table.\n"


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn`, after one warm-up call (JIT compilation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_isolated(module: str, name: str, argv: list[str]) -> dict:
    """`python -m module ARGV --only NAME` in a new process; the JSON object its last output line prints."""
    done = subprocess.run([sys.executable, "-m", module, *argv, "--only", name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def forwarded_options(args: argparse.Namespace) -> list[str]:
    """The parsed options again as flags, for the processes `run_each` starts (which add their own --only):
    every setting reaches them, so none is silently left at its default there."""
    flags = []
    for name, value in vars(args).items():
        if name == "only" or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"{flag}={value}")
    return flags


def run_each(module: str, names: list[str] | tuple[str, ...], argv: list[str]) -> dict[str, dict]:
    """`run_isolated` for each name in turn, printing progress; {name: its result}."""
    results = {}
    for name in names:
        print(f"{name} ...", flush=True)
        results[name] = run_isolated(module, name, argv)
        print(f"  {json.dumps(results[name])}", flush=True)
    return results


def machine_line() -> str:
    """CPU model, cores, torch threads and library versions, for the table's caption."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = names[0].strip() if names else cpu
    versions = [f"torch {torch.__version__}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = PAGE.read_text() if PAGE.is_file() else TITLE
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
