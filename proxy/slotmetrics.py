"""
The metrics of the per-account connection caps (``proxy.upstream.slots``),
read from this instance's ``SlotKeeper`` at scrape time: slots held, logins
waiting for one, logins refused at the cap. Each instance reports its own;
a cluster's are their sum.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "imapproxy_account_connections"
PROTOCOLS = ("imap", "smtp")


class SlotCollector(Collector):
    """
    :param keeper: the ``SlotKeeper``.
    :param perAccount: series per account too (``--metrics-per-account``).
    """

    def __init__(self, keeper: Any, perAccount: bool = False):
        self._keeper = keeper
        self._perAccount = perAccount

    def collect(self) -> Iterable[Any]:
        keeper = self._keeper
        inUse = keeper.inUse()
        waiting = keeper.waiting()
        yield _byProtocol(
            PREFIX, "Provider connections held under an account's cap (this instance)", inUse
        )
        yield _byProtocol(
            f"{PREFIX}_waiting", "Logins waiting for a slot of their account's cap", waiting
        )
        refused = CounterMetricFamily(
            f"{PREFIX}_refused",
            "Logins refused because their account was at its connection cap",
            labels=["protocol"],
        )
        for protocol in PROTOCOLS:
            refused.add_metric([protocol], keeper.refused.get(protocol, 0))
        yield refused
        if self._perAccount:
            for name, helpText, figures in (
                (f"{PREFIX}_by_account", "Provider connections held, by account", inUse),
                (f"{PREFIX}_waiting_by_account", "Logins waiting, by account", waiting),
            ):
                family = GaugeMetricFamily(name, helpText, labels=["account", "protocol"])
                for (account, protocol), n in sorted(figures.items()):
                    family.add_metric([account, protocol], n)
                yield family
            byAccount = CounterMetricFamily(
                f"{PREFIX}_refused_by_account",
                "Logins refused at the connection cap, by account",
                labels=["account", "protocol"],
            )
            for (account, protocol), n in sorted(keeper.refusedBy.items()):
                byAccount.add_metric([account, protocol], n)
            yield byAccount


def _byProtocol(name: str, helpText: str, figures: dict[tuple[str, str], int]) -> Any:
    family = GaugeMetricFamily(name, helpText, labels=["protocol"])
    totals = dict.fromkeys(PROTOCOLS, 0)
    for (_account, protocol), n in figures.items():
        totals[protocol] = totals.get(protocol, 0) + n
    for protocol, n in sorted(totals.items()):
        family.add_metric([protocol], n)
    return family
