"""
Request validation from one source: the request bodies of the API (and the
same shapes from the admin command) are checked against the schemas of the
OpenAPI description (``proxy/web/openapi.json``, ``components.schemas``), so
a field's type, length, pattern or allowed values are written once, there.
What a schema cannot say (a provider preset filling a field, a rule across
fields, a time in the future) is checked in ``proxy.admin``'s builders.

A refusal names the first field that is wrong in a short fixed text
(``description must be a string``, ``imap.port must be an integer
1-65535``); it never repeats a value that was given.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

from .model import SMTP_PORTS, Account, OAuth2App, OAuth2Grant, Upstream
from .presets import APP_PRESETS, PRESETS

OPENAPI_PATH = os.path.join(os.path.dirname(__file__), "web", "openapi.json")


class AdminError(Exception):
    """
    A refused operation. ``message`` is safe to show (it never holds a secret);
    ``status`` is the HTTP status the API answers with.
    """

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(AdminError):
    status = 400


def _openapi30(node: Any, names: bool = False) -> Any:
    """
    An OpenAPI 3.0 schema as JSON Schema: ``nullable`` becomes a ``null``
    type (and a None in an ``enum``); annotations JSON Schema does not know
    are dropped, but never a property of that name (``names``: ``node`` is
    a ``properties`` object, its keys are field names such as ``readOnly``).
    """
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _openapi30(v, k == "properties" and not names)
        for k, v in node.items()
        if names or k not in ("nullable", "writeOnly", "readOnly", "example", "format")
    }
    if node.get("nullable") and not names:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _strictInteger(checker: Any, value: Any) -> bool:
    # JSON Schema counts 1.0 as an integer and Python counts True: neither
    # is a port or a number of seconds.
    return isinstance(value, int) and not isinstance(value, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine("integer", _strictInteger),
)


def _loadSchemas(path: str = OPENAPI_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    return {"components": {"schemas": _openapi30(spec["components"]["schemas"])}}


_ROOT = _loadSchemas()
_validators: dict[str, Any] = {}


def _validator(name: str) -> Any:
    if name not in _validators:
        schema = {"$ref": f"#/components/schemas/{name}", **copy.deepcopy(_ROOT)}
        _validators[name] = _Validator(schema)
    return _validators[name]


# What a field's value must look like, where the schema's pattern (or range)
# says it in a way a person should not have to read.
_SHAPES = {
    "account": "account: letters, digits and . _ @ + - only, "
    "starting with a letter or digit, at most 128 characters",
    "app": "app: letters, digits and . _ @ + - only",
    "email": "email is not a mail address",
    "tenant": "tenant is not a tenant id",
    "imap.host": "imap.host is not a host name",
    "imap.port": "imap.port must be an integer 1-65535",
    "imap.caFile": "imap.caFile must be an absolute path",
    "imap.maxConnections": "imap.maxConnections must be an integer 0-10000 or null",
    "smtp.host": "smtp.host is not a host name",
    "smtp.port": "smtp.port must be an integer 1-65535",
    "smtp.caFile": "smtp.caFile must be an absolute path",
    "smtp.maxConnections": "smtp.maxConnections must be an integer 0-10000 or null",
    "redirectUrl": "redirectUrl must be https:// (or http:// on localhost)",
    "oauth2.scopes": "oauth2.scopes must be a list of scope strings",
    "restrictions.addresses": "restrictions.addresses: not an IP address or CIDR network",
    "expiresIn": "expiresIn must be a positive whole number of seconds (at most ten years)",
}
# Lists, where a type is wrong (of the list or of an entry).
_LISTS = {
    "scopes": "scopes must be a list of scope strings",
    "oauth2.scopes": "oauth2.scopes must be a list of scope strings",
    "restrictions.addresses": "restrictions.addresses must be a list of CIDR strings",
}
_URLS = ("tokenUrl", "authorizationUrl", "deviceAuthorizationUrl", "oauth2.tokenUrl")
_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "object": "an object",
    "array": "a list",
    "boolean": "true or false",
}
# Errors about a value's shape (rather than its type or presence).
_SHAPE_ERRORS = ("pattern", "minLength", "minimum", "maximum", "anyOf", "format")


def _message(error: ValidationError, what: str) -> str:
    """A short fixed text for the first thing wrong, naming the field."""
    top = error
    while top.parent is not None:
        top = top.parent
    if top.validator == "anyOf":
        # None of the alternatives fits: say what the alternatives are for,
        # rather than guess which one was meant.
        error = top
    path = [p for p in error.absolute_path if isinstance(p, str)]
    name = ".".join(path) or what
    item = bool(error.absolute_path) and isinstance(error.absolute_path[-1], int)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        unknown = sorted(k for k in instance if k not in known)
        return f"{name}: unknown field(s): {', '.join(unknown)}"
    if kind == "required":
        missing = next(r for r in value if r not in instance)
        return f"{'.'.join([*path, missing])} is required"
    if kind == "not" and not path:
        return "give expires or expiresIn, not both"
    if kind == "anyOf" and not path and what == "app":
        return "tokenUrl is required for a generic app"
    if kind == "type":
        types = [t for t in ([value] if isinstance(value, str) else value) if t != "null"]
        if name in _LISTS and (item or types[0] == "array"):
            return _LISTS[name]
        if item:
            return f"{name} must be a list of {types[0]}s"
        if name in _SHAPES and types[0] == "integer":
            return _SHAPES[name]
        return f"{name} must be {_TYPES.get(types[0], types[0])}"
    if kind == "enum":
        allowed = ", ".join(str(v) for v in value if v is not None)
        return f"{name} must be one of {allowed}"
    if kind == "maxLength":
        return f"{name} is too long (at most {value} characters)"
    if kind == "maxItems":
        return f"{name}: at most {value} entries"
    if kind == "minItems":
        return f"{name}: at least one is required"
    if kind in _SHAPE_ERRORS:
        if name in _SHAPES:
            return _SHAPES[name]
        if name in _URLS or name.endswith("Url"):
            return f"{name} must be an https:// URL"
        if isinstance(instance, str):
            if any(ord(c) < 32 for c in instance):
                return f"{name} must not contain control characters"
            if not instance.strip():
                return f"{name} must not be empty"
    return f"{name} is not valid"


def validate(schema: str, data: Any, what: str) -> dict[str, Any]:
    """
    Check ``data`` against a schema of the OpenAPI description.

    :param schema: its name under ``components.schemas``.
    :param what: what ``data`` is, for a message about all of it.
    :return: ``data`` (an object, once valid).
    :raises InvalidInput: naming the first field that is wrong.
    """
    error = best_match(_validator(schema).iter_errors(data))
    if error is not None:
        raise InvalidInput(_message(error, what))
    _unicode(data, what)
    return data  # type: ignore[no-any-return]


def _unicode(value: Any, what: str, path: tuple[str, ...] = ()) -> None:
    """
    JSON may carry a lone surrogate (``\\ud800``), which no store can
    encode: refuse it here, naming the field (JSON Schema cannot say it).
    """
    if isinstance(value, str):
        if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise InvalidInput(f"{'.'.join(path) or what} is not valid Unicode")
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode(k, what, path)
            _unicode(v, what, (*path, k))
    elif isinstance(value, list):
        for v in value:
            _unicode(v, what, path)


def requireObject(value: Any, name: str, allowed: set[str]) -> dict[str, Any]:
    """An object with only ``allowed`` fields (for shapes the API does not describe)."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{name} must be an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidInput(f"{name}: unknown field(s): {', '.join(unknown)}")
    return value


