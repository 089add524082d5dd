"""Helpers to stand up a federation on loopback: tests, the benchmark and the README demo.

Everything is real: a CA and tokens from ``hefl.net.certs``, a ``run.toml``, one ``.npz`` per
client, and server/client *processes* started with ``python -m hefl.cli``.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hefl.data.federated import ClientData, FederatedData
from hefl.net.certs import Federation, make_federation
from hefl.net.data import write_federated

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(doc: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document of flat tables (enough for run.toml)."""
    out = []
    for section, values in doc.items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        out.append("")
    return "\n".join(out)


@dataclass(frozen=True)
class Demo:
    """A federation written to disk."""

    root: Path
    config: Path
    names: tuple[str, ...]
    fed: Federation
    data: Mapping[str, Path]
    address: str
    state: Path

    def party_options(self, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """``ClientSettings`` options for ``name``: its identity key, and for a key holder the
        registry it verifies signatures against; explicit ``options`` win."""
        base: dict[str, Any] = {"identity": self.fed.identity(name)}
        if options.get("key_holder"):
            base["registry"] = self.fed.registry
        return {**base, **options}

    def client_args(self, name: str, *, tls: bool = True) -> list[str]:
        args = ["--server", self.address, "--data", str(self.data[name]),
                "--token-file", str(self.fed.token(name))]
        return args + (["--ca", str(self.fed.ca)] if tls else ["--insecure"])


def make_demo(
    root: Path,
    data: FederatedData,
    *,
    model: Mapping[str, Any],
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    algorithm: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    tls: bool = True,
    test: ClientData | None = None,
    names: Sequence[str] | None = None,
    aggregation: Mapping[str, Any] | None = None,
    key_holders: Sequence[str] = (),
    mtls: bool = False,
    privacy: Mapping[str, Any] | None = None,
) -> Demo:
    """Write certs, per-client data and ``run.toml`` under ``root``; for an encrypted
    ``aggregation`` also run the key ceremony into ``root/keys``."""
    names = tuple(names or [f"c{i}" for i in range(len(data))])
    fed = make_federation(root / "certs", names, key_holders=key_holders)
    paths = write_federated(data, root / "data", names, test)
    address = f"127.0.0.1:{free_port()}"
    srv: dict[str, Any] = {"address": address, "min_clients": 1, "round_timeout_s": 60.0,
           "start_timeout_s": 60.0, "join_timeout_s": 5.0, "heartbeat_s": 2.0,
           "linger_s": 0.0}  # tests wait for the server to exit; a late-client test sets it
    if test is not None:
        srv["test_data"] = "data/test.npz"
    srv.update(server or {})
    doc: dict[str, dict[str, Any]] = {
        "run": {"name": "t", "rounds": rounds, "clients_per_round": clients_per_round,
                "seed": seed, "state_dir": "state"},
        "algorithm": dict(algorithm or {"name": "fedavg", "client_lr": 0.05}),
        "model": dict(model),
        "aggregation": dict(aggregation or {"kind": "plain"}),
        "server": srv,
        "tls": ({"cert": "certs/server.pem", "key": "certs/server.key",
                 "client_ca": "certs/ca.pem" if mtls else None} if tls else {"insecure": True}),
        "clients": {"registry": "certs/clients.toml"},
    }
    plan = None
    if privacy:
        from hefl.net.config import build_model
        from hefl.net.privacy import deployment_plan

        doc["privacy"] = dict(privacy)
        plan = deployment_plan(privacy, doc["aggregation"], len(names), clients_per_round,
                               rounds, build_model(model).spec.size)
    if doc["aggregation"].get("custody") == "threshold":
        threshold_ceremony_files(doc["aggregation"], model, fed, root / "keys", plan)
        doc["aggregation"]["public"] = "keys/public.ctx"
    elif doc["aggregation"].get("kind", "plain") != "plain":
        from hefl.net.config import build_model
        from hefl.net.keys import write_keys

        write_keys(doc["aggregation"], build_model(model).spec.size, root / "keys",
                   privacy=plan)
        doc["aggregation"]["public"] = "keys/public.ctx"
    cfg = root / "run.toml"
    cfg.write_text(to_toml(doc))
    shards = dict(zip(names, paths, strict=True))
    return Demo(root, cfg, names, fed, shards, address, root / "state")


def threshold_ceremony_files(agg: Mapping[str, Any], model: Mapping[str, Any], fed: Federation,
                             out: Path, privacy: Any = None) -> None:
    """Run the committee's ceremony (``hefl.net.ceremony``), each member with its own identity
    and key directory: ``out/NAME/share.key`` per member and ``out/public.ctx``."""
    from hefl.net.ceremony import CeremonyMember
    from hefl.net.config import build_model, load_registry
    from hefl.net.identity import Identity
    from hefl.net.keys import committee_spec

    spec, names = committee_spec(agg, build_model(model).spec.size, privacy)
    signers = {c.name: c.sign_key for c in load_registry(fed.registry) if c.role == "keyholder"}
    members = [CeremonyMember(spec, "test", names, n, Identity.load(fed.identity(n)), signers,
                              out / n) for n in names]
    hellos = [m.start().to_bytes() for m in members]
    deals = [m.deal(hellos).to_bytes() for m in members]
    for m in members:
        public, share = m.finish(hellos, deals)
        (out / m.name / "share.key").write_bytes(share.to_bytes())
        (out / m.name / "share.key").chmod(0o600)
    (out / "public.ctx").write_bytes(public.to_bytes())


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("PYTHONFAULTHANDLER", "1")  # a crashing child prints its Python stacks to its log
    return e


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen:
    """``python -m hefl.cli ARGS`` with output to ``log``."""
    f = open(log, "ab")  # noqa: SIM115 - closed when the process is reaped by the caller
    return subprocess.Popen([sys.executable, "-m", "hefl.cli", *args], stdout=f,
                            stderr=subprocess.STDOUT, env=env(), cwd=str(ROOT))


def spawn_server(demo: Demo, tag: str = "") -> subprocess.Popen:
    return spawn(["server", "--config", str(demo.config)], demo.root / f"server{tag}.log")


def spawn_client(demo: Demo, name: str, *extra: str, tls: bool = True) -> subprocess.Popen:
    return spawn(["client", *demo.client_args(name, tls=tls), *extra],
                 demo.root / f"client-{name}.log")


def spawn_key_holder(demo: Demo, name: str, share: Path, *extra: str,
                     tls: bool = True) -> subprocess.Popen:
    """``hefl client --key-holder`` for registered key holder ``name`` (its own registry copy)."""
    args = ["client", "--server", demo.address, "--token-file", str(demo.fed.token(name)),
            "--key-holder", "--he-key", str(share), "--registry", str(demo.fed.registry),
            *(["--ca", str(demo.fed.ca)] if tls else ["--insecure"]), *extra]
    return spawn(args, demo.root / f"client-{name}.log")


def events(log: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The structured events in a log file (non-JSON lines skipped)."""
    import json

    out: list[dict[str, Any]] = []
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and "event" in e and (name is None or e["event"] == name):
            out.append(e)
    return out


def wait_event(log: Path, name: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
    """Block until ``log`` holds event ``name`` with the given field values."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events(log, name):
            if all(e.get(k) == v for k, v in match.items()):
                return e
        time.sleep(0.05)
    raise TimeoutError(f"no {name} {match} in {log} after {timeout} s")


def run_in_threads(
    demo: Demo, client_options: Mapping[str, Mapping[str, Any]] | None = None,
    timeout: float = 120.0, errors: list[BaseException] | None = None,
    coordinator_class: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Run the demo's server and clients as threads of this process over real gRPC + TLS.

    Returns (round records, final params, name -> FederationClient). The server's error, if its
    run raised, is raised here after cleanup, or appended to ``errors`` when given. The
    coordinator class can be replaced (attack tests over gRPC subclass it).
    """
    import threading

    from hefl.net.client import ClientSettings, FederationClient
    from hefl.net.config import load_config
    from hefl.net.logs import get_logger
    from hefl.net.server import FederationServer
    from hefl.net.wire import Token

    def logger(name: str):
        return get_logger(f"hefl.test.{demo.root.name}.{name}",
                          stream=open(demo.root / f"{name}.log", "a"))

    from hefl.net.coordinator import Coordinator

    srv = FederationServer(load_config(demo.config), log=logger("server"),
                           coordinator_class=coordinator_class or Coordinator)
    srv.start()
    failures: list[BaseException] = []

    def drive() -> None:
        try:
            srv.run()
        except Exception as e:  # noqa: BLE001 - handed to the caller below
            failures.append(e)

    runner = threading.Thread(target=drive, daemon=True)
    runner.start()
    opts = client_options or {}
    clients = {}
    for n in opts or demo.names:
        s = ClientSettings(server=demo.address, ca=demo.fed.ca,
                           token=Token.parse(demo.fed.token(n).read_text()),
                           backoff_s=(0.05, 0.5), give_up_s=timeout,
                           **{"data": demo.data.get(n),
                              **demo.party_options(n, opts.get(n, {}))})
        clients[n] = FederationClient(s, log=logger(n))
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients.values()]
    for t in threads:
        t.start()
    runner.join(timeout)
    for t in threads:
        t.join(timeout)
    params = srv.store.resume_point(srv.run_id)[1]
    records = srv.store.records(srv.run_id)
    srv.stop()
    if errors is not None:
        errors.extend(failures)
    elif failures:
        raise failures[0]
    return records, params, clients


@dataclass
class MemoryRun:
    """A run of the real coordinator and clients in this process over ``MemoryTransport``."""

    coordinator: Any
    clock: Any
    clients: dict[str, Any]
    threads: list[Any]
    runner: Any
    outcome: dict[str, Any]

    def wait(self, predicate: Callable[[Any], Any], timeout: float = 60.0) -> None:
        """Block until ``predicate(coordinator)`` holds (checked on each state change)."""
        c = self.coordinator
        with c.cond:
            if not c.cond.wait_for(lambda: predicate(c), timeout=timeout):
                raise TimeoutError("the coordinator never reached the awaited state")

    def advance(self, seconds: float) -> None:
        """Once the coordinator's thread waits on the clock, move the clock by ``seconds``."""
        self.clock.blocked(self.runner)
        self.clock.advance(seconds)

    def finish(self, timeout: float = 60.0) -> tuple[list[Any], Any]:
        """Join everything; returns (round records, final params). Re-raises the run's error."""
        self.runner.join(timeout)
        for t in self.threads:
            t.join(timeout)
        c = self.coordinator
        records = c.store.records(c.run_id)
        params = c.store.resume_point(c.run_id)[1]
        c.close()
        if "error" in self.outcome:
            raise self.outcome["error"]
        return records, params


def run_in_memory(
    demo: Demo,
    client_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    coordinator_class: Any = None,
    client_class: Any = None,
    clock: Any = None,
) -> MemoryRun:
    """Start the demo's coordinator and clients as threads of this process, talking through
    ``hefl.net.memory.MemoryTransport`` with a ``FakeClock`` (no sockets, no sleeps). The
    coordinator and client classes can be replaced (attack tests subclass them); ``client_class``
    may map names to classes, to make only some clients rogue."""
    import threading

    from hefl.net.client import ClientSettings, FederationClient
    from hefl.net.config import load_config
    from hefl.net.coordinator import Coordinator
    from hefl.net.logs import get_logger
    from hefl.net.memory import FakeClock, MemoryTransport
    from hefl.net.wire import Token

    def logger(name: str):
        return get_logger(f"hefl.mem.{demo.root.name}.{name}",
                          stream=open(demo.root / f"{name}.log", "a"))

    clock = clock or FakeClock()
    coord = (coordinator_class or Coordinator)(load_config(demo.config), log=logger("server"),
                                               clock=clock)
    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            outcome["history"] = coord.run()
        except Exception as e:  # noqa: BLE001 - handed to the test by finish()
            outcome["error"] = e

    runner = threading.Thread(target=drive, daemon=True)
    runner.start()
    opts = client_options if client_options is not None else {n: {} for n in demo.names}
    clients: dict[str, Any] = {}
    threads = []
    for n, o in opts.items():
        token = Token.parse(demo.fed.token(n).read_text())
        s = ClientSettings(server="memory", data=demo.data.get(n), token=token,
                           backoff_s=(0.001, 0.01), give_up_s=30, **demo.party_options(n, o))
        cls = (client_class.get(n, FederationClient) if isinstance(client_class, Mapping)
               else client_class or FederationClient)
        clients[n] = cls(s, log=logger(n), connect=functools.partial(MemoryTransport, coord, token))

        def serve(c=clients[n], name=n) -> None:
            try:
                c.summary_result = c.run()
            except Exception as e:  # noqa: BLE001 - inspected by the test
                c.error = e

        threads.append(threading.Thread(target=serve, daemon=True))
    for t in threads:
        t.start()
    return MemoryRun(coord, clock, clients, threads, runner, outcome)
