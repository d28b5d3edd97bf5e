"""The language model's precision on the CPU: int8 (the default), bf16 or fp32.

Chosen by measurement (`benchmarks/cpu_inference.py`, README "Fast answers on the CPU"): decoding
reads every weight once per token, so it is bound by memory bandwidth, and int8 weights are a quarter
of fp32's bytes. Dynamic int8 keeps activations in fp32 and quantizes them per token; weights are
quantized per output channel, which kept greedy answers identical to fp32 in the measurements.

Quantization runs one decoder layer at a time from the bf16 model (LoRA already merged), so the
whole-model fp32 copy that a one-shot `quantize_dynamic(model)` needs is never made.
"""

from __future__ import annotations

import gc
import warnings
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
            layer.float()
            quantize_dynamic(layer, qconfig, dtype=torch.qint8, inplace=True)
            gc.collect()  # free this layer's bf16/fp32 weights before the next one is converted
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):  # a module is swapped by its parent: wrap the head to quantize it
            model.set_output_embeddings(quantize_dynamic(nn.Sequential(head.float()), qconfig, dtype=torch.qint8)[0])
            del head
            gc.collect()
    for module in model.modules():  # embeddings, layer norms, rotary buffers: small, kept in fp32
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point() and parameter.dtype != torch.float32:
                setattr(module, name, nn.Parameter(parameter.float(), requires_grad=False))
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                module.register_buffer(name, buffer.float())
    model.config.dtype = torch.float32
    gc.collect()
    return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers to quantize layer by layer")
    return layers


def apply_precision(model: nn.Module, precision: Precision) -> nn.Module:
    """A language model loaded in `precision.load_dtype` → ready to serve in `precision`."""
    return quantize_int8(model) if precision is Precision.INT8 else model
