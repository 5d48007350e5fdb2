"""`aggregator status`: is the data fresh, and how did the last runs go? The verdict first.

Four modules, each importing only those above it, so the rules load without a database driver:

- `verdict`: the freshness rules and the report, pure functions of what the database holds;
- `render`: the report as terminal text or the `--json` document (pure);
- `queries`: the read-only SQL that turns a database into a `verdict.StatusReport`;
- `command`: the `aggregator status` command, printing and choosing the exit status;
- `html_data`, `html`: `--html FILE`, one state per (site, source, day) gathered from the
  database (pure rules, then the SQL), and the self-contained page drawn from it (pure).

This file imports nothing, so importing one of them costs only what that one needs.
"""
