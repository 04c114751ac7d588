"""
What the proxy needs from a store. Every method returns a Deferred; the
implementations (SQLite now, Redis later) share one contract-test suite.
"""

from __future__ import annotations

from zope.interface import Interface


class IAccountStore(Interface):
    def getAccount(accountId):
        """
        :return: Deferred firing with the ``Account`` (secrets decrypted) or
            None when there is no such account.
        """

    def listAccounts():
        """:return: Deferred firing with a list of ``Account``, by id."""

    def putAccount(account):
        """
        Create or replace an account (secrets are encrypted on the way in).

        :return: Deferred firing with None.
        """

    def removeAccount(accountId):
        """
        Remove an account and every token issued for it.

        :return: Deferred firing with True when it existed.
        """

    def setRefreshToken(accountId, refreshToken):
        """
        Replace the stored refresh token (the provider rotated it), atomically.

        :return: Deferred firing with None.
        """

    def setAccountState(accountId, state, reason):
        """
        Set an account's state (``ok``, ``reauth-required``, ``disabled``) and
        the reason shown with it, atomically, without touching its grant.

        :return: Deferred firing with None.
        """


class ITokenStore(Interface):
    def addToken(token):
        """Store a ``Token`` record (its id is the hash). :return: Deferred(None)."""

    def getToken(tokenId):
        """:return: Deferred firing with the ``Token`` or None."""

    def listTokens(account=None):
        """
        :param account: only this account's tokens; None for every token.
        :return: Deferred firing with a list of ``Token``, newest first.
        """

    def removeToken(tokenId):
        """:return: Deferred firing with True when it existed."""

    def touchToken(tokenId, when, address):
        """Record a use of the token. :return: Deferred(None)."""
