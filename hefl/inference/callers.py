"""Who may score, and how much: the scoring service's callers and their query budgets.

Model extraction is a query-count attack (Tramèr et al., "Stealing Machine Learning Models via
Prediction APIs", USENIX Security 2016): a logistic regression over ``d`` features falls to
``d + 1`` chosen queries, and an encrypted query with chosen plaintexts is still a query. So
every caller is named and authenticated, and every record it has scored is counted against its
budget, in a ledger that survives restarts.

The callers file is the registry ``hefl certs`` writes (``clients.toml``), with optional
budgets per caller (the server's ``--records-per-day`` / ``--requests-per-minute`` apply to
callers without their own)::

    [[client]]
    name = "bank-a"
    token_sha256 = "..."          # SHA-256 of the caller's token NAME:SECRET, never the token
    revoked = false
    records_per_day = 100000      # optional
    requests_per_minute = 60      # optional

The file is re-read when it changes, so a revocation or a new token takes effect at the next
request, without a restart. Tokens are compared by their SHA-256 in constant time
(``hmac.compare_digest``).

Example:
    >>> b = Budget(records_per_day=10, requests_per_minute=2)
    >>> q = Quotas(b, clock=lambda: 120.0)
    >>> q.charge_request("bank-a"); q.charge_request("bank-a")
    >>> try:
    ...     q.charge_request("bank-a")
    ... except QuotaExceeded as e:
    ...     print(e.code, e.retry_after_s)
    RESOURCE_EXHAUSTED 60
"""

from __future__ import annotations

import hmac
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hefl.errors import ConfigError, QuotaExceeded, Refused, TransportError
from hefl.net.files import file_stamp

MINUTE, DAY = 60, 86400
#: Federation fields a ``hefl certs`` registry also carries; a scoring service ignores them.
FEDERATION_KEYS = ("role", "sign_key")


