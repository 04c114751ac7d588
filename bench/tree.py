"""
The measured proxy from another source tree: ``--tree DIR`` (``bench/run``,
``bench.login_cpu``) runs ``twistd imapproxy`` with DIR's ``proxy/`` first on
its ``PYTHONPATH``; the venv's dependencies and ``twistd`` plugin, and this
tree's benchmark, rig and admin command, stay as they are. So two versions
are measured by the same benchmark, on one machine, in one session, e.g.
``git archive COMMIT proxy | tar -x -C /tmp/COMMIT``, then alternate
``bash bench/run --tree /tmp/COMMIT`` with ``bash bench/run``.

The other version must accept the rig's options. For a tree older than SMTP
submission (no ``proxy/smtp``) a wrapper drops ``--smtp-port`` and
``--login-penalty``, which it lacks, and no SMTP listener is waited for
(``bench/run`` then measures no SMTP rows).
"""

from __future__ import annotations

import os
from typing import ClassVar

from tests.upstream.proxyproc import ProxyProcess as _ProxyProcess

# Runs twistd without the options a tree older than SMTP submission lacks.
_OLD_TREE_WRAPPER = """#!/bin/bash
args=(); skip=0
for a in "$@"; do
  if ((skip)); then skip=0; continue; fi
  case $a in --smtp-port|--login-penalty) skip=1;; *) args+=("$a");; esac
done
exec "${args[@]}"
"""


class ProxyProcess(_ProxyProcess):
    """
    ``tests.upstream.proxyproc.ProxyProcess`` whose server runs ``proxy/``
    from ``tree`` (the class's, else ``--tree``'s), when one is set.
    """

    #: ``--tree``: set once by the benchmark's entry point, for every proxy.
    default: ClassVar[str | None] = None
    tree: ClassVar[str | None] = None

    def sitePaths(self) -> list[str]:
        """More directories for the server's ``PYTHONPATH``, after the tree's."""
        return []

    def environment(self) -> list[str]:
        """More ``NAME=value`` for the server's environment."""
        return []

    def start(self, *extra: str) -> None:
        tree = self.tree or ProxyProcess.default
        path = [p for p in (tree, *self.sitePaths()) if p]
        prefix = ["env", f"PYTHONPATH={':'.join(path)}", *self.environment()] if path else []
        if tree and not hasSMTP(tree):
            wrapper = os.path.join(self.workdir, "old-tree-twistd")
            with open(wrapper, "w") as f:
                f.write(_OLD_TREE_WRAPPER)
            os.chmod(wrapper, 0o755)
            prefix.append(wrapper)
            extra = (*_withoutSMTPPorts(extra), "--smtp-port", "none")
        if prefix and self.server_prefix[: len(prefix)] != prefix:  # once, however often started
            self.server_prefix = [*prefix, *self.server_prefix]
        super().start(*extra)


def hasSMTP(tree: str | None) -> bool:
    """Whether the proxy of ``tree`` (None: this venv's) has the SMTP front door."""
    return tree is None or os.path.isdir(os.path.join(tree, "proxy", "smtp"))


def _withoutSMTPPorts(extra: tuple[str, ...]) -> tuple[str, ...]:
    kept: list[str] = []
    skip = False
    for arg in extra:
        if skip:
            skip = False
        elif arg == "--smtp-port":
            skip = True
        elif not arg.startswith("--smtp-port="):
            kept.append(arg)
    return tuple(kept)
