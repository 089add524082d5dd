"""Server configuration from TOML (``run.toml``), as frozen dataclasses.

Example ``run.toml`` (paths are relative to the file):

    [run]
    name = "demo"
    rounds = 5
    clients_per_round = 3
    seed = 0
    state_dir = "state"

    [algorithm]            # any builder in hefl.algorithms and its keyword arguments
    name = "fedavg"
    client_lr = 0.05

    [model]                # "mlp" (torch, W1 by default), "logreg" (numpy) or "keras"
    kind = "mlp"           # (kind = "keras" with path = "model.keras": a Keras 3 model file,
    hidden = 128           #  hefl.models.keras.load_keras; optional dtype = "float64")

    [server]
    address = "0.0.0.0:50051"
    min_clients = 2        # fewer results than this and the round is retried
    wait_fraction = 1.0    # close the round once this fraction of participants answered
    round_timeout_s = 120  # then close it anyway (stragglers dropped)
    test_data = "test.npz" # optional: evaluate the global model each round (or a CSV,
                           # with preprocessing = "preprocessing.json" from split-data --csv)

    [tls]
    cert = "certs/server.pem"
    key = "certs/server.key"
    # client_ca = "certs/ca.pem"   # also require client certificates (mTLS)
    # insecure = true              # plaintext gRPC (loopback benchmarks only)

    [clients]
    registry = "certs/clients.toml"   # written by `hefl certs`

    [aggregation]
    kind = "plain"

    [privacy]              # optional: client-level DP (hefl.net.privacy)
    epsilon = 8.0
    delta = 1e-5
    clip = 1.0
    mode = "central"
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hefl.errors import ConfigError
from hefl.net.wire import NAME_RE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError as e:
        raise ImportError("Python 3.10 needs `pip install tomli` to read TOML configs") from e


@dataclass(frozen=True)
class ClientEntry:
    """One registered client: its name and the SHA-256 of its token (never the token)."""

    name: str
    token_sha256: str
    revoked: bool = False
    role: str = "client"  # "client" (trains) or "keyholder" (decrypts sums, never sampled)
    sign_key: str = ""  # public Ed25519 identity key (hex): verifies the client's signatures

    def __post_init__(self) -> None:
        if self.role not in ("client", "keyholder"):
            raise ConfigError(f"client {self.name!r}: role must be 'client' or 'keyholder'")
        if self.sign_key:
            from hefl.net.identity import public_key

            public_key(self.sign_key)


@dataclass(frozen=True)
class ServerSettings:
    address: str = "0.0.0.0:50051"
    min_clients: int = 1
    wait_fraction: float = 1.0
    round_timeout_s: float = 120.0
    start_timeout_s: float = 60.0
    join_timeout_s: float = 5.0
    max_attempts: int = 0
    retry_delay_s: float = 1.0
    max_update_mb: float | None = None  # None: wire.body_cap(model size), what the model needs
    heartbeat_s: float = 5.0
    first_frame_timeout_s: float = 30.0  # a Submit must send its header within this
    streams_per_client: int = 2  # open Submit (and Subscribe) streams per identity
    linger_s: float = 60.0  # after the run: keep telling late clients "finished", then exit
    test_data: Path | None = None
    preprocessing: Path | None = None  # a CSV test_data's preprocessing.json


@dataclass(frozen=True)
class TLSSettings:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Everything ``hefl server`` needs. ``run_id`` depends only on what changes the result
    (run name, clients_per_round, seed, algorithm, model, aggregation, client names), so a
    restart with the same file resumes the same run while server settings (timeouts,
    revocations) may change. ``rounds`` is left out too: it only says where the run stops, so
    raising it continues the run (``Store.open_run`` reports "extended")."""

    name: str
    rounds: int
    clients_per_round: int
    seed: int
    state_dir: Path
    algorithm: Mapping[str, Any]
    model: Mapping[str, Any]
    aggregation: Mapping[str, Any]
    clients: tuple[ClientEntry, ...]
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    privacy: Mapping[str, Any] = field(default_factory=dict)  # [privacy]: hefl.dp(...) keys
    registry: Path | None = None  # [clients] registry: re-read for revocations while running

    @property
    def run_id(self) -> str:
        ident = {
            "name": self.name,
            "clients_per_round": self.clients_per_round,
            "seed": self.seed,
            "algorithm": dict(self.algorithm),
            "model": dict(self.model),
            "aggregation": {k: v for k, v in self.aggregation.items() if k != "public"},
            "clients": [c.name for c in self.clients if c.role == "client"],
        }
        if self.privacy:  # runs without DP keep the ids they had before [privacy] existed
            ident["privacy"] = dict(self.privacy)
        h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}-{h}"

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able data (token hashes left out)."""
        d = asdict(self)
        d["clients"] = [{"name": c.name, "revoked": c.revoked, "role": c.role}
                        for c in self.clients]
        return json.loads(json.dumps(d, default=str))


RUN_KEYS = frozenset({"name", "rounds", "clients_per_round", "seed", "state_dir"})


def _section(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    v = doc.get(name, {})
    if not isinstance(v, dict):
        raise ConfigError(f"[{name}] must be a table")
    return dict(v)


def _path(base: Path, value: Any) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in [{where}]; known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"bad [{where}] section: {e}") from e


def read_toml(path: Path, what: str, missing_hint: str = "") -> dict[str, Any]:
    """Parse a TOML file; ``ConfigError`` naming ``what`` when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {str(path)!r} not found{missing_hint}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {e}") from e


