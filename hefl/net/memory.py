"""The coordinator and real clients in one process, with no sockets and no sleeps: an
in-memory transport and a clock that tests move by hand (in the spirit of httpx's
``MockTransport``). Protocol tests and attack tests run the real ``Coordinator`` and real
``FederationClient`` objects through it; a malicious coordinator is a subclass.

    clock = FakeClock()
    coord = Coordinator(load_config("run.toml"), clock=clock)
    client = FederationClient(settings, connect=lambda: MemoryTransport(coord, token))

Every message still goes through its protobuf encoding, so what crosses here is what would cross
the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hefl.errors import Refused
from hefl.net import wire
from hefl.net.coordinator import Coordinator
from hefl.net.proto import hefl_pb2 as pb


def _copy(msg: Any) -> Any:
    """The message as the other side would parse it."""
    return type(msg).FromString(msg.SerializeToString())


class MemoryTransport:
    """A client's transport that calls ``coordinator`` directly, authenticated by ``token``."""

    def __init__(self, coordinator: Coordinator, token: wire.Token,
                 cert_names: Sequence[str] | None = None) -> None:
        self.c = coordinator
        self.token = token
        self.cert_names = list(cert_names) if cert_names is not None else None
        self.closed = False

    def _name(self) -> str:
        if self.closed:
            raise Refused("UNAVAILABLE", "transport closed")
        return self.c.authenticate(self.token, self.cert_names, peer="memory")

    def join(self, req: pb.JoinRequest) -> pb.JoinReply:
        return _copy(self.c.join(self._name(), _copy(req), peer="memory"))

    def subscribe(self, req: pb.SubscribeRequest, limit: int
                  ) -> Iterator[tuple[pb.TaskHeader, bytes]]:
        sess = self.c.subscribe(self._name(), _copy(req))
        try:
            while not self.closed:
                item = self.c.next_task(sess)
                if item is None:
                    return
                header, body = item
                wire.check_size(len(body), limit)  # what the gRPC client refuses before reading
                yield _copy(header), bytes(body)
                if header.kind == pb.TASK_DONE:
                    return
        finally:
            self.c.disconnect(sess, "stream closed")

    def submit(self, header: pb.UpdateHeader, body: bytes) -> pb.SubmitReply:
        name = self._name()
        h = _copy(header)
        h.body_size = len(body)
        h.body_sha256 = wire.digest(body)
        return _copy(self.c.submit(name, h, wire.chunks(body)))

    def close(self) -> None:
        self.closed = True


class FakeClock:
    """A clock that moves only when told: ``advance(s)`` wakes every waiter whose deadline
    passed. Waits that are not over block until the state they wait for changes (every state
    change of the coordinator notifies its condition) or the clock moves. ``blocked(thread)``
    lets a test wait until a thread is inside a wait, so that it advances time against the wait
    it means (a deadline is taken when a wait starts)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._conds: set[threading.Condition] = set()
        self._changed = threading.Condition()
        self._deadlines: dict[int, float] = {}  # thread ident -> deadline of its current wait

    def now(self) -> float:
        return self.t

    def wait(self, cond: threading.Condition, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = self.t + max(0.0, timeout)
        value: Any = None

        def over() -> bool:
            nonlocal value
            value = predicate()  # evaluated once per wake-up: it may consume what it finds
            return bool(value) or self.t >= deadline

        me = threading.get_ident()
        with self._changed:
            self._conds.add(cond)
            self._deadlines[me] = deadline
            self._changed.notify_all()
        try:
            cond.wait_for(over)
        finally:
            with self._changed:
                self._deadlines.pop(me, None)
        return value

    def blocked(self, thread: threading.Thread, timeout: float = 30.0) -> float:
        """Wait until ``thread`` is waiting on this clock; returns its deadline."""
        with self._changed:
            if not self._changed.wait_for(lambda: thread.ident in self._deadlines, timeout):
                raise TimeoutError(f"{thread.name} never waited on the clock")
            return self._deadlines[thread.ident]  # type: ignore[index]

    def advance(self, seconds: float) -> None:
        self.t += seconds
        with self._changed:
            conds = list(self._conds)
        for c in conds:
            with c:
                c.notify_all()
