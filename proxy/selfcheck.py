"""
A start-up check of the installed dependencies, so that a combination known
not to work stops the proxy with one clear line instead of failing at the
first login (e.g. cryptography 41 with pyOpenSSL 23.3, whose bindings lack
what TLS session resumption needs: every TLS upstream login answered
``NO [UNAVAILABLE]``).

The bounds are not written here a second time: they are read back from the
installed distribution's metadata (``setup.cfg`` ``install_requires``), with
public APIs only (``importlib.metadata``, ``packaging``). Nothing is imported
from the dependencies themselves, so a pair that would break at import is
still reported from its versions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import metadata

import attrs
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = ["KNOWN_BAD", "Installed", "check"]

DISTRIBUTION = "imapproxy"

# (package, versions, why): releases that cannot work whatever the bounds
# say, with the reason the operator is told.
KNOWN_BAD: tuple[tuple[str, str, str], ...] = (
    (
        "cryptography",
        "<42",
        "its OpenSSL bindings lack the TLS session-reuse query; releases before 42 are untested",
    ),
)


@attrs.frozen
class Installed:
    """
    What the check reads of the environment, injectable for tests.

    :ivar version: a distribution's installed version, ``None`` when missing.
    :ivar requires: a distribution's requirement strings (``None`` when missing).
    """

    version: Callable[[str], str | None]
    requires: Callable[[str], Iterable[str] | None]

    @classmethod
    def fromMetadata(cls) -> Installed:
        """The running interpreter's installed distributions."""
        return cls(version=_metadataVersion, requires=_metadataRequires)


def _metadataVersion(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _metadataRequires(name: str) -> list[str] | None:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def check(installed: Installed | None = None) -> str | None:
    """
    Whether the installed dependencies can run the proxy.

    :param installed: the environment to look at (default: this interpreter's).
    :return: ``None`` when they fit, else one line saying what does not.
    """
    env = installed if installed is not None else Installed.fromMetadata()
    ours = env.requires(DISTRIBUTION)
    if ours is None:
        # Run from a source tree that was never installed: no bounds to read.
        return None
    # One problem a package, the most telling first: a known-bad release,
    # then our own bounds, then what our dependencies need of each other.
    problems: dict[str, str] = {}
    for name, versions, why in KNOWN_BAD:
        found = env.version(name)
        if found is not None and _within(found, versions):
            problems[canonicalize_name(name)] = f"{name} {found}: {why}"
    requirements = _applicable(ours, ())
    for req in requirements:
        _unmet(req, env, DISTRIBUTION, problems)
    for req in requirements:
        # One level down: pyOpenSSL pins the cryptography it was built
        # against; pip enforces that, an install with --no-deps or a mix with
        # system packages does not, and a mismatch breaks at import.
        theirs = env.requires(req.name)
        if theirs is not None and env.version(req.name) is not None:
            for sub in _applicable(theirs, req.extras):
                _unmet(sub, env, canonicalize_name(req.name), problems)
    if not problems:
        return None
    return (
        "the installed packages cannot work: "
        + "; ".join(problems.values())
        + " (reinstall with -c constraints.txt, see docs/development.md)"
    )


def _applicable(lines: Iterable[str], extras: Iterable[str]) -> list[Requirement]:
    """The requirements in ``lines`` that apply here with ``extras`` requested."""
    wanted = [""] + sorted(extras)
    out = []
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in wanted):
            out.append(req)
    return out


def _unmet(req: Requirement, env: Installed, who: str, problems: dict[str, str]) -> None:
    """Note in ``problems`` what is wrong with ``req``, which ``who`` needs."""
    name = canonicalize_name(req.name)
    if name in problems:
        return
    found = env.version(req.name)
    if found is None:
        problems[name] = f"{name} is not installed ({who} needs {name}{req.specifier})"
    elif req.specifier and not _within(found, str(req.specifier)):
        problems[name] = f"{name} {found} is installed, {who} needs {name}{req.specifier}"


def _within(version: str, specifier: str) -> bool:
    """Whether ``version`` is in ``specifier`` (an unparsable version is not)."""
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False
