"""
A real HAProxy in front of proxy instances, as ``docs/scaling.md`` deploys it:
``mode tcp``, round robin, the PROXY protocol v2 to each backend, and the
client's TLS passed through untouched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from tests.upstream.osutil import free_port, stop_process

CONFIG = """\
global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend imaps
    bind 127.0.0.1:{port}
    default_backend imapproxy

backend imapproxy
    balance roundrobin
{servers}
"""

SERVER = "    server {name} 127.0.0.1:{port} send-proxy-v2 check check-send-proxy inter 1s"


class HAProxyError(RuntimeError):
    pass


class HAProxy:
    """:param backends: ``{name: port}`` of ``haproxy:`` listeners."""

    def __init__(self, workdir: str, backends: dict[str, int]) -> None:
        self.workdir = workdir
        self.backends = backends
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(binary):
            raise HAProxyError("haproxy is not installed (apt-get install haproxy)")
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        servers = "\n".join(
            SERVER.format(name=name, port=port) for name, port in self.backends.items()
        )
        conf = os.path.join(self.workdir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(CONFIG.format(port=self.port, servers=servers))
        check = subprocess.run([binary, "-c", "-f", conf], capture_output=True, text=True)
        if check.returncode != 0:
            raise HAProxyError(f"haproxy rejected its configuration: {check.stdout}{check.stderr}")
        self._proc = subprocess.Popen(
            [binary, "-db", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise HAProxyError(f"haproxy exited: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise HAProxyError("haproxy did not start listening")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()
