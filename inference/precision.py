"""The language model's precision on the CPU: int8 (the default), bf16 or fp32.

Chosen by measurement (`benchmarks/cpu_inference.py` writes the numbers to benchmarks/RESULTS.md and
README "Fast answers on the CPU"): decoding reads every weight once per token, so it is bound by
memory bandwidth, and int8 weights are a quarter of fp32's bytes. Weights are quantized per output
channel, activations per row (token) on torch.ao's dynamic int8 kernels (`Int8Linear`), so that no
token's answer depends on what else is computed with it. Trained LLMs' outliers (a few fixed input
dimensions far larger than the rest, and the massive activation at the first token and "\n") would set
each row's scale for everything else, so the input columns that carry them, found by running a
calibration prompt through the model while it is converted, are multiplied in fp32 beside the int8
product (LLM.int8()'s decomposition).

Quantization runs one decoder layer at a time from the model as the checkpoint stores it (phi-2: fp16;
LoRA already merged), so the whole-model fp32 copy that a one-shot `quantize_dynamic(model)` needs is
never made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn


class Precision(StrEnum):
    INT8 = "int8"  # dynamic int8 Linear layers (fp32 activations), the rest fp32: the fastest that stays faithful
    BF16 = "bf16"  # half the memory of fp32, no quantization error in the weights beyond bf16 rounding
    FP32 = "fp32"  # the reference

    @property
    def load_dtype(self) -> torch.dtype | str:
        """The dtype the checkpoint is loaded (and the LoRA merged) in. int8 takes the checkpoint's own
        ("auto": phi-2 ships fp16), so the loaded tensors are views of the mapped file, not copies, and
        `release_pages` can give each layer's pages back once it is quantized."""
        return {Precision.INT8: "auto", Precision.BF16: torch.bfloat16, Precision.FP32: torch.float32}[self]


DEFAULT_PRECISION = Precision.INT8
# Names this file's code in the keys of saved int8 models: a changed quantizer quantizes afresh.
QUANTIZER_VERSION = hashlib.sha1(Path(__file__).read_bytes(), usedforsecurity=False).hexdigest()[:12]
# An input column whose largest value on the calibration prompt is this many times the median column's stays
# fp32 (LLM.int8() uses a fixed magnitude, 6, on LayerNorm outputs of about unit scale).
OUTLIER_RATIO = 6.0


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
    return mapped_ranges([*module.parameters(), *module.buffers()])


