"""Tests for keyface_core.flip and keyface_core.keys: the keyed sign flip, its keystream, key material.

Pure core: no ComfyUI. Covers bit-exact involution, pattern independence and balance, a pinned
golden keystream, the public Gaussian, key files / environment variables / passphrases (scrypt),
SecretKey's refusal to show or serialise its bytes, the key check value, the keygen CLI, and that no
KeyMaterialError text (or traceback) ever carries key material.
"""

import base64
import copy
import hashlib
import logging
import os
import pickle
import stat
import subprocess
import sys
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keyface_core.errors import KeyFaceError, KeyMaterialError
from keyface_core.flip import apply_flip, flip_context, public_gaussian, sign_pattern
from keyface_core.keys import (DEFAULT_SCRYPT, KEY_BYTES, NONCE_BYTES, SecretKey, check_matches, generate_key,
                               key_check_value, key_from_env, load_key_file, new_nonce, parse_key_text,
                               passphrase_key, scrypt_image_key, write_key_file)

FAST_KDF = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1}   # tests only; images record DEFAULT_SCRYPT
BIG = (1, 4, 128, 128)                                      # 65,536 elements
BIG_ALT = (1, 4, 256, 64)                                   # same count, other shape


def _raw_key(material: bytes) -> SecretKey:
    return SecretKey(material, kind="key", source="test key")


def _pattern(image_key: bytes, shape=BIG, face: int = 0) -> torch.Tensor:
    return sign_pattern(image_key, shape, flip_context(shape, face))


