"""Google Search Console: everything the job knows about it, in one place.

- `client`: the source (HTTP, pacing, concurrency, the reaction to each error) and `check`'s
  access probe;
- `answers`: what an answer means (pure: properties, the query body, GscDay records);
- `errors`: what a Google error means and how long to back off (pure);
- `oauth`: refresh tokens to access tokens, per account;
- `pacing`: even spacing of queries per account and per OAuth client.
"""
