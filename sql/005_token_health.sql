-- Token health (issue 14): when each Google account was connected and since when its token
-- refreshes keep failing. Its last successful refresh is `last_refresh_at`, which a failed
-- attempt never moves. Idempotent; adds only nullable columns, so existing rows stay valid.

alter table gsc_accounts add column if not exists connected_at timestamptz;
alter table gsc_accounts add column if not exists failing_since timestamptz;

comment on column gsc_accounts.connected_at is
    'when `aggregator accounts add` stored this refresh token (null: connected before 005)';
comment on column gsc_accounts.failing_since is
    'first failed refresh of the current failure streak; null after a successful refresh';
