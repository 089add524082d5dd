"""CKKS batch scoring: encrypt records, evaluate a model on ciphertexts, decrypt scores.

CKKS (Cheon, Kim, Kim, Song 2017, "Homomorphic encryption for arithmetic of approximate
numbers") through the SEAL API that TenSEAL bundles (``tenseal.sealapi``): this module is the only
one in ``hefl.inference`` that touches the HE library. Nothing here implements a primitive; it
chooses parameters, packs data and calls SEAL's encoder, encryptor, evaluator and decryptor.

Packing: **one ciphertext per feature, records across the slots.** A batch of ``R`` records and
``d`` features is ``d`` ciphertexts; ciphertext ``j`` holds feature ``j`` of every record. Then a
linear layer is ``sum_j w_j * ct_j + b``: ``d`` plaintext-scalar multiplications and additions, no
rotation (so no Galois keys) and every slot is used. Packing one record per ciphertext would
waste slots or need ``log2(d)`` rotations per record to sum the products.

**The last, partly filled batch** of a logistic-regression job would leave most slots empty
(W5: 851 records in a 4096-record ciphertext, for each of 50 features). There ``k`` features share
one ciphertext, interleaved: feature ``c*k + b`` of ciphertext ``c`` sits in the slots ``j`` with
``j mod k == b`` (``k`` the largest power of two at which the records still fit, see
``feature_blocks``): ``ceil(d / k)`` ciphertexts instead of ``d``. The model owner multiplies each
ciphertext by a plaintext *vector* of period ``k`` holding each feature's weight and adds them up;
the data owner decrypts and sums each group of ``k`` neighbouring slots into a record's logit. No
rotation, so no keys and no key-switching noise (summing on the server with rotations was tried:
it gains nothing in privacy, since each slot then holds a window straddling two records, from
which the same partial sums follow, and the precise profile's 20-bit special prime made each
rotation cost ~1e-5 of logit precision). What the data owner learns beyond the logits: for each
record of a last batch, ``k`` partial logits (its own features times the weights, summed over
fixed feature subsets). These are linear in the weights, which the logits of ``d + 1`` records
already determine, so the model owner's weights are no better protected with ``k = 1``. A full
batch has ``k = 1``: the packing below, unchanged.

Both real and imaginary parts of every slot carry a record (record ``i`` in the real part,
record ``i + N/2`` in the imaginary part), so one ciphertext carries ``N`` records. A real scalar
times a complex slot scales both parts, so linear layers work unchanged. For logistic regression
the server returns the encrypted logit, unrescaled; the data owner decrypts and applies the
sigmoid.

The MLP (``x -> W1 x + b1 -> c2 z^2 + c1 z + c0 -> v . h + b2``) cannot square a complex slot
directly (``(a + ib)^2`` mixes the two records), so with ``w = conj(z)`` (one Galois key):
``P = z w = a^2 + b^2`` and ``Q = z^2 + w^2 = 2(a^2 - b^2)`` are real, and
``P (1 + i)/2 + Q (1 - i)/4 = a^2 + i b^2``. The complex constants are folded into the output
layer's weights, so the depth stays three. The MLP needs relinearization keys and the
conjugation key, uploaded once per session.

Keys: the data owner holds the secret key and is the only party that encrypts and decrypts, so
records are encrypted with SEAL's *symmetric* encryption: faster than public-key encryption and
serialized seeded (half the bytes). The model owner receives parameters and, for the MLP,
relinearization keys only.

Parameters (all at >= 128-bit security, checked against the HomomorphicEncryption.org table and
again by SEAL itself):

- logistic regression, ``LR_PARAMS`` ("precise", the default): ``N = 4096``, coefficient
  modulus ``[50, 39, 20]`` (109 bits, the N=4096 maximum). Inputs at scale 2^40, weights at
  2^25; no rescale is needed, so the 89 data bits leave 24 bits of headroom for the logit.
  ``N = 2048`` (54 bits) cannot hold a 2^40-scaled input times a weight, so 4096 is the smallest
  ring that fits.
- logistic regression, ``LR_FAST_PARAMS`` ("fast"): ``N = 4096``, ``[60, 49]``: one data prime,
  so about 40 % less work and bytes per record. Inputs at 2^30, weights at 2^21 (measured logit
  error ~4e-6); only 8 bits of headroom: logits must stay within +-128, which decryption checks.
- MLP (multiplicative depth 3: layer 1, square, output layer): ``N = 8192``, ``[50, 35, 35, 35,
  50]`` (205 <= 218 bits); ``N = 4096`` cannot hold four data primes at a useful scale.
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from hefl.crypto import seal as seal_io  # SEAL bytes <-> objects (private tmpfs files)
from hefl.crypto.spec import MAX_COEFF_BITS_128  # HomomorphicEncryption.org, 128-bit
from hefl.crypto.workers import HelperPool, UsesHelpers
from hefl.errors import ConfigError, ContextMismatch, CryptoError, TransportError


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters for one scoring job.

    Attributes:
        poly_modulus_degree: ring degree N (N/2 complex slots).
        coeff_mod_bit_sizes: prime sizes; the last is SEAL's special (key-switching) prime.
        scale_bits: inputs are encoded at scale 2**scale_bits.
        weight_scale_bits: plaintext weights of the last (unrescaled) product, 2**bits.
        complex_packing: two records per slot (real and imaginary part).
        block_packing: a linear model's partly filled batch may pack several features per
            ciphertext, summed with rotations (needs a special prime large enough that
            rotations keep the logits' precision; see ``feature_blocks``).
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    weight_scale_bits: int = 0
    complex_packing: bool = False
    block_packing: bool = False

    def __post_init__(self) -> None:
        limit = MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        if limit is None:
            raise ConfigError(
                f"poly_modulus_degree {self.poly_modulus_degree} is not one of "
                f"{sorted(MAX_COEFF_BITS_128)}"
            )
        total = sum(self.coeff_mod_bit_sizes)
        if total > limit:
            raise ConfigError(
                f"coefficient modulus of {total} bits at N={self.poly_modulus_degree} is below "
                f"128-bit security (at most {limit} bits); use fewer/smaller primes or a larger N"
            )
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ConfigError("give at least one data prime and the special prime")

    @property
    def records_per_ciphertext(self) -> int:
        """Records one ciphertext carries: N with complex packing, N/2 otherwise."""
        n = self.poly_modulus_degree
        return n if self.complex_packing else n // 2

    @property
    def data_bits(self) -> tuple[int, ...]:
        """The data-level primes (all but the special prime)."""
        return self.coeff_mod_bit_sizes[:-1]

    def to_dict(self) -> dict:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "weight_scale_bits": self.weight_scale_bits,
            "complex_packing": self.complex_packing,
            "block_packing": self.block_packing,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CkksParams:
        try:
            return cls(
                int(d["poly_modulus_degree"]),
                tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                int(d["scale_bits"]),
                int(d.get("weight_scale_bits", 0)),
                bool(d.get("complex_packing", False)),
                bool(d.get("block_packing", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed CKKS parameters {d!r}: {e}") from e


#: Logistic regression: depth 0 after the plaintext multiply (no rescale), complex packing.
LR_PARAMS = CkksParams(4096, (50, 39, 20), scale_bits=40, weight_scale_bits=25,
                       complex_packing=True, block_packing=True)
#: Logistic regression, one data prime: cheaper, logits limited to +-128 (checked on decryption).
LR_FAST_PARAMS = CkksParams(4096, (60, 49), scale_bits=30, weight_scale_bits=21,
                            complex_packing=True, block_packing=True)
#: One-hidden-layer MLP with a quadratic activation: three rescales, complex packing.
MLP_PARAMS = CkksParams(8192, (50, 35, 35, 35, 50), scale_bits=35, complex_packing=True)


def feature_blocks(records: int, features: int, params: CkksParams) -> int:
    """Features sharing one ciphertext in a linear model's batch of ``records`` records.

    The largest power of two ``k`` such that the records fit a block of
    ``records_per_ciphertext / k`` and ``k`` is below twice ``features`` (beyond that no
    ciphertext is saved); 1 for a full batch, or when ``params.block_packing`` is off.
    """
    cap = params.records_per_ciphertext
    k = 1
    if not params.block_packing:
        return k
    while k < features and records <= cap // (2 * k) and cap // (2 * k) >= 2:
        k *= 2
    return k


def pack_blocks(x: np.ndarray, k: int, params: CkksParams) -> np.ndarray:
    """Rows of ``records_per_ciphertext`` values, one per ciphertext, in the order
    ``encrypt_columns`` encodes them (real parts, then imaginary parts): ciphertext ``c`` holds
    features ``c*k .. c*k+k-1`` interleaved, feature ``c*k+b`` in the slots ``j = i*k + b``."""
    cap = params.records_per_ciphertext
    block = cap // k
    n_ct = -(-x.shape[1] // k)
    padded = np.zeros((n_ct * k, block))
    padded[: x.shape[1], : len(x)] = x.T
    blocks = padded.reshape(n_ct, k, block)
    if not params.complex_packing:
        return blocks.transpose(0, 2, 1).reshape(n_ct, cap)
    half = block // 2  # a feature's records in real parts; the rest go to imaginary parts
    return np.concatenate([blocks[:, :, :half].transpose(0, 2, 1).reshape(n_ct, -1),
                           blocks[:, :, half:].transpose(0, 2, 1).reshape(n_ct, -1)], axis=1)


def unpack_blocks(values: np.ndarray, k: int) -> np.ndarray:
    """The records' scores from decrypted values (real parts, then imaginary parts): each
    group of ``k`` neighbouring slots summed (the identity for ``k = 1``)."""
    return values.reshape(-1, k).sum(axis=1) if k > 1 else values


# --------------------------------------------------------------------------- SEAL plumbing

_CONTEXTS: dict[CkksParams, seal.SEALContext] = {}
_LOCK = threading.Lock()


def seal_context(params: CkksParams) -> seal.SEALContext:
    """The (cached) SEAL context for ``params``; SEAL re-checks 128-bit security."""
    with _LOCK:
        ctx = _CONTEXTS.get(params)
        if ctx is None:
            p = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
            p.set_poly_modulus_degree(params.poly_modulus_degree)
            p.set_coeff_modulus(
                seal.CoeffModulus.Create(params.poly_modulus_degree,
                                         list(params.coeff_mod_bit_sizes))
            )
            ctx = seal.SEALContext(p, True, seal.SEC_LEVEL_TYPE.TC128)
            if not ctx.parameters_set():
                raise ConfigError(f"SEAL rejects {params}: {ctx.parameters_error_message()}")
            _CONTEXTS[params] = ctx
        return ctx


def load_ciphertext(ctx: seal.SEALContext, data: bytes) -> seal.Ciphertext:
    """Parse one serialized ciphertext under ``ctx``.

    Raises:
        ContextMismatch: made under other parameters, or corrupt.
    """
    try:
        ct = seal_io.load(seal.Ciphertext, ctx, bytes(data))
    except ContextMismatch as e:
        raise ContextMismatch(
            f"a ciphertext does not load under this session's CKKS parameters ({e}); it was "
            "made under other parameters or keys, or is corrupt: re-encrypt with this session"
        ) from e
    if ct.size() != 2:
        raise ContextMismatch(f"expected a fresh 2-component ciphertext, got {ct.size()}")
    return ct


def save_ciphertext(ct: seal.Ciphertext) -> bytes:
    return seal_io.save(ct)


# --------------------------------------------------------------------------- key bundles

_BUNDLE_MAGIC = b"HEFLEVK1"


@dataclass(frozen=True)
class EvaluationKeys:
    """What the data owner sends the model owner once per session: no secret key.

    Attributes:
        params: CKKS parameters.
        key_id: random id of the data owner's secret key; every batch carries it.
        relin_keys: serialized relinearization keys (MLP only), else empty.
        galois_keys: serialized conjugation key (MLP with complex packing), else empty.
    """

    params: CkksParams
    key_id: str
    relin_keys: bytes = b""
    galois_keys: bytes = b""

    def dumps(self) -> bytes:
        head = json.dumps({"params": self.params.to_dict(), "key_id": self.key_id,
                           "relin_bytes": len(self.relin_keys)}).encode()
        return (_BUNDLE_MAGIC + struct.pack("<I", len(head)) + head + self.relin_keys
                + self.galois_keys)

    @classmethod
    def loads(cls, data: bytes) -> EvaluationKeys:
        """Parse a key bundle.

        Raises:
            TransportError: not a hefl key bundle.
        """
        if not data.startswith(_BUNDLE_MAGIC) or len(data) < len(_BUNDLE_MAGIC) + 4:
            raise TransportError("not a hefl evaluation-key bundle (bad magic); send the "
                                 "output of Keyring.evaluation_keys().dumps()")
        (n,) = struct.unpack_from("<I", data, len(_BUNDLE_MAGIC))
        start = len(_BUNDLE_MAGIC) + 4
        try:
            head = json.loads(data[start : start + n])
            params = CkksParams.from_dict(head["params"])
            key_id = str(head["key_id"])
            n_relin = int(head.get("relin_bytes", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise TransportError(f"malformed evaluation-key bundle header: {e}") from e
        keys = bytes(data[start + n :])
        if not 0 <= n_relin <= len(keys):
            raise TransportError("evaluation-key bundle is truncated")
        return cls(params, key_id, keys[:n_relin], keys[n_relin:])


# --------------------------------------------------------------------------- data owner


def encrypt_columns(encoder: seal.CKKSEncoder, encryptor: seal.Encryptor, params: CkksParams,
                    cols: np.ndarray, seeded: bool = True) -> list[bytes]:
    """Encode and symmetrically encrypt each row of ``cols`` (one padded feature column of
    ``records_per_ciphertext`` values each) into one serialized ciphertext."""
    half = params.poly_modulus_degree // 2
    scale = 2.0**params.scale_bits
    out = []
    for col in cols:
        values = (col[:half] + 1j * col[half:]) if params.complex_packing else col
        pt = seal.Plaintext()
        encoder.encode(values.tolist(), scale, pt)
        if seeded:
            out.append(seal_io.save(encryptor.encrypt_symmetric(pt)))
        else:
            ct = seal.Ciphertext()
            encryptor.encrypt_symmetric(pt, ct)
            out.append(seal_io.save(ct))
    return out


_HELPER: dict[str, Any] = {}  # state of a helper process (set by its initializer)



def _init_encrypt_helper(params: dict, secret_key: bytes) -> None:
    p = CkksParams.from_dict(params)
    ctx = seal_context(p)
    sk = seal_io.load(seal.SecretKey, ctx, secret_key)
    _HELPER.update(params=p, encoder=seal.CKKSEncoder(ctx), encryptor=seal.Encryptor(ctx, sk))


def _encrypt_in_helper(cols: np.ndarray, seeded: bool) -> list[bytes]:
    return encrypt_columns(_HELPER["encoder"], _HELPER["encryptor"], _HELPER["params"], cols,
                           seeded)



class Keyring(UsesHelpers):
    """The data owner's keys: encrypts records, decrypts scores. Never leaves the data owner.

    Example:
        >>> import numpy as np
        >>> kr = Keyring.generate(LR_PARAMS)
        >>> ev = Evaluator(kr.evaluation_keys())
        >>> x = np.array([[1.0, 2.0], [3.0, -1.0]])
        >>> cts = kr.encrypt_batch(x)
        >>> z = kr.decrypt_scores(ev.linear(cts, np.array([0.5, 1.0]), 0.25), len(x))
        >>> np.round(z, 6).tolist()
        [2.75, 0.75]
    """

    def __init__(self, params: CkksParams, relin: bool, workers: int = 1) -> None:
        self.params = params
        self._ctx = seal_context(params)
        keygen = seal.KeyGenerator(self._ctx)
        self._sk = keygen.secret_key()
        self._relin = seal_io.save(keygen.create_relin_keys()) if relin else b""
        conj = [2 * params.poly_modulus_degree - 1]  # the Galois element of complex conjugation
        self._galois = (seal_io.save(keygen.create_galois_keys(conj))
                        if relin and params.complex_packing else b"")
        self._encoder = seal.CKKSEncoder(self._ctx)
        self._encryptor = seal.Encryptor(self._ctx, self._sk)
        self._decryptor = seal.Decryptor(self._ctx, self._sk)
        self.key_id = secrets.token_hex(16)
        # The secret key reaches only this data owner's own helper processes, over a local pipe.
        self._pool = HelperPool(workers, _init_encrypt_helper,
                                (params.to_dict(), seal_io.save(self._sk)) if workers > 1 else ())

    @classmethod
    def generate(cls, params: CkksParams, relin: bool = False, workers: int = 1) -> Keyring:
        """Fresh secret key for ``params`` (``relin=True`` for models with a ct x ct product).

        ``workers > 1`` starts ``workers - 1`` helper processes once, here, that share the
        encryption of every batch (see ``hefl.crypto.workers``); ``close()`` stops them.
        """
        return cls(params, relin, workers)

    @property
    def workers(self) -> int:
        """Processes sharing encryption (1 when serial)."""
        return self._pool.workers


    def evaluation_keys(self) -> EvaluationKeys:
        """The public half for the model owner (parameters, key id, relinearization keys)."""
        return EvaluationKeys(self.params, self.key_id, self._relin, self._galois)

    def __repr__(self) -> str:  # never print key material
        return f"Keyring(key_id={self.key_id!r}, params={self.params})"

    def encrypt_batch(self, x: np.ndarray, seeded: bool = True, blocks: int = 1) -> list[bytes]:
        """Encrypt up to ``records_per_ciphertext`` records: one serialized ciphertext per column.

        Args:
            x: records (rows) by features (columns), preprocessed.
            seeded: serialize seeded (SEAL replaces the random half by its seed: half the bytes,
                but the receiver re-expands it, ~0.1 ms per ciphertext at N=4096). ``False``
                sends both halves: twice the bytes, cheaper for both sides; for a local or fast
                link. The receiver loads either form.
            blocks: features per ciphertext (linear models only; ``blocks_for`` gives the best
                for a batch, and ``decrypt_scores`` needs it back).

        Raises:
            ConfigError: more records than one batch holds (use ``split_batches``), or NaN/Inf.
        """
        x = np.asarray(x, np.float64)
        cap = self.params.records_per_ciphertext
        if x.ndim != 2 or len(x) > cap:
            raise ConfigError(f"a batch is a 2-D array of at most {cap} records, got shape "
                              f"{x.shape}; split it with split_batches")
        if not np.isfinite(x).all():
            raise ConfigError("records contain NaN/Inf after preprocessing; impute them first")
        if blocks != 1 and blocks > self.blocks_for(len(x), x.shape[1]):
            raise ConfigError(f"{len(x)} records of {x.shape[1]} features cannot be packed "
                              f"{blocks} features per ciphertext; use blocks_for(records, "
                              "features)")
        cols = pack_blocks(x, blocks, self.params)
        chunks = [(cols[i : i + 1], seeded) for i in range(len(cols))]
        parts = self._pool.map(_encrypt_in_helper, self._encrypt_columns, chunks)
        return [b for part in parts for b in part]

    def _encrypt_columns(self, cols: np.ndarray, seeded: bool) -> list[bytes]:
        return encrypt_columns(self._encoder, self._encryptor, self.params, cols, seeded)

    def blocks_for(self, records: int, features: int) -> int:
        """Features per ciphertext ``encrypt_batch`` packs for a linear model's batch of this
        shape (``feature_blocks``; 1 unless the parameters allow block packing); pass it to
        ``encrypt_batch`` and ``decrypt_scores``. Not for an MLP's batches (always 1)."""
        return feature_blocks(records, features, self.params)

    def decrypt_scores(self, data: bytes, n: int, blocks: int = 1) -> np.ndarray:
        """Decrypt one result ciphertext into ``n`` scores (logits); ``blocks``: the batch's
        ``blocks_for`` (features per ciphertext) for a linear model, else 1.

        Raises:
            ContextMismatch: the ciphertext was not made under this key (the decrypted values
                are out of range), or does not load under these parameters.
        """
        ct = load_ciphertext(self._ctx, data) if isinstance(data, bytes | bytearray) else data
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        if self.params.complex_packing:
            v = np.asarray(self._encoder.decode_complex(pt))
            values = np.concatenate([v.real, v.imag])
        else:
            values = np.asarray(self._encoder.decode_double(pt))
        # Range check: a ciphertext under another key decrypts to noise spread over the whole
        # modulus (+-2^(bits-1)/scale); honest scores stay within half of that.
        level_bits = self._level_bits(ct)
        bound = 2.0 ** (level_bits - np.log2(ct.scale) - 2)
        if not np.all(np.abs(values) < bound):
            raise ContextMismatch(
                f"decrypted scores reach {np.max(np.abs(values)):.3g}, beyond the {bound:.3g} "
                "these parameters represent: the result was computed on ciphertexts made under other "
                "keys (or another session), or the model's outputs overflow (serve it with the "
                "precise parameters); score again with this session's keys"
            )
        return unpack_blocks(values, blocks)[:n]

    def _level_bits(self, ct: seal.Ciphertext) -> float:
        cd = self._ctx.get_context_data(ct.parms_id())
        if cd is None:
            raise ContextMismatch("result ciphertext is at no level of this key's parameters")
        return float(sum(np.log2(float(m.value())) for m in cd.parms().coeff_modulus()))


