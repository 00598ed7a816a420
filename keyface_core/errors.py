"""Errors KeyFace raises: one base class, each message says what happened and what to do.

Messages never contain key material: they name key *sources* (a file name, a variable name),
never their contents.
"""


class KeyFaceError(Exception):
    """Base class; ``str(err)`` is a complete, user-facing message."""


class KeyMaterialError(KeyFaceError):
    """A key file, environment variable or passphrase could not be used."""


class MetadataError(KeyFaceError):
    """An image's KeyFace metadata is missing, corrupt, or from an unknown format version."""


class InputMismatchError(KeyFaceError):
    """Shapes, sizes, batches, models or settings do not match what an operation needs."""


class NoFaceError(KeyFaceError):
    """No face was found (or the mask selects nothing), so there is nothing to anonymize."""


class WrongKeyError(KeyFaceError):
    """The key's check value does not match the one stored with the image."""


class ImageReadError(KeyFaceError):
    """An image file is missing, unreadable, not an image, damaged, or too large to decode."""


class NotAnImageError(ImageReadError):
    """The file is not in an image format Pillow can read (a text file named .png, a HEIC photo...)."""


class DamagedImageError(ImageReadError):
    """The file starts like an image but cannot be decoded: truncated, corrupt."""


class ImageTooLargeError(ImageReadError):
    """The image is over the caller's megapixel limit, or over Pillow's decompression-bomb limit."""
