"""`aggregator status`: is the data fresh, and how did the last runs go? The verdict first.

Its modules, each importing only those listed above it (no cycle, nothing upward), so the rules
and their rendering load without a database driver:

- `verdict`: the freshness rules and the report, pure functions of what the database holds;
- `render`: the report as terminal text or the `--json` document (pure);
- `queries`: the read-only SQL that turns a database into a `verdict.StatusReport`;
- `html_data`: what `--html FILE` shows, one state per (site, source, day): pure rules, then
  the SQL;
- `html`: the self-contained page drawn from it (pure apart from writing the file);
- `command`: the `aggregator status` command, printing and choosing the exit status.

This file imports nothing, so importing one of them costs only what that one needs.
"""
