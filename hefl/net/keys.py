"""Encrypted aggregation in deployment: the key ceremony's files and who loads which.

``hefl keys --config run.toml --out keys`` runs ``hefl.crypto.key_ceremony`` for the model and
``[aggregation]`` options of the config and writes:

    keys/public.ctx   public HE context: give it to the server (and, in custody "keyholder",
                      to every client: it carries the public key they encrypt with)
    keys/share.key    the secret key (mode 0600): custody "clients" -> every data client;
                      custody "keyholder" -> only the key-holder process. Never the server.

The server loads only ``public.ctx`` (``SummingServer`` refuses a secret key); clients encrypt
(``EncryptingClient``); a key holder decrypts sums of at least its own ``--min-clients``
contributions (``KeyHolder``) and sends back only the mean update and the total weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hefl.errors import ConfigError, CryptoError, KeyCustodyError, UpdateRejected
from hefl.net.files import ignore_secrets, write_private

HE_KINDS = ("bfv", "ckks")
SPEC_OPTIONS = ("bits", "clip", "clip_norm", "max_weight", "max_clients", "lanes", "coeff_bits",
                "flood_security", "flood_queries")
CONFIG_KEYS = ("kind", "custody", "public", "key_holders", "threshold", *SPEC_OPTIONS)


@dataclass(frozen=True)
class KeyFiles:
    public: Path
    share: Path
    custody: str


def spec_options(agg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(agg) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown [aggregation] key(s) {sorted(unknown)}; known: {', '.join(CONFIG_KEYS)}"
        )
    return {k: agg[k] for k in SPEC_OPTIONS if k in agg}


def write_keys(agg: Mapping[str, Any], size: int, out: Path, overwrite: bool = False,
               privacy: Any = None) -> KeyFiles:
    """Key ceremony for ``size`` parameters under the ``[aggregation]`` options ``agg`` and
    the DP plan ``privacy`` (``hefl.net.privacy``: its clip, weights and noise go in the keys)."""
    from hefl.crypto import key_ceremony, make_spec
    from hefl.net.privacy import key_options, with_central_noise

    kind = agg.get("kind", "plain")
    if kind not in HE_KINDS:
        raise ConfigError(
            f"[aggregation] kind is {kind!r}: keys are only for encrypted aggregation "
            f"({' or '.join(HE_KINDS)})"
        )
    custody = str(agg.get("custody", "clients"))
    if custody == "threshold":
        raise ConfigError(
            "custody 'threshold' has no dealer, so `hefl keys` cannot make its keys: each key "
            "holder generates its own share in the committee's ceremony, which deployments do "
            "not run yet; deploy with custody 'keyholder', or use threshold keys in simulation"
        )
    spec = make_spec(kind, size, custody=custody, **key_options(privacy, spec_options(agg)))
    spec = with_central_noise(privacy, spec)
    public, share = out / "public.ctx", out / "share.key"
    if (public.exists() or share.exists()) and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds keys; pass --overwrite to replace them")
    ceremony = key_ceremony(spec)
    out.mkdir(parents=True, exist_ok=True)
    public.write_bytes(ceremony.public.to_bytes())
    write_private(share, ceremony.shares[0].to_bytes())
    ignore_secrets(out, ["share.key"])
    return KeyFiles(public, share, custody)


def committee_spec(agg: Mapping[str, Any], size: int,
                   privacy: Any = None) -> tuple[Any, list[str]]:
    """Threshold custody: the ``HeSpec`` and the committee (``[aggregation] key_holders``, in
    member order) of a config.

    Raises:
        ConfigError: not custody "threshold", or no list of distinct key holder names.
    """
    from hefl.crypto import make_spec
    from hefl.net.privacy import key_options

    if agg.get("custody") != "threshold" or agg.get("kind") not in HE_KINDS:
        raise ConfigError("the threshold ceremony needs [aggregation] kind = \"bfv\" (or "
                          "\"ckks\") and custody = \"threshold\"")
    names = agg.get("key_holders")
    if (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise ConfigError("[aggregation] key_holders must list the committee's distinct names, "
                          "as registered with `hefl certs --key-holders`, e.g. "
                          "[\"kh1\", \"kh2\", \"kh3\"]")
    spec = make_spec(agg["kind"], size, custody="threshold", key_holders=len(names),
                     threshold=agg.get("threshold"),
                     **key_options(privacy, spec_options(agg)))
    return spec, list(names)


def load_key(path: Path) -> Any:
    """A client's key file: the secret ``KeyShare`` or the ``PublicContext``."""
    from hefl.crypto.keys import key_from_bytes

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file {str(path)!r}: {e}") from e
    try:
        return key_from_bytes(data)
    except (UpdateRejected, CryptoError) as e:
        raise ConfigError(f"{str(path)!r} is not a hefl key file from `hefl keys`: {e}") from e


def server_aggregator(agg: Mapping[str, Any], size: int, base: Path | None = None) -> Any:
    """The server's half: sums ciphertexts under the public context, never a secret."""
    from hefl.crypto import PublicContext, SummingServer

    spec_options(agg)
    if not agg.get("public"):
        raise ConfigError("encrypted aggregation: set [aggregation] public = \"keys/public.ctx\" "
                          "(from `hefl keys`)")
    path = Path(str(agg["public"]))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the public context {str(path)!r}: {e}") from e
    if data.startswith(b"HEFLSEC1"):
        raise KeyCustodyError(
            f"{str(path)!r} is a secret key share: the server must never hold it; point "
            "[aggregation] public at public.ctx"
        )
    try:
        public = PublicContext.from_bytes(data)
    except (UpdateRejected, CryptoError) as e:
        raise ConfigError(f"{str(path)!r} is not a public context from `hefl keys`: {e}") from e
    _check_size(public.spec, size, path)
    return SummingServer(public)


def client_encoder(key: Any, size: int, workers: int = 1) -> Any:
    """The client's half: encrypts weighted updates with its key (in ``workers`` processes)."""
    from hefl.crypto import EncryptingClient

    _check_size(key.spec, size, "the client's key")
    return EncryptingClient(key, workers=workers)


def key_holder(key: Any, size: int, min_clients: int, workers: int = 1) -> Any:
    """A ``KeyHolder`` for a whole key, a ``ThresholdKeyHolder`` for a committee member's
    (either decrypting in ``workers`` processes)."""
    from hefl.crypto import KeyHolder, KeyShare
    from hefl.crypto.secure_sum import ThresholdKeyHolder

    if not isinstance(key, KeyShare):
        raise KeyCustodyError("--key-holder needs the secret share.key, not the public context")

    _check_size(key.spec, size, "the key holder's key")
    if key.parties > 1:
        return ThresholdKeyHolder(key, min_clients=min_clients, workers=workers)
    return KeyHolder(key, min_clients=min_clients, workers=workers)


def _check_size(spec: Any, size: int, where: Any) -> None:
    if spec.size != size:
        raise ConfigError(
            f"{where} was made for {spec.size} parameters but the model has {size}; run "
            "`hefl keys` again for this model"
        )
