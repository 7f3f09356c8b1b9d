"""``ipcv-export``: one small module per verb; parse, call the library, print.

Exit codes: 0 success, 1 a check that ran and failed, 2 bad input or missing dependency,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from ipcv_deploy.errors import IpcvError

__all__ = ["main"]


def _commands() -> dict[str, ModuleType]:
    from ipcv_deploy.cli import (
        bench,
        build,
        demo,
        evaluate,
        export,
        inspect,
        run,
        serve,
        verify,
    )

    return {
        "demo": demo,
        "export": export,
        "verify": verify,
        "inspect": inspect,
        "build": build,
        "bench": bench,
        "run": run,
        "eval": evaluate,
        "serve": serve,
    }


def _parser(commands: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipcv-export",
        description="Compress the vision encoder of a multimodal LLM with IPCV, export it to ONNX, "
        "verify and measure it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in commands.items():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        cmd = sub.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ipcv-export``; returns the exit code."""
    args = _parser(_commands()).parse_args(argv)
    try:
        return int(args.run(args))
    except IpcvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
