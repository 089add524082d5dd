"""The federation client: connects out to the server, trains on local data, sends updates.

    join (token) -> model spec, encoder, index -> subscribe -> for each FIT task:
        params, config -> ModelClient.fit -> client_answer (encoder.encode) -> dumps -> Submit

The same ``hefl.rounds.client_answer`` as the simulation: a fit that raises or an update that
cannot be encoded is reported (reason only) and the client stays in the federation. On any transport failure (server
restarting, network cut) the client reconnects with exponential backoff and jitter; it gives up
only after ``give_up_s`` seconds without reaching the server, or when the server refuses its
credentials (that needs an operator, not a retry).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from hefl.client import FitConfig, ModelClient
from hefl.errors import ConfigError, HeflError, Refused, TransportError
from hefl.net import wire
from hefl.net.config import build_aggregator, build_model, is_encrypted, load_registry
from hefl.net.data import load_client_data
from hefl.net.decrypt import DecodeLedger, VerifiedDecryptor, registry_signers
from hefl.net.identity import Identity, digest, statement
from hefl.net.keys import key_holder, load_key
from hefl.net.logs import event, get_logger
from hefl.net.privacy import client_clip
from hefl.net.proto import hefl_pb2 as pb
from hefl.privacy.roles import DpEncoder
from hefl.rounds import client_answer

FATAL = ("UNAUTHENTICATED", "PERMISSION_DENIED")
#: TLS failures that no retry mends: this client does not trust the server's certificate.
UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


@dataclass(frozen=True)
class ClientSettings:
    """How one client reaches its server.

    Attributes:
        server: ``HOST:PORT``.
        data: ``.npz`` with the client's ``x`` and ``y``, or a CSV of its raw rows.
        preprocessing: for a CSV, the federation's preprocessing file (``hefl split-data
            --csv`` writes it; or a public schema in the same format).
        token: ``NAME:SECRET`` from ``hefl certs`` (NAME is the client's registered name).
        ca: CA certificate to verify the server (TLS); ``insecure`` skips TLS (loopback only).
        cert, key: client certificate and key, when the server requires mTLS.
        server_name: TLS name to verify if it differs from HOST.
        give_up_s: stop after this long without reaching the server.
        backoff_s: (first, max) reconnect delay.
        fit_delay_s: sleep before each fit (simulates a slow device; for demos and tests).
        torch_threads: torch intra-op threads (W1 uses 1).
        workers: encrypted runs: processes (this one included) that encrypt this client's
            updates, or, as key holder, decrypt the sums (helpers started once, at the first
            update; they receive the key over a private pipe).
        he_key: encrypted aggregation: ``share.key`` (custody "clients", or the key holder) or
            ``public.ctx`` (custody "keyholder" data clients) from ``hefl keys``.
        key_holder: a key-holder process: no data, only decrypts verified sums (needs
            ``share.key`` and ``registry``). Data clients never decrypt, in any custody.
        min_clients: as key holder, refuse to decrypt sums of fewer contributions (local
            policy; the server cannot lower it).
        identity: Ed25519 identity key (``NAME.id`` from ``hefl certs``): a data client signs its
            encrypted updates with it (the CLI's default: ``NAME.id`` beside the token file).
        registry: as key holder, its own copy of the registry (``clients.toml``): whose
            signatures it accepts. Never taken from the server.
        state_dir: as key holder, where it remembers what it decrypted (default: ``decoded/``
            beside ``share.key``).
        share_metrics: in encrypted runs, also send the training loss in clear (off: the
            server learns no per-client metadata; the sample count is always encrypted).
    """

    server: str
    data: Path | None
    token: wire.Token
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    server_name: str | None = None
    give_up_s: float = 300.0
    backoff_s: tuple[float, float] = (0.2, 5.0)
    fit_delay_s: float = 0.0
    torch_threads: int = 1
    workers: int = 1
    he_key: Path | None = None
    key_holder: bool = False
    min_clients: int = 2
    identity: Path | None = None
    registry: Path | None = None
    state_dir: Path | None = None
    share_metrics: bool = False
    preprocessing: Path | None = None


@dataclass
class ClientSummary:
    run_id: str = ""
    rounds_trained: int = 0
    rounds_decoded: int = 0
    reconnects: int = 0
    refused: int = 0


def make_channel(s: ClientSettings) -> grpc.Channel:
    opts: list[tuple[str, Any]] = list(wire.GRPC_OPTIONS)
    if s.insecure:
        return grpc.insecure_channel(s.server, options=opts)
    try:
        ca = s.ca.read_bytes() if s.ca else None
        key = s.key.read_bytes() if s.key else None
        cert = s.cert.read_bytes() if s.cert else None
    except OSError as e:
        raise ConfigError(f"cannot read a TLS file: {e}; check --ca, --cert and --key") from e
    if s.server_name:
        opts.append(("grpc.ssl_target_name_override", s.server_name))
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(s.server, creds, options=opts)


class Transport(Protocol):
    """How a client reaches the coordinator: gRPC here, in-process in ``hefl.net.memory``.
    Refusals raise ``hefl.errors.Refused``; an unreachable server raises ``TransportError``."""

    def join(self, req: pb.JoinRequest) -> pb.JoinReply: ...

    def subscribe(self, req: pb.SubscribeRequest, limit: int
                  ) -> Iterator[tuple[pb.TaskHeader, bytes]]: ...

    def submit(self, header: pb.UpdateHeader, body: bytes) -> pb.SubmitReply: ...

    def close(self) -> None: ...


#: gRPC statuses that mean "the server is not there right now": reconnect. Any other status is
#: the server's answer (a refusal with a reason).
_UNREACHABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL",
                "ABORTED"}


def _rpc_error(e: grpc.RpcError) -> HeflError:
    code = e.code().name  # type: ignore[attr-defined]
    details = e.details() or ""  # type: ignore[attr-defined]
    if any(u in details for u in UNTRUSTED):
        return ConfigError(
            f"the server's TLS certificate is not trusted by this client ({code}: {details}); "
            "pass --ca with the CA certificate that signed it (ca.pem from `hefl certs`), and "
            "--server-name if the address is not a name in the certificate")
    if code in _UNREACHABLE:
        return TransportError(f"{code}: {details}")
    return Refused(code, details)


class GrpcTransport:
    """The client side of ``hefl.net.grpc_service`` over one channel (TLS unless insecure)."""

    def __init__(self, settings: ClientSettings) -> None:
        self.channel = make_channel(settings)
        self.md = settings.token.metadata()
        self._join = self.channel.unary_unary(
            wire.method("Join"), request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString)
        self._subscribe = self.channel.unary_stream(
            wire.method("Subscribe"), request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=pb.ServerFrame.FromString)
        self._submit = self.channel.stream_unary(
            wire.method("Submit"), request_serializer=pb.ClientFrame.SerializeToString,
            response_deserializer=pb.SubmitReply.FromString)

    def join(self, req: pb.JoinRequest) -> pb.JoinReply:
        try:
            return self._join(req, metadata=self.md, timeout=30)
        except grpc.RpcError as e:
            raise _rpc_error(e) from e

    def subscribe(self, req: pb.SubscribeRequest, limit: int
                  ) -> Iterator[tuple[pb.TaskHeader, bytes]]:
        stream = self._subscribe(req, metadata=self.md)
        try:
            yield from _tasks(stream, limit)
        except grpc.RpcError as e:
            raise _rpc_error(e) from e
        finally:
            stream.cancel()

    def submit(self, header: pb.UpdateHeader, body: bytes) -> pb.SubmitReply:
        try:
            return self._submit(wire.client_frames(header, body), metadata=self.md, timeout=600)
        except grpc.RpcError as e:
            raise _rpc_error(e) from e

    def close(self) -> None:
        self.channel.close()


def _tasks(stream: Iterator[pb.ServerFrame], limit: int) -> Iterator[tuple[pb.TaskHeader, bytes]]:
    """Reassemble (header, body) tasks from the frame stream; a declared body over ``limit``
    bytes is refused before any of it is read."""
    it = iter(stream)
    for frame in it:
        if frame.WhichOneof("frame") != "header":
            raise TransportError("server sent a chunk without a header")
        h = frame.header
        body = wire.read_body((f.chunk for f in _take(it, h.body_size)), h.body_size,
                              h.body_sha256, limit=limit)
        yield h, body


def _take(it: Iterator[pb.ServerFrame], size: int) -> Iterator[pb.ServerFrame]:
    got = 0
    while got < size:
        f = next(it, None)
        if f is None:
            return
        got += len(f.chunk)
        yield f


MTLS_HINT = ("if the server requires client certificates (mTLS, [tls] client_ca), pass --cert "
             "certs/clients/NAME.pem --key certs/clients/NAME.key")


def _check_files(s: ClientSettings) -> None:
    """Every file named on the command line exists, before any connection is tried: a typo
    must fail at once, not after ``give_up_s`` of reconnecting."""
    named = {"--data": s.data, "--preprocessing": s.preprocessing, "--he-key": s.he_key, "--registry": s.registry,
             "--identity": s.identity}
    if not s.insecure:
        named.update({"--ca": s.ca, "--cert": s.cert, "--key": s.key})
    for flag, path in named.items():
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {str(path)!r}: no such file")
    if not s.insecure and (s.cert is None) != (s.key is None):
        raise ConfigError("mTLS needs both --cert and --key (NAME.pem and NAME.key from "
                          "`hefl certs`)")


def encoding_seed(token: wire.Token, run_id: str, round_num: int) -> int:
    """A 128-bit seed for one round's encoding: HMAC-SHA256 keyed by the client's token secret
    (which the server never holds: it keeps only the token's SHA-256) over run id and round."""
    mac = hmac.new(token.secret.encode(), f"hefl-encode/{run_id}/{round_num}".encode(),
                   hashlib.sha256)
    return int.from_bytes(mac.digest()[:16], "little")


class FederationClient:
    """One client process's loop. ``run()`` returns when the server says the run is done.

    Args:
        settings: how to reach the server and what to train on.
        log: structured log (JSON lines).
        connect: makes a transport (default: ``GrpcTransport(settings)``); tests pass one that
            reaches a coordinator in this process (``hefl.net.memory``).
    """

    def __init__(self, settings: ClientSettings, log: logging.Logger | None = None,
                 connect: Callable[[], Transport] | None = None) -> None:
        self.s = settings
        self.name = settings.token.name
        self.log = log or get_logger(f"hefl.client.{self.name}")
        _check_files(settings)
        if settings.key_holder:
            if settings.he_key is None:
                raise ConfigError("a key holder needs --he-key share.key")
            if settings.registry is None:
                raise ConfigError(
                    "a key holder needs --registry clients.toml: its own copy of the registry, "
                    "to verify whose contributions it decrypts")
            self.data = None
        elif settings.data is None:
            raise ConfigError("pass --data PATH (the client's .npz, or its CSV with "
                              "--preprocessing)")
        else:
            self.data = load_client_data(settings.data, settings.preprocessing)
        self.key = load_key(settings.he_key) if settings.he_key is not None else None
        self.holder: Any = None  # a VerifiedDecryptor, only in a key-holder process
        self.identity: Identity | None = None
        self.connect: Callable[[], Transport] = connect or (lambda: GrpcTransport(settings))
        self.summary = ClientSummary()
        self._model_key: str | None = None
        self._rng = random.Random()
        self._trained: set[int] = set()
        self._decoded: set[int] = set()

    def run(self) -> ClientSummary:
        delay, cap = self.s.backoff_s
        self._last_ok = time.monotonic()
        while True:
            try:
                transport = self.connect()
                try:
                    if self._session(transport):
                        return self.summary
                finally:
                    transport.close()
                delay = self.s.backoff_s[0]
            except Refused as e:
                if e.code in FATAL:
                    raise TransportError(f"server refused this client: {e.reason}") from e
                event(self.log, "reconnecting", level=logging.WARNING, code=e.code,
                      details=e.reason, delay_s=round(delay, 2))
            except TransportError as e:
                event(self.log, "reconnecting", level=logging.WARNING, error=str(e),
                      **({"hint": MTLS_HINT} if self._no_cert(e) else {}))
            if time.monotonic() - self._last_ok > self.s.give_up_s:
                raise TransportError(
                    f"could not reach the server at {self.s.server} for {self.s.give_up_s:.0f} s"
                    + (f"; {MTLS_HINT}" if self.s.cert is None and self.s.ca is not None else "")
                )
            time.sleep(delay * (0.5 + self._rng.random()))
            delay = min(cap, delay * 2)
            self.summary.reconnects += 1

    def _no_cert(self, e: Exception) -> bool:
        """A TLS connection closed during the handshake, by a server that may require mTLS."""
        return self.s.cert is None and self.s.ca is not None and "Socket closed" in str(e)

    def _session(self, transport: Transport) -> bool:
        """Join, subscribe and serve tasks until the stream ends; True when the run is done."""
        join = transport.join(pb.JoinRequest(protocol_version=wire.PROTOCOL_VERSION))
        self._prepare(join)
        self._last_ok = time.monotonic()
        event(self.log, "joined", run_id=join.run_id, index=join.index, rounds=join.rounds)
        tasks = transport.subscribe(
            pb.SubscribeRequest(run_id=join.run_id, key_holder=self.holder is not None),
            limit=self._task_limit)
        with contextlib.closing(tasks):  # type: ignore[type-var]
            for header, body in tasks:
                self._last_ok = time.monotonic()
                if header.kind == pb.TASK_DONE:
                    event(self.log, "run_finished", run_id=join.run_id,
                          rounds_trained=self.summary.rounds_trained,
                          rounds_decoded=self.summary.rounds_decoded)
                    return True
                if header.kind == pb.TASK_FIT and self.data is not None:
                    self._fit(header, body, transport)
                elif header.kind == pb.TASK_DECODE and self.holder is not None:
                    self._decode(header, body, transport)
                elif header.kind == pb.TASK_DECODE:  # a server that asks a data client to decrypt
                    event(self.log, "decode_ignored", level=logging.WARNING, round=header.round,
                          reason="a data client never decrypts; only a registered key holder")
        return False

    def _prepare(self, join: pb.JoinReply) -> None:
        key = join.model_json + "|" + join.aggregation_json
        if key == self._model_key:
            return
        if join.model_json and json.loads(join.model_json).get("kind", "mlp") in ("mlp", "keras"):
            import torch

            torch.set_num_threads(self.s.torch_threads)
        self.model = build_model(json.loads(join.model_json))
        size = self.model.spec.size
        agg = json.loads(join.aggregation_json)
        announced = agg.pop("privacy", None)  # the server's DP plan: clip, mode
        if is_encrypted(agg):
            if self.key is None:  # local misconfiguration: stop now, do not retry
                raise ConfigError(
                    f"this federation aggregates encrypted ({agg.get('kind')}): pass --he-key "
                    "with the key file from `hefl keys`"
                )
            if self.s.key_holder:
                self.holder = self._decryptor(size)
            else:
                self.identity = self._identity()
        if self.data is not None:
            self.encoder = build_aggregator(agg, size, key=self.key, workers=self.s.workers)
            # DP: clip and weight 1; under encryption the clip is the key's, not the server's
            clip = client_clip(getattr(self.key, "spec", None) if is_encrypted(agg) else None,
                               announced)
            if clip is not None:
                self.encoder = DpEncoder(self.encoder, clip)
            self.client = ModelClient(self.model, self.data)
        # what this client accepts from the server: a model (data client), or every
        # contribution of a round (key holder: at most one per data client it accepts)
        senders = len(self.holder.signers) if self.holder is not None else 0
        self._task_limit = wire.body_cap(size, messages=senders + 1)
        self.summary.run_id = join.run_id
        self._model_key = key

    def _decryptor(self, size: int) -> VerifiedDecryptor:
        assert self.s.registry is not None and self.s.he_key is not None
        state = self.s.state_dir or Path(self.s.he_key).parent / "decoded"
        ledger = DecodeLedger(Path(state) / f"{self.name}.sqlite")
        signers = registry_signers(load_registry(Path(self.s.registry)))
        return VerifiedDecryptor(key_holder(self.key, size, self.s.min_clients, self.s.workers),
                                 signers, ledger)

    def _identity(self) -> Identity:
        path = self.s.identity
        if path is None:
            raise TransportError("encrypted runs sign every update: pass --identity NAME.id "
                                 "(from `hefl certs`)")
        return Identity.load(path)

    def _fit(self, h: pb.TaskHeader, body: bytes, transport: Transport) -> None:
        """Train, encode and answer; a fit that raises or an update that cannot be encoded is
        reported to the server (the reason only, never data) and the client stays."""
        params = wire.vector_from(body, self.model.spec.size)
        c = h.config
        config = FitConfig(round=c.round, lr=c.lr, epochs=c.epochs, batch_size=c.batch_size,
                           prox_mu=c.prox_mu, seed=c.seed)
        if self.s.fit_delay_s:
            time.sleep(self.s.fit_delay_s)
        try:
            outcome: object = self.client.fit(params, config)
        except Exception as e:  # noqa: BLE001 - reported to the server; the client stays
            outcome = e
        # the encoding's randomness (BFV stochastic rounding) comes from the run, the round and
        # this client's own secret: a rerun reproduces the model, the server cannot predict it
        self.encoder.reseed(encoding_seed(self.s.token, h.run_id, h.round))
        if isinstance(self.encoder, DpEncoder):  # distributed DP: the announced count
            self.encoder.begin_round(c.dp_count)
        answer = client_answer(self.encoder, self.name, params, outcome)
        clip = getattr(self.encoder, "last_clip", None)
        if clip is not None and clip.changed:  # never silent: how much of the update was cut
            event(self.log, "clipped", level=logging.WARNING, round=h.round,
                  clipped=clip.clipped, of=clip.of, norm=clip.norm, scaled=clip.scaled)
        out = self.encoder.dumps(answer.payload) if answer.payload is not None else b""
        header = pb.UpdateHeader(run_id=h.run_id, round=h.round, task_id=h.task_id,
                                 kind=pb.TASK_FIT, num_examples=answer.num_examples,
                                 metrics={k: float(v) for k, v in answer.metrics.items()},
                                 error=answer.error or "")
        if self.identity is not None:  # encrypted: the count travels only inside the ciphertext
            header.num_examples = 1 if out else 0
            if not self.s.share_metrics:
                header.ClearField("metrics")
            if out:
                header.signature = self.identity.sign(
                    statement(h.run_id, h.round, h.task_id, digest(body), digest(out)))
        if answer.error:
            event(self.log, "fit_failed", level=logging.WARNING, round=h.round,
                  reason=answer.error)
        try:
            reply = transport.submit(header, out)
        except Refused as e:
            if e.code in FATAL:
                raise
            self.summary.refused += 1
            event(self.log, "update_refused", level=logging.WARNING, round=h.round,
                  code=e.code, details=e.reason)
            return
        if reply.accepted:
            self._trained.add(h.round)  # a retried round counts once
            self.summary.rounds_trained = len(self._trained)
        event(self.log, "update_sent", round=h.round, bytes=len(out), message=reply.message)

    def _decode(self, h: pb.TaskHeader, body: bytes, transport: Transport) -> None:
        """Key holder: decrypt the sum (if it holds enough contributions), send mean + weight;
        a threshold member sends its partial decryption for the decrypting set instead."""
        header = pb.UpdateHeader(run_id=h.run_id, round=h.round, task_id=h.task_id,
                                 kind=pb.TASK_DECODE)
        out = b""
        try:
            if self.holder.threshold:  # a committee member: its partial for the set asked
                out = self.holder.partial(h.run_id, h.round, body, tuple(h.members))
            else:
                mean, weight = self.holder.decode(h.run_id, h.round, body)
                out = wire.vector_bytes(mean)
                header.metrics["total_weight"] = float(weight)
        except HeflError as e:
            header.error = str(e)
        if header.error:
            event(self.log, "decode_refused", level=logging.WARNING, round=h.round,
                  reason=header.error)
        transport.submit(header, out)
        if not header.error:
            self._decoded.add(h.round)
            self.summary.rounds_decoded = len(self._decoded)
        event(self.log, "decoded", round=h.round, refused=bool(header.error),
              reason=header.error or None)
