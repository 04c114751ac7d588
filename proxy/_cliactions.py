"""
The admin command's longer actions (device authorization, key management)
and how its failures become one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from .admin import Admin, AdminError
from .encryption import SecretKeyError, keyFingerprint, readLoadedMarker
from .model import TLS_MODES, Account
from .store import SQLiteStore, StoreError, makeStore, sqlitePath

# Commands that may create the store (and its key) when there is none yet;
# every other command fails with one line instead of creating an empty store.
CREATING = {("accounts", "add"), ("accounts", "authorize"), ("apps", "add"), ("tokens", "issue")}


# With SQLite, live sessions are only in the memory of the running service,
# which the admin command (it opens the store) cannot reach: one honest line.
# With Redis, the instances publish them there, and a close request reaches them.
SESSIONS_ELSEWHERE = (
    "imapproxy: with a SQLite store the live sessions are only in the running service: "
    "list them with GET /v1/sessions and end one with DELETE /v1/session/ID on its API"
)


async def sessionsCommand(args: argparse.Namespace, admin: Admin, out: Any) -> None:
    """``sessions list|end`` on a Redis store: what the instances published."""
    if args.command == "end":
        await admin.endSession(args.id)
        print(f"asked the instance holding session {args.id} to end it", file=sys.stderr)
        return
    found = await admin.listSessions(account=args.account, protocol=args.protocol)
    if getattr(args, "json", False):
        json.dump({"sessions": found}, out, indent=2)
        out.write("\n")
        return
    for s in found:
        out.write(
            f"{s['id']}\t{s['protocol']}\t{s['account']}\t{s['address']}\t{s['upstream']}\t"
            f"{s['started']}\t{s['bytesToProvider']}\t{s['bytesToClient']}\t"
            f"{s['lastActivity']}\n"
        )


def requireStore(url: str) -> None:
    """Exit with one line when ``url`` names an SQLite store that does not exist."""
    try:
        if urlsplit(url).scheme == "sqlite":
            path = os.path.abspath(sqlitePath(url))
            if not os.path.exists(path):
                raise StoreError(
                    f"no store at {path} (give --store or --config as the server has them; "
                    "'imapproxy accounts add' creates a new one)"
                )
    except StoreError as e:
        sys.exit(f"imapproxy: {e}")


def openStore(url: str, secretFile: str | None, create: bool = True) -> Any:
    if not create:
        requireStore(url)
    try:
        store = makeStore(url, secretFile)
        fresh = isinstance(store, SQLiteStore) and not os.path.exists(store.path)
        store.openBlocking()
    except (StoreError, SecretKeyError) as e:
        sys.exit(f"imapproxy: {e}")
    if fresh:
        print(f"imapproxy: created a new store {os.path.abspath(store.path)}", file=sys.stderr)
        _giveToStateOwner(store)
    if store.secrets.created:
        print(
            f"imapproxy: created a new secret key {store.secrets.path}: back it up",
            file=sys.stderr,
        )
    return store


def _giveToStateOwner(store: Any) -> None:
    """
    Root creating the store in a directory that belongs to the server's user
    gives the new files to that user: the server could not open them otherwise.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    directory = os.path.dirname(os.path.abspath(store.path))
    owner = os.stat(directory)
    if owner.st_uid == 0:
        return
    for path in (store.path, store.secrets.path):
        if path and os.path.dirname(os.path.abspath(path)) == directory:
            os.chown(path, owner.st_uid, owner.st_gid)


# The TLS mode a well-known SMTP port implies when --smtp-tls is not given.
PORT_TLS = {465: "implicit", 587: "starttls", 25: "starttls"}


