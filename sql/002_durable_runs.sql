-- Durable runs (issue 11): the run row is the run's lease. One row at a time may be `running`
-- (a unique partial index, so taking the lease is one conditional insert); its owner renews
-- `lease_until` with a heartbeat and re-checks it inside every flush transaction. A row whose
-- lease ran out belongs to a process that died: the next run closes it as `failed`.
-- Nothing here needs a session (advisory locks, open transactions), so it works through
-- Supabase's transaction pooler, and nothing needs a superuser.

alter table aggregator_runs add column if not exists heartbeat_at timestamptz;
alter table aggregator_runs add column if not exists lease_until timestamptz;
alter table aggregator_runs add column if not exists lease_owner text;

-- Rows left `running` by versions before the lease (killed processes) can never be closed by
-- their owners: close them, or the unique index below could not be built.
update aggregator_runs
set status = 'failed',
    finished_at = coalesce(finished_at, started_at),
    errors = errors || jsonb_build_array(jsonb_build_object(
        'site', '(run)', 'source', 'pipeline',
        'error', 'the process running this run died before it could close it'))
where status = 'running' and lease_until is null;

-- Created unless aggregator_runs has it: `create index if not exists` would also skip it when
-- another table's index holds the name (a copy kept by renaming aggregator_runs), and migrate,
-- applying this file again to re-create a dropped aggregator_runs, would leave runs unguarded.
do $$
begin
    if not exists (select 1 from pg_index i join pg_class c on c.oid = i.indexrelid
                   where i.indrelid = 'aggregator_runs'::regclass
                     and c.relname = 'aggregator_runs_one_running') then
        create unique index aggregator_runs_one_running
            on aggregator_runs (status) where status = 'running';
    end if;
end
$$;