@dataclass(frozen=True)
class Budget:
    """Default query budget of a caller that sets none of its own."""

    records_per_day: int = 1_000_000
    requests_per_minute: int = 120

    def __post_init__(self) -> None:
        for k in ("records_per_day", "requests_per_minute"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class Caller:
    """One registered caller: its name, its token's SHA-256, and its own budget if any."""

    name: str
    token_sha256: str
    revoked: bool = False
    records_per_day: int | None = None
    requests_per_minute: int | None = None

    def __post_init__(self) -> None:
        if len(self.token_sha256) != 64:
            raise ConfigError(f"caller {self.name!r}: token_sha256 must be 64 hex digits")
        for k in ("records_per_day", "requests_per_minute"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"caller {self.name!r}: {k} must be an integer >= 1, "
                                  f"got {v!r}")

    def budget(self, default: Budget) -> Budget:
        return Budget(self.records_per_day or default.records_per_day,
                      self.requests_per_minute or default.requests_per_minute)


def load_callers(path: str | Path) -> dict[str, Caller]:
    """Read a callers file (a ``hefl certs`` registry, budgets optional).

    Raises:
        ConfigError: missing, not TOML, a malformed or unknown key, a name listed twice.
    """
    from hefl.net.config import read_toml

    p = Path(path)
    doc = read_toml(p, "callers file", "; `hefl certs --out certs --clients NAME` writes one "
                    "(certs/clients.toml)")
    out: dict[str, Caller] = {}
    for entry in doc.get("client", []):
        values = {k: v for k, v in dict(entry).items() if k not in FEDERATION_KEYS}
        try:
            caller = Caller(**values)
        except TypeError as e:
            raise ConfigError(f"bad [[client]] entry in {str(p)!r}: {e}; keys are name, "
                              "token_sha256, revoked, records_per_day, requests_per_minute") from e
        if caller.name in out:
            raise ConfigError(f"caller {caller.name!r} is listed twice in {str(p)!r}")
        out[caller.name] = caller
    if not out:
        raise ConfigError(f"callers file {str(p)!r} lists no [[client]]; add one with "
                          "`hefl certs --add --out DIR --clients NAME`")
    return out


class Callers:
    """Authenticates requests against a callers file, re-read when it changes.

    Args:
        path: the callers file.
        require_cert: with mTLS, the caller's client certificate must name it (common name).
    """

    def __init__(self, path: str | Path, require_cert: bool = False) -> None:
        self.path = Path(path)
        self.require_cert = require_cert
        self._lock = threading.Lock()
        self._stamp = file_stamp(self.path)
        self.callers = load_callers(self.path)

    def refresh(self) -> None:
        """Re-read the file if its size or mtime changed; a broken file keeps the old list."""
        stamp = file_stamp(self.path)
        if stamp is None or stamp == self._stamp:  # gone (mid-rename?) or unchanged
            return
        try:
            callers = load_callers(self.path)
        except ConfigError:
            return  # half-written: keep what we have, the next request tries again
        with self._lock:
            self.callers, self._stamp = callers, stamp

    def authenticate(self, authorization: str | None,
                     cert_names: Sequence[str] = ()) -> Caller:
        """The caller behind an ``Authorization: Bearer NAME:SECRET`` header.

        Raises:
            Refused: ``UNAUTHENTICATED`` (no header, malformed, unknown name or wrong token),
                ``PERMISSION_DENIED`` (revoked, or a client certificate of someone else).
        """
        from hefl.net.wire import Token

        self.refresh()
        if not authorization or not authorization.startswith("Bearer "):
            raise Refused("UNAUTHENTICATED", "no credentials: send the header 'Authorization: "
                          "Bearer NAME:SECRET' (hefl infer score --token-file FILE)")
        try:
            token = Token.parse(authorization[len("Bearer "):])
        except TransportError as e:
            raise Refused("UNAUTHENTICATED", str(e)) from e
        caller = self.callers.get(token.name)
        # compare even for an unknown name, so timing does not tell which names exist
        expected = caller.token_sha256 if caller is not None else "0" * 64
        if not hmac.compare_digest(expected, token.sha256) or caller is None:
            raise Refused("UNAUTHENTICATED", f"unknown caller {token.name!r} or wrong token; "
                          "ask the model owner for a token")
        if caller.revoked:
            raise Refused("PERMISSION_DENIED", f"caller {caller.name!r} is revoked")
        if self.require_cert and caller.name not in cert_names:
            raise Refused("PERMISSION_DENIED", f"client certificate {list(cert_names)} does "
                          f"not belong to {caller.name!r}; use the certificate issued to it")
        return caller


@dataclass
class _Usage:
    minute: int = -1
    requests: int = 0
    day: int = -1
    records: int = 0


@dataclass
class Quotas:
    """Requests per minute and records per UTC day, per caller (fixed windows).

    Args:
        default: the budget of callers that set none.
        ledger: JSON-lines file (mode 0600): one line per charged batch and per refusal. Today's
            records are counted from it at start, so a restart does not reset a budget.
        clock: seconds since the epoch (tests move it).
    """

    default: Budget = field(default_factory=Budget)
    ledger: Path | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        if self.ledger is not None:
            from hefl.net.files import private_file

            self.ledger = private_file(self.ledger)
            self._replay(self.ledger)

    def _replay(self, path: Path) -> None:
        today = int(self.clock() // DAY)
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                if rec.get("event") == "score" and int(rec["t"] // DAY) == today:
                    u = self._usage.setdefault(str(rec["caller"]), _Usage(day=today))
                    u.records += int(rec["records"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash

    def budget(self, caller: str | Caller) -> Budget:
        """The caller's own budget where its entry sets one, else the default."""
        return caller.budget(self.default) if isinstance(caller, Caller) else self.default

    def _log(self, **rec: Any) -> None:
        if self.ledger is None:
            return
        line = json.dumps({"t": round(self.clock(), 3), **rec}) + "\n"
        fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _usage_now(self, name: str, now: float) -> _Usage:
        u = self._usage.setdefault(name, _Usage())
        minute, day = int(now // MINUTE), int(now // DAY)
        if u.minute != minute:
            u.minute, u.requests = minute, 0
        if u.day != day:
            u.day, u.records = day, 0
        return u

    def charge_request(self, caller: str | Caller) -> None:
        """Count one request; past the caller's requests per minute, ``QuotaExceeded``."""
        name = caller.name if isinstance(caller, Caller) else caller
        limit = self.budget(caller).requests_per_minute
        with self._lock:
            now = self.clock()
            u = self._usage_now(name, now)
            if u.requests >= limit:
                wait = math.ceil((u.minute + 1) * MINUTE - now)
                self._log(event="quota_exceeded", caller=name, limit="requests_per_minute",
                          allowed=limit)
                raise QuotaExceeded(
                    f"caller {name!r} made {limit} requests this minute, its limit "
                    f"(requests_per_minute); retry after {wait} s or ask the model owner for "
                    "a larger budget", retry_after_s=wait)
            u.requests += 1

    def charge_records(self, caller: str | Caller, records: int) -> None:
        """Count ``records`` scored records; past the caller's records per day,
        ``QuotaExceeded`` and nothing is charged."""
        name = caller.name if isinstance(caller, Caller) else caller
        limit = self.budget(caller).records_per_day
        with self._lock:
            now = self.clock()
            u = self._usage_now(name, now)
            if u.records + records > limit:
                wait = math.ceil((u.day + 1) * DAY - now)
                self._log(event="quota_exceeded", caller=name, limit="records_per_day",
                          allowed=limit, used=u.records, asked=records)
                raise QuotaExceeded(
                    f"caller {name!r} has scored {u.records} of its {limit} records today "
                    f"(records_per_day) and this batch counts {records}; retry after {wait} s "
                    "(UTC midnight) or ask the model owner for a larger budget",
                    retry_after_s=wait)
            u.records += records
            self._log(event="score", caller=name, records=records)

    def used(self, caller: str) -> tuple[int, int]:
        """(requests this minute, records today) of ``caller``."""
        with self._lock:
            u = self._usage_now(caller, self.clock())
            return u.requests, u.records
