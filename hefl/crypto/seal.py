"""Thin layer over Microsoft SEAL, through TenSEAL's ``sealapi`` bindings.

This module and ``hefl.crypto.baseline`` are the only ones that import TenSEAL. No cryptography is
implemented here: keys, encryption (including SEAL's seeded symmetric ciphertexts), addition,
decryption and serialization (SEAL's own format, zstd-compressed) are all SEAL's.

``sealapi`` serializes through file paths only, so bytes (secret keys among them) pass through an
anonymous in-memory file: a ``memfd_create`` file, private to this process, never on disk and
never on a shared path, that SEAL opens as ``/proc/self/fd/N`` and that is closed (freed) as soon
as it has been read. One per call, so threads and forked children never share one. That is 5x
faster than a file on disk (measured: saving one N = 2048 ciphertext 357 us through the disk,
71 us through a memfd). Where memfds are unavailable (not Linux, no ``/proc``), a private
scratch directory is used instead: ``tempfile.mkdtemp`` (mode 0700, owner only), never a
shared-memory path such as ``/dev/shm``; every file is removed as soon as it has been read, and
the directory when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi
import zstandard

from hefl.crypto.spec import HeSpec
from hefl.errors import ContextMismatch, CryptoError

_scratch_lock = threading.Lock()
_scratch: dict[int, str] = {}
_names = itertools.count()


def _scratch_dir() -> str:
    pid = os.getpid()
    with _scratch_lock:
        if pid not in _scratch:
            d = tempfile.mkdtemp(prefix="hefl-seal-")  # mode 0700, never a shared-memory path
            _scratch[pid] = d
            atexit.register(shutil.rmtree, d, True)
        return _scratch[pid]


@contextlib.contextmanager
def _scratch_file(data: bytes | None = None) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """A path SEAL can write (or read ``data`` from) and a function that reads what it wrote:
    an anonymous memfd when ``_MEMFD`` holds, else a file in the private scratch directory,
    removed on exit."""
    if _MEMFD:
        fd = os.memfd_create("hefl-seal", os.MFD_CLOEXEC)
        try:
            if data:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}", lambda: os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        return
    path = os.path.join(_scratch_dir(), f"{threading.get_ident()}-{next(_names)}")
    try:
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        yield path, read
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _memfd_works() -> bool:
    """Whether anonymous memfds exist here and a path to one can be reopened (``/proc``)."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = os.memfd_create("hefl-probe", os.MFD_CLOEXEC)
    except OSError:
        return False
    try:
        with open(f"/proc/self/fd/{fd}", "wb") as f:
            f.write(b"ok")
        return os.pread(fd, 2, 0) == b"ok"
    except OSError:
        return False
    finally:
        os.close(fd)


_MEMFD = _memfd_works()


def save(obj: Any) -> bytes:
    """SEAL's serialization of ``obj`` (anything with ``save(path)``) as bytes."""
    with _scratch_file() as (path, read):
        obj.save(path)
        return read()


def load(factory: Callable[[], Any], context: Any, data: bytes) -> Any:
    """Load SEAL bytes into ``factory()`` under ``context``; SEAL validates them.

    Raises:
        ContextMismatch: SEAL refused the bytes (corrupt, or made under other parameters).
    """
    obj = factory()
    with _scratch_file(data) as (path, _):
        try:
            obj.load(context, path)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ContextMismatch(
                f"SEAL refused the data ({e}); it is corrupt or was made under other HE "
                "parameters"
            ) from e
    return obj


#: SEAL's serialization header (magic, header size, version 4.3, compression none, total size).
_HEADER = struct.Struct("<HBBBBHQ")


def load_array(target: Any, data: np.ndarray) -> None:
    """Replace the coefficient array of ``target`` (a SEAL ``DynArray``, e.g. a ciphertext's
    ``dyn_array()``) by ``data`` (uint64), through SEAL's own loader (uncompressed format)."""
    body = struct.pack("<Q", data.size) + np.ascontiguousarray(data, dtype="<u8").tobytes()
    head = _HEADER.pack(0xA15E, _HEADER.size, 4, 3, 0, 0, _HEADER.size + len(body))
    with _scratch_file(head + body) as (path, _):
        target.load(path)


