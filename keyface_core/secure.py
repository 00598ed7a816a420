# TEMPORARY integrator stub: the `record` branch's keyface_core/secure.py replaces this file entirely (on a merge conflict keep the branch's version).
import hashlib, hmac, os
def _sub(image_key, purpose):
    return hmac.new(image_key, b"keyface/v2/" + purpose.encode(), hashlib.sha256).digest()
def keyed_digest(image_key, purpose, data):
    return hmac.new(_sub(image_key, purpose), bytes(data), hashlib.sha256).hexdigest()[:32]
def seal_bytes(image_key, purpose, plaintext, aad=b""):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    n = os.urandom(12)
    return n + ChaCha20Poly1305(_sub(image_key, purpose)).encrypt(n, plaintext, aad)
def open_bytes(image_key, purpose, sealed, aad=b""):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    return ChaCha20Poly1305(_sub(image_key, purpose)).decrypt(sealed[:12], sealed[12:], aad)
