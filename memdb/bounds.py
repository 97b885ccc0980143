"""Bounds on what a tensor may claim, checked before anything reshapes, indexes or searches it.

Owns the limits that memdb's two tensor encodings share (wire tensors in `memdb.wire`,
safetensors shards in `memdb.shards`): how many dimensions a tensor has and how large each is,
against the bytes that came with it (`check_shape`), and how long a key or query vector may be
(`check_norms`), so that FAISS's float32 arithmetic over them cannot overflow. Every refusal is
InvalidArgument naming the tensor. Knows nothing of what a tensor means: callers name it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from memdb.errors import InvalidArgument

MAX_DIMS = 8  # the widest tensor on the wire is 5-D (Lookup's out [Q, I, k, h, d])
# Each dimension, and the product of the non-zero ones: a shape with a zero dimension matches
# empty data whatever its other dimensions, and numpy refuses (ValueError) to make an array of
# more than 2**63 bytes even when it is empty. Both are far past any message or upload limit.
MAX_DIM = 2**32
MAX_ELEMENTS = 2**40
# The longest key or query vector (L2 norm). A squared norm is then at most 2**100, and so is
# an inner product of two such vectors (Cauchy-Schwarz), far below float32's largest value
# (~2**128): FAISS's norms, inner products and k-means distances (sums of a few) stay finite.
# Keys of 1e20 (squared 1e40: inf in float32) crashed an IVF build (invalid cluster assignment).
MAX_NORM = 2.0**50


def check_shape(name: str, shape: Sequence[int], dtype: np.dtype, nbytes: int) -> tuple[int, ...]:
    """The shape as a tuple, if it has at most MAX_DIMS dimensions, each in 0..MAX_DIM, the
    product of its non-zero ones at most MAX_ELEMENTS, and exactly `nbytes` of data of `dtype`;
    InvalidArgument naming `name` otherwise."""
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"{name}: {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    dims = tuple(int(s) for s in shape)
    if any(s < 0 for s in dims):
        raise InvalidArgument(f"{name}: shape {list(dims)} has a negative dimension")
    expected = math.prod(dims) * dtype.itemsize  # exact: Python ints do not overflow
    if expected != nbytes:
        raise InvalidArgument(
            f"{name}: shape {list(dims)} of {dtype.name} needs {expected} bytes, got {nbytes}"
        )
    big = next((s for s in dims if s > MAX_DIM), None)
    if big is not None:
        raise InvalidArgument(
            f"{name}: shape {list(dims)} has a dimension of {big}, over the limit of 2**32 "
            "per dimension; send the tensor's real shape"
        )
    if math.prod(max(s, 1) for s in dims) > MAX_ELEMENTS:
        raise InvalidArgument(
            f"{name}: shape {list(dims)} claims more than 2**40 elements (its non-zero "
            "dimensions multiplied); send the tensor's real shape"
        )
    return dims


def check_norms(name: str, vectors: np.ndarray, hint: str = "") -> None:
    """Every vector of `vectors` [..., D] (float32) finite with an L2 norm at most MAX_NORM;
    InvalidArgument naming `name`, the first bad vector's index and `hint` (how to fix)."""
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.einsum("...d,...d->...", vectors, vectors)  # inf where it overflows
    bad = ~(squared <= MAX_NORM**2)  # NaN and inf included
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    vector = vectors[where].astype(np.float64)  # its norm without float32's overflow
    finite = np.isfinite(vector).all()
    what = f"has norm {np.linalg.norm(vector):.3g}" if finite else "is not finite"
    raise InvalidArgument(
        f"{name}: the vector at {list(where)} {what}; vectors must be finite with a norm "
        f"of at most 2**50 ({MAX_NORM:.3g}){'; ' + hint if hint else ''}"
    )
