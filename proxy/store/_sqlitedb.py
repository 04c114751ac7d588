"""
The SQLite store's file (``proxy.store.sqlite``): the schema, the columns
added since stores were first created, where the ciphertexts are, opening
the file (creating it, with the key check and the marker), transactions.
The columns are those of ``proxy.store._records``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from ..encryption import Secrets
from ._errors import KEY_CHECK, StoreError
from ._records import newMarker

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    imap_host TEXT NOT NULL,
    imap_port INTEGER NOT NULL,
    imap_tls TEXT NOT NULL,
    imap_ca_file TEXT,
    token_url TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret_enc TEXT NOT NULL,
    refresh_token_enc TEXT NOT NULL,
    oauth_scopes TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL DEFAULT 'ok',
    state_reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    account TEXT,
    scopes TEXT NOT NULL,
    description TEXT NOT NULL,
    addresses TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    expires REAL,
    last_use_time REAL,
    last_use_address TEXT
);
CREATE INDEX IF NOT EXISTS tokens_account ON tokens(account);
CREATE TABLE IF NOT EXISTS oauth2_apps (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret_enc TEXT NOT NULL,
    redirect_url TEXT,
    authorization_url TEXT,
    token_url TEXT NOT NULL,
    device_url TEXT,
    scopes TEXT NOT NULL,
    tenant TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth2_pending (
    state TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    app TEXT NOT NULL,
    verifier_enc TEXT NOT NULL,
    email TEXT,
    expires REAL NOT NULL,
    imap TEXT
);
"""

# Columns added after a store was first created: (table, column, definition).
MIGRATIONS = [
    ("accounts", "oauth2_app", "TEXT"),
    ("accounts", "access_token_enc", "TEXT"),
    ("accounts", "access_token_expires", "REAL"),
    ("accounts", "access_token_lifetime", "REAL"),
    # An account's SMTP server: all NULL for an account without one.
    ("accounts", "smtp_host", "TEXT"),
    ("accounts", "smtp_port", "INTEGER"),
    ("accounts", "smtp_tls", "TEXT"),
    ("accounts", "smtp_ca_file", "TEXT"),
    ("oauth2_pending", "smtp", "TEXT"),
    # Per-account connection caps (NULL: the preset's or the global default).
    ("accounts", "imap_max_connections", "INTEGER"),
    ("accounts", "smtp_max_connections", "INTEGER"),
    # A token's IMAP restrictions (JSON); NULL: unrestricted.
    ("tokens", "restrictions", "TEXT"),
]

# Every encrypted column: (table, key column, encrypted column).
ENCRYPTED = [
    ("accounts", "id", "client_secret_enc"),
    ("accounts", "id", "refresh_token_enc"),
    ("accounts", "id", "access_token_enc"),
    ("oauth2_apps", "id", "client_secret_enc"),
    ("oauth2_pending", "state", "verifier_enc"),
    ("meta", "key", "value"),  # only key_check holds ciphertext
]


def connect(path: str, secrets: Secrets) -> tuple[sqlite3.Connection, dict[str, str]]:
    """
    Open (or create, mode 0600 in a 0700 directory) the database, bring its
    schema up to date, and write the key check and the marker when they are
    missing (a store from before markers gets one now).

    :return: the connection (rows as ``sqlite3.Row``) and the meta table.
    :raises StoreError: the file cannot be opened as a database.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fresh = not os.path.exists(path)
        db = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open the SQLite store {path}: {e}") from None
    try:
        if fresh:
            os.chmod(path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(SCHEMA)
        # One writer at a time looks and adds: processes opening an older
        # store at once (admin commands after an upgrade) must not each add
        # the same column.
        with _transaction(db):
            for table, column, definition in MIGRATIONS:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            for key, value in (
                ("key_check", secrets.encrypt(KEY_CHECK)),
                ("store_id", newMarker()),
                ("created", repr(time.time())),
            ):
                db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES(?, ?)", (key, value))
        meta = dict(db.execute("SELECT key, value FROM meta"))
    except (OSError, sqlite3.Error) as e:
        db.close()  # no lock or file left held by a store that did not open
        raise StoreError(f"cannot open the SQLite store {path}: {e}") from None
    db.row_factory = sqlite3.Row
    return db, meta


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        db = self._db
        if kind is None:
            try:
                db.execute("COMMIT")
                return
            except sqlite3.Error:
                if db.in_transaction:  # a failed COMMIT leaves it open
                    db.execute("ROLLBACK")
                raise
        # SQLite may have rolled back by itself (a full disk, say): a ROLLBACK
        # then fails, and its error would hide the one that matters.
        if db.in_transaction:
            db.execute("ROLLBACK")
