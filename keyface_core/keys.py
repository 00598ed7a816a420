"""Key material: 256-bit key files, environment variables, passphrases through scrypt.

A :class:`SecretKey` never shows its bytes: ``str``/``repr`` name only where it came from, so
ComfyUI's error reports (which ``str()`` every node input) and logs stay clean. Every image gets
its own 32-byte *image key*, derived from the secret and the image's public random nonce; the
flip pattern and the key-check value come from that image key, so no two images share a pattern.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import operator
import os
import re
import secrets
import stat
from pathlib import Path

from .errors import KeyMaterialError

KEY_BYTES = 32
NONCE_BYTES = 16
KEY_FILE_SUFFIX = ".key"
# scrypt cost: ~0.1 s and 32 MiB per derivation; recorded in the image so it can change later.
DEFAULT_SCRYPT = {"name": "scrypt", "n": 2**15, "r": 8, "p": 1}
MIN_PASSPHRASE_CHARS = 12
# scrypt needs 128 * n * r bytes; parameters come from image metadata, so cap what an image can demand
# (same cap as metadata.MAX_SCRYPT_MEMORY).
MAX_SCRYPT_MEMORY = 2**30
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)
_LOOKS_LIKE_KEY = re.compile(r"[0-9A-Fa-f]{32,}", re.ASCII)

log = logging.getLogger("keyface")


class SecretKey:
    """A secret that derives per-image keys; its bytes never leave this object."""

    __slots__ = ("_material", "_kind", "_source", "_kdf", "_cache")

    def __init__(self, material: bytes, *, kind: str, source: str, kdf: dict | None = None):
        if kind not in ("key", "passphrase"):
            raise ValueError("kind must be 'key' or 'passphrase'")
        self._material = bytes(material)
        self._kind = kind
        self._source = source
        self._kdf = dict(kdf) if kdf else None
        self._cache: dict[tuple, bytes] = {}

    @property
    def source(self) -> str:
        """Where the key came from (a file or variable name), safe to show."""
        return self._source

    @property
    def kdf(self) -> dict | None:
        """The passphrase KDF parameters to record with an image (None for raw keys)."""
        return dict(self._kdf) if self._kdf else None

    def image_key(self, nonce: bytes, kdf: dict | None = None) -> bytes:
        """The 32-byte key of one image (or face), bound to its public nonce."""
        if not isinstance(nonce, (bytes, bytearray, memoryview)) or len(nonce) != NONCE_BYTES:
            size = len(nonce) if isinstance(nonce, (bytes, bytearray, memoryview)) else type(nonce).__name__
            raise KeyMaterialError(f"a KeyFace nonce has {NONCE_BYTES} bytes, got {size}")
        nonce = bytes(nonce)
        if self._kind == "key":
            return hmac.new(self._material, b"keyface/v1/image-key\x00" + nonce, hashlib.sha256).digest()
        # Validate before using the parameters as a cache key: damaged metadata must give a
        # KeyMaterialError, never a KeyError/TypeError.
        n, r, p = _scrypt_params(kdf or self._kdf or DEFAULT_SCRYPT)
        cache_key = (nonce, n, r, p)
        if cache_key not in self._cache:
            self._cache[cache_key] = scrypt_image_key(self._material, nonce, {"name": "scrypt", "n": n, "r": r, "p": p})
        return self._cache[cache_key]

    def __repr__(self) -> str:
        return f"<KeyFace {self._kind} from {self._source}>"

    __str__ = __repr__

    def __reduce__(self):
        # Pickling would write the secret wherever the pickle goes (caches, disk).
        raise TypeError("a KeyFace key cannot be pickled or serialised")

    def __deepcopy__(self, memo):
        return self  # immutable; copying would only multiply the secret in memory

    def __copy__(self):
        return self


def _scrypt_params(params) -> tuple[int, int, int]:
    """(n, r, p) from a KDF dict, or KeyMaterialError when damaged or out of range."""
    try:
        name = params.get("name", "scrypt")
        n, r, p = (operator.index(params[k]) for k in ("n", "r", "p"))
        if any(isinstance(params[k], bool) for k in ("n", "r", "p")):
            raise TypeError("bool")
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        raise KeyMaterialError("the stored passphrase KDF parameters are damaged; the image metadata is not usable") from None
    if (name != "scrypt" or n < 2**10 or n > 2**22 or n & (n - 1) or not (1 <= r <= 64) or not (1 <= p <= 16)
            or 128 * n * r > MAX_SCRYPT_MEMORY):
        raise KeyMaterialError("the stored passphrase KDF parameters are out of range; the image metadata is not usable")
    return n, r, p


def scrypt_image_key(passphrase: bytes, nonce: bytes, params: dict) -> bytes:
    """scrypt(passphrase, salt = domain || nonce) -> 32 bytes."""
    n, r, p = _scrypt_params(params)
    return hashlib.scrypt(passphrase, salt=b"keyface/v1/scrypt\x00" + nonce, n=n, r=r, p=p,
                          maxmem=256 * r * n + (1 << 20), dklen=KEY_BYTES)


def key_check_value(image_key: bytes) -> str:
    """A short keyed check (64 bits, hex) that tells a matching key from a wrong one."""
    return hmac.new(image_key, b"keyface/v1/key-check", hashlib.sha256).hexdigest()[:16]


def check_matches(image_key: bytes, stored: str) -> bool:
    """Constant-time comparison of a key's check value with the stored one."""
    # Compare bytes: compare_digest raises TypeError on non-ASCII str, and a damaged stored value must
    # read as "does not match", not crash.
    return hmac.compare_digest(key_check_value(image_key).encode("ascii"), str(stored).encode("utf-8", "replace"))