def load_registry(path: Path) -> tuple[ClientEntry, ...]:
    """Read a client registry TOML (``[[client]] name, token_sha256, revoked``)."""
    doc = read_toml(path, "client registry", "; run `hefl certs`")
    return tuple(_build(ClientEntry, dict(c), "client") for c in doc.get("client", []))


def load_config(path: str | Path) -> RunConfig:
    """Parse and validate ``run.toml``.

    Raises:
        ConfigError: missing file, invalid TOML, unknown keys, or inconsistent settings.
    """
    p = Path(path).expanduser().resolve()
    doc = read_toml(p, "config file")
    base = p.parent
    run = _section(doc, "run")
    unknown = set(run) - RUN_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [run] of {str(p)!r}; known: "
                          f"{', '.join(sorted(RUN_KEYS))}")
    server = _section(doc, "server")
    server["test_data"] = _path(base, server.get("test_data"))
    server["preprocessing"] = _path(base, server.get("preprocessing"))
    tls = _section(doc, "tls")
    for k in ("cert", "key", "client_ca"):
        tls[k] = _path(base, tls.get(k))
    clients_sec = _section(doc, "clients")
    entries: list[ClientEntry] = []
    registry = _path(base, clients_sec.get("registry"))
    if registry is not None:
        entries += load_registry(registry)
    entries += [_build(ClientEntry, dict(c), "clients.client")
                for c in clients_sec.get("client", [])]
    algorithm = _section(doc, "algorithm") or {"name": "fedavg"}
    aggregation = _section(doc, "aggregation") or {"kind": "plain"}
    if aggregation.get("public"):
        aggregation["public"] = str(_path(base, aggregation["public"]))
    try:
        cfg = RunConfig(
            name=str(run.get("name", "run")),
            rounds=int(run.get("rounds", 1)),
            clients_per_round=int(run.get("clients_per_round", len(entries) or 1)),
            seed=int(run.get("seed", 0)),
            state_dir=_path(base, run.get("state_dir", "state")),  # type: ignore[arg-type]
            algorithm=algorithm,
            model=_section(doc, "model") or {"kind": "mlp"},
            aggregation=aggregation,
            clients=tuple(entries),
            server=_build(ServerSettings, server, "server"),
            tls=_build(TLSSettings, tls, "tls"),
            privacy=_section(doc, "privacy"),
            registry=registry,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value in [run] of {str(p)!r}: {e}") from e
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    names = [c.name for c in cfg.clients]
    if not any(c.role == "client" for c in cfg.clients):
        raise ConfigError("no clients registered; add [clients] registry = ... (see `hefl certs`)")
    if len(set(names)) != len(names):
        raise ConfigError("client names in the registry must be unique")
    for n in names:
        if not NAME_RE.match(n):
            raise ConfigError(f"client name {n!r} must be 1-64 letters, digits, '-' or '_'")
    if not NAME_RE.match(cfg.name):
        raise ConfigError(f"run name {cfg.name!r} must be letters, digits, '-' or '_'")
    if cfg.rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {cfg.rounds}")
    s = cfg.server
    if s.min_clients < 1:
        raise ConfigError(f"min_clients must be >= 1, got {s.min_clients}")
    _check_min_clients(cfg)
    if not 0 < s.wait_fraction <= 1:
        raise ConfigError(f"wait_fraction must be in (0, 1], got {s.wait_fraction}")
    if s.linger_s < 0:
        raise ConfigError(f"linger_s must be >= 0 seconds, got {s.linger_s}")
    if min(s.round_timeout_s, s.start_timeout_s, s.join_timeout_s, s.heartbeat_s,
           s.first_frame_timeout_s) <= 0:
        raise ConfigError("timeouts must be positive numbers of seconds")
    if s.max_update_mb is not None and not s.max_update_mb > 0:
        raise ConfigError(f"max_update_mb must be a positive number of MiB (or left out: sized "
                          f"to the model), got {s.max_update_mb}")
    if s.streams_per_client < 1:
        raise ConfigError(f"streams_per_client must be >= 1, got {s.streams_per_client}")
    if not cfg.tls.insecure and (cfg.tls.cert is None or cfg.tls.key is None):
        raise ConfigError(
            "TLS is on by default: set [tls] cert and key (`hefl certs` makes them), "
            "or insecure = true for a loopback test"
        )
    from hefl.net.privacy import dp_config

    dp_config(cfg.privacy)
    if "name" not in cfg.algorithm:
        raise ConfigError("[algorithm] needs a name, e.g. name = \"fedavg\"")


def _check_min_clients(cfg: RunConfig) -> None:
    """Every round must be able to reach min_clients answers, or it is retried forever.

    Revoked clients are still sampled (the draw depends only on the registered names, seed and
    round, so revoking one does not change who else is chosen) but never connect, so only the
    non-revoked ones sampled for a round can answer.
    """
    m = cfg.server.min_clients
    trainers = [c for c in cfg.clients if c.role == "client"]
    per_round = min(cfg.clients_per_round, len(trainers))
    if m > per_round:
        raise ConfigError(
            f"min_clients={m} can never be met: only {per_round} clients take part in a round;"
            " lower min_clients or raise clients_per_round"
        )
    revoked = {c.name for c in trainers if c.revoked}
    active = len(trainers) - len(revoked)
    if not active:
        raise ConfigError(
            f"all {len(trainers)} clients are revoked, so no round can ever run; set "
            "revoked = false for some in the registry or register new clients (a new run)"
        )
    if m > active:
        raise ConfigError(
            f"min_clients={m} can never be met: {len(revoked)} of the {len(trainers)} clients "
            f"{_is(len(revoked))} revoked ({', '.join(sorted(revoked))}), leaving {active}; "
            f"lower min_clients to {active} or less, or set revoked = false for some in the "
            "registry"
        )
    if m <= per_round - len(revoked) or cfg.privacy:
        return  # even a round that samples every revoked client has enough (or DP's Poisson
        # sampling, which no seed predicts: a short draw is retried)
    from hefl.rounds import sample_clients

    names = [c.name for c in trainers]
    short: list[tuple[int, list[str]]] = []  # (round, revoked clients it samples)
    worst = per_round
    for r in range(1, cfg.rounds + 1):
        chosen = [names[i] for i in sample_clients(len(names), cfg.clients_per_round,
                                                   cfg.seed, r)]
        out = sorted(revoked.intersection(chosen))
        worst = min(worst, len(chosen) - len(out))
        if len(chosen) - len(out) < m:
            short.append((r, out))
    if short:
        r, out = short[0]
        others = f" and {len(short) - 1} other round(s)" if len(short) > 1 else ""
        lower = (f"lower min_clients to {worst} or less (the fewest non-revoked clients any "
                 f"of the {cfg.rounds} rounds samples), " if worst >= 1 else "")
        raise ConfigError(
            f"min_clients={m} can never be met in round {r}{others}: of the {per_round} clients "
            f"it samples, {len(out)} {_is(len(out))} revoked ({', '.join(out)}); {lower}set "
            "revoked = false for some in the registry, or raise clients_per_round (a new run)"
        )


def _is(n: int) -> str:
    return "is" if n == 1 else "are"


# ---------------------------------------------------------------- models named in the config


def build_model(spec: Mapping[str, Any], base: Path | None = None) -> Any:
    """The model adapter a config names: ``{"kind": "mlp", n_in, hidden, n_out, seed}`` (torch,
    defaults = W1's 64-128-10 MLP), ``{"kind": "logreg", n_features, n_classes, l2}`` or
    ``{"kind": "keras", "path": "model.keras", dtype}`` (a Keras 3 model file read by
    ``hefl.models.keras.load_keras``; its weights are the initial global model).

    Args:
        spec: the ``[model]`` table.
        base: the folder a relative ``path`` is relative to (the run.toml's); default: the
            current directory.

    Raises:
        ConfigError: unknown kind or options; for ``"keras"``: no ``path``, a missing or
            unreadable file, or Keras 3 not installed.
    """
    opts = dict(spec)
    kind = opts.pop("kind", "mlp")
    if kind == "keras":
        return _keras_model(opts, base)
    try:
        if kind == "mlp":
            from hefl.models.torch import TorchModel
            from hefl.models.zoo import mlp

            seed = int(opts.pop("seed", 0))
            dims = {k: int(opts.pop(k)) for k in ("n_in", "hidden", "n_out") if k in opts}
            _no_extra(opts, kind)
            return TorchModel(lambda: mlp(**dims), seed=seed)
        if kind == "logreg":
            from hefl.models.linear import LogisticRegressionModel

            return LogisticRegressionModel(**opts)
    except TypeError as e:
        raise ConfigError(f"bad [model] options for kind {kind!r}: {e}") from e
    raise ConfigError(f"unknown model kind {kind!r}; choose 'mlp', 'logreg' or 'keras'")


def _keras_model(opts: dict[str, Any], base: Path | None) -> Any:
    """``[model] kind = "keras"``: ``path`` (relative to ``base``) and optional ``dtype``."""
    path = opts.pop("path", None)
    dtype = opts.pop("dtype", None)
    _no_extra(opts, "keras")
    if not path:
        raise ConfigError('[model] kind = "keras" needs path = "model.keras" (a Keras 3 model '
                          "file, written by model.save)")
    p = _path(base if base is not None else Path.cwd(), path)
    if p is None or not p.is_file():
        raise ConfigError(f"[model] path {str(p)!r} not found; write the Keras model there with "
                          "model.save('model.keras'), or fix the path (relative to run.toml)")
    from hefl.models.keras import load_keras

    return load_keras(p, dtype=dtype)


def _no_extra(opts: Mapping[str, Any], kind: str) -> None:
    if opts:
        raise ConfigError(f"unknown [model] option(s) {sorted(opts)} for kind {kind!r}")


def build_algorithm(spec: Mapping[str, Any]) -> Any:
    from hefl.algorithms import ALGORITHMS, make_algorithm

    opts = dict(spec)
    name = str(opts.pop("name"))
    import inspect

    if name.lower() in ALGORITHMS:
        accepted = inspect.signature(ALGORITHMS[name.lower()]).parameters
        unknown = set(opts) - set(accepted)
        if unknown:
            raise ConfigError(
                f"unknown [algorithm] option(s) {sorted(unknown)} for {name}; "
                f"known: {', '.join(accepted)}"
            )
    return make_algorithm(name, **opts)


def build_aggregator(spec: Mapping[str, Any], size: int, *, key: Any = None,
                     workers: int = 1) -> Any:
    """The aggregator a config names: plaintext, or for encrypted kinds the server's half
    (``key`` None: ``SummingServer`` under the public context) or a client's (``EncryptingClient``
    with its ``key``, encrypting in ``workers`` processes)."""
    from hefl.net import keys

    opts = dict(spec)
    kind = opts.pop("kind", "plain")
    if kind == "plain":
        from hefl.aggregation import PlainAggregator

        _no_extra(opts, "plain")
        return PlainAggregator(size)
    if kind in keys.HE_KINDS:
        if key is None:
            return keys.server_aggregator(spec, size)
        return keys.client_encoder(key, size, workers)
    raise ConfigError(f"unknown aggregation kind {kind!r}; choose plain, bfv or ckks")


def is_encrypted(spec: Mapping[str, Any]) -> bool:
    return spec.get("kind", "plain") != "plain"
