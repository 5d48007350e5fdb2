-- The nightly window is planned per site from the primary key (site_id, date); the index that
-- served the old "oldest provisional day across all sites" lookup only costs writes now.
drop index if exists daily_analytics_provisional_idx;
