"""Signed key rotation statements: format, decoding hostile bytes, and following chains."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from agent.identity import rotation
from agent.identity.keys import fingerprint_of_public_key, new_device_id, sign
from agent.identity.rotation import MAX_STATEMENTS, RotationStatement, decode, encode, follow_chain, make_statement

DEV = "AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH"
OTHER = "ZZZZYYYYXXXXWWWWVVVVUUUUTTTTSSSS"

# A statement made once with fixed keys (scalars 0x1111 -> 0x2222) and checked in, so a change to
# the wire format or the signed bytes is deliberate.
VECTOR = bytes.fromhex(
    "9801d9204141414142424242434343434444444445454545464646464747474748484848d940333736386562663663"
    "3361396538316235613566313234343132326166636533616336373631393438643463383138313937383464393137"
    "3362643462383330d94061376637323164393839656166303665333436623232306263396638393365633030336634"
    "363463653034323038663663663963323134613964353334346535c45b3059301306072a8648ce3d020106082a8648"
    "ce3d030107034200040dcc7648c78a3118f2612866fe83ef19f40304f623399e1211a10f2b3d1c05cf30e8027677bc"
    "b912943e99ff71140ea9bc24713be1b75c31ff4054724c4f9d00c45b3059301306072a8648ce3d020106082a8648ce"
    "3d03010703420004a62f048f367359809c2d46c2049d7d7bf268c3c073c472753cb18a24a8ad20b1caccf8104b6667"
    "95c7f35dac9dc444b3c2c61978198c49859955b99956da5edbce6553f100c4473045022055fb5f6540d2b9397092cf"
    "49db44d1554aa35f8d418ea6407f4af367f975f155022100d25285ab805b75f9063bd4d273c8586222a388838b9473"
    "d58167a02a547c432f"
)
VECTOR_OLD_FP = "3768ebf6c3a9e81b5a5f1244122afce3ac6761948d4c81819784d9173bd4b830"
VECTOR_NEW_FP = "a7f721d989eaf06e346b220bc9f893ec003f464ce04208f6cf9c214a9d5344e5"


def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def fp(k: ec.EllipticCurvePrivateKey) -> str:
    return fingerprint_of_public_key(k.public_key())


def rotate(
    old: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey, t: int = 1000, dev: str = DEV
) -> RotationStatement:
    return make_statement(old, new.public_key(), dev, t)


@pytest.fixture(scope="module")
def keys() -> list[ec.EllipticCurvePrivateKey]:
    return [key() for _ in range(18)]


# -- format ---------------------------------------------------------------------------------------


def test_signed_bytes_are_label_and_length_prefixed_fields() -> None:
    spki = b"\x30\x59" + b"k" * 89
    got = rotation.signed_bytes(DEV, "a" * 64, "b" * 64, spki, 0x0102030405)
    want = (
        b"\x00\x14tofu-agent/v1/rotate"
        + b"\x00\x20"
        + DEV.encode()
        + b"\x00\x40"
        + b"a" * 64
        + b"\x00\x40"
        + b"b" * 64
        + b"\x00\x5b"
        + spki
        + b"\x00\x08\x00\x00\x00\x01\x02\x03\x04\x05"
    )
    assert got == want


def test_known_vector_decodes_and_links() -> None:
    stmt = decode(VECTOR)
    assert (stmt.device_id, stmt.old_fingerprint, stmt.new_fingerprint) == (DEV, VECTOR_OLD_FP, VECTOR_NEW_FP)
    assert stmt.time == 1700000000
    assert encode(stmt) == VECTOR
    old = ec.derive_private_key(0x1111, ec.SECP256R1())
    assert fp(old) == VECTOR_OLD_FP
    assert follow_chain(VECTOR_OLD_FP, DEV, VECTOR_NEW_FP, [VECTOR]).ok


def test_round_trip_and_size_bound() -> None:
    old, new = key(), key()
    stmt = make_statement(old, new.public_key(), new_device_id(), rotation.MAX_TIME)
    data = encode(stmt)
    assert len(data) <= rotation.MAX_ENCODED
    assert decode(data) == stmt
    assert rotation.check(stmt) is None
    assert stmt.old_fingerprint == fp(old) and stmt.new_fingerprint == fp(new)
    assert hashlib.sha256(stmt.new_public_key).hexdigest() == stmt.new_fingerprint


def test_oversized_input_is_malformed() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode(b"\x00" * (rotation.MAX_ENCODED + 1))
    assert exc.value.code is ErrorCode.MALFORMED


def test_make_statement_refuses_bad_shape() -> None:
    k = key()
    with pytest.raises(LocalProtocolError):
        make_statement(k, key().public_key(), "not-a-device-id", 1)
    with pytest.raises(LocalProtocolError):
        make_statement(k, k.public_key(), DEV, 1)  # rotating to the same key
    with pytest.raises(LocalProtocolError):
        make_statement(k, key().public_key(), DEV, -1)
    with pytest.raises(LocalProtocolError):
        make_statement(k, ec.generate_private_key(ec.SECP384R1()).public_key(), DEV, 1)


def _fields(stmt: RotationStatement) -> list[object]:
    return list(msgpack.unpackb(encode(stmt)))


def _pack(fields: list[object]) -> bytes:
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, 2),  # unknown version
        (0, True),  # bool is not the version int
        (1, "short"),
        (1, b"AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH"),  # bytes where a string belongs
        (2, "A" * 64),  # upper-case fingerprint
        (3, None),
        (4, b""),
        (5, b"x" * 200),
        (6, -5),
        (6, 1.5),
        (6, True),
        (7, b""),
        (7, "sig"),
    ],
)
def test_bad_fields_are_malformed(index: int, value: object) -> None:
    fields = _fields(rotate(key(), key()))
    fields[index] = value
    with pytest.raises(RemoteProtocolError) as exc:
        decode(_pack(fields))
    assert exc.value.code is ErrorCode.MALFORMED


def test_wrong_arity_and_types_are_malformed() -> None:
    fields = _fields(rotate(key(), key()))
    for bad in (fields[:7], [*fields, 0], {"v": 1}, "x", 7, None):
        with pytest.raises(RemoteProtocolError):
            decode(_pack(bad))  # type: ignore[arg-type]


def test_mismatched_public_key_is_malformed() -> None:
    fields = _fields(rotate(key(), key()))
    fields[5] = fields[4]  # new SPKI no longer hashes to the new fingerprint
    with pytest.raises(RemoteProtocolError, match="new public key"):
        decode(_pack(fields))


def test_non_canonical_spki_is_refused() -> None:
    # The same key with a compressed point: a different hash, so it could never match a handshake.
    old, new = key(), key()
    stmt = rotate(old, new)
    spki = new.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    point = new.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    algorithm = spki[2:23]  # the AlgorithmIdentifier SEQUENCE: ecPublicKey, prime256v1
    inner = algorithm + b"\x03\x22\x00" + point  # BIT STRING: no unused bits, 33-byte point
    compressed = b"\x30" + bytes([len(inner)]) + inner
    loaded = serialization.load_der_public_key(compressed)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert loaded.public_numbers() == new.public_key().public_numbers()
    forged = dataclasses.replace(
        stmt, new_public_key=compressed, new_fingerprint=hashlib.sha256(compressed).hexdigest()
    )
    assert rotation.check(forged) is not None


def test_every_truncation_and_bit_flip_is_malformed_or_valid() -> None:
    data = encode(rotate(key(), key()))
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            decode(data[:n])
    rng = random.Random(4)
    for _ in range(300):
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        try:
            decode(bytes(buf))
        except RemoteProtocolError as exc:
            assert exc.code is ErrorCode.MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=rotation.MAX_ENCODED + 8))
def test_garbage_never_escapes_as_another_error(data: bytes) -> None:
    try:
        decode(data)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=100),
    lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_msgpack_values, min_size=8, max_size=8))
@pytest.mark.slow
def test_well_formed_msgpack_of_wrong_shape_is_malformed(fields: list[object]) -> None:
    data = _pack(fields)
    if len(data) > rotation.MAX_ENCODED:
        data = data[: rotation.MAX_ENCODED]
    with pytest.raises(RemoteProtocolError) as exc:
        decode(data)
    assert exc.value.code is ErrorCode.MALFORMED


# -- chains ---------------------------------------------------------------------------------------


def test_no_rotation_needed() -> None:
    r = follow_chain("a" * 64, DEV, "a" * 64, [])
    assert r.ok and r.path == ("a" * 64,)


def test_single_link(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b = keys[0], keys[1]
    r = follow_chain(fp(a), DEV, fp(b), [rotate(a, b)])
    assert r.ok, r.reason
    assert r.path == (fp(a), fp(b))
    assert [s.new_fingerprint for s in r.links] == [fp(b)]


def test_peer_offline_during_two_rotations_follows_chain_in_any_order(
    keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    a, b, c = keys[:3]
    stmts = [encode(rotate(b, c, 2000)), encode(rotate(a, b, 1000))]
    r = follow_chain(fp(a), DEV, fp(c), stmts)
    assert r.ok, r.reason
    assert r.path == (fp(a), fp(b), fp(c))
    # A peer that already followed the first rotation needs only the second link.
    assert follow_chain(fp(b), DEV, fp(c), stmts).path == (fp(b), fp(c))


def test_broken_link(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b, c, d = keys[:4]
    r = follow_chain(fp(a), DEV, fp(d), [rotate(a, b), rotate(c, d)])
    assert not r.ok
    assert "do not lead" in r.reason


def test_forged_signature(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b, mallory = keys[0], keys[1], keys[2]
    honest = rotate(a, b)
    # Signed by mallory but claiming to come from the pinned key a.
    forged = dataclasses.replace(honest, signature=sign(mallory, honest.signed_bytes()))
    r = follow_chain(fp(a), DEV, fp(b), [forged])
    assert not r.ok and "signature" in r.ignored[0]
    # a's genuine signature moved onto a statement for mallory's key.
    retarget = dataclasses.replace(
        honest,
        new_public_key=rotate(b, mallory).new_public_key,
        new_fingerprint=fp(mallory),
    )
    r = follow_chain(fp(a), DEV, fp(mallory), [retarget])
    assert not r.ok
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode(encode(retarget))
    # Mallory's own key and signature under the pinned fingerprint: the hash gives it away.
    mine = rotate(mallory, b)
    relabelled = dataclasses.replace(mine, old_fingerprint=fp(a))
    r = follow_chain(fp(a), DEV, fp(b), [relabelled])
    assert not r.ok and "old public key" in r.ignored[0]


def test_replayed_old_statement_does_not_reach_a_new_key(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b, c = keys[:3]
    r = follow_chain(fp(a), DEV, fp(c), [rotate(a, b)])
    assert not r.ok


def test_statement_for_another_device_counts_for_nothing(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b = keys[:2]
    r = follow_chain(fp(a), DEV, fp(b), [rotate(a, b, dev=OTHER)])
    assert not r.ok
    assert "another device" in r.ignored[0]


def test_statement_signed_by_an_unpinned_key_counts_for_nothing(
    keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    a, b, x = keys[:3]
    r = follow_chain(fp(a), DEV, fp(b), [rotate(x, b)])
    assert not r.ok
    assert r.reason == "no valid statement is signed by the pinned key"


def test_cycles_are_harmless(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b, c, d = keys[:4]
    stmts = [rotate(a, b, 1), rotate(b, a, 2), rotate(b, c, 3), rotate(c, b, 3)]
    r = follow_chain(fp(a), DEV, fp(c), stmts)
    assert r.ok and r.path == (fp(a), fp(b), fp(c))
    assert not follow_chain(fp(a), DEV, fp(d), stmts).ok


def test_link_times_must_not_go_backwards(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b, c = keys[:3]
    assert not follow_chain(fp(a), DEV, fp(c), [rotate(a, b, 10), rotate(b, c, 5)]).ok
    assert follow_chain(fp(a), DEV, fp(c), [rotate(a, b, 10), rotate(b, c, 10)]).ok


def test_earliest_arrival_keeps_later_links_usable(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    # a->b at 50 directly, or a->x->b arriving at 20; only the early arrival can use b->c at 30.
    a, b, c, x = keys[:4]
    stmts = [rotate(a, b, 50), rotate(b, c, 30), rotate(a, x, 10), rotate(x, b, 20)]
    r = follow_chain(fp(a), DEV, fp(c), stmts)
    assert r.ok and r.path == (fp(a), fp(x), fp(b), fp(c))


def test_garbage_among_statements_is_skipped(keys: list[ec.EllipticCurvePrivateKey]) -> None:
    a, b = keys[:2]
    r = follow_chain(fp(a), DEV, fp(b), [b"\xc1", b"", encode(rotate(a, b))])
    assert r.ok
    assert len(r.ignored) == 2


def test_a_chain_at_the_statement_cap_is_followed_and_one_more_refused(
    keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    n = MAX_STATEMENTS
    stmts = [rotate(keys[i], keys[i + 1], i) for i in range(n + 1)]
    r = follow_chain(fp(keys[0]), DEV, fp(keys[n]), stmts[:n])
    assert r.ok and len(r.links) == n
    r = follow_chain(fp(keys[0]), DEV, fp(keys[n + 1]), stmts)
    assert not r.ok and "over the limit" in r.reason
