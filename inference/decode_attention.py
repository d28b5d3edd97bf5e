"""A decode step's attention for all rows of a batch in one call (`decode_attention.c`), each row over its own
positions: what `inference.model.row_by_row_attention` otherwise computes with one sdpa call per row.

torch's CPU sdpa computes a single query position head by head through small matrix products, and per row and
layer that costs more than reading the row's keys and values (`benchmarks/decode_attention.py` measures both).
The C kernel reads each head's keys and values once, in one pass each, for every row in one call, and works on
each (row, head) alone, so a row computes the same, bit for bit, whoever else is in the batch.

The kernel is compiled when first needed, for the CPU it runs on (`-march=native`; the machine a Space is built on
is not the one it runs on). Where there is no C compiler, or `VQA_ATTENTION=sdpa` is set, `kernel()` is None and
the model keeps torch's sdpa, row by row.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
# -ffast-math for the compile only: linked with it, GCC 12 adds crtfastmath.o, which would flush denormals to zero
# for the whole process. The kernel's OpenMP calls go to the libgomp torch has loaded (the same soname).
COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK = ["-shared", "-fopenmp", "-lmvec", "-lm"]

log = logging.getLogger(__name__)


@functools.cache
def kernel() -> Callable[..., int] | None:
    """The compiled kernel, or None where it cannot be built (torch's sdpa serves then)."""
    if os.environ.get("VQA_ATTENTION", "kernel") == "sdpa":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler: the decode attention runs row by row through torch's sdpa")
        return None
    with tempfile.TemporaryDirectory() as folder:
        objects, library = Path(folder) / "decode_attention.o", Path(folder) / "decode_attention.so"
        try:
            subprocess.run([compiler, *COMPILE, str(SOURCE), "-o", str(objects)], check=True, capture_output=True)
            subprocess.run([compiler, str(objects), "-o", str(library), *LINK], check=True, capture_output=True)
            loaded = ctypes.CDLL(str(library))  # mapped: the file may go with its folder
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            log.warning("decode attention kernel not built (%s %s): torch's sdpa serves", error, detail.decode()[-500:])
            return None
    function = loaded.decode_attention
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
