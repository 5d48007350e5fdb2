-- gsc_learned_rates.limit_shown says what a stored rate is. True: Google refused faster
-- queries, and the rate sits just under the limit it showed; the next run starts there and
-- probes above it only now and then. False: no query was refused, so the rate is only the
-- fastest Google was asked for (a small portfolio never nears the quota); the next run starts
-- there and keeps speeding up while Google answers. Rates stored before 007 are of unknown
-- kind and start as false: one run re-finds the limit instead of treating a floor as one.
-- Idempotent.
alter table gsc_learned_rates add column if not exists limit_shown boolean not null default false;

comment on column gsc_learned_rates.limit_shown is
    'true: Google refused above this rate (it sits just under the limit shown); false: nothing was refused, the rate is a floor the next run grows from';