def mapped_ranges(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Byte ranges of those `tensors` that are views of a memory-mapped safetensors file (safetensors and
    transformers hand out such views; the pages they touched count in the process's memory while mapped)."""
    try:
        with open("/proc/self/maps") as maps:
            files = [line.split()[0].split("-") for line in maps if line.rstrip().endswith(".safetensors")]
    except OSError:
        return []
    mapped = [(int(start, 16), int(end, 16)) for start, end in files]
    ranges = []
    for tensor in tensors:
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


class Int8Linear(nn.Module):
    """A dynamic int8 Linear with one activation scale per row (token), whose outlier input columns, if any, are
    multiplied in fp32 (LLM.int8()'s decomposition).

    torch.ao's dynamic int8 Linear quantizes its input with one scale for the whole tensor. Two things
    follow, and both are undone here. A few large input columns (trained LLMs' systematic outlier
    dimensions, and the massive activation of the first token and "\\n", which sits in a fixed dimension
    too) would set the step for every other value: those columns are zeroed in the int8 product's input
    and weight and added back as a small fp32 product. And one row would set the step of every other
    row: a token's answer would depend on the other prompts of a batch (`inference.batching`) or the
    other positions of a prefill. So each row is divided by its own largest magnitude, and one row
    holding +1 and -1 goes in with them: the kernel's range is always [-1, 1], whatever else is in the
    batch, and the product is scaled back row by row. The int8 product itself is exact integer arithmetic,
    so a row computes the same alone as in any batch.
    """

    def __init__(self, int8: nn.Module, columns: torch.Tensor, outlier_weight: torch.Tensor) -> None:
        super().__init__()
        self.int8 = int8  # a dynamic int8 Linear whose weight is zero in `columns`
        self.register_buffer("columns", columns)
        self.register_buffer("outlier_weight", outlier_weight)  # (columns, out_features), fp32
        # Added back after the per-row scaling (the kernel adds it before); not saved: the int8 part holds it.
        self.register_buffer("bias", int8.bias(), persistent=False)
        span = torch.zeros(1, int8.in_features)
        span[0, :2] = torch.tensor([1.0, -1.0])
        self.register_buffer("span", span, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, columns: torch.Tensor, qconfig) -> Int8Linear:
        from torch.ao.quantization import quantize_dynamic

        weight = linear.weight.detach().float()
        rest = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            rest.weight.copy_(weight.index_fill(1, columns, 0.0))
            if linear.bias is not None:
                rest.bias.copy_(linear.bias.float())
        int8 = quantize_dynamic(nn.Sequential(rest), {nn.Linear: qconfig}, dtype=torch.qint8)[0]
        return cls(int8, columns, weight[:, columns].T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)
        inliers = rows.index_fill(-1, self.columns, 0.0) if self.columns.numel() else rows
        scale = inliers.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        output = self.int8(torch.cat([inliers / scale, self.span]))[:-1]
        output = output * scale if self.bias is None else torch.addcmul(self.bias, output - self.bias, scale)
        if self.columns.numel():
            output.addmm_(rows.index_select(-1, self.columns), self.outlier_weight)
        return output.view(*x.shape[:-1], output.shape[-1])


def outlier_columns(peaks: torch.Tensor, ratio: float = OUTLIER_RATIO) -> torch.Tensor:
    """Input columns whose largest magnitude on the calibration prompt is `ratio`× the median column's.

    At most 8 or 1/64 of the columns, whichever is more (the largest), so the fp32 part stays small.
    """
    median = peaks.median().clamp_min(torch.finfo(torch.float32).tiny)
    candidates = torch.nonzero(peaks > ratio * median).flatten()
    limit = max(8, peaks.numel() // 64)
    if candidates.numel() > limit:
        candidates = candidates[peaks[candidates].topk(limit).indices]
    return candidates.sort().values


def _int8_linear(linear: nn.Linear, peaks: torch.Tensor | None, qconfig) -> Int8Linear:
    """`linear` as int8: with its outlier columns in fp32 when the calibration found any (`peaks`: per column)."""
    columns = outlier_columns(peaks) if peaks is not None else torch.empty(0, dtype=torch.long)
    return Int8Linear.from_linear(linear, columns, qconfig)


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration_ids: Sequence[int]) -> nn.Module:
    """Replace every `nn.Linear` of a causal LM by a dynamic int8 one, calibrated on a prompt; the rest becomes fp32.

    One forward of the decoder over `calibration_ids` drives the conversion: as each decoder layer is
    reached it becomes fp32, runs while its Linear layers record their largest input per column, and
    is quantized before the next layer starts, so the model is never whole in fp32. Columns far above
    the median (`outlier_columns`) stay fp32 (`Int8Linear`). The head is calibrated on the
    decoder's output. The prompt should hold what carries outliers in served prompts: a first token
    and "\n".
    """
    # torch.ao's eager dynamic quantization is deprecated in favour of torchao but is kept in the pinned
    # torch; tests/test_precision.py holds its answers against fp32, so a change would be noticed.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        from torch.ao.quantization import per_channel_dynamic_qconfig as qconfig

        decoder, layers = model.model, _decoder_layers(model)
        for child in decoder.children():  # final LayerNorm, rotary: fp32 now (the embeddings at the end)
            if child is not layers and child is not model.get_input_embeddings():
                child.float()
        peaks: dict[nn.Module, torch.Tensor] = {}
        hooks: list = []
        ranges: list[tuple[int, int]] = []

        def record(linear: nn.Module, args: tuple) -> None:
            peak = args[0].detach().abs().flatten(0, -2).amax(0).float()
            peaks[linear] = torch.maximum(peaks[linear], peak) if linear in peaks else peak

        def enter(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            ranges[:] = checkpoint_ranges(layer)
            layer.float()
            hooks.extend(m.register_forward_pre_hook(record) for m in layer.modules() if type(m) is nn.Linear)
            if args:
                args = (args[0].float(), *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].float()}
            return args, kwargs

        def leave(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
            for hook in hooks:
                hook.remove()
            hooks.clear()
            _quantize_children(layer, peaks, qconfig)
            gc.collect()  # free this layer's bf16/fp32 weights before the next one is converted
            release_pages(ranges)

        layer_hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
        layer_hooks += [layer.register_forward_hook(leave) for layer in layers]
        try:
            hidden = decoder(input_ids=torch.tensor([list(calibration_ids)]), use_cache=False).last_hidden_state
        finally:
            for hook in layer_hooks:
                hook.remove()
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            ranges = checkpoint_ranges(head)
            model.set_output_embeddings(_int8_linear(head, hidden.abs().flatten(0, -2).amax(0), qconfig))
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


def _quantize_children(module: nn.Module, peaks: dict[nn.Module, torch.Tensor], qconfig) -> None:
    """Every `nn.Linear` inside `module` → int8, calibrated on its recorded input peaks (used up)."""
    found = [(p, n, c) for p in module.modules() for n, c in p.named_children() if type(c) is nn.Linear]
    for parent, name, linear in found:
        setattr(parent, name, _int8_linear(linear, peaks.pop(linear, None), qconfig))


def _still_used(model: nn.Module, address: int) -> bool:
    return any(tensor.data_ptr() == address for tensor in [*model.parameters(), *model.buffers()])


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers to quantize layer by layer")
    return layers
