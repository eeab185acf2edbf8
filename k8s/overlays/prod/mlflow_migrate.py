"""Init container of the production MLflow replicas: one schema migration at a time.

Two replicas start together (first rollout, scale-up from zero, a rollout onto a new MLflow release) and
each would migrate the tracking schema (``mlflow db upgrade``) and the basic-auth schema at once; Alembic
takes no lock, so the two race (duplicate tables, a half-applied revision). This script holds a PostgreSQL
session advisory lock on the backend store while it migrates both schemas: the first replica migrates,
the second waits, then finds both schemas at head and does nothing. The lock is released when the session
ends, also when the pod dies. (SQLite, for a local try: no lock, one process anyway.)

Reads $MLFLOW_BACKEND_STORE_URI (Secret atmask-mlflow-server) and $MLFLOW_AUTH_CONFIG_PATH (basic_auth.ini,
whose database_uri is the auth store); logs hosts, never passwords. Exit 1 with one line on failure:
Kubernetes restarts the init container with back-off and the pod stays unready meanwhile.
Usage: python3 mlflow_migrate.py [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

LOCK_KEY = 0x41544D41534B  # "ATMASK": the advisory lock every replica takes
PROG = "mlflow-migrate"


def where(url) -> str:
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{url.host or 'localhost'}{port}/{url.database or ''}"


def connect(uri: str, timeout: float):
    """A connection to the backend store, retried until ``timeout``."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    url = sqlalchemy.engine.make_url(uri)
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return engine.connect()
        except sqlalchemy.exc.SQLAlchemyError as err:
            reason = str(getattr(err, "orig", err)).splitlines()[0].replace(url.password or "\0", "***")
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{PROG}: database {where(url)} did not answer in {timeout:.0f} s: {reason}"
                ) from None
            print(f"{PROG}: database {where(url)} not ready ({reason}); retrying", flush=True)
            time.sleep(2)


def migrate(uri: str) -> None:
    """The tracking schema, then the auth schema, both to head (no-ops when already there)."""
    import sqlalchemy
    from mlflow.db import upgrade

    upgrade.callback(uri)
    if os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        from mlflow.server.auth.config import read_auth_config
        from mlflow.server.auth.db.utils import migrate as migrate_auth

        auth = sqlalchemy.create_engine(read_auth_config().database_uri)
        migrate_auth(auth, "head")
        auth.dispose()


def main(argv: list[str] | None = None) -> int:
    import sqlalchemy

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the database")
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_BACKEND_STORE_URI", "")
    if not uri:
        raise SystemExit(
            f"{PROG}: MLFLOW_BACKEND_STORE_URI is not set; add it to Secret atmask-mlflow-server"
        )
    url = sqlalchemy.engine.make_url(uri)
    locking = url.get_backend_name() == "postgresql"
    with connect(uri, args.timeout) as conn:
        if locking:
            print(f"{PROG}: waiting for the migration lock on {where(url)}", flush=True)
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        try:
            migrate(uri)
        except Exception as err:  # alembic and the drivers raise many types: one line, no password
            reason = str(err).splitlines()[0].replace(url.password or "\0", "***")
            raise SystemExit(f"{PROG}: migrating {where(url)} failed: {reason}") from None
        finally:
            if locking:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
    print(f"{PROG}: {where(url)} and the auth store are at the current schema", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
