"""
``imapproxy``: the admin command. It works on the same store as the server
(``--store``, ``--config``, ``--secret-file`` mean the same), through the
same store code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn
from urllib.parse import urlsplit

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from . import __version__, adminaudit, selfcheck
from ._cliactions import (
    CREATING,
    SESSIONS_ELSEWHERE,
    addAccount,
    authorize,
    describeServer,
    errorLine,
    openStore,
    requireStore,
    secrets,
    sessionsCommand,
    smtpArguments,
    updateAccount,
)
from ._clitokens import addRestrictionArguments, restrictionsRequest, tokenLine
from .admin import Admin, AdminError, accountView, appView, tokenView
from .alerts import commandAdmin, delivered
from .config import ConfigError, readConfig
from .model import TLS_MODES
from .startup import KEY_RELOAD_INTERVAL
from .store import REDIS_SCHEMES, RedisStore, SessionBoard, SessionBus, defaultStoreURL
from .store.copy import copyStore


def _secretArg(value: str) -> str:
    # "-" reads the secret from standard input, keeping it out of `ps`.
    if value == "-":
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise argparse.ArgumentTypeError("no value on standard input")
        return line
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other failure of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"imapproxy: {self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="store URL: sqlite:///ABSOLUTE/PATH (three slashes), "
        "redis://[:PASSWORD@]HOST[:PORT][/DB], unix:///PATH/redis.sock?db=N or "
        "redis+sentinel://[:PASSWORD@]HOST:PORT,HOST:PORT/SERVICE[/DB] "
        "[default: imapproxy.sqlite3 in the state directory]",
    )
    common.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help="the server's config file (its store and secret-file)",
    )
    common.add_argument(
        "--secret-file",
        default=argparse.SUPPRESS,
        help="file with the key that encrypts provider secrets",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    adminaudit.addArguments(common)

    p = _Parser(
        prog="imapproxy", parents=[common], description="Manage imapproxy accounts and tokens."
    )
    p.add_argument("--version", action="version", version=f"imapproxy {__version__}")
    top = p.add_subparsers(dest="group", required=True)

    acc = top.add_parser("accounts", help="mailbox accounts").add_subparsers(
        dest="command", required=True
    )
    add = acc.add_parser("add", parents=[common], help="register a mailbox")
    add.add_argument("account", help="account id (what clients log in as)")
    add.add_argument("--email", required=True, help="mailbox address (XOAUTH2 user)")
    add.add_argument("--imap-host", required=True)
    add.add_argument("--imap-port", type=int, default=993)
    add.add_argument("--imap-tls", choices=TLS_MODES, default="implicit")
    add.add_argument(
        "--imap-ca-file", help="PEM CA bundle for the IMAP server [default: the system's CAs]"
    )
    smtpArguments(add)
    add.add_argument("--token-url", required=True, help="the provider's token endpoint")
    add.add_argument("--client-id", required=True)
    add.add_argument(
        "--client-secret",
        required=True,
        type=_secretArg,
        help="OAuth2 client secret ('-' reads it from stdin)",
    )
    add.add_argument(
        "--refresh-token",
        required=True,
        type=_secretArg,
        help="OAuth2 refresh token ('-' reads it from stdin)",
    )
    add.add_argument(
        "--oauth2-scope",
        action="append",
        default=[],
        help="scope to ask for when refreshing (repeatable)",
    )
    add.add_argument(
        "--replace", action="store_true", help="replace an existing account of that id"
    )
    upd = acc.add_parser(
        "update", parents=[common], help="change an account's SMTP server (its grant untouched)"
    )
    upd.add_argument("account")
    smtpArguments(upd, update=True)
    acc.add_parser("list", parents=[common], help="list accounts")
    show = acc.add_parser("show", parents=[common], help="show one account")
    show.add_argument("account")
    rm = acc.add_parser("remove", parents=[common], help="remove an account and revoke its tokens")
    rm.add_argument("account")

    auth = acc.add_parser(
        "authorize",
        parents=[common],
        help="onboard a mailbox through an OAuth2 app: prints the URL "
        "to open (or, with --device, a code to enter) and saves the grant",
    )
    auth.add_argument("account")
    auth.add_argument("--app", required=True, help="the OAuth2 app (see 'imapproxy apps')")
    auth.add_argument(
        "--device",
        action="store_true",
        help="use the device authorization grant (no browser needed here)",
    )
    auth.add_argument("--email", help="the mailbox address, as a hint to the provider")
    auth.add_argument("--imap-host", help="IMAP server (needed for new accounts of a generic app)")
    auth.add_argument("--imap-port", type=int, default=993)
    auth.add_argument("--imap-tls", choices=TLS_MODES, default="implicit")
    auth.add_argument("--imap-ca-file")
    smtpArguments(auth)

    apps = top.add_parser("apps", help="OAuth2 apps shared by accounts").add_subparsers(
        dest="command", required=True
    )
    appAdd = apps.add_parser("add", parents=[common], help="register an OAuth2 app")
    appAdd.add_argument("app")
    appAdd.add_argument("--provider", choices=("gmail", "outlook", "generic"), default="generic")
    appAdd.add_argument("--tenant", help="Microsoft tenant [default: common]")
    appAdd.add_argument("--client-id", required=True)
    appAdd.add_argument(
        "--client-secret", required=True, type=_secretArg, help="'-' reads it from stdin"
    )
    appAdd.add_argument(
        "--redirect-url", help="this proxy's https://HOST/oauth2/callback, as registered"
    )
    appAdd.add_argument("--authorization-url")
    appAdd.add_argument("--token-url")
    appAdd.add_argument("--device-authorization-url")
    appAdd.add_argument("--scope", action="append", help="(repeatable) [default: preset]")
    appAdd.add_argument("--replace", action="store_true")
    apps.add_parser("list", parents=[common], help="list OAuth2 apps")
    appShow = apps.add_parser("show", parents=[common], help="show one OAuth2 app")
    appShow.add_argument("app")
    appRm = apps.add_parser("remove", parents=[common], help="remove an unused OAuth2 app")
    appRm.add_argument("app")

    sec = top.add_parser(
        "secrets", help="the keys that encrypt provider secrets at rest"
    ).add_subparsers(dest="command", required=True)
    sec.add_parser(
        "add-key",
        parents=[common],
        help="add a new newest key to the key file (running servers load it within seconds)",
    )
    sec.add_parser(
        "rotate", parents=[common], help="re-encrypt every stored secret under the newest key"
    )
    sec.add_parser(
        "retire", parents=[common], help="drop all but the newest key, once nothing needs them"
    )

    tok = top.add_parser("tokens", help="access tokens").add_subparsers(
        dest="command", required=True
    )
    issue = tok.add_parser(
        "issue", parents=[common], help="issue a token; prints it (only it) on stdout"
    )
    issue.add_argument("--account", help="the account (none: a root token)")
    issue.add_argument(
        "--scope",
        action="append",
        required=True,
        help="imap-proxy, smtp, api, metrics or * (repeatable)",
    )
    issue.add_argument("--description", required=True)
    issue.add_argument(
        "--address", action="append", default=[], help="allowed client network, CIDR (repeatable)"
    )
    issue.add_argument("--expires-in", type=int, metavar="SECONDS")
    addRestrictionArguments(issue)
    lst = tok.add_parser("list", parents=[common], help="list tokens (never their values)")
    lst.add_argument("--account")
    rev = tok.add_parser("revoke", parents=[common], help="revoke a token")
    rev.add_argument("token", metavar="TOKEN-OR-ID")
    rev.add_argument(
        "--disconnect",
        action="store_true",
        help="also close its live sessions on every instance (a shared Redis store only; "
        "on SQLite use the API of the running service)",
    )

    ses = top.add_parser("sessions", help="live sessions (a Redis store)")
    sesCmd = ses.add_subparsers(dest="command", required=True)
    sesList = sesCmd.add_parser("list", parents=[common], help="list live sessions")
    sesList.add_argument("--account")
    sesList.add_argument("--protocol", choices=["imap", "smtp"])
    sesCmd.add_parser("end", parents=[common], help="end one session").add_argument("id")
    st = top.add_parser("store", help="the store as a whole").add_subparsers(
        dest="command", required=True
    )
    cp = st.add_parser(
        "copy",
        parents=[common],
        help="copy every app, account and token to another store (e.g. SQLite to Redis)",
        description="Copy every OAuth2 app, account (with its grant and state), token and "
        "saved access token from one store to another. Secrets are decrypted with FROM's key "
        "and encrypted with TO's; tokens keep working.",
    )
    cp.add_argument("source", metavar="FROM", help="store URL to copy from")
    cp.add_argument("target", metavar="TO", help="store URL to copy to")
    cp.add_argument("--from-secret-file", help="FROM's key (default: as for --store)")
    cp.add_argument("--to-secret-file", help="TO's key (a Redis store needs one)")
    cp.add_argument("--overwrite", action="store_true", help="copy into a store that is not empty")
    return p


async def _run(args: argparse.Namespace, admin: Admin, out: Any) -> None:
    asJSON = getattr(args, "json", False)
    group, command = args.group, args.command
    if group == "sessions":
        await sessionsCommand(args, admin, out)
    elif group == "accounts" and command == "add":
        await addAccount(args, admin)
    elif group == "accounts" and command == "list":
        accounts = await admin.listAccounts()
        if asJSON:
            _json({"accounts": [accountView(a) for a in accounts]}, out)
        else:
            for a in accounts:
                imap = f"{a.upstream.host}:{a.upstream.port}"
                out.write(f"{a.id}\t{a.email}\t{imap}\t{a.state}\t{describeServer(a)}\n")
    elif group == "accounts" and command == "update":
        await updateAccount(args, admin)
    elif group == "accounts" and command == "show":
        _json(accountView(await admin.getAccount(args.account)), out)
    elif group == "accounts" and command == "remove":
        await admin.removeAccount(args.account)
        print(f"account {args.account} removed with its tokens", file=sys.stderr)
    elif group == "accounts" and command == "authorize":
        await authorize(args, admin, out)
    elif group == "apps" and command == "add":
        data: dict[str, Any] = {
            "app": args.app,
            "provider": args.provider,
            "clientId": args.client_id,
            "clientSecret": args.client_secret,
        }
        for flag, key in (
            ("tenant", "tenant"),
            ("redirect_url", "redirectUrl"),
            ("authorization_url", "authorizationUrl"),
            ("token_url", "tokenUrl"),
            ("device_authorization_url", "deviceAuthorizationUrl"),
            ("scope", "scopes"),
        ):
            if getattr(args, flag) is not None:
                data[key] = getattr(args, flag)
        await admin.createApp(data, replace=args.replace)
        print(f"OAuth2 app {args.app} saved", file=sys.stderr)
    elif group == "apps" and command == "list":
        found = await admin.listApps()
        if asJSON:
            _json({"apps": [appView(a) for a in found]}, out)
        else:
            for app in found:
                out.write(f"{app.id}\t{app.provider}\t{app.clientId}\n")
    elif group == "apps" and command == "show":
        _json(appView(await admin.getApp(args.app)), out)
    elif group == "apps" and command == "remove":
        await admin.removeApp(args.app)
        print(f"OAuth2 app {args.app} removed", file=sys.stderr)
    elif group == "secrets":
        await secrets(command, admin.store, KEY_RELOAD_INTERVAL)
    elif group == "tokens" and command == "issue":
        request: dict[str, Any] = {
            "account": args.account,
            "scopes": args.scope,
            "description": args.description,
            "restrictions": restrictionsRequest(args),
        }
        if args.expires_in is not None:
            request["expiresIn"] = args.expires_in
        token, record = await admin.issueToken(request)
        out.write(token + "\n")
        print(f"token id {record.id}", file=sys.stderr)
    elif group == "tokens" and command == "list":
        tokens = await admin.listTokens(args.account)
        if asJSON:
            _json({"tokens": [tokenView(t) for t in tokens]}, out)
        else:
            for t in tokens:
                out.write(tokenLine(t))
    elif group == "tokens" and command == "revoke":
        if args.disconnect and admin.bus is None:
            raise AdminError(
                "--disconnect needs a shared (Redis) store; with SQLite, revoke through the "
                "running service's API: DELETE /v1/tokens/ID?disconnect=true"
            )
        await admin.revokeToken(args.token, disconnect=args.disconnect)
        done = ", its sessions closed on every instance" if args.disconnect else ""
        print(f"token revoked{done}", file=sys.stderr)


def _json(value: Any, out: Any) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")


def main(argv: list[str] | None = None) -> None:
    reason = selfcheck.check()
    if reason is not None:
        print(f"imapproxy: {reason}", file=sys.stderr)
        sys.exit(2)
    args = _parser().parse_args(argv)
    settings: dict[str, str] = {}
    if getattr(args, "config", None):
        try:
            settings = readConfig(args.config, _serverSettings())
        except ConfigError as e:
            sys.exit(f"imapproxy: {e}")
    adminaudit.startFor(args)
    url = getattr(args, "store", None) or settings.get("store") or defaultStoreURL()
    secretFile = getattr(args, "secret_file", None) or settings.get("secret-file")
    if args.group == "store":
        source, target = _openBoth(args, url, secretFile)
        _react(lambda: _copy(source, target, args.overwrite))
    if args.group == "sessions" and urlsplit(url).scheme not in REDIS_SCHEMES:
        print(SESSIONS_ELSEWHERE, file=sys.stderr)
        sys.exit(2)
    store = _open(url, secretFile, create=(args.group, args.command) in CREATING)

    async def run() -> None:
        # On a shared store, sessions closed here are closed on every instance.
        bus = SessionBus(store, lambda a, t: 0, None) if isinstance(store, RedisStore) else None
        # What the instances publish of their live sessions (a Redis store).
        board = SessionBoard(store, "admin-command", 5.0) if bus is not None else None
        try:
            admin = commandAdmin(store, settings, bus=bus, board=board)  # webhooks too
            await _run(args, admin, sys.stdout)
            await delivered(admin)
        finally:
            await store.close()

    _react(run)


def _open(url: str, secretFile: str | None, create: bool = True) -> Any:
    return openStore(url, secretFile, create)


def _openBoth(args: argparse.Namespace, url: str, secretFile: str | None) -> tuple[Any, Any]:
    # The configured store's key is FROM's when FROM is the configured store.
    requireStore(args.source)
    source = _open(
        args.source, args.from_secret_file or (secretFile if args.source == url else None)
    )
    target = _open(args.target, args.to_secret_file)
    if _identity(source) == _identity(target):
        sys.exit("imapproxy: FROM and TO are the same store")
    return source, target


def _identity(store: Any) -> tuple[str, str]:
    """What tells two stores apart: the file, or the Redis database and key prefix."""
    address = getattr(store, "address", None)
    if address is not None:
        return (address.describe(), address.prefix)
    return (os.path.abspath(str(store.path)), "")


async def _copy(source: Any, target: Any, overwrite: bool) -> None:
    try:
        report = await copyStore(source, target, overwrite=overwrite)
    finally:
        await source.close()
        await target.close()
    print(report.describe(), file=sys.stderr)


def _react(run: Any) -> None:

    code = 0

    def outer(reactor: Any) -> Any:
        def failed(f: Any) -> None:
            nonlocal code
            # Every failure is one line; a traceback only when asked for.
            if os.environ.get("IMAPPROXY_DEBUG"):
                f.printTraceback(file=sys.stderr)
            print(f"imapproxy: {errorLine(f.value)}", file=sys.stderr)
            code = 1

        return ensureDeferred(run()).addErrback(failed)

    try:
        react(outer)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(code)


def _serverSettings() -> set[str]:
    from .settings import LIST_SETTINGS, SETTINGS

    return set(SETTINGS) | LIST_SETTINGS


if __name__ == "__main__":
    main()
