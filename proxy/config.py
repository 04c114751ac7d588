"""
The configuration file (``--config``), shared by the server and the admin
command: an INI file with one ``[imapproxy]`` section whose keys are the long
option names. Options given on the command line win over the file.
"""

from __future__ import annotations

import configparser

SECTION = "imapproxy"


class ConfigError(Exception):
    """The file cannot be read or holds an unknown setting."""


def readConfig(path: str, known: set[str]) -> dict[str, str]:
    """
    :param known: the setting names this program accepts.
    :return: the settings given in the file, by option name.
    :raises ConfigError: unreadable file, no ``[imapproxy]`` section, or an
        unknown key (a typo should not silently fall back to a default).
    """
    # "port = tcp:2143 ; the IMAP port": a comment after a value (after
    # white space) is a comment, never part of an endpoint string or a path.
    parser = configparser.ConfigParser(
        interpolation=None, default_section="__none__", inline_comment_prefixes=(";", "#")
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"config file {path} is malformed: {e.message}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"config file {path} has no [{SECTION}] section")
    values = dict(parser.items(SECTION))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return values


def splitList(value: str) -> list[str]:
    """Multi-valued settings (``port``): one value a line."""
    return [v.strip() for v in value.splitlines() if v.strip()]