def _differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten() != b.flatten()).double().mean())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw IEEE bits, so -0.0 and 0.0 (and every payload) are told apart."""
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def _special_values(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 10
    flat = x.view(-1)
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), info.max, -info.max, info.tiny, -info.tiny,
                             info.tiny / 4, -info.tiny / 4, info.eps, 1.0, -1.0], dtype=dtype)
    flat[: len(specials)] = specials
    return x


# ==============================================================================================
# Flip: bit-exact involution
# ==============================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flip_is_a_bit_exact_involution_without_mask(dtype):
    shape = (2, 4, 16, 16)
    x = _special_values(shape, dtype)
    signs = _pattern(bytes(range(32)), shape)
    once = apply_flip(x, signs)
    twice = apply_flip(once, signs)
    assert once.dtype == dtype and twice.dtype == dtype
    assert torch.equal(twice, x)
    assert torch.equal(_bits(twice), _bits(x))
    # The flip changes exactly the sign bit where the pattern is -1 and nothing else.
    assert torch.equal(_bits(once), _bits(torch.where(signs.to(dtype) < 0, -x, x)))
    assert 0.4 < float((signs < 0).double().mean()) < 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_shape", [(2, 1, 16, 16), (1, 1, 16, 16), (2, 4, 16, 16)])
def test_flip_with_mask_is_an_involution_and_leaves_outside_bit_exact(dtype, mask_shape):
    shape = (2, 4, 16, 16)
    x = _special_values(shape, dtype, seed=1)
    signs = _pattern(b"\x01" * 32, shape)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(2))
    mask.view(-1)[:4] = torch.tensor([0.5, 0.49999, 1.0, 0.0])   # the threshold: >= 0.5 is inside
    once = apply_flip(x, signs, mask)
    twice = apply_flip(once, signs, mask)
    assert torch.equal(_bits(twice), _bits(x))
    inside = (mask >= 0.5).expand(shape)
    assert torch.equal(_bits(once[~inside]), _bits(x[~inside]))
    assert torch.equal(_bits(once[inside]), _bits((x * signs.to(dtype))[inside]))
    # The threshold element itself (mask 0.5) is flipped where its sign is -1, 0.49999 is not touched.
    first = (0,) * len(shape)
    assert bool(inside[first])
    flipped_somewhere_inside = (_bits(once) != _bits(x)) & inside
    assert bool(flipped_somewhere_inside.any())
    assert not bool(((_bits(once) != _bits(x)) & ~inside).any())


def test_flip_mask_of_zeros_and_ones():
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    signs = _pattern(b"\x02" * 32, (1, 4, 8, 8))
    assert torch.equal(apply_flip(x, signs, torch.zeros(1, 1, 8, 8)), x)
    assert torch.equal(apply_flip(x, signs, torch.ones(1, 1, 8, 8)), apply_flip(x, signs))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=64),
       st.binary(min_size=32, max_size=32), st.booleans())
def test_flip_involution_property(values, key, use_mask):
    x = torch.tensor(values, dtype=torch.float32)
    signs = sign_pattern(key, tuple(x.shape), flip_context(tuple(x.shape)))
    mask = (torch.arange(len(values)) % 3 == 0).float() if use_mask else None
    assert torch.equal(_bits(apply_flip(apply_flip(x, signs, mask), signs, mask)), _bits(x))
    x64 = x.double()
    assert torch.equal(_bits(apply_flip(apply_flip(x64, signs, mask), signs, mask)), _bits(x64))


# ==============================================================================================
# Flip: the keystream
# ==============================================================================================


def test_pattern_is_plus_minus_one_float32_of_the_shape():
    for shape in [(1, 4, 16, 16), (3, 5, 7), (1,), (4, 1, 1)]:
        p = _pattern(b"k" * 32, shape)
        assert p.shape == shape and p.dtype == torch.float32
        assert bool(((p == 1) | (p == -1)).all())


def test_same_key_nonce_context_give_the_same_pattern():
    key = _raw_key(b"\x11" * 32)
    nonce = bytes(range(16))
    assert torch.equal(_pattern(key.image_key(nonce)), _pattern(key.image_key(nonce)))
    # A fresh SecretKey from the same bytes derives the same pattern.
    assert torch.equal(_pattern(key.image_key(nonce)), _pattern(_raw_key(b"\x11" * 32).image_key(nonce)))


def test_pattern_changes_with_nonce_key_face_and_shape():
    key = _raw_key(b"\x11" * 32)
    nonce = bytes(range(16))
    base = _pattern(key.image_key(nonce))
    others = {
        "other nonce": _pattern(key.image_key(bytes(range(1, 17)))),
        "one nonce bit": _pattern(key.image_key(bytes([1]) + bytes(range(1, 16)))),
        "other key": _pattern(_raw_key(b"\x12" * 32).image_key(nonce)),
        "other face": _pattern(key.image_key(nonce), face=1),
        "other shape": _pattern(key.image_key(nonce), shape=BIG_ALT),
        "other purpose": sign_pattern(key.image_key(nonce), BIG, flip_context(BIG, 0, purpose="other")),
    }
    for name, pattern in others.items():
        frac = _differing(base, pattern)
        assert 0.47 <= frac <= 0.53, f"{name}: {frac:.4f} of signs differ"


def test_pattern_is_balanced():
    for seed in range(4):
        p = _pattern(hashlib.sha256(bytes([seed])).digest())
        minus = float((p < 0).double().mean())
        assert 0.49 <= minus <= 0.51, minus      # sd 0.2 % over 65,536 fair bits


def test_flip_context_is_unambiguous():
    # Length-prefixed fields: shape (1, 23) vs (12, 3), face 1 vs 11, never the same bytes.
    assert flip_context((1, 23)) != flip_context((12, 3))
    assert flip_context((4, 8), face_index=1) != flip_context((4, 8), face_index=11)
    assert flip_context((4, 8), 0, "a") != flip_context((4, 8), 0, "b")


GOLDEN_KEY = bytes(range(32))
GOLDEN_NONCE = bytes(16)
GOLDEN_IMAGE_KEY = "8a7023301e5ef5349c64465e58066fd2830ccb9ba18edb6738cb0f9f8136cb1a"
GOLDEN_SIGNS_SHA256 = {
    # sha256 of the first 1024 signs as bytes (1 = minus) of sign_pattern(image_key, shape, flip_context(shape, 0))
    (1, 4, 16, 16): "cf710a5196b9f548cf727ec4d6e8d90655e246138f24591a0adff7085c4453af",
}
GOLDEN_FIRST_16 = [-1, 1, 1, 1, 1, -1, -1, -1, 1, -1, -1, -1, -1, 1, 1, 1]


def test_golden_keystream_is_stable():
    """A change of the image-key derivation or the keystream breaks every stored image: caught here."""
    image_key = _raw_key(GOLDEN_KEY).image_key(GOLDEN_NONCE)
    assert image_key.hex() == GOLDEN_IMAGE_KEY
    shape = (1, 4, 16, 16)
    signs = _pattern(image_key, shape).flatten()
    assert signs[:16].tolist() == GOLDEN_FIRST_16
    digest = hashlib.sha256((signs[:1024] < 0).numpy().astype(np.uint8).tobytes()).hexdigest()
    assert digest == GOLDEN_SIGNS_SHA256[shape]


def test_keystream_matches_its_specification():
    """Independent re-derivation from the documented construction (HMAC-SHA256 image key, SHAKE-256 stream)."""
    import hmac

    def enc(*fields):
        return b"".join(len(f).to_bytes(8, "big") + f for f in fields)

    image_key = hmac.new(GOLDEN_KEY, b"keyface/v1/image-key\x00" + GOLDEN_NONCE, hashlib.sha256).digest()
    assert image_key.hex() == GOLDEN_IMAGE_KEY
    shape = (4, 16, 16)
    context = enc(b"noise-flip", b"0", b"4,16,16")
    assert flip_context(shape, 0) == context
    stream = hashlib.shake_256(enc(b"keyface/v1/sign-pattern", image_key, context)).digest(4 * 16 * 16 // 8)
    expected = [(-1.0 if (stream[i // 8] >> (i % 8)) & 1 else 1.0) for i in range(4 * 16 * 16)]
    assert sign_pattern(image_key, shape, context).flatten().tolist() == expected


# ==============================================================================================
# public_gaussian
# ==============================================================================================


def test_public_gaussian_is_deterministic_and_standard():
    a = public_gaussian(b"seed", (1, 4, 128, 128))
    b = public_gaussian(b"seed", (1, 4, 128, 128))
    assert a.dtype == torch.float64 and a.shape == (1, 4, 128, 128)
    assert torch.equal(a, b)
    assert bool(torch.isfinite(a).all())
    assert abs(float(a.mean())) < 0.02
    assert abs(float(a.std()) - 1.0) < 0.02
    within_one = float((a.abs() < 1).double().mean())
    assert abs(within_one - 0.6827) < 0.01


def test_public_gaussian_seeds_differ_and_values_are_pinned():
    a = public_gaussian(b"seed", (4096,))
    b = public_gaussian(b"seee", (4096,))
    assert not torch.equal(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1
    pinned = [-0.5935464636276844, -0.005041143832497, 0.65310768321279, -0.09989626742882678]
    assert np.allclose(public_gaussian(b"seed", (8,))[:4].numpy(), pinned, rtol=1e-12, atol=1e-14)
    odd = public_gaussian(b"seed", (3, 5))
    assert odd.shape == (3, 5) and bool(torch.isfinite(odd).all())


# ==============================================================================================
# Keys: generation, files
# ==============================================================================================


def test_generate_key_and_nonce_lengths():
    keys = {generate_key() for _ in range(8)}
    assert len(keys) == 8 and all(len(k) == KEY_BYTES == 32 for k in keys)
    nonces = {new_nonce() for _ in range(8)}
    assert len(nonces) == 8 and all(len(n) == NONCE_BYTES == 16 for n in nonces)


def test_write_key_file_is_owner_only_and_never_overwrites(tmp_path):
    path = write_key_file(tmp_path / "sub" / "mine.key")
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert len(text.strip()) == 64 and bytes.fromhex(text.strip())
    with pytest.raises(KeyMaterialError) as err:
        write_key_file(path)
    assert "already exists" in str(err.value)
    assert text.strip() not in str(err.value)
    assert path.read_text() == text, "the existing key must be untouched"


def test_load_key_file_round_trip(tmp_path):
    path = write_key_file(tmp_path / "k.key")
    material = bytes.fromhex(path.read_text())
    key = load_key_file(path)
    nonce = bytes(range(16))
    assert key.image_key(nonce) == _raw_key(material).image_key(nonce)
    assert "k.key" in key.source
    # Whitespace and a byte-order mark around the hex digits are ignored.
    loose = tmp_path / "loose.key"
    loose.write_bytes(b"\xef\xbb\xbf  " + material.hex()[:32].encode() + b"\n " + material.hex()[32:].upper().encode() + b"\r\n")
    os.chmod(loose, 0o600)
    assert load_key_file(loose).image_key(nonce) == key.image_key(nonce)


def test_load_key_file_missing_says_which_file_and_how_to_make_one(tmp_path):
    with pytest.raises(KeyMaterialError) as err:
        load_key_file(tmp_path / "absent.key")
    message = str(err.value)
    assert "absent.key" in message and "keygen" in message


@pytest.mark.parametrize("content", [
    "ab" * 31,                    # too short
    "ab" * 33,                    # too long
    "zz" + "ab" * 31,             # right length, not hex
    "",                           # empty
])
def test_load_key_file_bad_content_never_echoed(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyMaterialError) as err:
        load_key_file(path)
    message = str(err.value)
    assert "bad.key" in message
    if content:
        assert content not in message and content[:16] not in message
    assert "keygen" in message


def test_load_key_file_binary_and_directory(tmp_path):
    binary = tmp_path / "bin.key"
    binary.write_bytes(b"\xff\xfe" + bytes(range(128, 160)))
    os.chmod(binary, 0o600)
    with pytest.raises(KeyMaterialError, match="not a text file"):
        load_key_file(binary)
    folder = tmp_path / "dir.key"
    folder.mkdir()
    with pytest.raises(KeyMaterialError, match="cannot be read"):
        load_key_file(folder)


def test_load_key_file_readable_by_others_warns_but_loads(tmp_path, caplog):
    path = write_key_file(tmp_path / "open.key")
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="keyface"):
        key = load_key_file(path)
    assert isinstance(key, SecretKey)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and "open.key" in warnings[0].getMessage() and "chmod 600" in warnings[0].getMessage()
    assert path.read_text().strip() not in caplog.text
    caplog.clear()
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="keyface"):
        load_key_file(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_load_passphrase_file(tmp_path):
    path = tmp_path / "pass.txt"
    path.write_text("a long enough passphrase\n")
    os.chmod(path, 0o600)
    key = load_key_file(path, kind="passphrase")
    nonce = bytes(16)
    assert key.image_key(nonce, FAST_KDF) == passphrase_key("a long enough passphrase", "x").image_key(nonce, FAST_KDF)
    assert key.kdf == DEFAULT_SCRYPT


# ==============================================================================================
# Keys: environment variables and passphrases
# ==============================================================================================


def test_key_from_env_unset_and_empty(monkeypatch):
    monkeypatch.delenv("KEYFACE_TEST_KEY", raising=False)
    with pytest.raises(KeyMaterialError, match="KEYFACE_TEST_KEY is not set"):
        key_from_env("KEYFACE_TEST_KEY")
    for empty in ("", "   ", "\n"):
        monkeypatch.setenv("KEYFACE_TEST_KEY", empty)
        with pytest.raises(KeyMaterialError, match="not set"):
            key_from_env("KEYFACE_TEST_KEY")


@pytest.mark.parametrize("name", ["", "BAD-NAME", "BAD NAME", "1KEY", "KÉY", "A=B", "$HOME", "a" * 200, None])
def test_key_from_env_bad_names(name):
    with pytest.raises(KeyMaterialError, match="environment variable name"):
        key_from_env(name)


def test_key_from_env_valid_hex_and_wrong_content(monkeypatch):
    material = bytes(range(100, 132))
    monkeypatch.setenv("KEYFACE_TEST_KEY", "  " + material.hex().upper() + "\n")
    key = key_from_env("KEYFACE_TEST_KEY")
    assert key.image_key(bytes(16)) == _raw_key(material).image_key(bytes(16))
    assert key.source == "environment variable KEYFACE_TEST_KEY"
    monkeypatch.setenv("KEYFACE_TEST_KEY", material.hex()[:-1])
    with pytest.raises(KeyMaterialError, match="expected 64 hex digits"):
        key_from_env("KEYFACE_TEST_KEY")


def test_key_from_env_passphrase(monkeypatch):
    monkeypatch.setenv("KEYFACE_TEST_PASS", "short")
    with pytest.raises(KeyMaterialError, match="too short"):
        key_from_env("KEYFACE_TEST_PASS", kind="passphrase")
    monkeypatch.setenv("KEYFACE_TEST_PASS", "twelve chars")
    key = key_from_env("KEYFACE_TEST_PASS", kind="passphrase")
    assert key.kdf == DEFAULT_SCRYPT


def test_passphrase_keys_are_scrypt_salted_by_the_nonce():
    key = passphrase_key("correct horse battery staple", "test")
    n1, n2 = bytes(16), bytes([1]) + bytes(15)
    k1, k2 = key.image_key(n1, FAST_KDF), key.image_key(n2, FAST_KDF)
    assert len(k1) == 32 and k1 != k2
    assert key.image_key(n1, FAST_KDF) == k1                                           # same nonce, same key
    assert passphrase_key("correct horse battery staple", "again").image_key(n1, FAST_KDF) == k1
    assert passphrase_key("correct horse battery stapler", "x").image_key(n1, FAST_KDF) != k1
    expected = hashlib.scrypt(b"correct horse battery staple", salt=b"keyface/v1/scrypt\x00" + n1,
                              n=2**10, r=8, p=1, dklen=32)
    assert k1 == expected
    # The KDF parameters are part of the derivation, and the default is what a key records.
    assert key.image_key(n1, {**FAST_KDF, "n": 2**11}) != k1
    assert key.kdf == DEFAULT_SCRYPT
    default = key.image_key(n1)
    assert default == hashlib.scrypt(b"correct horse battery staple", salt=b"keyface/v1/scrypt\x00" + n1,
                                     n=DEFAULT_SCRYPT["n"], r=DEFAULT_SCRYPT["r"], p=DEFAULT_SCRYPT["p"],
                                     maxmem=2**26, dklen=32)
    # Raw keys and passphrases of the same bytes do not collide.
    assert _raw_key(b"correct horse battery staple").image_key(n1) != k1


def test_passphrase_too_short_and_newlines():
    with pytest.raises(KeyMaterialError, match="at least 12 characters"):
        passphrase_key("eleven char", "test")
    # Trailing newlines (files, echo) are not part of the passphrase.
    a = passphrase_key("a long passphrase\r\n", "x").image_key(bytes(16), FAST_KDF)
    assert a == passphrase_key("a long passphrase", "y").image_key(bytes(16), FAST_KDF)


BAD_KDFS = [
    {"name": "scrypt", "n": 2**9, "r": 8, "p": 1},          # too cheap
    {"name": "scrypt", "n": 3000, "r": 8, "p": 1},          # not a power of two
    {"name": "scrypt", "n": 2**23, "r": 1, "p": 1},         # n too large
    {"name": "scrypt", "n": 2**22, "r": 8, "p": 1},         # 4 GiB of memory
    {"name": "scrypt", "n": 2**15, "r": 0, "p": 1},
    {"name": "scrypt", "n": 2**15, "r": 65, "p": 1},
    {"name": "scrypt", "n": 2**15, "r": 8, "p": 0},
    {"name": "scrypt", "n": 2**15, "r": 8, "p": 17},
    {"name": "argon2id", "n": 2**15, "r": 8, "p": 1},
    {"name": "scrypt", "r": 8, "p": 1},                     # missing n
    {"name": "scrypt", "n": "lots", "r": 8, "p": 1},
    {"name": "scrypt", "n": float("inf"), "r": 8, "p": 1},
    {"name": "scrypt", "n": 1024.5, "r": 8, "p": 1},
    {"name": "scrypt", "n": [1024], "r": 8, "p": 1},       # unhashable
    {"name": "scrypt", "n": 2**15, "r": True, "p": 1},
    ["scrypt", 2**15, 8, 1],
    "scrypt",
]


@pytest.mark.parametrize("kdf", BAD_KDFS, ids=[str(i) for i in range(len(BAD_KDFS))])
def test_stored_kdf_parameters_out_of_range(kdf):
    key = passphrase_key("correct horse battery staple", "test")
    with pytest.raises(KeyMaterialError, match="KDF parameters"):
        key.image_key(bytes(16), kdf)
    with pytest.raises(KeyMaterialError, match="KDF parameters"):
        scrypt_image_key(b"correct horse battery staple", bytes(16), kdf)


def test_bad_nonce():
    key = _raw_key(bytes(32))
    for nonce in (b"", bytes(15), bytes(17), "0" * 16, None):
        with pytest.raises(KeyMaterialError, match="nonce"):
            key.image_key(nonce)
    assert key.image_key(bytearray(16)) == key.image_key(bytes(16))


def test_secret_key_rejects_unknown_kind():
    with pytest.raises(ValueError):
        SecretKey(bytes(32), kind="seed", source="x")


# ==============================================================================================
# SecretKey never shows or serialises its bytes
# ==============================================================================================


def _forms(secret: bytes) -> list[str]:
    """Every text form key bytes could take in a message."""
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
             base64.urlsafe_b64encode(secret).decode(), base64.b64encode(secret).decode().rstrip("="),
             base64.b32encode(secret).decode(), secret.decode("latin-1"), repr(secret), str(list(secret))]
    try:
        forms.append(secret.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    return forms


def _leaks(text: str, secrets_: list[bytes], passphrases: list[str] = ()) -> list[str]:
    found = [f for s in secrets_ for f in _forms(s) if f and f in text]
    found += [p for p in passphrases if p in text]
    # Also any 16-hex-digit window of a secret (a truncated echo is a leak too).
    for s in secrets_:
        h = s.hex()
        found += [h[i:i + 16] for i in range(0, len(h) - 15, 8) if h[i:i + 16] in text.lower()]
    return found


SECRET = hashlib.sha256(b"keyface leak test key").digest()
PASSPHRASE = "Tr0ub4dor&3 horse battery staple"


def test_secret_key_text_forms_never_show_the_bytes():
    nonce = bytes(range(16))
    for key, material in ((_raw_key(SECRET), SECRET), (passphrase_key(PASSPHRASE, "pp"), PASSPHRASE.encode())):
        derived = key.image_key(nonce, FAST_KDF)
        texts = [str(key), repr(key), format(key), f"{key}", f"{key!r}", f"{key!s}", "%s" % key, "%r" % (key,),
                 str([key]), repr({"key": key}), str((key,)), str(key.source), repr(key.kdf)]
        for text in texts:
            assert not _leaks(text, [material, derived], [PASSPHRASE]), text
        assert "KeyFace" in repr(key)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_key_cannot_be_pickled(protocol):
    key = _raw_key(SECRET)
    with pytest.raises(TypeError):
        pickle.dumps(key, protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [key]}, protocol=protocol)


def test_secret_key_copies_are_the_same_object():
    key = _raw_key(SECRET)
    assert copy.copy(key) is key
    assert copy.deepcopy(key) is key
    holder = copy.deepcopy({"k": [key]})
    assert holder["k"][0] is key


def test_secret_key_has_no_instance_dict():
    key = _raw_key(SECRET)
    assert not hasattr(key, "__dict__")
    with pytest.raises(AttributeError):
        key.extra = 1


# ==============================================================================================
# Key check value
# ==============================================================================================


def test_key_check_value_tells_right_from_wrong_key():
    nonce = bytes(range(16))
    right = _raw_key(SECRET).image_key(nonce)
    stored = key_check_value(right)
    assert len(stored) == 16 and int(stored, 16) >= 0
    assert check_matches(right, stored)
    assert not check_matches(_raw_key(bytes(32)).image_key(nonce), stored)
    assert not check_matches(_raw_key(SECRET).image_key(bytes(16)), stored)      # other nonce
    # The check value is not the key, nor a prefix of it.
    assert stored not in right.hex()
    # Damaged stored values read as "no match", never crash.
    for damaged in ("", stored[:-1], stored.upper() + "0", "é" * 16, None, 12345):
        assert check_matches(right, damaged) is False


def test_key_check_value_of_passphrase_keys():
    nonce = bytes(range(16))
    stored = key_check_value(passphrase_key(PASSPHRASE, "a").image_key(nonce, FAST_KDF))
    assert check_matches(passphrase_key(PASSPHRASE, "b").image_key(nonce, FAST_KDF), stored)
    assert not check_matches(passphrase_key(PASSPHRASE + "!", "b").image_key(nonce, FAST_KDF), stored)


# ==============================================================================================
# keygen CLI
# ==============================================================================================


def _keygen(*args, env=None):
    return subprocess.run([sys.executable, "-m", "keyface_core.keygen", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


def test_keygen_cli_writes_owner_only_file_and_refuses_overwrite(tmp_path):
    first = _keygen("cli_test", "--dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    path = tmp_path / "cli_test.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text()
    material = bytes.fromhex(content.strip())
    assert len(material) == 32
    assert not _leaks(first.stdout + first.stderr, [material])
    assert isinstance(load_key_file(path), SecretKey)

    again = _keygen("cli_test.key", "--dir", str(tmp_path))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert path.read_text() == content
    assert not _leaks(again.stdout + again.stderr, [material])


def test_keygen_cli_rejects_paths_as_names(tmp_path):
    result = _keygen("../escape", "--dir", str(tmp_path))
    assert result.returncode == 2
    assert not (tmp_path.parent / "escape.key").exists()


def test_keygen_cli_default_dir_from_environment(tmp_path):
    env = {**os.environ, "KEYFACE_KEYS_DIR": str(tmp_path / "keys")}
    result = _keygen("envdir", env=env)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "keys" / "envdir.key").stat().st_mode) == 0o600


# ==============================================================================================
# No key material in any KeyMaterialError text
# ==============================================================================================


def _collect_key_errors(tmp_path, monkeypatch) -> list[KeyMaterialError]:
    """Trigger every KeyMaterialError path reachable with the known SECRET / PASSPHRASE in play."""
    hexkey = SECRET.hex()
    errors: list[KeyMaterialError] = []

    def expect(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except KeyMaterialError as err:
            errors.append(err)
        else:
            raise AssertionError(f"{fn.__name__}{args!r} did not raise")

    def key_file(name: str, data: bytes, mode: int = 0o600):
        path = tmp_path / name
        path.write_bytes(data)
        os.chmod(path, mode)
        return path

    # Key files with the secret inside, damaged in every way.
    expect(load_key_file, key_file("long.key", (hexkey + "00").encode()))
    expect(load_key_file, key_file("short.key", hexkey[:-2].encode()))
    expect(load_key_file, key_file("nonhex.key", (hexkey[:-2] + "zz").encode()))
    expect(load_key_file, key_file("upper.key", (hexkey.upper() + "G").encode()))
    expect(load_key_file, key_file("b64.key", base64.b64encode(SECRET)))
    expect(load_key_file, key_file("raw.key", SECRET + b"\xff\xfe"))
    expect(load_key_file, key_file("pass_as_key.key", PASSPHRASE.encode()))
    expect(load_key_file, key_file("open_bad.key", hexkey[:-1].encode(), mode=0o644))
    expect(load_key_file, key_file("short_pass.txt", PASSPHRASE[:8].encode()), kind="passphrase")
    expect(load_key_file, tmp_path / "missing.key")
    (tmp_path / "a_dir.key").mkdir()
    expect(load_key_file, tmp_path / "a_dir.key")
    if os.geteuid() != 0:
        expect(load_key_file, key_file("locked.key", hexkey.encode(), mode=0o000))
    # Text parsers called directly.
    expect(parse_key_text, hexkey[:-1], "text")
    expect(parse_key_text, hexkey + "x", "text")
    expect(parse_key_text, PASSPHRASE, "text")
    expect(passphrase_key, PASSPHRASE[:11], "text")

    # Environment variables holding the secret, damaged; and the secret pasted where the name goes.
    monkeypatch.setenv("KEYFACE_LEAK_TEST", hexkey[:-1])
    expect(key_from_env, "KEYFACE_LEAK_TEST")
    monkeypatch.setenv("KEYFACE_LEAK_TEST", hexkey + "zz")
    expect(key_from_env, "KEYFACE_LEAK_TEST")
    monkeypatch.setenv("KEYFACE_LEAK_TEST", PASSPHRASE)
    expect(key_from_env, "KEYFACE_LEAK_TEST")
    monkeypatch.setenv("KEYFACE_LEAK_TEST", PASSPHRASE[:8])
    expect(key_from_env, "KEYFACE_LEAK_TEST", kind="passphrase")
    monkeypatch.delenv("KEYFACE_LEAK_TEST")
    expect(key_from_env, "KEYFACE_LEAK_TEST")
    for pasted in (hexkey, hexkey.upper(), "f" + hexkey[1:], "ab" * 32, PASSPHRASE, base64.b64encode(SECRET).decode()):
        expect(key_from_env, pasted)
        expect(key_from_env, pasted, kind="passphrase")

    # Existing key file.
    existing = key_file("exists.key", hexkey.encode())
    expect(write_key_file, existing)

    # Derivation with bad inputs, from both kinds of secret.
    raw = _raw_key(SECRET)
    phrase = passphrase_key(PASSPHRASE, "leak test")
    for nonce in (bytes(15), SECRET, "nonce"):
        expect(raw.image_key, nonce)
        expect(phrase.image_key, nonce, FAST_KDF)
    for kdf in BAD_KDFS:
        expect(phrase.image_key, bytes(16), kdf)
        expect(scrypt_image_key, PASSPHRASE.encode(), bytes(16), kdf)
    return errors


def test_no_key_material_in_any_key_error(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.DEBUG, logger="keyface"):
        errors = _collect_key_errors(tmp_path, monkeypatch)
    assert len(errors) >= 60
    derived = [_raw_key(SECRET).image_key(bytes(16)), passphrase_key(PASSPHRASE, "x").image_key(bytes(16), FAST_KDF)]
    secrets_ = [SECRET, *derived]
    passphrases = [PASSPHRASE, PASSPHRASE[:11], PASSPHRASE[:8]]
    for err in errors:
        assert isinstance(err, KeyFaceError)
        rendered = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        for text in (str(err), repr(err), rendered, str(err.args)):
            leaked = _leaks(text, secrets_, passphrases)
            assert not leaked, f"{type(err).__name__}: {err} leaks {leaked!r}"
        # Messages are complete sentences that say what to do, not bare exceptions.
        assert len(str(err)) > 30
    # The warning logged for the group-readable file names the file, not its content.
    assert "open_bad.key" in caplog.text
    assert not _leaks(caplog.text, secrets_, passphrases)


def test_seal_round_trips_every_bit_and_depends_on_key_and_context():
    from keyface_core.flip import seal, unseal
    values = torch.tensor([[0.0, -0.0, 1e-310, float("inf")], [float("nan"), -2.5, 3.141592653589793, 1e300]],
                          dtype=torch.float64)
    key, other = bytes(range(32)), bytes(range(1, 33))
    context = flip_context(tuple(values.shape), 0, "residual-seal")
    sealed = seal(key, context, values)
    assert sealed.dtype == np.uint8 and sealed.size == 8 * values.numel()
    back = unseal(key, context, sealed, tuple(values.shape))
    assert back.numpy().tobytes() == values.numpy().tobytes()
    assert unseal(other, context, sealed, tuple(values.shape)).numpy().tobytes() != values.numpy().tobytes()
    assert not np.array_equal(seal(key, flip_context(tuple(values.shape), 1, "residual-seal"), values), sealed)
    with pytest.raises(ValueError, match="bytes"):
        unseal(key, context, sealed[:-1], tuple(values.shape))
