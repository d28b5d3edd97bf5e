"""The small C kernels of the CPU serving path (`inference/*.c`), compiled when first needed for the CPU they run on.

Each is a file beside this one with plain C functions over fp32 arrays, called through ctypes (which lets go of
the GIL while it runs). They are compiled in a fraction of a second with `-march=native`, as the machine a Space is
built on is not the one it runs on, and kept for the process. Their OpenMP calls go to the libgomp torch has
loaded (the same soname), so they share torch's threads.

Where there is no C compiler, or `VQA_C_KERNELS=0` is set, `library` is None and the callers compute the same in
torch ops (`inference.decode_attention`, `inference.int8_linear`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
COMPILE = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-c"]
LINK = ["-shared", "-fopenmp", "-lm"]

log = logging.getLogger(__name__)


@functools.cache
def library(name: str, *flags: str) -> ctypes.CDLL | None:
    """`inference/{name}.c` compiled with `flags` beside the usual ones (and linked with `-l` flags among them),
    or None where it cannot be built."""
    if os.environ.get("VQA_C_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler: %s's work runs in torch ops", name)
        return None
    compile_flags = [flag for flag in flags if not flag.startswith("-l")]
    # Linked without the compile flags: GCC 12 links crtfastmath.o for -ffast-math, flushing denormals to zero in
    # the whole process.
    libraries = [flag for flag in flags if flag.startswith("-l")]
    with tempfile.TemporaryDirectory() as folder:
        objects, shared = Path(folder) / f"{name}.o", Path(folder) / f"{name}.so"
        commands = (
            [compiler, *COMPILE, *compile_flags, str(HERE / f"{name}.c"), "-o", str(objects)],
            [compiler, str(objects), "-o", str(shared), *LINK, *libraries],
        )
        try:
            for command in commands:
                subprocess.run(command, check=True, capture_output=True)
            return ctypes.CDLL(str(shared))  # mapped: the file may go with its folder
        except (OSError, subprocess.CalledProcessError) as error:
            detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace")[-500:]
            log.warning("%s not built (%s %s): its work runs in torch ops", name, error, detail)
            return None
