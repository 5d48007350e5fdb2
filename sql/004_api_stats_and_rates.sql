-- Issue 13: API figures per run, and the Search Console rates each run learned.
-- Idempotent: safe to run again. Like every table a migration creates, gsc_learned_rates gets
-- row level security and no access for Supabase's API roles from `migrate` itself.

-- Per source: requests, retries, failed_requests, rate_limited, sites_ok, sites_failed,
-- sites_skipped, seconds (see aggregator/api_stats.py). The API error rate of a source is
-- failed_requests / requests.
alter table aggregator_runs add column if not exists stats jsonb not null default '{}'::jsonb;

-- The query rate Search Console allowed at the end of the last run, per OAuth client
-- (scope 'client', key = GOOGLE_CLIENT_ID) and per Google account (scope 'account', key =
-- gsc_accounts.id as text), so the next run starts from it instead of from a cautious guess.
create table if not exists gsc_learned_rates (
    scope text not null check (scope in ('client', 'account')),
    key text not null,
    queries_per_second double precision not null check (queries_per_second > 0),
    learned_at timestamptz not null default now(),
    primary key (scope, key)
);
