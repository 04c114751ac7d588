"""
Starting the real ``twistd imapproxy`` the way an operator does: listeners
that cannot listen end the process in one line, ``ssl:`` ports with the
configured certificate renewed under live sessions, key rotation by root while
the server runs as another user, and admin-command failures in one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import CLIENT_ID, CLIENT_SECRET, ISSUED_SECRETS, register
from tests.imaputil import TIMEOUT, plain
from tests.upstream.certs import make_pki
from tests.upstream.proxyproc import BIN, ProxyProcess

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
# Seconds within which a start that cannot listen must have ended.
FAILS_WITHIN = 20


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("PYTHONPATH", None)
    return e


def openToOthers(path: str) -> bool:
    """Whether every directory above ``path`` lets other users through (o+x)."""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


@pytest.fixture
def home() -> Iterator[str]:
    """A work directory that the user ``nobody`` owns (outside root-only /tmp dirs)."""
    if not openToOthers(BIN):
        # A checkout inside a directory closed to others (``mktemp -d``, mode
        # 0700) with its venv inside it: nobody cannot run the server at all.
        pytest.skip(f"{BIN} is in a directory other users cannot enter")
    d = tempfile.mkdtemp(prefix="imapproxy-startup-")
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def twistd(workdir: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``twistd -n imapproxy`` to its end (it must end: every case here fails)."""
    started = time.monotonic()
    result = subprocess.run(
        [
            *prefix,
            os.path.join(BIN, "twistd"),
            "-n",
            "--pidfile=",
            "imapproxy",
            "--store",
            f"sqlite://{workdir}/state/imapproxy.sqlite3",
            *args,
        ],
        cwd=workdir,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < FAILS_WITHIN
    return result


def one_line(result: subprocess.CompletedProcess) -> str:
    """The failure's only line on standard error (status 1)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imapproxy: ")
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("option", ["--port", "--api-port"])
def test_port_in_use_ends_the_process(tmp_path, busy_port, option):
    """An IMAP or API port that is taken: exit status 1, one line, nothing served."""
    other = "--api-port" if option == "--port" else "--port"
    result = twistd(
        str(tmp_path),
        option,
        f"tcp:{busy_port}:interface=127.0.0.1",
        other,
        "tcp:0:interface=127.0.0.1",
    )
    assert one_line(result) == (
        f"imapproxy: cannot listen on tcp:{busy_port}:interface=127.0.0.1: Address already in use"
    )


def test_privileged_port_as_another_user(home):
    """Port 143 as a user without the right to bind it: one line, status 1."""
    result = twistd(home, "--port", "tcp:143:interface=127.0.0.1", prefix=tuple(AS_NOBODY))
    assert one_line(result) == (
        "imapproxy: cannot listen on tcp:143:interface=127.0.0.1: Permission denied"
    )


def test_missing_certificate_named_in_one_line(tmp_path):
    """ssl:PORT with a configured certificate that is missing: named, no usage text."""
    missing = str(tmp_path / "cert.pem")
    result = twistd(
        str(tmp_path), "--port", "ssl:0", "--tls-certificate", missing, "--tls-key", missing
    )
    assert one_line(result) == (
        f"imapproxy: cannot read TLS certificate {missing}: No such file or directory"
    )


def test_malformed_store_url_in_one_line(tmp_path):
    """sqlite://var/… (two slashes) is refused; nothing is created in the working directory."""
    result = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "imapproxy"]
        + ["--store", "sqlite://var/lib/imapproxy/imapproxy.sqlite3"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "three slashes" in one_line(result)
    assert os.listdir(tmp_path) == []


def test_unwritable_store_in_one_line(home):
    """A state directory the user cannot write: one line from the server and the command."""
    locked = os.path.join(home, "locked")
    os.mkdir(locked, 0o700)  # root's
    url = f"sqlite://{locked}/state/imapproxy.sqlite3"
    server = subprocess.run(
        [*AS_NOBODY, os.path.join(BIN, "twistd"), "-n", "--pidfile=", "imapproxy", "--store", url],
        cwd=home,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    admin = subprocess.run(
        [*AS_NOBODY, os.path.join(BIN, "imapproxy"), "tokens", "issue", "--store", url]
        + ["--scope", "api", "--description", "x"],
        cwd=home,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    for result in (server, admin):
        assert one_line(result) == (
            f"imapproxy: cannot create secret file {locked}/state/secret.key: Permission denied"
        )


def der(pem_path: str) -> bytes:
    with open(pem_path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)


def renew(source, cert: str, key: str) -> None:
    """Install a renewed certificate the way ACME clients do: new files renamed over."""
    for src, dst in ((source.key, key), (source.cert, cert)):
        shutil.copyfile(src, dst + ".new")
        os.replace(dst + ".new", dst)


def tls_client(port: int, ca_file: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca_file)
    return ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT), server_hostname="localhost"
    )


def test_ssl_port_uses_configured_certificate_and_renewal_keeps_idle(
    tmp_path, pki, provider, dovecot
):
    """
    --port=ssl:PORT offers the configured certificate (as STARTTLS does); a renewed
    certificate reaches new connections (on SIGHUP, and on a file change alone)
    while an IDLE session opened before goes on working.
    """
    first = make_pki(str(tmp_path / "first"))
    second = make_pki(str(tmp_path / "second"))
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    renew(first, cert, key)
    proxy = ProxyProcess(str(tmp_path / "proxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    with proxy:
        proxy.start(
            "--port", "ssl:0:interface=127.0.0.1", "--tls-certificate", cert, "--tls-key", key
        )
        port = proxy.ports["ssl"]
        box = register(proxy, provider, dovecot, pki)
        # The certificate STARTTLS offers on the plain port is the same one.
        c = plain(proxy.port)
        c.starttls(ssl.create_default_context(cafile=first.ca_cert))
        assert c.sock.getpeercert(binary_form=True) == der(first.cert)
        c.logout()

        idle = tls_client(port, first.ca_cert)
        assert idle.getpeercert(binary_form=True) == der(first.cert)
        reader = idle.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        idle.sendall(f"a LOGIN {box.account} {box.token}\r\n".encode())
        while not (line := reader.readline()).startswith(b"a "):
            pass
        assert line.startswith(b"a OK"), line
        idle.sendall(b"b SELECT INBOX\r\nc IDLE\r\n")
        while not reader.readline().startswith(b"+ "):
            pass

        renew(second, cert, key)
        os.kill(proxy.pid(), signal.SIGHUP)
        proxy.wait_for_log("TLS certificate reloaded", timeout=30)
        fresh = tls_client(port, second.ca_cert)
        assert fresh.getpeercert(binary_form=True) == der(second.cert)
        fresh.close()

        # A renewal seen by the file watch alone, without a signal.
        renew(first, cert, key)
        proxy.wait_for_log("TLS certificate reloaded", count=2, timeout=30)
        again = tls_client(port, first.ca_cert)
        assert again.getpeercert(binary_form=True) == der(first.cert)
        again.close()

        # The IDLE session opened before both renewals is alive and answers.
        idle.sendall(b"DONE\r\n")
        while not (line := reader.readline()).startswith(b"c "):
            pass
        assert line.startswith(b"c OK"), line
        idle.sendall(b"d NOOP\r\n")
        while not (line := reader.readline()).startswith(b"d "):
            pass
        assert line.startswith(b"d OK"), line
        idle.close()


def test_key_rotation_by_root_with_server_as_another_user(home, pki, provider, dovecot):
    """
    Root runs 'secrets add-key', 'rotate' and 'retire' while the server runs as
    nobody: the server loads the new key (the command says so), the files keep
    their owner, and the server starts again and logs in with the rotated secrets.
    """
    ca = os.path.join(home, "ca.pem")
    shutil.copyfile(pki.ca_cert, ca)
    os.chmod(ca, 0o644)
    proxy = ProxyProcess(
        os.path.join(home, "proxy"),
        env={"REQUESTS_CA_BUNDLE": ca},
        store=f"sqlite://{home}/proxy/state/imapproxy.sqlite3",
        server_prefix=AS_NOBODY,
    )
    os.chown(proxy.workdir, NOBODY, NOBODY)
    with proxy:
        proxy.start()
        keyFile = os.path.join(home, "proxy", "state", "secret.key")
        assert os.stat(keyFile).st_uid == NOBODY
        box = register(proxy, provider, dovecot, SimpleNamespace(ca_cert=ca))
        added = proxy.cli("secrets", "add-key")
        assert f"(pid {proxy.pid()}) now uses it" in added.stderr, added.stderr
        proxy.cli("secrets", "rotate")
        proxy.cli("secrets", "retire")
        for name in ("secret.key", "imapproxy.sqlite3"):
            st = os.stat(os.path.join(home, "proxy", "state", name))
            assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
        assert "Permission denied" not in proxy.log()
        proxy.stop()
        proxy.start()
        c = plain(proxy.port)
        assert c.login(box.account, box.token)[0] == "OK"
        c.logout()


def test_device_authorization_unreachable_in_one_line(tmp_path, provider):
    """'accounts authorize --device' against an unreachable or untrusted provider: one line."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    proxy = ProxyProcess(str(tmp_path))
    https = provider.token_url.rsplit("/", 1)[0]
    for app, base in (("down", f"https://127.0.0.1:{port}"), ("untrusted", https)):
        proxy.cli(
            "apps",
            "add",
            app,
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            "-",
            "--token-url",
            f"{base}/token",
            "--authorization-url",
            f"{base}/authorize",
            "--device-authorization-url",
            f"{base}/device",
            input=CLIENT_SECRET + "\n",
        )
    ISSUED_SECRETS.append(CLIENT_SECRET)
    down = proxy.cli("accounts", "authorize", "a", "--app", "down", "--device", check=False)
    assert one_line(down) == (
        f"imapproxy: cannot reach the provider at 127.0.0.1:{port} (connection refused)"
    )
    untrusted = proxy.cli(
        "accounts", "authorize", "b", "--app", "untrusted", "--device", check=False
    )
    assert "certificate-untrusted" in one_line(untrusted)
    assert "REQUESTS_CA_BUNDLE" in one_line(untrusted)


def test_api_does_not_advertise_versions(proxy):
    """The API's Server header names no software version."""
    request = urllib.request.Request(proxy.api_url + "/v1/tokens")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(request, timeout=TIMEOUT)
    assert refused.value.headers["Server"] == "imapproxy"
