"""``atmask promote --version N``: move the ``champion`` alias by hand, bypassing the gate, logged.

The version gets tags ``promoted_manually`` (UTC time) and ``promoted_from`` (the previous champion's
version, or ``none``); the move is printed. The registered model gets tag ``champion_floor`` (the highest
version number now): versions up to it are no longer eligible for ``atmask register``'s automatic
convergence, so a later registration does not undo the manual choice by moving the champion back to an
older, better-scoring version.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from components.errors import UserError
from components.params import load_params
from components.register import CHAMPION, FLOOR_TAG, _mlflow_client


def promote(params, version: str, model_name: str | None = None) -> str | None:
    """Point ``champion`` at ``version``; returns the previous champion's version (or None)."""
    from mlflow.exceptions import MlflowException

    name = model_name or params.register.model_name
    client, uri = _mlflow_client(params)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise UserError(
            f"MLflow at {uri}: model {name!r} has no version {version}; list them in the MLflow UI"
        ) from None
    try:
        previous = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        previous = None
    floor = max(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))
    client.set_registered_model_tag(name, FLOOR_TAG, str(floor))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(name, str(version), "promoted_manually", now)
    client.set_model_version_tag(name, str(version), "promoted_from", previous or "none")
    print(f"atmask promote: {name}: champion moved from v{previous or '-'} to v{version} (manual, {now})")
    return previous


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", required=True, help="model version to make champion")
    parser.add_argument("--model-name", help="registered model (default: params register.model_name)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")


def run(args: argparse.Namespace) -> int:
    promote(load_params(args.params), args.version, args.model_name)
    return 0
