"""
Encryption at rest for provider secrets (refresh tokens, client secrets).

Fernet from ``cryptography``; several keys may be given (newest first) so that
data written under an older key stays readable while keys are rotated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

ENV_VAR = "IMAPPROXY_SECRET_KEY"


class SecretKeyError(Exception):
    """The secret key is missing, malformed or does not match the store."""


class Secrets:
    """
    :param keys: newest first: the first encrypts and signs, all decrypt.
    :param path: the key file they came from (None for the environment), so
        that a running service can pick up keys added by ``secrets add-key``.
    """

    #: True when this process created the key file (a new key: back it up).
    created = False

    def __init__(self, keys: list[bytes], path: str | None = None):
        self.path = path
        self._lastBad: str | None = None
        self._setKeys(keys)

    def _setKeys(self, keys: list[bytes]) -> None:
        if not keys:
            raise SecretKeyError("no secret key given")
        try:
            fernet = MultiFernet([Fernet(k) for k in keys])
        except (ValueError, TypeError):
            raise SecretKeyError(
                "a secret key is not a valid Fernet key (32 url-safe base64 bytes)"
            ) from None
        # Signing keys derived from the encryption keys (never the same bytes
        # for two purposes); the newest signs, all verify, as with Fernet.
        self._signing = [hashlib.sha256(b"imapproxy-sign\0" + k).digest() for k in keys]
        self._fernet = fernet
        self.keys = list(keys)

    def reloadBlocking(self) -> bool:
        """
        Re-read the key file (blocking: from a worker thread). :return: True
        when the keys changed. A missing or broken file keeps the old keys.
        """
        if self.path is None:
            return False
        try:
            keys = _readKeyFile(self.path)
            if keys == self.keys:
                return False
            self._setKeys(keys)
        except SecretKeyError as e:
            # Keep serving with the keys we have; say so once per bad content.
            if self._lastBad != str(e):
                self._lastBad = str(e)
                raise
            return False
        self._lastBad = None
        return True

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt under the newest key."""
        try:
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise SecretKeyError(
                "stored secrets cannot be decrypted with the configured key"
            ) from None

    def newestOnly(self) -> Secrets:
        return Secrets(self.keys[:1])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def sign(self, value: str) -> str:
        return hmac.new(self._signing[0], value.encode("utf-8"), hashlib.sha256).hexdigest()

    def verify(self, value: str, signature: str) -> bool:
        """Constant-time check of ``signature`` under any of the keys."""
        if not signature.isascii():
            return False
        ok = False
        for key in self._signing:
            mac = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
            ok |= hmac.compare_digest(mac, signature)
        return ok

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise SecretKeyError(
                "stored secrets cannot be decrypted with the configured key"
            ) from None


def parseKeys(text: str) -> list[bytes]:
    """One key a line (or separated by commas); ``#`` starts a comment."""
    keys = []
    for line in text.splitlines():
        for key in line.split("#", 1)[0].split(","):
            if key.strip():
                keys.append(key.strip().encode("ascii"))
    return keys


def loadSecrets(secretFile: str | None, defaultFile: str | None, environ=os.environ) -> Secrets:
    """
    Find the key: ``secretFile`` if given, else the environment variable
    ``IMAPPROXY_SECRET_KEY``, else ``defaultFile``, which is created (mode
    0600) with a new key when it does not exist yet.

    :raises SecretKeyError: when no key can be found or read.
    """
    if secretFile:
        return Secrets(_readKeyFile(secretFile), secretFile)
    if environ.get(ENV_VAR):
        return Secrets(parseKeys(environ[ENV_VAR]))
    if defaultFile is None:
        raise SecretKeyError(f"no secret key: give --secret-file or set {ENV_VAR}")
    created = False
    if not os.path.exists(defaultFile):
        try:
            _createKeyFile(defaultFile)
        except OSError as e:
            raise SecretKeyError(f"cannot create secret file {defaultFile}: {e.strerror}") from None
        created = True
    secrets = Secrets(_readKeyFile(defaultFile), defaultFile)
    secrets.created = created
    return secrets


def writeKeyFile(path: str, keys: list[bytes]) -> None:
    """
    Replace the key file atomically, keeping its owner, group and mode (the
    server may run as another user than the admin command; a key file it
    cannot read would stop it at the next start).

    :raises SecretKeyError: when the owner cannot be kept (say as whom to run).
    """
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None  # a new file: ours, mode 0600
    except OSError as e:
        raise SecretKeyError(f"cannot read secret file {path}: {e.strerror}") from None
    tmp = f"{path}.new.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise SecretKeyError(f"cannot write beside {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# imapproxy secret keys, newest first (see 'imapproxy secrets')\n")
            for k in keys:
                f.write(k.decode("ascii") + "\n")
            f.flush()
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                except PermissionError:
                    raise SecretKeyError(
                        f"{path} belongs to {_owner(old.st_uid)}: run the command as that "
                        f"user (runuser -u {_owner(old.st_uid)} -- imapproxy ...) or as root"
                    ) from None
            if old is not None:
                os.fchmod(f.fileno(), old.st_mode & 0o7777)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def keyFingerprint(key: bytes) -> str:
    """A short, one-way name for a key, safe to write down and compare."""
    return hashlib.sha256(b"imapproxy-key-id\0" + key).hexdigest()[:16]


def loadedMarkerPath(keyFile: str) -> str:
    """Where a running server records the keys it loaded from ``keyFile``."""
    return keyFile + ".loaded"


def writeLoadedMarker(keyFile: str, keys: list[bytes], pid: int) -> None:
    """
    Blocking: record which keys (fingerprints, newest first) the server ``pid``
    uses, so that ``imapproxy secrets add-key`` can tell whether it picked a
    new key up. :raises OSError: when the directory is not writable.
    """
    path = loadedMarkerPath(keyFile)
    tmp = f"{path}.{pid}"
    with open(tmp, "w", encoding="ascii") as f:
        json.dump({"pid": pid, "keys": [keyFingerprint(k) for k in keys]}, f)
    os.replace(tmp, path)


def readLoadedMarker(keyFile: str) -> tuple[int, list[str]] | None:
    """:return: (pid, key fingerprints) last recorded by a server, or None."""
    try:
        with open(loadedMarkerPath(keyFile), encoding="ascii") as f:
            data = json.load(f)
        return int(data["pid"]), [str(k) for k in data["keys"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newKey() -> bytes:
    return Fernet.generate_key()


def _readKeyFile(path: str) -> list[bytes]:
    try:
        with open(path, encoding="ascii") as f:
            keys = parseKeys(f.read())
    except OSError as e:
        raise SecretKeyError(f"cannot read secret file {path}: {e.strerror}") from None
    if not keys:
        raise SecretKeyError(f"secret file {path} holds no key")
    return keys


def _createKeyFile(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(Fernet.generate_key().decode("ascii") + "\n")
