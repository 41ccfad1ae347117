"""Real Redis deployments on 127.0.0.1 for the store tests: a Redis Cluster and a Sentinel group.

``LocalCluster`` starts ``redis-server --cluster-enabled yes`` processes (primaries, and replicas
if asked) on free ports in a temporary directory and joins them with CLUSTER ADDSLOTSRANGE,
MEET and REPLICATE (what ``redis-cli --cluster create`` does, without its fixed one-second
pauses). ``LocalSentinel`` starts a primary, a replica and three ``redis-server --sentinel``
processes monitoring it. Both use short timeouts (node timeout, down-after) so a killed primary
is replaced within a few seconds, and both stop every process they started on ``close()``.

Admin commands go through redis-py's synchronous client, with short timeouts and no retries.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from servers import terminate

__all__ = ["LocalCluster", "LocalSentinel", "RedisProcess"]

HASH_SLOTS = 16384


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true (and return that); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError) as error:  # a server still starting or failing over
            last = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s (last error: {last!r})")
        time.sleep(interval)


class RedisProcess:
    """One ``redis-server`` (or sentinel) process on 127.0.0.1, restartable on its port."""

    def __init__(self, binary: str, workdir: Path, name: str, args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.port = free_port()
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.args = list(args)
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisProcess:
        """Start (or restart, same port and directory) and return once it answers PING."""
        if self.running:
            return self
        args = [self.binary, *self.args, "--port", str(self.port), "--bind", "127.0.0.1"]
        if "--sentinel" not in self.args:  # a Sentinel has no data to persist
            args += ["--dir", str(self.dir), "--save", "", "--appendonly", "no"]
            # A replica's first sync starts at once (the default waits 5 s for more replicas).
            args += ["--repl-diskless-sync-delay", "0"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        until(lambda: self._alive() and self.client().ping(), timeout, f"{self.name} PING")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
        return True

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as a crashed host would (no failover hand-off)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            terminate([proc], timeout=5)

    def client(self) -> redis.Redis:
        """A new synchronous client on this process (close it after use)."""
        return redis.Redis(
            *self.address, socket_timeout=2.0, socket_connect_timeout=2.0, retry_on_error=[]
        )

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info(section))

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"


class LocalCluster:
    """A Redis Cluster: ``primaries`` nodes sharing the slots, each with ``replicas`` replicas."""

    def __init__(
        self,
        binary: str,
        *,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="stscreds-cluster-")
        workdir = Path(self._tmp.name)
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(node_timeout_ms)]
        # A replica takes over whatever the age of its data: these tests kill primaries.
        args += ["--cluster-replica-validity-factor", "0", *extra_args]
        # The cluster bus on a free port of its own: the default (port + 10000) may be taken,
        # or beyond 65535.
        self.nodes = [
            RedisProcess(binary, workdir, f"node-{i}", args)
            for i in range(primaries * (1 + replicas))
        ]
        self.bus_ports = {node.port: free_port() for node in self.nodes}
        for node in self.nodes:
            node.args += ["--cluster-port", str(self.bus_ports[node.port])]
        self._primaries, self._replicas = primaries, replicas
        self.ids: dict[int, str] = {}  # port -> cluster node id

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (any one would do: the rest is discovered)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [node.address for node in self.nodes]

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        primaries = self.nodes[: self._primaries]
        for node in self.nodes:
            self.ids[node.port] = node.command("CLUSTER", "MYID").decode()
        step = HASH_SLOTS // len(primaries)
        for index, node in enumerate(primaries):
            first = index * step
            last = HASH_SLOTS - 1 if index == len(primaries) - 1 else first + step - 1
            # Distinct epochs, as redis-cli sets them: no collision to resolve at start.
            node.command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            first = self.nodes[0].port
            node.command("CLUSTER", "MEET", "127.0.0.1", first, self.bus_ports[first])
        until(
            lambda: all(self._known_nodes(n) == len(self.nodes) for n in self.nodes),
            20,
            "every node knows every other",
        )
        for index, node in enumerate(self.nodes[self._primaries :]):
            primary = primaries[index % len(primaries)]
            node.command("CLUSTER", "REPLICATE", self.ids[primary.port])
        self.wait_ok()
        return self

    def _known_nodes(self, node: RedisProcess) -> int:
        return int(self._info(node)["known"])

    def _info(self, node: RedisProcess) -> dict[str, Any]:
        text = node.command("CLUSTER", "INFO").decode()
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return {
            "state": fields.get("cluster_state"),
            "known": int(fields.get("cluster_known_nodes", 0)),
            "slots_ok": int(fields.get("cluster_slots_ok", 0)),
        }

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node sees the cluster OK, all slots served, replicas in sync."""

        def ok() -> bool:
            live = [n for n in self.nodes if n.running]
            for node in live:
                info = self._info(node)
                if info["state"] != "ok" or info["slots_ok"] != HASH_SLOTS:
                    return False
                replication = node.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
            # All live nodes agree on who serves each slot range.
            views = {self._slot_owners(node) for node in live}
            return len(views) == 1

        until(ok, timeout, "cluster state ok")

    def _slot_owners(self, node: RedisProcess) -> tuple[tuple[int, int, int], ...]:
        return tuple(
            sorted((int(a), int(b), int(p[1])) for a, b, p, *_ in node.command("CLUSTER", "SLOTS"))
        )

    def slot(self, key: str) -> int:
        return int(self.nodes[0].command("CLUSTER", "KEYSLOT", key))

    def owner(self, slot: int) -> RedisProcess:
        """The live primary serving ``slot``, as the live nodes see it."""
        live = next(n for n in self.nodes if n.running)
        for first, last, port in self._slot_owners(live):
            if first <= slot <= last:
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def primaries(self) -> list[RedisProcess]:
        live = next(n for n in self.nodes if n.running)
        ports = {port for _, _, port in self._slot_owners(live)}
        return [n for n in self.nodes if n.port in ports and n.running]

    def migrate_slot(self, slot: int, target: RedisProcess) -> None:
        """Move ``slot`` and its keys to ``target``, as ``redis-cli --cluster reshard`` does."""
        self.start_migration(slot, target)
        self.end_migration(slot, target)

    def start_migration(self, slot: int, target: RedisProcess) -> RedisProcess:
        """Mark ``slot`` MIGRATING/IMPORTING and move its keys; return the source node.

        Until ``end_migration`` the source still owns the slot: commands for keys it no
        longer has are redirected to ``target`` with ASK.
        """
        source = self.owner(slot)
        assert source is not target
        source_id, target_id = self.ids[source.port], self.ids[target.port]
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            # MIGRATE keeps each key's TTL.
            source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        return source

    def end_migration(self, slot: int, target: RedisProcess) -> None:
        """Give ``slot`` to ``target`` on every primary, then wait for the cluster to agree."""
        source = self.owner(slot)
        others = [n for n in self.primaries() if n not in (source, target)]
        for node in (target, source, *others):
            node.command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[target.port])
        self.wait_ok()

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self._tmp.cleanup()

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ({n.port}) ---\n{n.log_tail()}" for n in self.nodes)


