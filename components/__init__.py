"""Pipeline steps (ingest, train, evaluate, report, register, predict), each a function plus a CLI."""
