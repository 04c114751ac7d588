"""
What the proxy needs from a store: everything its callers use, in a few
interfaces that SQLite, Redis and the in-memory store all provide (one
contract-test suite checks them, ``tests/test_store.py``).

Every method returns a Deferred. Any of them may fail with ``StoreError``
(the message is safe to show), with ``StoreUnavailable`` when the store
cannot be reached in time (worth retrying; logins answer ``[UNAVAILABLE]``,
the API 503) and with ``StoreDataLost`` (a ``StoreUnavailable``) when the
store answers but has lost the data it had when it was opened. Methods that
decrypt may also fail with ``SecretKeyError`` when no key decrypts a value.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from zope.interface import Attribute, Interface


class IAccountStore(Interface):
    """Accounts: a mailbox, its upstream and its OAuth2 grant."""

    def getAccount(accountId):
        """
        :return: Deferred firing with the ``Account`` (secrets decrypted; an
            account of a shared app with the app's client side) or None.
        """

    def listAccounts():
        """:return: Deferred firing with a list of ``Account``, by id."""

    def putAccount(account):
        """
        Create or replace an account (secrets are encrypted on the way in).
        Replacing keeps the stored creation time and drops the saved access
        token (a changed account may point at another mailbox).

        :return: Deferred firing with None.
        """

    def removeAccount(accountId):
        """
        Remove an account and every token issued for it.

        :return: Deferred firing with True when it existed.
        """

    def setRefreshToken(accountId, refreshToken):
        """
        Replace the stored refresh token (the provider rotated it), atomically;
        nothing when there is no such account.

        :return: Deferred firing with None.
        """

    def setAccountState(accountId, state, reason):
        """
        Set an account's state (``ok``, ``reauth-required``, ``disabled``) and
        the reason shown with it (None clears it), atomically, without
        touching its grant; nothing when there is no such account.

        :return: Deferred firing with the state it had before (the caller
            that changed it is the one that sees a different one: webhooks
            are sent once per cluster), or None when there is no such account.
        """


class IAccessTokenStore(Interface):
    """
    Provider access tokens saved with their accounts, so that a restart (or
    another instance) need not refresh at once.
    """

    def getAccessToken(accountId):
        """
        :return: Deferred firing with ``(token, expires, lifetime)`` as saved
            by ``saveAccessToken``, or None.
        """

    def saveAccessToken(accountId, token, expires, lifetime):
        """
        Save (encrypted) an account's provider access token, or with a None
        token drop it; nothing when there is no such account.

        :return: Deferred firing with None.
        """


class ITokenStore(Interface):
    """Token records: never a token, only its SHA-256 (the record's id)."""

    def addToken(token):
        """
        Store a new ``Token`` record.

        :return: Deferred firing with None; ``StoreError`` when a token with
            this id exists (the first is kept).
        """

    def getToken(tokenId):
        """
        :return: Deferred firing with the ``Token`` (its last use included,
            even one not written yet) or None.
        """

    def listTokens(account=None):
        """
        :param account: only this account's tokens; None for every token.
        :return: Deferred firing with a list of ``Token``, newest first, ties
            by id.
        """

    def removeToken(tokenId):
        """:return: Deferred firing with True when it existed."""

    def touchToken(tokenId, when, address):
        """
        Record a use of the token (it may be written a little later, never
        in a login's way); nothing when there is no such token.

        :return: Deferred firing with None.
        """


class IAppStore(Interface):
    """Shared OAuth2 apps: one client registration used by many accounts."""

    def getApp(appId):
        """:return: Deferred firing with the ``OAuth2App`` (secret decrypted) or None."""

    def listApps():
        """:return: Deferred firing with a list of ``OAuth2App``, by id."""

    def putApp(app):
        """
        Create or replace an app, all of it (its creation time too); the
        accounts that use it see the change at once.

        :return: Deferred firing with None.
        """

    def removeApp(appId):
        """
        :return: Deferred firing with True when it existed; ``StoreError``
            (``N account(s) use this app``) while accounts use it.
        """


class IPendingStore(Interface):
    """Consents in progress (authorization code with PKCE), single use."""

    def addPending(pending):
        """
        Store a ``PendingAuthorization`` (its verifier encrypted); those
        that have expired may be dropped meanwhile.

        :return: Deferred firing with None; ``StoreError`` when one with this
            state exists.
        """

    def takePending(state):
        """
        Remove and return the authorization with this state (single use: of
        two takes at once, one gets it).

        :return: Deferred firing with the ``PendingAuthorization`` or None.
        """


class ISecretStore(Interface):
    """The store's secret keys (``imapproxy secrets``)."""

    secrets = Attribute("The ``Secrets`` that encrypt and decrypt the store's values.")

    def rotateSecrets():
        """
        Re-encrypt every stored secret under the newest key, atomically.

        :return: Deferred firing with how many values; ``SecretKeyError``
            (nothing changed) when a value cannot be decrypted.
        """

    def undecryptable(secrets):
        """
        :param secrets: the keys to try (e.g. the newest only).
        :return: Deferred firing with how many stored secrets ``secrets``
            cannot decrypt (0 means older keys may be retired).
        """

    def reloadSecrets():
        """
        Re-read the key file, off the reactor thread.

        :return: Deferred firing with True when the keys changed;
            ``SecretKeyError`` when the file is now invalid (the old keys stay).
        """


class IStore(
    IAccountStore,
    IAccessTokenStore,
    ITokenStore,
    IAppStore,
    IPendingStore,
    ISecretStore,
    IService,
):
    """
    A whole store, as ``makeStore`` builds it: a service that opens when it
    starts (stopping it closes it) and holds everything above.
    """

    path = Attribute("Where the store is (a file, or a URL without credentials): for logs.")

    def openBlocking():
        """
        Open (creating when new) and check the key, blocking: only before the
        reactor runs.

        :raises StoreError: the store cannot be opened or the key is wrong.
        """

    def closeBlocking():
        """Undo ``openBlocking`` before the reactor runs, so that it can open again."""

    def open():
        """
        Open (creating when new) and check the key against the store.

        :return: Deferred firing with None once the store is usable;
            ``StoreError`` when it cannot be opened or the key is wrong.
        """

    def close():
        """
        Close the store; later operations fail with ``StoreError``. A second
        close is harmless.

        :return: Deferred firing with None.
        """

    def checkHealth():
        """
        Ask the store whether it is there and still holds its data: the
        marker written when it was created must be the one it had when it
        opened. A lost marker is logged once (until it is back).

        :return: Deferred firing with None when healthy; ``StoreUnavailable``
            when the store does not answer, ``StoreDataLost`` (with the reason
            as its message) when it answers without its data.
        """


class IRedisAccess(Interface):
    """
    What the Redis store lends to what coordinates instances through it (the
    refresh lock, the session bus): its address and its connections.
    """

    address = Attribute("The ``RedisAddress`` (host or socket, database, key prefix).")
    timeout = Attribute("Seconds to wait for a connection or a reply.")

    def key(*parts):
        """:return: the key named by ``parts`` under the store's prefix."""

    def endpoint():
        """
        :return: a client endpoint for a new connection of one's own (the
            session bus's subscription) to the store's Redis: its master,
            behind Sentinel.
        """

    def command(method, *args):
        """
        Run one txredisapi command with the store's deadline.

        :return: Deferred with its reply; ``StoreUnavailable`` or ``StoreError``.
        """

    def script(script, keys, args):
        """
        Run a Lua script (EVAL, then EVALSHA) with the store's deadline.

        :return: Deferred with its reply; ``StoreUnavailable`` or ``StoreError``.
        """


class ISlotCounter(Interface):
    """
    Where the connection slots of every account are counted
    (``proxy.upstream.slots``): in this process, or in Redis for every
    instance sharing it. ``key`` is ``ACCOUNT/PROTOCOL``.
    """

    shared = Attribute("True when slots can be freed elsewhere (poll while waiting).")

    def tryAcquire(key: str, cap: int, holder: str, now: float) -> Any:
        """Take a slot of ``key`` for ``holder`` if fewer than ``cap`` are held (Deferred[bool])."""

    def release(key: str, holder: str) -> Any:
        """Give ``holder``'s slot of ``key`` back (none held: nothing); a Deferred."""

    def refresh(held: list[tuple[str, str]], now: float) -> Any:
        """Renew the slots this process holds (``(key, holder)`` pairs); a Deferred."""

    def count(key: str, now: float) -> Any:
        """The slots of ``key`` held now, by every instance (Deferred[int])."""

    def want(key: str, seconds: float) -> Any:
        """
        Say, for ``seconds``, that a login waits for a slot of ``key``: an
        instance holding a spare of it gives the spare up (a Deferred).
        """

    def wanted(keys: list[str]) -> Any:
        """Those of ``keys`` a login waits for now, on any instance (Deferred[list[str]])."""
