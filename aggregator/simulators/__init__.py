"""Local servers speaking the real Matomo, Google OAuth and Search Console protocols.

Used by `aggregator demo`, the benchmark and end-to-end tests over real sockets:

    async with MatomoSimulator(token="t", sites={1: "UTC"}, seed=1) as matomo:
        ...  # MATOMO_URL=matomo.url
    async with GoogleSimulator(client_id=..., client_secret=..., accounts={...}) as google:
        ...  # GOOGLE_TOKEN_URL=f"{google.url}/token", GSC_API_URL=google.url
"""

from aggregator.simulators.google import GoogleSimulator, SimAccount
from aggregator.simulators.matomo import MatomoSimulator
from aggregator.simulators.server import SimServer

__all__ = ["GoogleSimulator", "MatomoSimulator", "SimAccount", "SimServer"]
