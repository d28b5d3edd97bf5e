"""A decode step's attention for all rows of a batch in one call (`decode_attention.c`), each row over its own
positions: what `inference.model.row_by_row_attention` otherwise computes with one sdpa call per row.

torch's CPU sdpa computes a single query position head by head through small matrix products, and per row and
layer that costs more than reading the row's keys and values (`benchmarks/decode_attention.py` measures both).
The C kernel reads each head's keys and values once, in one pass each, for every row in one call, and works on
each (row, head) alone, so a row computes the same, bit for bit, whoever else is in the batch.

The kernel is compiled when first needed, for the CPU it runs on (`inference.native`). Where it cannot be, `kernel()`
is None and the model keeps torch's sdpa, row by row.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence

import torch

from inference import native


@functools.cache
def kernel() -> Callable[..., int] | None:
    """The compiled kernel, or None where it cannot be built (torch's sdpa serves then, row by row)."""
    # -ffast-math for the vectorised exp (glibc's libmvec) and sums: their order is still fixed by the code and the
    # row's length, not by the batch.
    library = native.library("decode_attention", "-ffast-math", "-lmvec")
    if library is None:
        return None
    function = library.decode_attention
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int]
    return function


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel computes this call: fp32 on the CPU, as many key heads as query heads, and each head's
    positions one after another (a KV cache's layout)."""
    dim = query.shape[-1]
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key, value))
        and key.shape[1] == query.shape[1] == value.shape[1]
        and all(t.stride(-1) == 1 and t.stride(-2) == dim for t in (key, value))
    )


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, first: Sequence[int], scale: float
) -> torch.Tensor:
    """Attention of `query` (rows, heads, 1, dim), one position per row, over row r's keys and values from
    position `first[r]` to the last of `key`/`value` (rows, heads, positions, dim): (rows, 1, heads, dim), as
    transformers' sdpa attention returns it. Only for calls that `fits` and where `kernel()` is not None."""
    rows, heads, _, dim = query.shape
    query = query.contiguous()
    out = torch.empty(rows, 1, heads, dim)
    starts = torch.tensor(first, dtype=torch.int64)
    failed = kernel()(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        out.data_ptr(),
        starts.data_ptr(),
        key.shape[2],
        rows,
        heads,
        dim,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        scale,
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("the decode attention kernel could not allocate its scratch space")
    return out
