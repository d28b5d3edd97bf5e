"""The language model's precision on the CPU: int8 (the default), bf16 or fp32.

Chosen by measurement (`benchmarks/cpu_inference.py` writes the numbers to benchmarks/RESULTS.md and
README "Fast answers on the CPU"): decoding reads every weight once per token, so it is bound by
memory bandwidth, and int8 weights are a quarter of fp32's bytes. torch.ao's dynamic int8 Linear
quantizes its input with one scale for the whole tensor (per tensor, not per token: in a prefill the
largest activation of any position sets it); weights are quantized per output channel.

Quantization runs one decoder layer at a time from the bf16 model (LoRA already merged), so the
whole-model fp32 copy that a one-shot `quantize_dynamic(model)` needs is never made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import warnings
from contextlib import contextmanager
from enum import StrEnum

import torch
from torch import nn


class Precision(StrEnum):
    INT8 = "int8"  # dynamic int8 Linear layers (fp32 activations), the rest fp32: the fastest that stays faithful
    BF16 = "bf16"  # half the memory of fp32, no quantization error in the weights beyond bf16 rounding
    FP32 = "fp32"  # the reference

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype the checkpoint is loaded (and the LoRA merged) in."""
        return torch.float32 if self is Precision.FP32 else torch.bfloat16


DEFAULT_PRECISION = Precision.INT8


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


@contextmanager
def returning_freed_memory():
    """While converting weights, give freed tensors back to the OS at once (glibc), so memory does not pile up.

    glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and keeps
    them when freed: phi-2's 13 MB bf16 and 26 MB fp32 attention weights would stay resident after
    conversion, on top of the new int8 ones. A fixed 1 MB threshold maps each tensor on its own; after
    the conversion the threshold goes back up, so generation's many small allocations stay cheap.
    Together with `release_pages` this sets the load peak that `benchmarks/cpu_inference.py` reports.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _LIBC.malloc_trim(0)
        _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)


MADV_DONTNEED = 4
PAGE = 4096


def checkpoint_ranges(module: nn.Module) -> list[tuple[int, int]]:
    """Byte ranges of `module`'s tensors that live in a memory-mapped checkpoint file.

    transformers maps a safetensors file into memory and hands out views of it, so a converted
    layer's old weights stay resident until every tensor of the file is gone: the peak would be the
    bf16 model plus the whole int8 one. `release_pages` gives those ranges back once they are unused.
    """
    try:
        with open("/proc/self/maps") as maps:
            files = [line.split()[0].split("-") for line in maps if line.rstrip().endswith(".safetensors")]
    except OSError:
        return []
    mapped = [(int(start, 16), int(end, 16)) for start, end in files]
    ranges = []
    for tensor in [*module.parameters(), *module.buffers()]:
        start = tensor.data_ptr()
        if any(low <= start < high for low, high in mapped):
            ranges.append((start, start + tensor.nbytes))
    return ranges


def release_pages(ranges: list[tuple[int, int]]) -> None:
    """Drop the pages lying wholly inside these (no longer used) checkpoint ranges; neighbours keep theirs.

    The mapping stays valid: a dropped page would read back from the file, but nothing reads it.
    """
    if _LIBC is None or not hasattr(_LIBC, "madvise"):
        return
    for start, end in ranges:
        first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        if last > first:
            _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of a causal LM by a dynamic int8 one, layer by layer; the rest becomes fp32."""
    # torch.ao's eager dynamic quantization is deprecated in favour of torchao but is kept in the pinned
    # torch; tests/test_precision.py holds its answers against fp32, so a change would be noticed.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = {nn.Linear: per_channel_dynamic_qconfig}
        for layer in _decoder_layers(model):
            ranges = checkpoint_ranges(layer)
            layer.float()
            quantize_dynamic(layer, qconfig, dtype=torch.qint8, inplace=True)
            gc.collect()  # free this layer's bf16/fp32 weights before the next one is converted
            release_pages(ranges)
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):  # a module is swapped by its parent: wrap the head to quantize it
            ranges = checkpoint_ranges(head)
            model.set_output_embeddings(quantize_dynamic(nn.Sequential(head.float()), qconfig, dtype=torch.qint8)[0])
            del head
            gc.collect()
            release_pages(ranges)
    ranges = checkpoint_ranges(model)
    for module in model.modules():  # embeddings, layer norms, rotary buffers: small, kept in fp32
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point() and parameter.dtype != torch.float32:
                setattr(module, name, nn.Parameter(parameter.float(), requires_grad=False))
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                module.register_buffer(name, buffer.float())
    model.config.dtype = torch.float32
    gc.collect()
    release_pages([(start, end) for start, end in ranges if not _still_used(model, start)])
    return model


def _still_used(model: nn.Module, address: int) -> bool:
    return any(tensor.data_ptr() == address for tensor in [*model.parameters(), *model.buffers()])


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers to quantize layer by layer")
    return layers


def apply_precision(model: nn.Module, precision: Precision) -> nn.Module:
    """A language model loaded in `precision.load_dtype` → ready to serve in `precision`."""
    return quantize_int8(model) if precision is Precision.INT8 else model
