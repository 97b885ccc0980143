"""Launch shapes shared by the hosts of the split-KV decode kernels (`shared_prefix`,
`fitted_rows`): powers of two, the device's SM count, the slices of a live KV cache and the
live mask's pointer and strides.

Knows nothing of memories, prefixes or models: it takes sizes and tensors.
"""

from __future__ import annotations

import torch

_SM_COUNT: dict[int, int] = {}


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (16 elsewhere: Triton's interpreter)."""
    if device.type != "cuda":
        return 16
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def slices(length: int, block: int, programs: int) -> tuple[int, int]:
    """Split `length` keys into at most `programs` slices of whole blocks: (keys per slice,
    slices); at least one slice, also of an empty range."""
    tiles = max(1, -(-int(length) // block))
    per = -(-tiles // min(tiles, max(1, programs))) * block
    return per, max(1, -(-int(length) // per))


def live_mask(mask: torch.Tensor | None, batch: int, dummy: torch.Tensor):
    """(pointer, stride per row, stride per key) of a boolean live mask [B|1, (1, 1,) N]
    (True = attend); `dummy` and zero strides without one."""
    if mask is None:
        return dummy, 0, 0
    if mask.dtype != torch.bool:
        raise ValueError("the decode kernels take a boolean mask")
    mk = mask.reshape(mask.shape[0], mask.shape[-1])
    if mk.shape[0] == 1 and batch > 1:
        mk = mk.expand(batch, -1)
    return mk, mk.stride(0), mk.stride(1)


__all__ = ["live_mask", "pow2", "slices", "sm_count"]
