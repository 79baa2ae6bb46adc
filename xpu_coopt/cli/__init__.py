"""The `xpu-coopt` command: `xpu-coopt generate | bench | eval-ppl | calibrate-kv | convert-gqa ...`.

arguments.py        what the commands share: dtypes, devices, files, cache options, loading a model
commands.py         each command's parser and run
bench.py            the side-by-side benchmark
text_generation.py  generate's printed text, chat, timing and comparison with transformers
prompts.py          prompts to token ids, generated ids to (streamed) text
perplexity.py       the perplexity harness
"""

from __future__ import annotations

import argparse
import sys

from xpu_coopt.cli.arguments import DTYPES
from xpu_coopt.cli.commands import COMMANDS

__all__ = ["DTYPES", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xpu-coopt", description="xpu_coopt: fast LLaMA-family inference")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"xpu-coopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
