"""The ``atmask`` command: the step commands of :mod:`components.cli` plus the pipeline's own.

It sits above both packages, so the steps never name the pipeline layer (not even as a module string).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from components.cli import STEP_COMMANDS, Command, dispatch

PIPELINE_COMMANDS: dict[str, Command] = {
    "pipeline": Command("pipelines.cli", "compile, submit or locally run the Kubeflow pipeline"),
    "image": Command("pipelines.image", "build and push the container image"),
}
COMMANDS: dict[str, Command] = {**STEP_COMMANDS, **PIPELINE_COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
