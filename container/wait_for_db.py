"""Init container of the MLflow server (k8s/base/mlflow.yaml): wait for the backend store, then bring its
schema up to date (what ``mlflow db upgrade`` does), so the server starts only against a ready database.

The URI comes from $MLFLOW_BACKEND_STORE_URI (a Secret), never from the command line. Each failed attempt
logs one line naming the database's host, port and name, never the password; after --timeout seconds the
script exits 1, Kubernetes restarts it with back-off and the pod stays unready with that line in its log.
Runs in the ``mlflow`` image (MLflow, SQLAlchemy, psycopg); usage: python3 wait_for_db.py [--timeout S]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ENV = "MLFLOW_BACKEND_STORE_URI"
PROG = "wait-for-db"


def where(url) -> str:  # a sqlalchemy URL, password left out
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{url.host or 'localhost'}{port}/{url.database or ''}"


def reason(err: BaseException, password: str | None) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.replace(password, "***") if password else line


def wait(uri: str, timeout: float, interval: float) -> bool:
    """True once the database answers ``SELECT 1`` (within ``timeout`` seconds), else False."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    url = sqlalchemy.engine.make_url(uri)
    connect_args = {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except ImportError as err:
        print(f"{PROG}: no driver for {where(url)} in this image ({err})", file=sys.stderr)
        return False
    deadline = time.monotonic() + timeout
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
            return True
        except sqlalchemy.exc.SQLAlchemyError as err:
            left = deadline - time.monotonic()
            why = reason(err, url.password)
            if left <= 0:
                print(
                    f"{PROG}: database {where(url)} did not answer within {timeout:.0f} s: {why}; check the "
                    f"database and {ENV} in Secret atmask-mlflow-server",
                    file=sys.stderr,
                    flush=True,
                )
                return False
            print(f"{PROG}: database {where(url)} not ready ({why}); retrying for {left:.0f} s", flush=True)
            time.sleep(min(interval, max(left, 0.1)))


def upgrade(uri: str) -> None:
    """Create the tables in an empty database, or migrate an older schema (``mlflow db upgrade``)."""
    from mlflow.db import upgrade as mlflow_db_upgrade

    mlflow_db_upgrade.callback(uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between attempts (default 2)")
    parser.add_argument("--no-upgrade", action="store_true", help="only wait, leave the schema as it is")
    args = parser.parse_args(argv)
    uri = os.environ.get(ENV, "")
    if not uri:
        print(f"{PROG}: {ENV} is not set; add it to Secret atmask-mlflow-server", file=sys.stderr)
        return 1
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except sqlalchemy.exc.ArgumentError:
        print(
            f"{PROG}: {ENV} is not a database URI (e.g. postgresql://user:pw@host:5432/mlflow)",
            file=sys.stderr,
        )
        return 1
    if not wait(uri, args.timeout, args.interval):
        return 1
    if not args.no_upgrade:
        try:
            upgrade(uri)
        except Exception as err:  # alembic and the drivers raise many types; one line, no password
            print(
                f"{PROG}: schema upgrade of {where(url)} failed: {reason(err, url.password)}", file=sys.stderr
            )
            return 1
    print(
        f"{PROG}: database {where(url)} ready" + ("" if args.no_upgrade else ", schema up to date"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