def read_array(array: Any) -> np.ndarray:
    """The uint64 elements of a SEAL ``DynArray``, read from SEAL's own serialization of it
    (header, then zstd or raw: element count and the elements)."""
    data = save(array)
    magic, size, _, _, mode, _, total = _HEADER.unpack_from(data)
    if magic != 0xA15E or size != _HEADER.size or total != len(data) or mode not in (0, 2):
        raise CryptoError(f"unexpected SEAL serialization (compression mode {mode})")
    body = data[size:]
    if mode == 2:
        body = _decompressor().decompress(body, max_output_size=1 << 31)
    (count,) = struct.unpack_from("<Q", body)
    return np.frombuffer(body, dtype="<u8", count=count, offset=8).astype(np.uint64)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (making one costs about as much as a small decompression;
    one object must not be shared between threads)."""
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class Seal:
    """A SEAL context for a ``HeSpec``, with its encoder and evaluator (no keys)."""

    spec: HeSpec
    context: Any
    encoder: Any
    evaluator: Any

    @classmethod
    def of(cls, spec: HeSpec) -> Seal:
        """Build (and let SEAL re-check at 128-bit security) the context for ``spec``."""
        scheme = sealapi.SCHEME_TYPE.BFV if spec.scheme == "bfv" else sealapi.SCHEME_TYPE.CKKS
        parms = sealapi.EncryptionParameters(scheme)
        parms.set_poly_modulus_degree(spec.poly_degree)
        try:
            q = sealapi.CoeffModulus.Create(spec.poly_degree, list(spec.coeff_primes))
            parms.set_coeff_modulus(q)
            if spec.scheme == "bfv":
                parms.set_plain_modulus(
                    sealapi.PlainModulus.Batching(spec.poly_degree, spec.plain_bits)
                )
        except (RuntimeError, ValueError) as e:
            raise CryptoError(f"SEAL cannot build parameters for {spec}: {e}") from e
        context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise CryptoError(
                f"SEAL rejects the HE parameters ({context.parameters_error_message()}); "
                "they must meet 128-bit security"
            )
        encoder = (
            sealapi.BatchEncoder(context) if spec.scheme == "bfv" else sealapi.CKKSEncoder(context)
        )
        return cls(spec, context, encoder, sealapi.Evaluator(context))

    @property
    def coeff_moduli(self) -> tuple[int, ...]:
        """The data-level primes of the ciphertext modulus."""
        return tuple(int(m.value()) for m in self.context.first_context_data().parms().coeff_modulus())

    @property
    def plain_modulus(self) -> int:
        return int(self.context.first_context_data().parms().plain_modulus().value())

    # -- keys ------------------------------------------------------------------------------
    def keygen(self) -> tuple[Any, Any]:
        """A fresh (secret key, public key)."""
        gen = sealapi.KeyGenerator(self.context)
        pk = sealapi.PublicKey()
        gen.create_public_key(pk)
        return gen.secret_key(), pk

    def load_secret_key(self, data: bytes) -> Any:
        return load(sealapi.SecretKey, self.context, data)

    def load_public_key(self, data: bytes) -> Any:
        return load(sealapi.PublicKey, self.context, data)

    # -- client ----------------------------------------------------------------------------
    def encryptor(self, key: Any) -> Any:
        return sealapi.Encryptor(self.context, key)

    def encode(self, values: np.ndarray) -> Any:
        """One plaintext from ``slot_values`` reals (CKKS) or N integers in ``[0, t)`` (BFV:
        its coefficients, or its batching slots in specs made before ``coefficients``)."""
        if self.spec.coefficients:
            pt = sealapi.Plaintext(self.spec.poly_degree)
            load_array(pt.dyn_array(), values)  # SEAL refuses a coefficient >= t at encryption
            return pt
        pt = sealapi.Plaintext()
        if self.spec.scheme == "bfv":
            self.encoder.encode(values.astype(np.int64).tolist(), pt)
        else:
            z = values[0::2] + 1j * values[1::2]
            self.encoder.encode(z.tolist(), 2.0**self.spec.scale_bits, pt)
        return pt

    def encrypt(self, encryptor: Any, values: np.ndarray) -> bytes:
        """Encrypt one ciphertext's worth of values; seeded when symmetric."""
        if self.spec.symmetric:
            return save(encryptor.encrypt_symmetric(self.encode(values)))
        return save(self.encrypt_full(encryptor, values))

    def encrypt_full(self, encryptor: Any, values: np.ndarray) -> Any:
        """Encrypt one ciphertext's worth of values as a full SEAL ciphertext (both
        polynomials, never seeded: one that can be added to, not the smaller upload form)."""
        pt = self.encode(values)
        ct = sealapi.Ciphertext()
        if self.spec.symmetric:
            encryptor.encrypt_symmetric(pt, ct)
        else:
            encryptor.encrypt(pt, ct)
        return ct

    # -- server ----------------------------------------------------------------------------
    def ciphertext(self, data: bytes) -> Any:
        """Load and check one fresh ciphertext (2 polynomials, at the data level)."""
        ct = load(sealapi.Ciphertext, self.context, data)
        if ct.size() != 2 or ct.parms_id() != self.context.first_parms_id():
            raise ContextMismatch(
                f"ciphertext has {ct.size()} polynomials or another level; expected a fresh "
                "2-polynomial ciphertext under these parameters"
            )
        return ct

    def add_inplace(self, acc: Any, ct: Any) -> None:
        self.evaluator.add_inplace(acc, ct)

    # -- key holder ------------------------------------------------------------------------
    def decryptor(self, secret_key: Any) -> Any:
        return sealapi.Decryptor(self.context, secret_key)

    def decrypt(self, decryptor: Any, ct: Any) -> np.ndarray:
        """Decrypt and decode one ciphertext (uint64 slots for BFV, reals for CKKS).

        Raises:
            CryptoError: BFV noise budget exhausted (more noise than the spec allows).
        """
        if self.spec.scheme == "bfv" and decryptor.invariant_noise_budget(ct) <= 0:
            raise CryptoError(
                "the aggregate's noise budget is exhausted, so it cannot be decrypted correctly; "
                "it holds more contributions than max_clients allows"
            )
        pt = sealapi.Plaintext()
        decryptor.decrypt(ct, pt)
        return self.decode(pt)

    def decode(self, pt: Any) -> np.ndarray:
        """The values of a decrypted plaintext (``encode``'s inverse)."""
        if self.spec.coefficients:
            coeffs = np.zeros(self.spec.poly_degree, dtype=np.uint64)
            got = read_array(pt.dyn_array())  # SEAL may drop high zero coefficients
            coeffs[: got.size] = got
            return coeffs
        if self.spec.scheme == "bfv":
            return np.asarray(self.encoder.decode_uint64(pt), dtype=np.uint64)
        z = np.asarray(self.encoder.decode_complex(pt))
        out = np.empty(2 * z.size)
        out[0::2], out[1::2] = z.real, z.imag
        return out

    def add_to_decryption(self, cts: list[Any], noise: np.ndarray) -> None:
        """Add integer polynomial ``noise[i]`` (coefficient form, int64) to what ``cts[i]``
        decrypts to, in place: ``c0 += noise[i]`` in SEAL's NTT domain (CKKS noise flooding).

        SEAL refuses to make a ciphertext whose second polynomial is zero ("transparent"), so
        ``(noise, 1)`` is added and ``(0, 1)`` subtracted; both are SEAL-transformed to NTT form.
        """
        moduli = self.coeff_moduli
        n = self.spec.poly_degree
        ones = np.ones(n * len(moduli), dtype=np.uint64)
        offset = self._coefficient_ciphertext(cts[0].scale, np.zeros_like(ones), ones)
        for ct, f in zip(cts, noise, strict=True):
            c0 = np.concatenate([np.mod(f, q).astype(np.uint64) for q in moduli])
            flood = self._coefficient_ciphertext(ct.scale, c0, ones)
            self.evaluator.add_inplace(ct, flood)
            self.evaluator.sub_inplace(ct, offset)

    def _coefficient_ciphertext(self, scale: float, c0: np.ndarray, c1: np.ndarray) -> Any:
        """The ciphertext ``(c0, c1)`` given in coefficient form, moved to NTT form by SEAL."""
        ct = sealapi.Ciphertext(self.context)
        ct.resize(self.context, self.context.first_parms_id(), 2)
        load_array(ct.dyn_array(), np.concatenate([c0, c1]))
        ct.scale = scale
        self.evaluator.transform_to_ntt_inplace(ct)
        return ct

    # -- raw polynomials (threshold keys, ``hefl.crypto.threshold``) ------------------------
    # Polynomials are uint64 arrays of shape (primes, N), residues prime by prime in SEAL's
    # order. SEAL does every transform and every product; these helpers only move coefficients
    # in and out of SEAL objects, through SEAL's own (validating) loaders.
    @property
    def key_moduli(self) -> tuple[int, ...]:
        """All primes of the modulus, the special prime included (the level keys live at)."""
        return tuple(int(m.value()) for m in self.context.key_context_data().parms().coeff_modulus())

    def polys(self, obj: Any, count: int) -> np.ndarray:
        """The coefficient array of a SEAL ciphertext, plaintext or key data, as ``count``
        polynomials of shape (primes, N)."""
        return read_array(obj.dyn_array()).reshape(count, -1, self.spec.poly_degree)

    def uniform_polynomial(self, seed: bytes) -> np.ndarray:
        """The polynomial ``a`` (NTT form, key level) that SEAL samples uniformly from its
        SHAKE-256 PRNG seeded with ``seed`` (64 bytes): every party derives the same one."""
        if len(seed) != 64:
            raise ValueError("the common polynomial needs a 64-byte seed")
        src = self.context.key_context_data().parms()
        parms = sealapi.EncryptionParameters(src.scheme())
        parms.set_poly_modulus_degree(self.spec.poly_degree)
        parms.set_coeff_modulus(src.coeff_modulus())
        if self.spec.scheme == "bfv":
            parms.set_plain_modulus(src.plain_modulus())
        parms.set_random_generator(
            sealapi.Shake256PRNGFactory(list(struct.unpack("<8Q", seed)))
        )
        context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        pk = sealapi.PublicKey()
        sealapi.KeyGenerator(context).create_public_key(pk)
        return self.polys(pk.data(), 2)[1]  # a public key is (-a s + e, a): keep a

    def secret_key_polys(self, secret_key: Any) -> np.ndarray:
        """A secret key's polynomial (NTT form, key level)."""
        return self.polys(secret_key.data(), 1)[0]

    def secret_key_from(self, s: np.ndarray) -> bytes:
        """SEAL bytes of the secret key whose polynomial (NTT form, key level) is ``s``."""
        template, _ = self.keygen()  # a key of that shape; kept alive while its data is used
        data = template.data()
        load_array(data.dyn_array(), s)
        return save(data)  # a secret key serializes as its plaintext

    def public_key_from(self, p0: np.ndarray, a: np.ndarray) -> bytes:
        """SEAL bytes of the public key ``(p0, a)`` (NTT form, key level); SEAL checks them."""
        _, template = self.keygen()
        ct = template.data()
        load_array(ct.dyn_array(), np.concatenate([p0.ravel(), a.ravel()]))
        data = save(ct)  # a public key serializes as its ciphertext
        self.load_public_key(data)
        return data

    def ntt_plaintext(self, values: np.ndarray) -> Any:
        """A plaintext in NTT form at the data level holding ``values`` (primes, N)."""
        pt = sealapi.Plaintext(self.spec.poly_degree, 0)
        if self.spec.scheme == "bfv":
            self.evaluator.transform_to_ntt_inplace(pt, self.context.first_parms_id())
        else:
            self.encoder.encode(0.0, self.context.first_parms_id(), 1.0, pt)
        load_array(pt.dyn_array(), values)
        return pt

    def ntt_copy(self, ct: Any) -> Any:
        """A copy of ``ct`` in NTT form (CKKS ciphertexts already are)."""
        out = sealapi.Ciphertext()
        if ct.is_ntt_form():
            self.evaluator.negate(ct, out)
            self.evaluator.negate_inplace(out)
        else:
            self.evaluator.transform_to_ntt(ct, out)
        return out

    def from_ntt(self, poly: np.ndarray) -> np.ndarray:
        """SEAL's inverse NTT of one polynomial (primes, N) at the data level."""
        ct = self._ntt_ciphertext(poly, poly)
        self.evaluator.transform_from_ntt_inplace(ct)
        return self.polys(ct, 2)[0]

    def decrypt_shifted(self, x: Any, d: np.ndarray) -> np.ndarray:
        """Decode the polynomial ``c0 + d`` (NTT form, data level), where ``c0`` is the first
        part of ``x`` (an NTT-form ciphertext, consumed): SEAL adds ``(d, d)`` to ``x`` and
        decrypts the result under the zero key, which gives its first part itself (BFV:
        SEAL's scale-and-round; CKKS: SEAL's decoding). ``x``'s coefficients are never read
        out of SEAL.

        Raises:
            CryptoError: BFV: ``c0 + d`` is not within the noise budget (a wrong or garbled sum).
        """
        shift = self._ntt_ciphertext(d, d)
        shift.scale = x.scale
        self.evaluator.add_inplace(x, shift)
        if self.spec.scheme == "bfv":
            self.evaluator.transform_from_ntt_inplace(x)
        return self.decrypt(self._zero_decryptor, x)

    def _ntt_ciphertext(self, c0: np.ndarray, c1: np.ndarray) -> Any:
        """The NTT-form ciphertext ``(c0, c1)`` at the data level (scale 1), its parts loaded
        as given: a copy of ``_ntt_template``'s form with its data replaced."""
        ct = sealapi.Ciphertext()
        self.evaluator.negate(self._ntt_template, ct)
        load_array(ct.dyn_array(), np.concatenate([c0.ravel(), c1.ravel()]))
        return ct

    @cached_property
    def _ntt_template(self) -> Any:
        """A 2-part NTT-form ciphertext at the data level (SEAL refuses to make a transparent
        one, whose second part is zero, so both parts are ones)."""
        ones = np.ones(len(self.coeff_moduli) * self.spec.poly_degree, dtype=np.uint64)
        return self._coefficient_ciphertext(1.0, ones, ones)

    @cached_property
    def _zero_decryptor(self) -> Any:
        zero = np.zeros(len(self.key_moduli) * self.spec.poly_degree, dtype=np.uint64)
        return self.decryptor(self.load_secret_key(self.secret_key_from(zero)))

    def noise_budget(self, decryptor: Any, ct: Any) -> int:
        """BFV invariant noise budget in bits (for tests and diagnostics)."""
        return int(decryptor.invariant_noise_budget(ct))
