-- gsc_accounts.last_refresh_at is the time of the latest token refresh attempt, successful or
-- not, and last_error that attempt's error (null after a success). Before 006 a failed attempt
-- did not move last_refresh_at, so it held the last success: that time now has its own column,
-- last_success_at (token health: "unused for six months" is measured from it), which existing
-- rows start from. Idempotent: the column is added, and filled, only once.

do $$
begin
    if not exists (select 1 from pg_attribute
                   where attrelid = 'gsc_accounts'::regclass and attname = 'last_success_at'
                     and attnum > 0 and not attisdropped) then
        alter table gsc_accounts add column last_success_at timestamptz;
        update gsc_accounts set last_success_at = last_refresh_at;
    end if;
end
$$;

comment on column gsc_accounts.last_refresh_at is
    'latest token refresh attempt, successful or not (its error, if any, is last_error)';
comment on column gsc_accounts.last_success_at is
    'latest successful token refresh; a failed attempt never moves it';
