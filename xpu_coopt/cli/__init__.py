"""The `xpu-coopt` command: `xpu-coopt generate | serve | bench | eval-ppl | calibrate-kv | convert-gqa ...`.

arguments.py        what the commands share: dtypes, devices, files, cache options, loading a model
commands.py         each command's parser and run
bench.py            the side-by-side benchmark
text_generation.py  generate's printed text, chat, timing and comparison with transformers
prompts.py          prompts to token ids, generated ids to (streamed) text
perplexity.py       the perplexity harness
serve.py            the OpenAI-compatible server's command
"""

from __future__ import annotations

import argparse
import os
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
    except KeyboardInterrupt:
        print(f"\nxpu-coopt {args.command}: interrupted", file=sys.stderr)
        return 130  # as a shell reports a command that SIGINT ended
    except Exception as error:  # the command line's promise: the error in a line, never a traceback
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"xpu-coopt {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2 if isinstance(error, EXPECTED_ERRORS) else 1


# Errors that name what the user gave; any other is unexpected: its type is named, and
# XPU_COOPT_TRACEBACK=1 shows where it came from.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, TypeError)
TRACEBACK_VARIABLE = "XPU_COOPT_TRACEBACK"


def _describe(error: Exception) -> str:
    if isinstance(error, EXPECTED_ERRORS):
        return str(error)
    return f"{type(error).__name__}: {error} (set {TRACEBACK_VARIABLE}=1 to see where it was raised)"


if __name__ == "__main__":
    sys.exit(main())