def smtpArguments(parser: argparse.ArgumentParser, update: bool = False) -> None:
    """The ``--smtp-*`` flags of ``accounts add``, ``update`` and ``authorize``."""
    parser.add_argument("--smtp-host", help="SMTP submission server, for sending through the proxy")
    parser.add_argument(
        "--smtp-port", type=int, help="[default: 465 with implicit TLS, 587 with starttls]"
    )
    parser.add_argument(
        "--smtp-tls",
        choices=TLS_MODES,
        help="[default: starttls with --smtp-port 587 or 25, else implicit]",
    )
    parser.add_argument(
        "--smtp-ca-file", help="PEM CA bundle for the SMTP server [default: the system's CAs]"
    )
    if update:
        parser.add_argument(
            "--no-smtp", action="store_true", help="remove the SMTP server (no sending)"
        )
    for protocol in ("imap", "smtp"):
        parser.add_argument(
            f"--{protocol}-max-connections",
            type=_cap,
            metavar="N",
            help=f"connections to the {protocol.upper()} server at most, all instances "
            "together ('default': the provider's or the server's setting; 0: no cap)",
        )


def _cap(value: str) -> int | str:
    """A connection cap flag: a whole number 0-10000, or ``default`` (JSON null)."""
    if value == "default":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= 10000:
        raise argparse.ArgumentTypeError("a whole number 0-10000, or 'default'")
    return n


def capSetting(body: dict[str, Any], name: str, value: int | str | None) -> None:
    """Put a ``--*-max-connections`` flag's value into ``body[name]`` (if given)."""
    if value is not None:
        body.setdefault(name, {})["maxConnections"] = None if value == "default" else value


def smtpSettings(args: argparse.Namespace) -> dict[str, Any] | None:
    """
    The ``smtp`` object the ``--smtp-*`` flags give (None: no flag). A port
    of 465, 587 or 25 without ``--smtp-tls`` implies its TLS mode; the port
    left out follows the mode (``proxy.validation``: 465 or 587).
    """
    smtp: dict[str, Any] = {}
    if args.smtp_host is not None:
        smtp["host"] = args.smtp_host
    if args.smtp_port is not None:
        smtp["port"] = args.smtp_port
    tls = args.smtp_tls or PORT_TLS.get(args.smtp_port or 0)
    if tls is not None:
        smtp["tls"] = tls
    if args.smtp_ca_file:
        smtp["caFile"] = os.path.abspath(args.smtp_ca_file)
    if args.smtp_max_connections is not None:
        capSetting({"smtp": smtp}, "smtp", args.smtp_max_connections)
    return smtp or None


def describeServer(account: Account) -> str:
    """The SMTP server as ``accounts list`` shows it: ``host:port``, or ``-``."""
    return "-" if account.smtp is None else f"{account.smtp.host}:{account.smtp.port}"


async def addAccount(args: argparse.Namespace, admin: Admin) -> None:
    """``accounts add``: the flags as the API's account object."""
    imap: dict[str, Any] = {"host": args.imap_host, "port": args.imap_port, "tls": args.imap_tls}
    if args.imap_ca_file:
        imap["caFile"] = os.path.abspath(args.imap_ca_file)
    capSetting({"imap": imap}, "imap", args.imap_max_connections)
    oauth2: dict[str, Any] = {
        "tokenUrl": args.token_url,
        "clientId": args.client_id,
        "clientSecret": args.client_secret,
        "refreshToken": args.refresh_token,
    }
    if args.oauth2_scope:
        oauth2["scopes"] = args.oauth2_scope
    body = {"account": args.account, "email": args.email, "imap": imap, "oauth2": oauth2}
    smtp = smtpSettings(args)
    if smtp is not None:
        body["smtp"] = smtp
    await admin.createAccount(body, replace=args.replace)
    print(f"account {args.account} saved", file=sys.stderr)


