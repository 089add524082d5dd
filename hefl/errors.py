"""One exception tree for hefl.

    HeflError                      base of everything hefl raises on purpose
    ├── ConfigError                a setting is invalid (unknown algorithm, bad rate, ...)
    │   └── StateInUse             another server holds the state directory's lock
    ├── DataError                  a data set cannot be found, read or split
    ├── ParamsError                parameters do not match the model's ParamSpec
    ├── ClientError                one client's contribution was refused (carries id and stage)
    │   └── UpdateRejected         its update failed validation (NaN/Inf, wrong size, ...)
    ├── RoundError                 a round could not complete (e.g. no participating clients)
    │   ├── RetryRound             this attempt cannot finish (no key holder): retry the round
    │   └── NothingTrained         every round of a run was skipped (carries the history)
    ├── CryptoError                encryption, decryption or key handling failed
    │   ├── ContextMismatch        a ciphertext was made under another context or key
    │   └── KeyCustodyError        an operation needs a key this party must not hold
    │       └── DecodeRefused      a key holder refused to decrypt (unverified, repeated, too few)
    └── TransportError             a message could not be sent, received or parsed
        └── Refused                the other side refused the request (a status code and why)
            └── QuotaExceeded      a caller's query budget is spent until the next window

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations

import functools
from typing import Any


class HeflError(Exception):
    """Base class of every error hefl raises on purpose."""


class ConfigError(HeflError, ValueError):
    """A setting is invalid."""


class StateInUse(ConfigError):
    """Another process holds the state directory's lock (``hefl.net.store.StateLock``).

    Attributes:
        state_dir: the directory concerned.
        address: the holder's recorded address, or None if it recorded none.
        pid: the holder's recorded process id, or None.
    """

    def __init__(
        self, message: str, *, state_dir: str = "", address: str | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(message)
        self.state_dir = state_dir
        self.address = address
        self.pid = pid


class DataError(HeflError):
    """A data set cannot be found, read or split."""


class ParamsError(HeflError, ValueError):
    """Parameters do not match the expected ParamSpec."""


class ClientError(HeflError):
    """One client's contribution was refused.

    Attributes:
        client_id: the client concerned.
        stage: the round stage where it failed ("fit", "encode", "aggregate", ...).
    """

    def __init__(self, message: str, *, client_id: object = None, stage: str = "") -> None:
        prefix = f"client {client_id!r}" if client_id is not None else "client"
        if stage:
            prefix += f" at stage {stage!r}"
        super().__init__(f"{prefix}: {message}")
        self.client_id = client_id
        self.stage = stage
        self.reason = message

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled with its fields (it crosses from a helper process: ``hefl.crypto.workers``)."""
        return functools.partial(type(self), client_id=self.client_id, stage=self.stage), (
            self.reason,)


class UpdateRejected(ClientError):
    """A client's update failed validation and was left out of the aggregate."""


class RoundError(HeflError):
    """A round could not complete."""


class RetryRound(RoundError):
    """This attempt at a round cannot finish (e.g. no key holder answered); retry it."""


class NothingTrained(RoundError):
    """Every round of a run was skipped: nothing was trained.

    Attributes:
        result: what the run produced (its history says why each round was skipped).
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class CryptoError(HeflError):
    """Encryption, decryption or key handling failed."""


class ContextMismatch(CryptoError):
    """A ciphertext was made under another context, key or parameter set."""


class KeyCustodyError(CryptoError):
    """An operation needs a key that this party must not hold."""


class FloodBudgetSpent(KeyCustodyError):
    """A CKKS key answered all the decryptions its noise flooding is sized for
    (``HeSpec.flood_queries``); a new key set is needed."""


class MemberUnavailable(KeyCustodyError):
    """A threshold key holder did not answer (down, unreachable, timed out); the committee
    decrypts without it while ``threshold`` members answer."""


class DecodeRefused(KeyCustodyError):
    """A key holder refused a decode request: a signature that does not verify, fewer than
    ``min_clients`` distinct registered signers, a second decryption of a round, a replayed model.
    The key holder logs the reason; the server records the round as skipped."""


class TransportError(HeflError):
    """A message could not be sent, received or parsed."""


class Refused(TransportError):
    """The other side refused a request.

    Attributes:
        code: the status, by gRPC's names (``"PERMISSION_DENIED"``, ``"INVALID_ARGUMENT"``, ...),
            whatever the transport.
        reason: why, for the person reading the log.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class QuotaExceeded(Refused):
    """A caller's query budget is spent (requests per minute, records per day) until the next
    window (``hefl.inference.callers``).

    Attributes:
        retry_after_s: seconds until the window that refused the request ends.
    """

    def __init__(self, reason: str, retry_after_s: int = 0) -> None:
        super().__init__("RESOURCE_EXHAUSTED", reason)
        self.retry_after_s = retry_after_s