class LocalSentinel:
    """A primary, a replica of it and three Sentinels monitoring it as ``service``."""

    def __init__(
        self, binary: str, *, service: str = "mymaster", down_after_ms: int = 1000
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="stscreds-sentinel-")
        workdir = Path(self._tmp.name)
        self.service = service
        self.primary = RedisProcess(binary, workdir, "primary")
        self.replica = RedisProcess(binary, workdir, "replica")
        self.sentinels = [RedisProcess(binary, workdir, f"sentinel-{i}") for i in range(3)]
        self._down_after_ms = down_after_ms

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> LocalSentinel:
        self.primary.start()
        self.replica.args = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        until(
            lambda: self.replica.info("replication")["master_link_status"] == "up",
            15,
            "replica in sync",
        )
        for sentinel in self.sentinels:
            # Sentinel rewrites its configuration file: each gets its own, in its directory.
            config = sentinel.dir / "sentinel.conf"
            config.write_text(
                f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self._down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            sentinel.args = [str(config), "--sentinel"]
            sentinel.start()

        def ready() -> bool:
            for sentinel in self.sentinels:
                state = self._state(sentinel)
                # Each knows the replica and the two other Sentinels: a failover can be voted.
                if int(state["num-other-sentinels"]) != 2 or int(state["num-slaves"]) != 1:
                    return False
            return True

        until(ready, 20, "sentinels know each other and the replica", interval=0.1)
        return self

    def _state(self, sentinel: RedisProcess) -> dict[str, Any]:
        reply = sentinel.command("SENTINEL", "MASTER", self.service)
        if not isinstance(reply, dict):
            reply = dict(zip(reply[::2], reply[1::2], strict=True))
        return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in reply.items()}

    def master_port(self) -> int | None:
        """The primary's port as a majority of live Sentinels names it (None if they differ)."""
        ports = []
        for sentinel in self.sentinels:
            if sentinel.running:
                _, port = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                ports.append(int(port))
        return ports[0] if ports and len(set(ports)) == 1 else None

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> RedisProcess:
        """Until the Sentinels agree on a new primary that says it is one; return it."""

        def promoted() -> RedisProcess | None:
            port = self.master_port()
            if port is None or port == old_port:
                return None
            node = self.replica if self.replica.port == port else self.primary
            return node if node.info("replication")["role"] == "master" else None

        result: RedisProcess = until(promoted, timeout, "failover", interval=0.1)
        return result

    def close(self) -> None:
        for process in (*self.sentinels, self.replica, self.primary):
            process.stop()
        self._tmp.cleanup()

    def logs(self) -> str:
        processes = (self.primary, self.replica, *self.sentinels)
        return "\n".join(f"--- {p.name} ({p.port}) ---\n{p.log_tail()}" for p in processes)
