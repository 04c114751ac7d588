"""
Property-based tests of the HTTP API from its OpenAPI description: Schemathesis
generates requests for every described operation (valid ones and invalid
ones) and sends them to a real ``twistd imapproxy`` with a real SQLite store,
with a root API token. No answer may be a server error, and every answer must
be one the description documents, in the shape it documents.

A few example-based tests run against the same process for what only the
real service shows: the SQLite store behind the API, and the body limit that
only the real ``Site`` installs.

The server is this module's own (no Dovecot needed), so the requests the
fuzzer makes cannot disturb the integration tests' shared proxy.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.web.api import MAX_BODY, OPENAPI_PATH
from tests.upstream.proxyproc import ProxyProcess

MAX_EXAMPLES = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,
]

schema = schemathesis.openapi.from_path(OPENAPI_PATH)
schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")

# The statuses each operation answered during the fuzzing, to show the
# generated requests got past authentication into the routes.
SEEN: dict[str, set[int]] = defaultdict(set)

# Accounts that exist before the fuzzing starts, named like the short ids the
# generator tries first, so that reads, updates and deletes also meet real
# accounts and not only 404s.
SEEDED = ["0", "A", "a"]


@pytest.fixture(scope="module")
def server() -> Iterator[ProxyProcess]:
    workdir = tempfile.mkdtemp(prefix="imapproxy-apifuzz-")
    p = ProxyProcess(os.path.join(workdir, "proxy"))
    p.start()
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def root(server: ProxyProcess) -> str:
    """A root token with every scope, from the admin command; the seeded accounts and app."""
    token = server.cli(
        "tokens", "issue", "--scope", "*", "--description", "api fuzzing"
    ).stdout.strip()
    for name in SEEDED:
        r = call(server, token, "POST", "/v1/account", new_account_body(name, "cs", "rt"))
        assert r.status_code == 200, r.text
        r = call(
            server,
            token,
            "POST",
            "/v1/token",
            {"account": name, "scopes": ["imap-proxy"], "description": "seed"},
        )
        assert r.status_code == 200, r.text
    r = call(
        server,
        token,
        "POST",
        "/v1/oauth2",
        {"app": "0", "provider": "gmail", "clientId": "c", "clientSecret": "s"},
    )
    assert r.status_code == 200, r.text
    return token


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def call(server, root, method: str, path: str, body=None, **kw) -> requests.Response:
    return requests.request(
        method,
        server.api_url + path,
        headers={"Authorization": f"Bearer {root}", **kw.pop("headers", {})},
        json=body,
        timeout=20,
        **kw,
    )


def assertJSONError(r: requests.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json", r.headers
    assert r.json() == {"error": r.json()["error"], "statusCode": status}


# -- property-based, from the description ------------------------------------------


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms(case, server, root, http):
    """Generated requests to every operation get documented, non-5xx, JSON answers."""
    conforms(case, server, root, http)


def conforms(case, server, root, http) -> None:
    """Send one generated request, note its status in ``SEEN``, check its answer."""
    headers = {"Authorization": f"Bearer {root}"}
    response = case.call(base_url=server.api_url, headers=headers, session=http, timeout=20)
    SEEN[case.operation.label].add(response.status_code)
    case.validate_response(
        response,
        checks=CHECKS,
        headers=headers,
        transport_kwargs={"base_url": server.api_url, "headers": headers, "session": http},
    )


def test_fuzzing_reached_the_routes(server, root, http):
    """The fuzzing got past authentication: successes and refusals on every kind of route."""
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label not in SEEN:
            # Run alone, or before test_api_conforms: fuzz that operation here.
            fuzz(operation, server, root, http)
    assert set(SEEN) == {op.ok().label for op in schema.get_all_operations()}
    for label in [
        "POST /v1/token",
        "GET /v1/tokens",
        "GET /v1/accounts",
        "GET /v1/account/{account}",
        "PUT /v1/account/{account}",
        "DELETE /v1/account/{account}",
    ]:
        assert 200 in SEEN[label], (label, SEEN[label])
    for label in ["POST /v1/token", "POST /v1/account", "PUT /v1/account/{account}"]:
        assert 400 in SEEN[label], (label, SEEN[label])
    # ... and the service still answers, the root token still works.
    assert requests.get(server.api_url + "/health", timeout=10).json() == {"status": "ok"}
    assert call(server, root, "GET", "/v1/accounts").status_code == 200


def fuzz(operation, server, root, http) -> None:
    """What test_api_conforms does for ``operation``, as one Hypothesis run."""

    strategy = st.one_of(operation.as_strategy(mode) for mode in GenerationMode)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        conforms(case, server, root, http)

    run()


# -- examples against the real store -------------------------------------------------


def new_account_body(name: str, client_secret: str, refresh: str) -> dict:
    return {
        "account": name,
        "email": f"{name}@example.com",
        "imap": {"host": "imap.example.com", "port": 993, "tls": "implicit"},
        "oauth2": {
            "tokenUrl": "https://oauth.example.com/token",
            "clientId": "client-1",
            "clientSecret": client_secret,
            "refreshToken": refresh,
        },
    }


def test_lifecycle_sqlite(server, root):
    """Account and token round trip through the SQLite store, secrets never shown."""
    name = "fz-" + secrets.token_hex(4)
    client_secret = "cs-" + secrets.token_urlsafe(16)
    refresh = "rt-" + secrets.token_urlsafe(16)
    seen = []

    r = call(server, root, "POST", "/v1/account", new_account_body(name, client_secret, refresh))
    seen.append(r)
    assert r.status_code == 200, r.text
    assert r.json()["oauth2"]["refreshTokenSet"] is True

    r = call(
        server,
        root,
        "POST",
        "/v1/token",
        {"account": name, "scopes": ["api"], "description": "own", "expiresIn": 600},
    )
    seen.append(r)
    assert r.status_code == 200, r.text
    issued = r.json()

    # The account token uses the API; its use is recorded in the store.
    r = call(server, issued["token"], "GET", f"/v1/account/{name}")
    seen.append(r)
    assert r.status_code == 200, r.text
    r = call(server, root, "GET", f"/v1/tokens/account/{name}")
    seen.append(r)
    [listed] = r.json()["tokens"]
    assert listed["id"] == issued["id"]
    assert listed["lastUse"]["address"] == "127.0.0.1"
    assert listed["expires"] is not None

    r = call(server, root, "PUT", f"/v1/account/{name}", {"email": "moved@example.com"})
    seen.append(r)
    assert r.json()["email"] == "moved@example.com"
    assert r.json()["oauth2"]["clientSecretSet"] is True

    r = call(server, root, "DELETE", f"/v1/token/{issued['id']}?disconnect=true")
    seen.append(r)
    assert r.json() == {"deleted": True, "disconnected": 0}
    assertJSONError(call(server, issued["token"], "GET", f"/v1/account/{name}"), 401)

    r = call(server, root, "DELETE", f"/v1/account/{name}")
    seen.append(r)
    assert r.json() == {"deleted": True, "disconnected": 0}
    assertJSONError(call(server, root, "GET", f"/v1/account/{name}"), 404)

    for r in seen:
        assert client_secret not in r.text
        assert refresh not in r.text
        assert root not in r.text


def test_oversize_body(server, root):
    """A body over the limit gets a JSON 413 from the real service and creates nothing."""
    name = "big-" + secrets.token_hex(4)
    body = new_account_body(name, "s", "r")
    body["oauth2"]["clientId"] = "c" * (MAX_BODY + 1)
    assertJSONError(call(server, root, "POST", "/v1/account", body), 413)

    def chunks():
        data = json.dumps(body).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = call(server, root, "POST", "/v1/account", data=chunks())
    assertJSONError(r, 413)
    assertJSONError(call(server, root, "GET", f"/v1/account/{name}"), 404)


def test_unpaired_surrogate(server, root):
    """A JSON string the store cannot encode (a lone surrogate) is a 400, not a 500."""
    name = "sur-" + secrets.token_hex(4)
    data = json.dumps(new_account_body(name, "s", "r")).replace(
        f"{name}@example.com", "\\ud800@example.com"
    )
    r = call(
        server,
        root,
        "POST",
        "/v1/account",
        data=data.encode(),
        headers={"Content-Type": "application/json"},
    )
    assertJSONError(r, 400)
    r = call(
        server,
        root,
        "POST",
        "/v1/token",
        data=b'{"scopes": ["api"], "description": "\\udfff"}',
        headers={"Content-Type": "application/json"},
    )
    assertJSONError(r, 400)


def test_undecodable_path(server, root):
    """A path that is not UTF-8 once decoded still gets a JSON error."""
    r = call(server, root, "GET", "/v1/account/%ff")
    assert 400 <= r.status_code < 500, r.text
    assertJSONError(r, r.status_code)


def test_callback_non_ascii_state(server):
    """A consent callback whose state carries non-ASCII text is refused with a 400 page."""
    r = requests.get(
        server.api_url + "/oauth2/callback",
        params={"state": "abc.sig\u00e9", "code": "x"},
        timeout=20,
    )
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("text/html"), r.headers


def test_callback_bad_state(server):
    """A consent callback with a forged state is refused with a 400 page, no token needed."""
    r = requests.get(
        server.api_url + "/oauth2/callback", params={"state": "abc.def", "code": "x"}, timeout=20
    )
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("text/html"), r.headers
    assert "not valid" in r.text