async def updateAccount(args: argparse.Namespace, admin: Admin) -> None:
    """
    ``accounts update``: the SMTP settings of an existing account, through
    the API's PUT operation; its grant, IMAP server and state are untouched.
    """
    smtp = smtpSettings(args)
    if args.no_smtp and smtp is not None:
        raise AdminError("--no-smtp removes the SMTP server: give it without --smtp-* flags")
    body: dict[str, Any] = {}
    capSetting(body, "imap", args.imap_max_connections)
    if not args.no_smtp and smtp is None and not body:
        raise AdminError(
            "nothing to change: give --smtp-host, --smtp-port, --smtp-tls, "
            "--smtp-ca-file, --no-smtp or --*-max-connections"
        )
    if args.no_smtp or smtp is not None:
        body["smtp"] = smtp
    account = await admin.updateAccount(args.account, body)
    server = account.smtp
    said = "none" if server is None else f"{server.host}:{server.port} ({server.tls})"
    print(f"account {account.id}: SMTP server {said}", file=sys.stderr)


def errorLine(error: BaseException) -> str:
    """
    The one line (after ``imapproxy: ``) that says why a command failed.
    Exception texts of our own are safe to show; those of libraries are
    reduced to their kind, never echoed whole (a URL could hold a secret).
    """
    if isinstance(error, (AdminError, StoreError, SecretKeyError)):
        return str(error)
    try:
        import requests
    except ImportError:  # pragma: no cover - a declared dependency
        requests = None  # type: ignore[assignment]
    if requests is not None and isinstance(error, requests.RequestException):
        url = getattr(getattr(error, "request", None), "url", None) or ""
        where = urlsplit(url).netloc or "the provider"
        if isinstance(error, requests.exceptions.SSLError):
            return (
                f"the TLS certificate of {where} is not trusted (a private CA? "
                "set REQUESTS_CA_BUNDLE to its PEM file)"
            )
        if isinstance(error, requests.Timeout):
            return f"{where} did not answer in time"
        if isinstance(error, requests.ConnectionError):
            return f"cannot connect to {where}"
        return f"the request to {where} failed ({type(error).__name__})"
    if isinstance(error, OSError):
        name = f" {error.filename}" if error.filename else ""
        return f"{error.strerror or type(error).__name__}{':' if name else ''}{name}"
    return f"unexpected {type(error).__name__} (please report it)"


