"""
Encrypt pre-authorised OAuth2 tokens for emailproxy, with emailproxy's own code.

Run by :mod:`bench.peer` with the *peer venv's* interpreter (this file imports
nothing from this repository)::

    PEER_PYTHON -I bench/peer_seed.py --no-gui < request.json > answer.json

The request is ``{"config": PATH, "accounts": [{"email", "password",
"refresh_token"}, ...]}``; the answer maps each email to the three cached
options that emailproxy itself writes for an account once its interactive
authorisation has succeeded (``OAuth2Helper.get_oauth2_credentials``):
``token_salt``, ``token_iterations`` and ``refresh_token`` (the latter
encrypted with a Fernet key that PBKDF2 derives from the account's IMAP
password and salt).  emailproxy's ``Cryptographer`` does all of it, so the
values are exactly what it would have stored.  ``--no-gui`` is on the command
line because emailproxy reads it at import time to skip its GUI imports.
"""

import json
import sys

import emailproxy


def main() -> None:
    request = json.load(sys.stdin)
    emailproxy.Log.initialise(None)  # its Log must exist before any of its code logs
    # Cryptographer reads the account's options (and allow_catch_all_accounts)
    # through AppConfig, so point AppConfig at the peer's config file.
    emailproxy.CONFIG_FILE_PATH = emailproxy.CACHE_STORE = request["config"]
    config = emailproxy.AppConfig.get()
    answer = {}
    for account in request["accounts"]:
        email = account["email"]
        cryptographer = emailproxy.Cryptographer(config, email, account["password"])
        answer[email] = {
            "token_salt": cryptographer.salt,
            "token_iterations": str(cryptographer.iterations),
            "refresh_token": cryptographer.encrypt(account["refresh_token"]),
        }
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
