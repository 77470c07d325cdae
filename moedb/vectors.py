"""Vector encoding and validation. Vectors are stored as little-endian float32 (``<f4``) bytes."""
from __future__ import annotations

import numpy as np

from .errors import DimensionMismatch, InvalidVector

F4 = np.dtype("<f4")
F32_MAX = float(np.finfo(np.float32).max)


def to_blob(v: np.ndarray) -> bytes:
    """Encode a vector of shape ``(d,)`` as ``<f4`` bytes."""
    return np.ascontiguousarray(v, dtype=F4).tobytes()


def from_blob(b: bytes) -> np.ndarray:
    """Decode ``<f4`` bytes into a float32 array of shape ``(d,)``."""
    return np.frombuffer(b, dtype=F4).astype(np.float32, copy=False)


def as_matrix(vectors, dim: int | None, what: str = "vectors") -> np.ndarray:
    """Validate and convert to a float32 matrix of shape ``(n, dim)``.

    Raises :class:`InvalidVector` on a wrong shape, complex or non-finite values or values float32 cannot
    hold, and :class:`DimensionMismatch` when ``dim`` is given and differs.
    """
    if np.iscomplexobj(vectors):
        raise InvalidVector(f"{what}: complex values (vectors must be real)")
    try:
        a = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidVector(f"{what}: not numeric ({e})") from None
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise InvalidVector(f"{what}: expected shape (n, d), got {a.shape}")
    if a.shape[1] == 0:
        raise InvalidVector(f"{what}: zero-length vector")
    if dim is not None and a.shape[1] != dim:
        raise DimensionMismatch(
            f"{what}: dimension {a.shape[1]} does not match the file's embedding dimension {dim}"
        )
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise InvalidVector(f"{what}: row {int(np.flatnonzero(bad)[0])} contains NaN or infinity")
    huge = (np.abs(a) > F32_MAX).any(axis=1)
    if huge.any():
        raise InvalidVector(f"{what}: row {int(np.flatnonzero(huge)[0])} has values beyond the float32 range "
                            f"(|x| > {F32_MAX:.3g})")
    return a.astype(np.float32)


def normalize(a: np.ndarray) -> np.ndarray:
    """L2-normalise rows of ``a`` (shape ``(n, d)`` or ``(d,)``) into float32; zero rows raise InvalidVector.

    The norm is taken in float64, so rows of very large (up to the float32 maximum) or very small float32
    values normalise instead of overflowing to a zero row or underflowing to a "zero vector"."""
    a = np.asarray(a, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise InvalidVector("zero vector cannot be normalised")
    return (a / norms).astype(np.float32)