def fields(schema: str) -> set[str]:
    """The fields an object of this schema may have."""
    return set(_ROOT["components"]["schemas"][schema]["properties"])


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


# Upstreams a password-less plain connection may go to.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def buildAccount(
    data: Any,
    existing: Account | None = None,
    accountId: str | None = None,
    app: OAuth2App | None = None,
) -> Account:
    """
    Validate an account description (the API's JSON shape) and build the
    ``Account``. With ``existing``, fields left out keep their values (PUT
    replaces what it names; secrets are kept unless given; ``smtp: null``
    removes the SMTP server). A provider preset fills what is missing on a
    new account, or replaces the imap and smtp settings when the provider
    is named again.

    :param accountId: the account named by the URL (the body may repeat it).
    :param app: the shared OAuth2 app the account uses, if any.
    :raises InvalidInput: naming the first field that is wrong.
    """
    data = validate("AccountFields", data, "account")
    if accountId is not None:
        validate("AccountId", accountId, "account")
        _check(
            data.get("account", accountId) == accountId, "account in the body differs from the URL"
        )
    aid = accountId if accountId is not None else data.get("account")
    _check(aid is not None, "account is required")
    provider = data.get("provider", app.provider if app is not None else "generic")
    preset = PRESETS.get(provider, {})
    tenant = data.get("tenant", "common")

    # A preset's servers apply to a new account, or when the provider is named again.
    presetting = existing is None or "provider" in data
    upstream = _upstream(
        "imap",
        data.get("imap", {}),
        preset.get("imap", {}) if presetting else {},
        existing.upstream if existing else None,
    )
    smtp = existing.smtp if existing else None
    if data.get("smtp") is not None or (presetting and preset.get("smtp") and "smtp" not in data):
        smtp = _upstream(
            "smtp",
            data.get("smtp") or {},
            preset.get("smtp", {}) if presetting else {},
            smtp,
            SMTP_PORTS,
        )
    elif "smtp" in data:
        smtp = None  # null: the account has no SMTP server (any more)

    oauth = data.get("oauth2", {})
    oldGrant = existing.oauth2 if existing else None

    def given(name: str, old: str | None) -> str:
        value = oauth.get(name, old)
        _check(value is not None, f"oauth2.{name} is required")
        return value  # type: ignore[no-any-return]

    email = data.get("email", existing.email if existing else None)
    _check(email is not None, "email is required")
    state = data.get("state")
    if state is None:
        state = existing.state if existing else "ok"
        if state == "reauth-required" and "refreshToken" in oauth:
            # A new grant is what re-authorization means.
            state = "ok"
    kept = existing is not None and state == existing.state
    if app is not None:
        clientFields = sorted(set(oauth) & {"tokenUrl", "clientId", "clientSecret", "scopes"})
        _check(
            not clientFields,
            f"oauth2: {', '.join(clientFields)} come from the app; give only app and refreshToken",
        )
        grant = OAuth2Grant(
            tokenURL=app.tokenURL,
            clientId=app.clientId,
            clientSecret=app.clientSecret,
            refreshToken=given("refreshToken", oldGrant.refreshToken if oldGrant else None),
            scopes=app.scopes,
            app=app.id,
        )
    else:
        tokenUrl = oauth.get("tokenUrl")
        if tokenUrl is None and "tokenUrl" in preset:
            tokenUrl = preset["tokenUrl"].format(tenant=tenant)
        if tokenUrl is None and oldGrant is not None:
            tokenUrl = oldGrant.tokenURL
        _check(tokenUrl is not None, "oauth2.tokenUrl is required")
        scopes = oauth.get("scopes", preset.get("scopes", oldGrant.scopes if oldGrant else []))
        grant = OAuth2Grant(
            tokenURL=tokenUrl,  # type: ignore[arg-type]
            clientId=given("clientId", oldGrant.clientId if oldGrant else None),
            clientSecret=given("clientSecret", oldGrant.clientSecret if oldGrant else None),
            refreshToken=given("refreshToken", oldGrant.refreshToken if oldGrant else None),
            scopes=tuple(scopes),
        )
    return Account(
        id=aid,
        email=email,
        upstream=upstream,
        oauth2=grant,
        state=state,
        stateReason=existing.stateReason if kept and existing else None,
        created=existing.created if existing else 0.0,
        smtp=smtp,
    )


