"""The ``atmask`` command line: one entry point for users, DVC stages and KFP components.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so ``atmask --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from components.errors import UserError

# name -> (module, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ingest": (
        "components.ingest",
        "validate and normalise a COCO dataset (local, s3://, https://, synthetic)",
    ),
    "train": ("components.train", "train the baseline or an ATMask ablation"),
    "evaluate": ("components.evaluate", "COCO bbox/segm/boundary AP, threshold sweep and pictures for a run"),
    "report": ("components.report", "ablation tables (paper Tables 2-5) from measured runs"),
    "register": ("components.register", "log a run to the MLflow Model Registry, gated promotion"),
    "promote": ("components.promote", "manually move the champion alias to a model version"),
    "predict": ("components.predict", "run a trained or registered model on images"),
    "pipeline": ("pipelines.cli", "compile, submit or locally run the Kubeflow pipeline"),
    "image": ("pipelines.image", "build and push the container image"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in SUBCOMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def _top_level_help(commands: dict[str, tuple[str, str]]) -> str:
    width = max(len(n) for n in commands)
    rows = "\n".join(f"  {name.ljust(width)}  {summary}" for name, (_, summary) in commands.items())
    return (
        "usage: atmask <command> [options]\n\n"
        "ATMask R-CNN: train, evaluate and ship adaptive-threshold Mask R-CNN.\n\n"
        f"commands:\n{rows}\n\n"
        "Run 'atmask <command> --help' for a command's options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help(commands))
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"atmask {version('atmask')}")
        return 0
    name = argv[0]
    if name not in commands:
        print(f"atmask: unknown command {name!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    module_name, summary = commands[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"atmask {name}", description=summary)
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


if __name__ == "__main__":
    sys.exit(main())
