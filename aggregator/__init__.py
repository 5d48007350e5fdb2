"""aggregator: nightly Matomo and Google Search Console daily analytics into Postgres."""

__version__ = "0.1.0"