def _upstream(
    name: str,
    given: dict[str, Any],
    preset: dict[str, Any],
    old: Upstream | None,
    ports: dict[str, int] | None = None,
) -> Upstream:
    """
    A server's settings (``imap`` or ``smtp``): each field as given, else
    the preset's, else the stored one (``old``), else the default.

    :param ports: the default port by TLS mode (SMTP's, where the TLS mode
        decides the port); a changed mode then takes its default port
        rather than keeping the stored one. None: IMAP's 993, the stored
        port kept whatever the mode.
    """
    host = given.get("host", preset.get("host", old.host if old else None))
    if host is None:
        raise InvalidInput(f"{name}.host is required")
    tls = given.get("tls", preset.get("tls", old.tls if old else "implicit"))
    _check(
        tls != "plain" or host in LOCAL_HOSTS,
        f"{name}.tls plain (no TLS at all) is allowed only to a server on this machine",
    )
    port = given.get("port", preset.get("port"))
    if port is None:
        if old is not None and (ports is None or old.tls == tls):
            port = old.port
        else:
            port = ports[tls] if ports is not None else 993
    return Upstream(
        host=host,
        port=port,
        tls=tls,
        caFile=given.get("caFile", old.caFile if old else None),
        maxConnections=given.get("maxConnections", old.maxConnections if old else None),
    )


def buildApp(data: Any) -> OAuth2App:
    """
    Validate an OAuth2 app description (the API's JSON shape) and build it; a
    provider preset fills in the URLs and scopes not given.

    :raises InvalidInput: naming the first field that is wrong.
    """
    data = validate("AppCreate", data, "app")
    provider = data.get("provider", "generic")
    preset = APP_PRESETS[provider]
    tenant = data.get("tenant", "common")

    def url(name: str, required: bool) -> str | None:
        value = data.get(name)
        if value is None and preset.get(name) is not None:
            # Only the preset's own URLs are templates; what a user gives is
            # taken as it is.
            value = preset[name].format(tenant=tenant)
        _check(value is not None or not required, f"{name} is required for a {provider} app")
        return value  # type: ignore[no-any-return]

    return OAuth2App(
        id=data["app"],
        provider=provider,
        clientId=data["clientId"],
        clientSecret=data["clientSecret"],
        redirectURL=data.get("redirectUrl"),
        authorizationURL=url("authorizationUrl", False),
        tokenURL=url("tokenUrl", True),  # type: ignore[arg-type]
        deviceURL=url("deviceAuthorizationUrl", False),
        scopes=tuple(data.get("scopes", preset.get("scopes", []))),
        tenant=tenant,
    )
