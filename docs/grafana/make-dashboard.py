"""
Writes imapproxy-dashboard.json (Grafana 10+, importable: a
``${DS_PROMETHEUS}`` datasource input). Edit the panels here and run
``python3 docs/grafana/make-dashboard.py``; tests/test_dashboard.py checks
that every metric the dashboard names is one the service exposes.
"""

from __future__ import annotations

import json
import os
from typing import Any

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
_ids = iter(range(1, 1000))


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update(instant=True, range=False, format="table")
    return t


def refs(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(pairs)]


def panel(
    title: str,
    targets: list[dict[str, Any]],
    x: int,
    y: int,
    w: int = 8,
    h: int = 8,
    kind: str = "timeseries",
    unit: str = "short",
    description: str = "",
    defaults: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": next(_ids),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, **(defaults or {})},
            "overrides": overrides or [],
        },
        "options": options
        or {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {
        "id": next(_ids),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {
        "thresholds": {
            "mode": "absolute",
            "steps": [{"value": v, "color": c} for v, c in steps],
        }
    }


def quantiles(metric: str, by: str = "") -> list[dict[str, Any]]:
    group = f"le{', ' + by if by else ''}"
    prefix = "{{" + by + "}} " if by else ""
    return refs(
        *(
            (
                f"histogram_quantile({q}, "
                f"sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
                f"{prefix}p{int(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        )
    )


REAUTH_RED = [
    {
        "matcher": {"id": "byName", "options": "reauth-required"},
        "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
            {"id": "custom.lineWidth", "value": 3},
        ],
    }
]


def panels() -> list[dict[str, Any]]:
    out = [row("Sessions and logins", 0)]
    out += [
        panel(
            "Sessions open",
            refs((f"sum by (protocol) (imapproxy_sessions{{{SEL}}})", "{{protocol}}")),
            0,
            1,
            description="Logged-in sessions being relayed, by protocol.",
        ),
        panel(
            "Logins/s by result",
            refs(
                (
                    f"sum by (protocol, result) (rate(imapproxy_logins_total{{{SEL}}}[{RATE}]))",
                    "{{protocol}} {{result}}",
                )
            ),
            8,
            1,
            unit="reqps",
            description="ok, or the fixed reason code of the refusal (docs/operations.md).",
        ),
        panel(
            "Login duration",
            quantiles("imapproxy_login_seconds", "protocol"),
            16,
            1,
            unit="s",
            description="Whole logins, from the credentials to the answer.",
        ),
        panel(
            "Login duration, its parts (p95)",
            refs(
                *(
                    (
                        f"histogram_quantile(0.95, "
                        f"sum by (le) (rate({m}_bucket{{{SEL}}}[{RATE}])))",
                        legend,
                    )
                    for m, legend in (
                        ("imapproxy_login_token_check_seconds", "token check"),
                        ("imapproxy_login_access_token_seconds", "access token"),
                        ("imapproxy_login_upstream_seconds", "provider connect and login"),
                    )
                )
            ),
            0,
            9,
            unit="s",
            description="The token check (a penalised address's wait included), getting the "
            "provider access token (cache or refresh), connecting and logging in upstream.",
        ),
        panel(
            "Bytes relayed/s",
            refs(
                (
                    f"sum by (protocol, direction) "
                    f"(rate(imapproxy_relayed_bytes_total{{{SEL}}}[{RATE}]))",
                    "{{protocol}} {{direction}}",
                )
            ),
            8,
            9,
            unit="Bps",
        ),
        panel(
            "Login penalties in force",
            refs((f"max(imapproxy_login_penalty_addresses{{{SEL}}})", "addresses")),
            16,
            9,
            description="Addresses whose failed logins are remembered; each waits on its next "
            "try. With Redis, every instance reads the shared count (max, not sum).",
        ),
    ]
    out.append(row("Accounts and provider tokens", 17))
    out += [
        panel(
            "Accounts needing re-authorization",
            refs((f'max(imapproxy_accounts{{{SEL}, state="reauth-required"}})', "")),
            0,
            18,
            w=6,
            kind="stat",
            description="Their grant was revoked or expired: the owner must consent again.",
            defaults={"color": {"mode": "thresholds"}, **thresholds((None, "green"), (1, "red"))},
            options={
                "colorMode": "background",
                "graphMode": "none",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            },
        ),
        panel(
            "Accounts by state",
            refs((f"max by (state) (imapproxy_accounts{{{SEL}}})", "{{state}}")),
            6,
            18,
            w=10,
            description="Read from the store at most every 15 s; every instance reads the "
            "same store (max, not sum).",
            overrides=REAUTH_RED,
        ),
        panel(
            "Accounts needing re-authorization, by name (--metrics-per-account)",
            [
                target(
                    f'max by (account) (imapproxy_account_state{{{SEL}, state="reauth-required"}})',
                    "{{account}}",
                    instant=True,
                )
            ],
            16,
            18,
            kind="table",
            options={"showHeader": True},
            description="Empty unless metrics-per-account is on.",
        ),
        panel(
            "Token refreshes/s by result",
            refs(
                (
                    f"sum by (provider, result) "
                    f"(rate(imapproxy_token_refreshes_total{{{SEL}}}[{RATE}]))",
                    "{{provider}} {{result}}",
                )
            ),
            0,
            26,
            w=12,
            unit="reqps",
        ),
        panel(
            "Token refresh duration",
            quantiles("imapproxy_token_refresh_seconds", "provider"),
            12,
            26,
            w=12,
            unit="s",
        ),
    ]
    out.append(row("Spares, store and process", 34))
    out += [
        panel(
            "Spare provider connections",
            refs(
                (f"sum(imapproxy_spare_connections{{{SEL}}})", "waiting"),
                (
                    f"sum(rate(imapproxy_spare_connections_handed_out_total{{{SEL}}}[{RATE}]))",
                    "handed out/s",
                ),
                (
                    f"sum(rate(imapproxy_spare_connections_discarded_total{{{SEL}}}[{RATE}]))",
                    "discarded/s",
                ),
            ),
            0,
            35,
        ),
        panel(
            "Store available",
            refs((f"imapproxy_store_up{{{SEL}}}", "{{instance}}")),
            8,
            35,
            kind="stat",
            defaults={
                "color": {"mode": "thresholds"},
                "mappings": [
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "DOWN", "color": "red"},
                            "1": {"text": "up", "color": "green"},
                        },
                    }
                ],
                **thresholds((None, "red"), (1, "green")),
            },
            options={
                "colorMode": "background",
                "graphMode": "none",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            },
        ),
        panel(
            "Store operations failed/s",
            refs(
                (
                    f"sum by (operation) (rate(imapproxy_store_errors_total{{{SEL}}}[{RATE}]))",
                    "{{operation}}",
                )
            ),
            16,
            35,
            unit="ops",
        ),
        panel(
            "Process CPU",
            refs((f"rate(imapproxy_process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}")),
            0,
            43,
            unit="percentunit",
        ),
        panel(
            "Process memory (resident)",
            refs((f"imapproxy_process_resident_memory_bytes{{{SEL}}}", "{{instance}}")),
            8,
            43,
            unit="bytes",
        ),
        panel(
            "Open files",
            refs(
                (f"imapproxy_process_open_fds{{{SEL}}}", "{{instance}} open"),
                (f"imapproxy_process_max_fds{{{SEL}}}", "{{instance}} limit"),
            ),
            16,
            43,
            description="Each session holds two connections: the open files limit caps sessions.",
        ),
    ]
    return out


def dashboard() -> dict[str, Any]:
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes imapproxy",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
            {"type": "panel", "id": "table", "name": "Table", "version": ""},
        ],
        "id": None,
        "uid": "imapproxy",
        "title": "imapproxy",
        "description": "imapproxy: sessions, logins, accounts, provider tokens, store, process",
        "tags": ["imapproxy", "imap", "smtp"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "label": "instance",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(imapproxy_store_up, instance)", "refId": "I"},
                    "definition": "label_values(imapproxy_store_up, instance)",
                    "refresh": 2,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels(),
    }


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imapproxy-dashboard.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dashboard(), f, indent=2)
        f.write("\n")
    print(path)
