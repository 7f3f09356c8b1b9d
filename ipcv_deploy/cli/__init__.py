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
from ipcv_deploy.fileio import interrupts_recorded

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


def _names_ort_genai(argv: Sequence[str]) -> bool:
    """Whether a ``run`` command line picks ``--llm-backend ort-genai``."""
    for i, arg in enumerate(argv):
        if arg == "--llm-backend" and i + 1 < len(argv) and argv[i + 1] == "ort-genai":
            return True
        if arg == "--llm-backend=ort-genai":
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ipcv-export``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["run"] and _names_ort_genai(argv):
            # Before anything imports torch: the ONNX Runtime GenAI backend runs without it.
            from ipcv_deploy.cli import run_genai

            args = run_genai.parse(argv[1:])
            command = run_genai.run
        else:
            args = _parser(_commands()).parse_args(argv)
            command = args.run
        with interrupts_recorded():
            return int(command(args))
    except IpcvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
