"""The threshold key ceremony between separate key holders (``hefl.net.ceremony``), attacked by
the relay that moves its files (an operator or the server).

Claims: the relay cannot substitute a member's nonce, X25519 key or public share (every
message is signed and checked against the registry), cannot read a Shamir share (sealed to its
recipient), cannot mix messages of two ceremonies; a member deals once; the state file is
owner-only and removed; the keys it yields decrypt with any 2 of 3 shares.
"""

from __future__ import annotations

import dataclasses
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from typer.testing import CliRunner

from hefl.crypto import make_spec
from hefl.crypto.secure_sum import EncryptingClient
from hefl.crypto.threshold import fuse, partial_decrypt
from hefl.errors import KeyCustodyError
from hefl.net.ceremony import STATE_FILE, CeremonyMember, Deal, Hello, open_share
from hefl.net.identity import Identity

NAMES = ["kh1", "kh2", "kh3"]
SIZE = 300


def committee(tmp_path, spec=None, run_id="run"):
    spec = spec or make_spec("bfv", SIZE, custody="threshold")
    ids = {n: Identity.generate() for n in NAMES}
    signers = {n: i.public_hex for n, i in ids.items()}
    return [CeremonyMember(spec, run_id, NAMES, n, ids[n], signers, tmp_path / n)
            for n in NAMES]


def decrypts(public, shares, members=(1, 3)) -> bool:
    x = np.random.default_rng(0).uniform(-1, 1, SIZE)
    up = EncryptingClient(public, seed=0).encode(0, x, 1.0)
    seal = public.seal
    cts = [seal.ciphertext(b) for b in up.ciphertexts]
    parts = [partial_decrypt(shares[j - 1], cts, members) for j in members]
    slots = fuse(public.spec, parts, cts)
    from hefl.crypto.packing import unpack

    weighted, weight = unpack(slots, public.spec)
    return weight == 1.0 and bool(np.abs(weighted - x).max() < public.spec.error_bound)


def test_three_separate_key_holders_make_one_key_that_any_two_decrypt(tmp_path):
    ms = committee(tmp_path)
    hellos = [m.start().to_bytes() for m in ms]
    assert stat.S_IMODE((tmp_path / "kh2" / STATE_FILE).stat().st_mode) == 0o600
    deals = [m.deal(hellos).to_bytes() for m in ms]
    results = [m.finish(hellos, deals) for m in ms]
    publics = {r[0].to_bytes() for r in results}
    assert len(publics) == 1  # every member computed the same public context
    shares = [r[1] for r in results]
    assert [s.party for s in shares] == [1, 2, 3]
    assert decrypts(results[0][0], shares, (1, 3)) and decrypts(results[0][0], shares, (2, 3))
    assert not (tmp_path / "kh1" / STATE_FILE).exists()  # the key share is gone with it


def test_the_relay_cannot_substitute_a_members_hello_or_deal(tmp_path):
    ms = committee(tmp_path)
    hellos = [m.start().to_bytes() for m in ms]
    # the relay puts its own X25519 key into kh3's hello, to read kh3's shares
    h3 = Hello.from_bytes(hellos[2])
    relay = X25519PrivateKey.generate()
    from hefl.net.ceremony import _raw

    forged = dataclasses.replace(h3, box_key=_raw(relay.public_key())).to_bytes()
    with pytest.raises(KeyCustodyError, match="hello of 'kh3' is not signed"):
        ms[0].deal([hellos[0], hellos[1], forged])
    with pytest.raises(KeyCustodyError, match="needs one from each"):
        ms[0].deal(hellos[:2])
    deals = [m.deal(hellos).to_bytes() for m in ms]
    # the relay swaps kh2's public share for its own
    d2 = Deal.from_bytes(deals[1], 3)
    swapped = dataclasses.replace(d2, public_share=Deal.from_bytes(deals[0], 3).public_share)
    with pytest.raises(KeyCustodyError, match="deal of 'kh2' is not signed"):
        ms[0].finish(hellos, [deals[0], swapped.to_bytes(), deals[2]])
    # ... and cannot open any sealed share with its own key
    key_id = d2.key_id
    with pytest.raises(KeyCustodyError, match="does not open"):
        open_share(d2.sealed[0], relay, "run", key_id, 2, 1)


def test_messages_of_another_ceremony_are_refused(tmp_path):
    ms = committee(tmp_path / "a")
    hellos = [m.start().to_bytes() for m in ms]
    other = committee(tmp_path / "b", run_id="another run")
    other_hellos = [m.start().to_bytes() for m in other]
    with pytest.raises(KeyCustodyError, match="not signed by its registered identity"):
        ms[0].deal([hellos[0], hellos[1], other_hellos[2]])  # other identities
    deals = [m.deal(hellos).to_bytes() for m in ms]
    with pytest.raises(KeyCustodyError, match="dealt its shares already"):
        ms[0].deal(hellos)
    assert ms[0].finish(hellos, deals)  # the honest messages still finish


def test_the_ceremony_from_the_command_line(tmp_path):
    from hefl.cli import app
    from hefl.net.certs import make_federation
    from hefl.net.testing import to_toml

    fed = make_federation(tmp_path / "certs", ["c1", "c2"], key_holders=NAMES)
    config = tmp_path / "run.toml"
    config.write_text(to_toml({"model": {"kind": "logreg", "n_features": 20, "n_classes": 2},
                               "aggregation": {"kind": "bfv", "custody": "threshold",
                                               "key_holders": NAMES, "threshold": 2}}))
    runner = CliRunner()
    hellos, deals = tmp_path / "hellos", tmp_path / "deals"
    hellos.mkdir()
    deals.mkdir()

    def step(name, what):
        args = ["ceremony", what, "--config", str(config), "--name", name,
                "--identity", str(fed.client_dir / f"{name}.id"), "--registry", str(fed.registry),
                "--key-dir", str(tmp_path / name), "--hellos", str(hellos), "--deals", str(deals)]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        return r.output

    for n in NAMES:
        step(n, "hello")
        (hellos / f"{n}.hello").write_bytes((tmp_path / n / f"{n}.hello").read_bytes())
    for n in NAMES:
        step(n, "deal")
        (deals / f"{n}.deal").write_bytes((tmp_path / n / f"{n}.deal").read_bytes())
    ids = {step(n, "finish").split()[2] for n in NAMES}
    assert len(ids) == 1  # the same key id printed by all three
    from hefl.crypto.keys import KeyShare, PublicContext

    public = PublicContext.from_bytes((tmp_path / "kh1" / "public.ctx").read_bytes())
    shares = [KeyShare.from_bytes((tmp_path / n / "share.key").read_bytes()) for n in NAMES]
    assert stat.S_IMODE((tmp_path / "kh2" / "share.key").stat().st_mode) == 0o600
    assert public.key_id.hex() in ids and public.spec.size == 21  # binary logreg: 20 + 1
    x = np.random.default_rng(1).uniform(-1, 1, 21)
    up = EncryptingClient(public, seed=0).encode(0, x, 1.0)
    cts = [public.seal.ciphertext(b) for b in up.ciphertexts]
    slots = fuse(public.spec, [partial_decrypt(shares[j - 1], cts, (1, 2)) for j in (1, 2)], cts)
    from hefl.crypto.packing import unpack

    weighted, _ = unpack(slots, public.spec)
    assert np.abs(weighted - x).max() < public.spec.error_bound
    r = runner.invoke(app, ["keys", "--config", str(config), "--out", str(tmp_path / "k")])
    assert r.exit_code == 2 and "has no dealer" in r.output  # no dealer's shortcut