def new_nonce() -> bytes:
    """A fresh random per-image (per-face) nonce from the OS generator."""
    return secrets.token_bytes(NONCE_BYTES)


def generate_key() -> bytes:
    """32 random bytes from the OS generator."""
    return secrets.token_bytes(KEY_BYTES)


def parse_key_text(text: str, source: str) -> SecretKey:
    """A raw key from its hex text (64 hex digits, surrounding whitespace ignored)."""
    cleaned = "".join(text.split())
    if len(cleaned) != 2 * KEY_BYTES:
        raise KeyMaterialError(
            f"{source} does not hold a KeyFace key: expected {2 * KEY_BYTES} hex digits, found {len(cleaned)} characters. "
            "Create a new key with `python -m keyface_core.keygen NAME`, or choose kind 'passphrase'.")
    try:
        material = bytes.fromhex(cleaned)
    except ValueError:
        raise KeyMaterialError(f"{source} does not hold a KeyFace key: it contains characters that are not hex digits. "
                               "Create a new key with `python -m keyface_core.keygen NAME`.") from None
    return SecretKey(material, kind="key", source=source)


def passphrase_key(passphrase: str, source: str) -> SecretKey:
    """A passphrase secret; per-image keys come from scrypt with the image nonce as salt."""
    stripped = passphrase.strip("\r\n")
    if len(stripped) < MIN_PASSPHRASE_CHARS:
        raise KeyMaterialError(f"the passphrase in {source} is too short: use at least {MIN_PASSPHRASE_CHARS} characters "
                               "(or a 256-bit key file from `python -m keyface_core.keygen NAME`).")
    return SecretKey(stripped.encode("utf-8"), kind="passphrase", source=source, kdf=DEFAULT_SCRYPT)


def load_key_file(path: str | os.PathLike, kind: str = "key") -> SecretKey:
    """Read a key file (64 hex digits) or a passphrase file; warns when others can read it."""
    path = Path(path)
    source = f"key file '{path.name}'"
    try:
        st = path.stat()
        # utf-8-sig: a byte-order mark (Windows editors) is not part of the key or passphrase.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise KeyMaterialError(f"{source} was not found in {path.parent}. Create one with "
                               f"`python -m keyface_core.keygen {path.stem}` or pick an existing file.") from None
    except (PermissionError, IsADirectoryError):
        raise KeyMaterialError(f"{source} cannot be read by this process; check its permissions (chmod 600).") from None
    except UnicodeDecodeError:
        raise KeyMaterialError(f"{source} is not a text file; a KeyFace key file holds 64 hex digits.") from None
    except OSError as err:
        raise KeyMaterialError(f"{source} cannot be read ({err.strerror or type(err).__name__}); "
                               "check the path and its permissions.") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("KeyFace: %s can be read by other users (mode %o); run `chmod 600` on it.", source, st.st_mode & 0o777)
    if kind == "passphrase":
        return passphrase_key(text, source)
    return parse_key_text(text, source)


def key_from_env(variable: str, kind: str = "key") -> SecretKey:
    """Read a key (64 hex digits) or passphrase from an environment variable, by name."""
    if not isinstance(variable, str) or not _ENV_NAME.fullmatch(variable):
        raise KeyMaterialError("the environment variable name must be ASCII letters, digits and underscores, not starting "
                               "with a digit, e.g. KEYFACE_KEY")
    if _LOOKS_LIKE_KEY.fullmatch(variable):
        # Someone pasted a key where the *name* goes: never echo it (error texts travel into reports).
        raise KeyMaterialError("the environment variable name looks like key material, not a name: never type a key "
                               "into a workflow (it is saved in every image); put it in a key file or an environment "
                               "variable and enter only that name, e.g. KEYFACE_KEY")
    value = os.environ.get(variable)
    source = f"environment variable {variable}"
    if value is None or not value.strip():
        raise KeyMaterialError(f"{source} is not set (or empty) in the environment of the ComfyUI server; "
                               "set it before starting ComfyUI, or use a key file.")
    if kind == "passphrase":
        return passphrase_key(value, source)
    return parse_key_text(value, source)


def write_key_file(path: str | os.PathLike) -> Path:
    """Create a new key file (owner-only permissions); never overwrites an existing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyMaterialError(f"'{path}' already exists; KeyFace never overwrites a key (images made with it would be lost). "
                               "Choose another name.") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(generate_key().hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