async def authorize(args: argparse.Namespace, admin: Admin, out: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from .oauth.onboarding import (
        DevicePending,
        DeviceSlowDown,
        Onboarding,
        OnboardingError,
        devicePollBlocking,
        deviceStartBlocking,
    )

    imap: dict[str, Any] | None = None
    if args.imap_host:
        imap = {"host": args.imap_host, "port": args.imap_port, "tls": args.imap_tls}
        if args.imap_ca_file:
            imap["caFile"] = os.path.abspath(args.imap_ca_file)
        capSetting({"imap": imap}, "imap", args.imap_max_connections)
    smtp = smtpSettings(args)
    onboarding = Onboarding(admin, admin.store.secrets, deferToThread, reactor)
    if not args.device:
        request: dict[str, Any] = {"app": args.app, "account": args.account}
        if args.email:
            request["email"] = args.email
        if imap is not None:
            request["imap"] = imap
        if smtp is not None:
            request["smtp"] = smtp
        started = await onboarding.start(request)
        out.write(started["url"] + "\n")
        print(
            "open this URL in the mailbox owner's browser within 10 minutes; "
            "the proxy's /oauth2/callback completes the account",
            file=sys.stderr,
        )
        return
    app = await admin.getApp(args.app)
    if not app.deviceURL:
        raise OnboardingError(f"OAuth2 app {app.id} has no deviceAuthorizationUrl")
    grant = await deferToThread(deviceStartBlocking, app, 10.0)
    uri = grant.get("verification_uri") or grant.get("verification_url")
    out.write(f"To authorize, open {uri} on any device and enter the code {grant['user_code']}\n")
    out.flush()
    interval = float(grant.get("interval", 5))
    deadline = reactor.seconds() + float(grant.get("expires_in", 900))
    while True:
        if reactor.seconds() >= deadline:
            raise OnboardingError("the code expired before it was used; start again")
        await deferLater(reactor, interval)
        try:
            token = await deferToThread(devicePollBlocking, app, grant["device_code"], 10.0)
            break
        except DeviceSlowDown:
            interval += 5
        except DevicePending:
            pass
    account = await onboarding.complete(
        args.account, app, token, args.email, imap, smtp, flow="device"
    )
    print(f"account {account.id} authorized for {account.email}", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # running, as another user
    return True


async def awaitPickup(path: str, key: bytes, clock: Any, wait: float, step: float = 0.5) -> str:
    """
    Wait until the server that records its keys beside ``path`` uses ``key``.

    :return: what to tell the operator when all is well.
    :raises AdminError: when a running server did not pick the key up.
    """
    from twisted.internet.task import deferLater

    wanted = keyFingerprint(key)
    marker = readLoadedMarker(path)
    if marker is None:
        return "no server has recorded using this key file yet: it loads the key when it starts"
    if not _alive(marker[0]):
        return f"no server is running with it (last: pid {marker[0]}): it loads the key at start"
    deadline = clock.seconds() + wait
    while clock.seconds() < deadline:
        marker = readLoadedMarker(path)
        if marker is not None and marker[1][:1] == [wanted]:
            return f"the running server (pid {marker[0]}) now uses it"
        await deferLater(clock, step)
    pid = marker[0] if marker is not None else "?"
    raise AdminError(
        f"the running server (pid {pid}) did not load the new key within {wait:.0f} s: see its "
        f"log (can its user read {path}?); do not run 'secrets rotate' until it does"
    )


def checkServerUsesNewest(path: str, newest: bytes) -> None:
    """
    Before re-encrypting: a running server that still encrypts under an older
    key would write secrets that ``retire`` then makes unreadable.

    :raises AdminError: when the server recorded beside ``path`` is running
        without the newest key.
    """
    marker = readLoadedMarker(path)
    if marker is not None and _alive(marker[0]) and marker[1][:1] != [keyFingerprint(newest)]:
        raise AdminError(
            f"the running server (pid {marker[0]}) does not use the newest key of {path}: "
            "see its log (can its user read the file?) and try again"
        )


async def secrets(command: str, store: Any, reloadInterval: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from .encryption import newKey, writeKeyFile

    keys = store.secrets
    if keys.path is None:
        raise AdminError(
            "the keys come from $IMAPPROXY_SECRET_KEY: change them there "
            "(newest first, comma-separated)"
        )
    if command == "add-key":
        key = newKey()
        writeKeyFile(keys.path, [key, *keys.keys])
        print(f"new key added to {keys.path}", file=sys.stderr)
        said = await awaitPickup(keys.path, key, reactor, 2 * reloadInterval + 2)
        print(f"{said}. Next: imapproxy secrets rotate", file=sys.stderr)
    elif command == "rotate":
        # Servers re-read the key file every few seconds; wait until they must
        # have the newest key, so nothing they write later needs an old one.
        age = time.time() - os.stat(keys.path).st_mtime
        if age < 2 * reloadInterval:
            await deferLater(reactor, 2 * reloadInterval - age)
        checkServerUsesNewest(keys.path, keys.keys[0])
        n = await store.rotateSecrets()
        print(
            f"{n} stored secrets re-encrypted under the newest key. Next: imapproxy secrets retire",
            file=sys.stderr,
        )
    elif command == "retire":
        if len(keys.keys) == 1:
            print("only one key: nothing to retire", file=sys.stderr)
            return
        left = await store.undecryptable(keys.newestOnly())
        if left:
            raise AdminError(
                f"{left} stored secret(s) still need an older key: "
                "run 'imapproxy secrets rotate' first"
            )
        writeKeyFile(keys.path, keys.keys[:1])
        print(f"{len(keys.keys) - 1} old key(s) removed from {keys.path}", file=sys.stderr)
