"""The step commands of ``atmask`` (ingest, pull, train, evaluate, report, register, promote, predict).

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules
are imported only when their command runs, so ``atmask --help`` stays fast. This module knows only the
steps: the full ``atmask`` entry point, one layer up, adds the pipeline's commands to these.
``python -m components.cli train ...`` is what ``torchrun`` workers run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from components.errors import UserError


class Command(NamedTuple):
    module: str  # exposes add_arguments(parser) and run(args) -> int
    summary: str


STEP_COMMANDS: dict[str, Command] = {
    "ingest": Command(
        "components.ingest", "validate and normalise a COCO dataset (local, s3://, https://, synthetic)"
    ),
    "pull": Command("components.data_pull", "fetch one DVC data version by its hash from the DVC remote"),
    "train": Command("components.train", "train the baseline or an ATMask ablation"),
    "evaluate": Command(
        "components.evaluate", "COCO bbox/segm/boundary AP, threshold sweep and pictures for a run"
    ),
    "report": Command("components.report", "ablation tables (paper Tables 2-5) from measured runs"),
    "register": Command("components.register", "log a run to the MLflow Model Registry, gated promotion"),
    "promote": Command("components.promote", "manually move the champion alias to a model version"),
    "predict": Command("components.predict", "run a trained or registered model on images"),
}


def top_level_help(commands: Mapping[str, Command]) -> str:
    width = max(len(n) for n in commands)
    rows = "\n".join(f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in commands.items())
    return (
        "usage: atmask <command> [options]\n\n"
        "ATMask R-CNN: train, evaluate and ship adaptive-threshold Mask R-CNN.\n\n"
        f"commands:\n{rows}\n\n"
        "Run 'atmask <command> --help' for a command's options."
    )


def dispatch(commands: Mapping[str, Command], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) against ``commands`` and run the chosen one.

    A ``UserError`` becomes one line on stderr and exit status 1; Ctrl-C exits 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(commands))
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"atmask {version('atmask')}")
        return 0
    name = argv[0]
    if name not in commands:
        print(f"atmask: unknown command {name!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name].module)
    parser = argparse.ArgumentParser(prog=f"atmask {name}", description=commands[name].summary)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"atmask {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"atmask {name}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """The step commands only (what pipeline tasks and torchrun workers call)."""
    return dispatch(STEP_COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
