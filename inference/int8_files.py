"""int8 language models as files: plain tensors in safetensors (no pickle), to keep in a cache or publish.

`save_int8` writes what `precision.quantize_int8` made: each `Int8Linear` as its int8 weight,
per-output-channel scales and zero points, and bias, and its fp32 outlier columns when it has any;
every other tensor (embeddings, LayerNorms) in fp32; the config beside. `load_int8` builds the model
on the meta device and puts those tensors in place: no bf16 checkpoint is read and nothing is
quantized again, which is what makes a second start fast.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from inference.config import ManifestError
from inference.precision import Int8Linear, mapped_ranges, release_pages

INT8_DIR = "int8"  # in a weights folder: its int8 language model, when training published one
INT8_FILE = "model-int8.safetensors"
FORMAT = "vqa-assistant-int8/1"

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear


def save_int8(model: PreTrainedModel, folder: Path, source: str = "") -> Path:
    """Write `model` (int8 Linear layers, the rest fp32) into `folder`, atomically; `source` names what it
    was made from (kept in the file's metadata, for `saved_source`). One layer's tensors are unpacked at a
    time and written as they come (`_write_safetensors`), so saving adds one layer to memory, not the model."""
    layout: dict[str, str] = {}
    for name, module in model.named_modules():
        if name.startswith(tuple(f"{done}." for done in layout)):
            continue  # the int8 part of an Int8Linear: written with it
        if isinstance(module, Int8Linear):
            layout[name] = "outliers" if module.columns.numel() else "int8"
    prefixes = tuple(f"{name}." for name in layout)
    rest = {key: value for key, value in model.state_dict().items() if not key.startswith(prefixes)}
    groups = [functools.partial(_int8_layer_tensors, name, model.get_submodule(name)) for name in layout]
    keys = [f"{name}.{part}" for name in layout for part in LAYER_PARTS] + list(rest)
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.save_pretrained(staging)
    metadata = {"format": FORMAT, "layout": json.dumps(layout), "source": source}
    _write_safetensors(staging / INT8_FILE, [*groups, lambda: rest], keys, metadata)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# What an int8 layer is written as (each `name.part`): bias when it has one, the last two with outlier columns.
LAYER_PARTS = ("weight_int8", "weight_scale", "weight_zero_point", "bias", "columns", "outlier_weight")


def _int8_layer_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    weight, bias = module.int8._weight_bias()  # unpacked from the kernels' layout: a copy
    if weight.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
        raise ValueError(f"{name}: only per-channel int8 weights are written (found {weight.qscheme()})")
    tensors = {
        f"{name}.weight_int8": weight.int_repr(),
        f"{name}.weight_scale": weight.q_per_channel_scales(),
        f"{name}.weight_zero_point": weight.q_per_channel_zero_points(),
    }
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach()
    if module.columns.numel():
        tensors |= {f"{name}.columns": module.columns, f"{name}.outlier_weight": module.outlier_weight}
    return tensors


SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


def _write_safetensors(
    path: Path, groups: list[Callable[[], dict[str, torch.Tensor]]], keys: list[str], metadata: dict[str, str]
) -> None:
    """A safetensors file of the tensors each of `groups` makes when called, one group in memory at a time.

    The format puts a JSON header (names, dtypes, shapes, byte offsets) before the data, so room for it is
    left first, sized for the names in `keys` (those the groups may make), and the header is written into it
    once the data is; the format allows trailing spaces in the header, which fill the rest."""
    entry = len(json.dumps({"dtype": "BOOL", "shape": [2**40] * 4, "data_offsets": [2**50, 2**50]}))
    room = sum(len(json.dumps(key)) + entry + 2 for key in keys) + len(json.dumps(metadata)) + 64
    room += -room % 8  # the data starts 8-byte aligned
    header: dict[str, object] = {"__metadata__": metadata}
    offset, expected = 0, set(keys)
    with open(path, "wb") as out:
        out.seek(8 + room)
        for group in groups:
            for key, tensor in group().items():
                if key not in expected or key in header:
                    raise ValueError(f"{path.name}: {key} is not one of the expected tensors, or comes twice")
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                out.write(memoryview(data))
                header[key] = {
                    "dtype": SAFETENSORS_DTYPES[tensor.dtype],
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + data.nbytes],
                }
                offset += data.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        out.seek(0)
        out.write(struct.pack("<Q", room) + encoded.ljust(room, b" "))


def saved_source(folder: Path) -> str | None:
    """The `source` an int8 folder was saved with; None when there is no int8 model in it."""
    if not (folder / INT8_FILE).is_file():
        return None
    with safe_open(str(folder / INT8_FILE), "pt") as file:
        return (file.metadata() or {}).get("source", "")


def load_int8(folder: Path) -> PreTrainedModel:
    """The language model `save_int8` wrote into `folder`, ready to serve. Packing the weights for fbgemm's
    kernels is most of the time; the layers are packed on as many threads as torch uses."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with safe_open(str(folder / INT8_FILE), "pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != FORMAT:
            found = metadata.get("format")
            raise ManifestError(f"{folder / INT8_FILE} is not an int8 model this version reads (format {found})")
        layout = json.loads(metadata["layout"])
        prefixes = tuple(f"{name}." for name in layout)
        names = set(file.keys())
        rest = {key: file.get_tensor(key) for key in names if not key.startswith(prefixes)}
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)  # before the int8 layers
        missing = [key for key in missing if not key.startswith(prefixes)]
        if missing or unexpected:
            raise ManifestError(
                f"{folder / INT8_FILE} does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        # torch's ops let go of the GIL while packing; a few layers at a time are read, so memory holds no more.
        # The int8 weights are views of the mapped file; once packed (a copy in the kernels' layout) their
        # pages are given back, or the whole file would stay resident beside the packed model.
        workers = torch.get_num_threads()
        with ThreadPoolExecutor(workers) as pool:
            packing: deque[tuple[str, Future, list[tuple[int, int]]]] = deque()
            for name, kind in layout.items():
                if len(packing) == 2 * workers:
                    _place(model, *packing.popleft())
                tensors = _int8_tensors(file, names, name)
                module = pool.submit(_int8_module, tensors, kind, model.get_submodule(name))
                packing.append((name, module, mapped_ranges([tensors["weight_int8"]])))
            while packing:
                _place(model, *packing.popleft())
    for module in model.modules():  # buffers that are computed, not saved (rotary frequencies)
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            module_type = type(module)
            model.set_submodule(_name_of(model, module), module_type(config=config))
    return model.eval()


def _place(model: nn.Module, name: str, packed: Future, read: list[tuple[int, int]]) -> None:
    model.set_submodule(name, packed.result())
    release_pages(read)


def _int8_tensors(file, names: set[str], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {key.removeprefix(prefix): file.get_tensor(key) for key in names if key.startswith(prefix)}


def _int8_module(tensors: dict[str, torch.Tensor], kind: str, shape: nn.Module) -> nn.Module:
    scale, zero_point = tensors["weight_scale"], tensors["weight_zero_point"]
    weight = torch._make_per_channel_quantized_tensor(tensors["weight_int8"], scale, zero_point, 0)
    bias = tensors.get("bias")
    # Made 1 × 1 and given its size after: built at full size, it would first pack a full-size empty weight,
    # which cost as much as packing the real one (fbgemm's prepack is most of a second start).
    int8 = DynamicLinear(1, 1, bias_=bias is not None, dtype=torch.qint8)
    int8.in_features, int8.out_features = shape.in_features, shape.out_features
    int8.set_weight_bias(weight, bias)
    if kind == "int8":
        return Int8Linear(int8, torch.empty(0, dtype=torch.long), torch.empty(0, shape.out_features))
    return Int8Linear(int8, tensors["columns"], tensors["outlier_weight"])


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)