def split_batches(n: int, capacity: int) -> list[slice]:
    """Row slices of at most ``capacity`` records covering ``range(n)`` (oversized batches are
    split, never refused)."""
    if capacity < 1:
        raise ConfigError(f"batch capacity must be >= 1, got {capacity}")
    return [slice(s, min(s + capacity, n)) for s in range(0, n, capacity)]


# --------------------------------------------------------------------------- model owner


class Evaluator(UsesHelpers):
    """The model owner's side: evaluates models on a data owner's ciphertexts; holds no secret."""

    def __init__(self, keys: EvaluationKeys, workers: int = 1) -> None:
        """``workers > 1`` starts ``workers - 1`` helper processes (public material only) that
        share the loading and weighting of each logistic-regression batch."""
        self.keys = keys
        self.params = keys.params
        self._ctx = seal_context(keys.params)
        self._eval = seal.Evaluator(self._ctx)
        self._encoder = seal.CKKSEncoder(self._ctx)
        self._pool = HelperPool(workers, _init_evaluate_helper,
                                (keys.dumps(),) if workers > 1 else ())
        self._relin: seal.RelinKeys | None = None
        if keys.relin_keys:
            try:
                self._relin = seal_io.load(seal.RelinKeys, self._ctx, keys.relin_keys)
            except ContextMismatch as e:
                raise ContextMismatch(
                    f"relinearization keys do not load under {keys.params}: {e}"
                ) from e
        self._galois: seal.GaloisKeys | None = None
        if keys.galois_keys:
            try:
                self._galois = seal_io.load(seal.GaloisKeys, self._ctx, keys.galois_keys)
            except ContextMismatch as e:
                raise ContextMismatch(f"Galois keys do not load under {keys.params}: {e}") from e

    @staticmethod
    def _check_count(n: int, expected: int) -> None:
        if n != expected:
            raise ContextMismatch(
                f"batch has {n} feature ciphertexts, this model takes {expected}; "
                "preprocess records with the model's preprocessing before encrypting"
            )

    def load(self, blobs: Sequence[bytes], expected: int) -> list[seal.Ciphertext]:
        """Parse a batch of ``expected`` feature ciphertexts.

        Raises:
            ContextMismatch: wrong count for this model, or a ciphertext under other parameters.
        """
        self._check_count(len(blobs), expected)
        cts = [load_ciphertext(self._ctx, b) for b in blobs]
        first = self._ctx.first_parms_id()
        scale = 2.0**self.params.scale_bits
        for ct in cts:
            if list(ct.parms_id()) != list(first) or abs(ct.scale / scale - 1) > 1e-9:
                raise ContextMismatch("a ciphertext is not a fresh encryption at this session's "
                                      "level and scale; encrypt with Keyring.encrypt_batch")
        return cts

    def _const(self, value: float, ct: seal.Ciphertext, scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        if self.params.complex_packing:
            self._encoder.encode(complex(value, value), ct.parms_id(), scale, pt)
        else:
            self._encoder.encode(float(value), ct.parms_id(), scale, pt)
        return pt

    def _real_scalar(self, value: float, ct: seal.Ciphertext, scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        self._encoder.encode(float(value), ct.parms_id(), scale, pt)
        return pt

    def _block_weights(self, row: np.ndarray, ct: seal.Ciphertext, scale: float,
                       addend: bool = False) -> seal.Plaintext:
        """Interleaved values: ``row[b]`` on the slots ``j`` with ``j mod len(row) == b``. A real
        factor scales both records of a slot; an ``addend`` must reach both (``v + iv``)."""
        pt = seal.Plaintext()
        v = np.tile(row, self.params.poly_modulus_degree // 2 // len(row))
        if addend and self.params.complex_packing:
            v = v + 1j * v
        self._encoder.encode(v.tolist(), ct.parms_id(), scale, pt)
        return pt

    def _dot(self, cts: Sequence[seal.Ciphertext], w: np.ndarray, scale: float
             ) -> seal.Ciphertext:
        """sum_j w_j * ct_j with weights encoded at ``scale`` (no rescale); a 2-D ``w`` holds
        one row of block weights per ciphertext."""
        acc: seal.Ciphertext | None = None
        for ct, wj in zip(cts, w, strict=True):
            if not np.any(wj):
                continue
            prod = seal.Ciphertext()
            pt = (self._block_weights(wj, ct, scale) if np.ndim(wj)
                  else self._real_scalar(float(wj), ct, scale))
            self._eval.multiply_plain(ct, pt, prod)
            if acc is None:
                acc = prod
            else:
                self._eval.add_inplace(acc, prod)
        if acc is None:  # all-zero weights: 0 * ct keeps the level and scale right
            acc = seal.Ciphertext()
            self._eval.multiply_plain(cts[0], self._real_scalar(0.0, cts[0], scale), acc)
        return acc

    def linear(self, cts: Sequence[seal.Ciphertext] | Sequence[bytes], coef: np.ndarray,
               intercept: float, records: int | None = None) -> bytes:
        """Encrypted logits ``X @ coef + intercept`` for one batch (logistic regression).

        One ciphertext per feature is always accepted. With ``records`` (the batch's record
        count), fewer ciphertexts mean the packed layout that the data owner's
        ``Keyring.blocks_for`` chooses for that many records (``feature_blocks``).
        """
        coef = np.asarray(coef, np.float64).reshape(-1)
        k = 1
        if records and len(cts) != len(coef):
            k = feature_blocks(records, len(coef), self.params)
        if k > 1:  # one row of block weights per ciphertext (zeros beyond the last feature)
            n_ct = -(-len(coef) // k)
            coef = np.pad(coef, (0, n_ct * k - len(coef))).reshape(n_ct, k)
        if self._pool.parallel and cts and isinstance(cts[0], bytes | bytearray):
            # Ciphertexts go to whichever process is free; each keeps a running sum, and the
            # helpers' sums (one ciphertext each) are added here at the end.
            self._check_count(len(cts), len(coef))
            sums: list[seal.Ciphertext] = []

            def here(blobs: Sequence[bytes], w: np.ndarray) -> None:
                part = self._partial_linear(blobs, w)
                if sums:
                    self._eval.add_inplace(sums[0], part)
                else:
                    sums.append(part)

            chunks = [(cts[i : i + 1], coef[i : i + 1]) for i in range(len(cts))]
            try:
                self._pool.map(_linear_in_helper, here, chunks)
            except Exception:
                self._pool.each(_flush_helper_sum)  # drop this batch's partial sums
                raise
            sums += [seal_io.load(seal.Ciphertext, self._ctx, b)
                     for b in self._pool.each(_flush_helper_sum) if b]
            acc = sums[0]
            for ct in sums[1:]:
                self._eval.add_inplace(acc, ct)
        else:
            acc = self._dot(self._ensure_loaded(cts, len(coef)), coef,
                            2.0**self.params.weight_scale_bits)
        if k == 1:
            self._eval.add_plain_inplace(acc, self._const(intercept, acc, acc.scale))
        else:  # once per record: on the first slot of each group of k
            row = np.zeros(k)
            row[0] = intercept
            self._eval.add_plain_inplace(acc, self._block_weights(row, acc, acc.scale, True))
        return save_ciphertext(acc)

    def _partial_linear(self, blobs: Sequence[bytes], coef: np.ndarray) -> seal.Ciphertext:
        """``sum_j coef_j * ct_j`` over a share of a batch's features (no intercept)."""
        return self._dot(self.load(blobs, len(blobs)), coef, 2.0**self.params.weight_scale_bits)

    def poly_mlp(self, cts: Sequence[seal.Ciphertext] | Sequence[bytes], w1: np.ndarray,
                 b1: np.ndarray, act: tuple[float, float, float], w2: np.ndarray,
                 b2: float) -> bytes:
        """Encrypted logits of ``w2 . f(w1 x + b1) + b2`` with ``f(z) = c2 z^2 + c1 z + c0``.

        Depth 3 with one rescale after each product; weights are encoded at the prime they are
        rescaled by, so that scales come back exactly to the input scale. The activation's
        linear and constant terms are folded into the output layer.
        """
        if self._relin is None:
            raise CryptoError("the MLP needs relinearization keys; generate the keyring with "
                              "relin=True")
        cplx = self.params.complex_packing
        if cplx and self._galois is None:
            raise CryptoError("the MLP with complex packing needs the conjugation (Galois) key")
        w1 = np.asarray(w1, np.float64)
        w2 = np.asarray(w2, np.float64).reshape(-1)
        b1 = np.asarray(b1, np.float64).reshape(-1)
        c2, c1, c0 = (float(c) for c in act)
        cts = self._ensure_loaded(cts, w1.shape[1])
        ev = self._eval
        q = self._primes(cts[0])  # data primes at the fresh level, q[-1] is dropped first
        delta = cts[0].scale
        terms: list[tuple[seal.Ciphertext, complex]] = []
        for k in range(w1.shape[0]):
            z = self._dot(cts, w1[k], q[-1])  # scale delta * q_L
            ev.add_plain_inplace(z, self._const(b1[k], z, z.scale))
            ev.rescale_to_next_inplace(z)  # scale delta
            for sq, coeff in self._squares(z):
                terms.append((sq, coeff * w2[k] * c2))
            ev.mod_switch_to_next_inplace(z)  # level of the squares, scale unchanged
            terms.append((z, complex(w2[k] * c1)))
        q1 = float(self._primes(terms[0][0])[-1])
        target = q1 * delta
        acc: seal.Ciphertext | None = None
        for ct, coeff in terms:
            pt = seal.Plaintext()
            value = coeff if cplx else coeff.real
            self._encoder.encode(value, ct.parms_id(), target / ct.scale, pt)
            prod = seal.Ciphertext()
            ev.multiply_plain(ct, pt, prod)
            prod.scale = target  # equal up to float rounding of target / scale * scale
            if acc is None:
                acc = prod
            else:
                ev.add_inplace(acc, prod)
        assert acc is not None
        ev.add_plain_inplace(acc, self._const(float(b2 + c0 * w2.sum()), acc, acc.scale))
        ev.rescale_to_next_inplace(acc)
        return save_ciphertext(acc)

    def _squares(self, z: seal.Ciphertext) -> list[tuple[seal.Ciphertext, complex]]:
        """Ciphertexts and complex weights whose weighted sum is the slot-wise square of each
        record: ``z^2`` with real packing; ``P (1+i)/2 + Q (1-i)/4`` with complex packing."""
        ev = self._eval

        def finish(ct: seal.Ciphertext) -> seal.Ciphertext:
            ev.relinearize_inplace(ct, self._relin)
            ev.rescale_to_next_inplace(ct)
            return ct

        if not self.params.complex_packing:
            u = seal.Ciphertext()
            ev.square(z, u)
            return [(finish(u), 1.0 + 0j)]
        w = seal.Ciphertext()
        ev.complex_conjugate(z, self._galois, w)
        p, z2, w2 = seal.Ciphertext(), seal.Ciphertext(), seal.Ciphertext()
        ev.multiply(z, w, p)  # a^2 + b^2
        ev.square(z, z2)
        ev.square(w, w2)
        ev.add_inplace(z2, w2)  # 2 (a^2 - b^2)
        return [(finish(p), (1 + 1j) / 2), (finish(z2), (1 - 1j) / 4)]

    def _primes(self, ct: seal.Ciphertext) -> list[int]:
        cd = self._ctx.get_context_data(ct.parms_id())
        return [m.value() for m in cd.parms().coeff_modulus()]

    def _ensure_loaded(self, cts, expected: int) -> list[seal.Ciphertext]:
        if cts and isinstance(cts[0], bytes | bytearray):
            return self.load(cts, expected)
        if len(cts) != expected:
            raise ContextMismatch(f"batch has {len(cts)} feature ciphertexts, model takes "
                                  f"{expected}")
        return list(cts)


def _init_evaluate_helper(bundle: bytes) -> None:
    _HELPER["evaluator"] = Evaluator(EvaluationKeys.loads(bundle))


def _linear_in_helper(blobs: Sequence[bytes], coef: np.ndarray) -> None:
    ev = _HELPER["evaluator"]
    part = ev._partial_linear(blobs, coef)
    if _HELPER.get("sum") is None:
        _HELPER["sum"] = part
    else:
        ev._eval.add_inplace(_HELPER["sum"], part)


def _flush_helper_sum() -> bytes:
    """This helper's running sum of its chunks since the last flush (b"" if none)."""
    part = _HELPER.pop("sum", None)
    return save_ciphertext(part) if part is not None else b""
