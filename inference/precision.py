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

from inference.int8_linear import Int8Linear, SharedInput, place_shared


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
# Names the quantizer's code in the keys of saved int8 models: a changed quantizer quantizes afresh.
_QUANTIZER_CODE = Path(__file__).read_bytes() + Path(__file__).with_name("int8_linear.py").read_bytes()
QUANTIZER_VERSION = hashlib.sha1(_QUANTIZER_CODE, usedforsecurity=False).hexdigest()[:12]
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
def quantize_int8(model: nn.Module, calibration_ids: Sequence[int], share_inputs: bool = True) -> nn.Module:
    """Replace every `nn.Linear` of a causal LM by a dynamic int8 one, calibrated on a prompt; the rest becomes fp32.

    One forward of the decoder over `calibration_ids` drives the conversion: as each decoder layer is
    reached it becomes fp32, runs while its Linear layers record their largest input per column, and
    is quantized before the next layer starts, so the model is never whole in fp32. Columns far above
    the median (`outlier_columns`) stay fp32 (`Int8Linear`). Linear layers that read one input (phi's q, k, v
    and fc1) become one product (`SharedInput`), unless `share_inputs` is False. The head is calibrated on the
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
        readers: dict[int, tuple[torch.Tensor, list[nn.Module]]] = {}  # by input: the tensor, who read it
        hooks: list = []
        ranges: list[tuple[int, int]] = []

        def record(linear: nn.Module, args: tuple) -> None:
            peak = args[0].detach().abs().flatten(0, -2).amax(0).float()
            peaks[linear] = torch.maximum(peaks[linear], peak) if linear in peaks else peak
            readers.setdefault(id(args[0]), (args[0], []))[1].append(linear)

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
            groups = [list(dict.fromkeys(linears)) for _, linears in readers.values()] if share_inputs else []
            readers.clear()
            _quantize_children(layer, peaks, qconfig, [group for group in groups if len(group) > 1])
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


def _quantize_children(
    module: nn.Module, peaks: dict[nn.Module, torch.Tensor], qconfig, groups: list[list[nn.Linear]]
) -> None:
    """Every `nn.Linear` inside `module` → int8, calibrated on its recorded input peaks (used up); each of
    `groups` (layers that read one input) → one `SharedInput`."""
    names = {linear: name for name, linear in module.named_modules() if type(linear) is nn.Linear}
    for group in groups:
        if len({linear.bias is None for linear in group}) > 1:
            continue  # a bias for some and not others: left apart
        joined = nn.Linear(group[0].in_features, sum(linear.out_features for linear in group), device="meta")
        joined.weight = nn.Parameter(torch.cat([linear.weight.detach().float() for linear in group]), False)
        has_bias = group[0].bias is not None
        joined.bias = (
            nn.Parameter(torch.cat([linear.bias.detach().float() for linear in group]), False) if has_bias else None
        )
        peak = torch.stack([peaks.pop(linear) for linear in group]).amax(0)  # one input: the same peaks
        for linear in group:  # joined: their own fp32 weights can go before the product is quantized
            linear.weight = linear.bias = None
        shared = SharedInput(_int8_linear(joined, peak, qconfig), [linear.out_features for linear in group])
        place_shared(module, [names[linear] for linear in group], shared)
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
