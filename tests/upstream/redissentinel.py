"""A real Redis Sentinel set on 127.0.0.1 for the failover tests: one master,
one replica and three ``redis-server --sentinel`` processes watching them,
with short ``down-after-milliseconds`` and ``failover-timeout`` so that a
failover after the master is killed takes a second or three.

``url`` is the store URL (``redis+sentinel://…``); ``master()`` is whichever
server the sentinels say is the master now; ``kill_master()`` SIGKILLs it and
``wait_failover()`` waits until another one is promoted.
"""

from __future__ import annotations

import os

from tests.upstream.osutil import wait_until
from tests.upstream.redisserver import RedisServer, RedisServerError

__all__ = ["SentinelSet"]

SERVICE = "imapproxy"
QUORUM = 2
READY_TIMEOUT = 20.0
# A replica's first sync at once, not after Redis's default 5 s pause.
_FAST_SYNC = ("--repl-diskless-sync-delay", "0")


class Sentinel(RedisServer):
    """One ``redis-server --sentinel`` watching ``SERVICE``."""

    def __init__(
        self,
        master_port: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        password: str | None = None,
        master_password: str | None = None,
    ) -> None:
        super().__init__(password=password)
        self.master_password = master_password
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def _command_line(self, port: int) -> list[str]:
        # Sentinel rewrites its configuration file: one of its own each run.
        assert self.dir is not None
        conf = os.path.join(self.dir, f"sentinel-{port}.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {port}\n"
                f"bind {self.host}\n"
                f"dir {self.dir}\n"
                f"sentinel monitor {SERVICE} {self.host} {self.master_port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            if self.master_password:
                f.write(f"sentinel auth-pass {SERVICE} {self.master_password}\n")
            if self.password:
                # Its own password, and the one it gives the other sentinels.
                f.write(f"requirepass {self.password}\nsentinel sentinel-pass {self.password}\n")
        return ["redis-server", conf, "--sentinel"]

    def master_port_now(self) -> int | None:
        """The master's port as this sentinel sees it, or None if unreachable."""
        try:
            reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        except (OSError, RedisServerError):
            return None
        return int(reply[1]) if reply else None

    def state(self) -> dict[str, str]:
        reply = self.command("SENTINEL", "MASTER", SERVICE)
        return dict(zip(reply[::2], reply[1::2], strict=True))


class SentinelSet:
    """
    :param down_after_ms: how long the master must be silent to be down.
    :param failover_timeout_ms: Sentinel's ``failover-timeout``.
    :param password: the Redis servers' ``requirepass`` (and ``masterauth``).
    :param sentinel_password: the sentinels' own ``requirepass``.
    """

    host = RedisServer.host
    service = SERVICE

    def __init__(
        self,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[Sentinel] = []

    def start(self) -> None:
        try:
            auth = ("--masterauth", self.password) if self.password else ()
            master = RedisServer(self.password, extra_args=(*_FAST_SYNC, *auth))
            self.servers.append(master)
            master.start()
            assert master.port is not None
            replica = RedisServer(
                self.password,
                extra_args=(*_FAST_SYNC, *auth, "--replicaof", self.host, str(master.port)),
            )
            self.servers.append(replica)
            replica.start()
            _wait(lambda: _field(replica, "master_link_status") == "up", "the replica in sync")
            for _ in range(3):
                sentinel = Sentinel(
                    master.port,
                    self.down_after_ms,
                    self.failover_timeout_ms,
                    self.sentinel_password,
                    self.password,
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            # A failover needs every sentinel to know the others and the replica.
            for sentinel in self.sentinels:
                _wait(
                    lambda s=sentinel: _knows_all(s.state()),  # type: ignore[misc]
                    "each sentinel knowing the other two and the replica",
                )
        except BaseException:
            self.cleanup()
            raise

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/imapproxy/0``."""
        hosts = ",".join(f"{self.host}:{s.port}" for s in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0{query}"

    def master_port(self) -> int:
        """Where the sentinels (the first that answers) say the master is."""
        for sentinel in self.sentinels:
            port = sentinel.master_port_now()
            if port is not None:
                return port
        raise RedisServerError("no sentinel answers")

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master, once its replica holds all it wrote; the killed server."""
        self.wait_replicated()
        master = self.master()
        master.kill()
        return master

    def wait_replicated(self, seconds: float = READY_TIMEOUT) -> None:
        """
        Wait until every running replica holds all the master had written when
        called. Replication is asynchronous: a failover right after a write
        may promote a replica without it, which the store rightly reports as
        data lost (its marker differs). A test that means to lose nothing
        waits for this first, as an operator's planned failover would.
        """
        master = self.master()
        target = int(_field(master, "master_repl_offset") or 0)
        replicas = [s for s in self.servers if s is not master and s.running]

        def caught_up() -> bool:
            for replica in replicas:
                if _field(replica, "master_link_status") != "up":
                    return False
                offset = _field(replica, "slave_repl_offset")
                if offset is None or int(offset) < target:
                    return False
            return True

        _wait(caught_up, "every replica holding what the master wrote", seconds)

    def wait_failover(self, old_port: int, seconds: float = 30.0) -> RedisServer:
        """Wait until every sentinel names another master and it says it is one."""

        def promoted() -> RedisServer | None:
            ports = {s.master_port_now() for s in self.sentinels}
            if len(ports) != 1 or old_port in ports or None in ports:
                return None
            new = next((s for s in self.servers if s.port in ports), None)
            if new is None or _field(new, "role") != "master":
                return None
            return new

        return _wait(promoted, "a replica promoted", seconds)

    def revive(self, server: RedisServer) -> None:
        """
        Start a killed server again (the sentinels make it a replica of the
        master), or make a demoted master that the sentinels have not
        reconfigured yet a replica (what they would do within some seconds).
        """
        if not server.running:
            server.start()
        else:
            master = self.master()
            if master is not server:
                server.command("REPLICAOF", self.host, str(master.port))
        _wait(
            lambda: (
                _field(server, "role") == "slave" and _field(server, "master_link_status") == "up"
            ),
            "the revived server in sync as a replica",
        )

    def cleanup(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.cleanup()

    def __enter__(self) -> SentinelSet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def _field(server: RedisServer, name: str) -> str | None:
    """One ``INFO replication`` field, or None when the server does not answer."""
    try:
        info = server.command("INFO", "replication")
    except (OSError, RedisServerError):
        return None
    for line in str(info).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def _knows_all(state: dict[str, str]) -> bool:
    return state.get("num-other-sentinels") == "2" and state.get("num-slaves") == "1"


def _wait(check, what: str, seconds: float = READY_TIMEOUT):  # type: ignore[no-untyped-def]
    return wait_until(check, seconds, what)
