"""int8 language models as files: plain tensors in safetensors (no pickle), to keep in a cache or publish.

`save_int8` writes what `precision.quantize_int8` made: each int8 Linear layer as its int8 weight,
per-output-channel scales and zero points, and bias, and its fp32 outlier columns when it has any;
every other tensor (embeddings, LayerNorms) in fp32; the config beside. Layers computed as one product
(`SharedInput`) are written as the layers they stand for, and the file's metadata names each such group.
`load_int8` builds the model on the meta device and puts those tensors in place, joining each group
before its weights are packed: no bf16 checkpoint is read and nothing is quantized again, which is what
makes a second start fast.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from inference.config import ManifestError
from inference.int8_linear import Int8Linear, SharedInput, packed_int8, place_shared, shared_inputs
from inference.precision import mapped_ranges, release_pages

INT8_DIR = "int8"  # in a weights folder: its int8 language model, when training published one
INT8_FILE = "model-int8.safetensors"
FORMAT = "vqa-assistant-int8/1"


def save_int8(model: PreTrainedModel, folder: Path, source: str = "") -> Path:
    """Write `model` (int8 Linear layers, the rest fp32) into `folder`, atomically; `source` names what it
    was made from (kept in the file's metadata, for `saved_source`). One layer's tensors are unpacked at a
    time and written as they come (`_write_safetensors`), so saving adds one layer to memory, not the model."""
    shared = shared_inputs(model)
    layers: dict[str, tuple[Int8Linear, dict[str, tuple[int, int]]]] = {}  # int8 product: what it writes
    for name, (module, parts) in shared.items():
        layers[name] = (module.product, dict(zip(parts, itertools.pairwise(module.bounds), strict=True)))
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear) and not name.startswith(tuple(f"{done}." for done in layers)):
            layers[name] = (module, {name: (0, module.int8.out_features)})
    layout = {
        part: "outliers" if module.columns.numel() else "int8" for module, parts in layers.values() for part in parts
    }
    prefixes = tuple(f"{name}." for name in layers)
    rest = {key: value for key, value in model.state_dict().items() if not key.startswith(prefixes)}
    groups = [functools.partial(_int8_layer_tensors, module, parts) for module, parts in layers.values()]
    keys = [f"{name}.{part}" for name in layout for part in LAYER_PARTS] + list(rest)
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.save_pretrained(staging)
    metadata = {"format": FORMAT, "layout": json.dumps(layout), "source": source}
    metadata["shared_inputs"] = json.dumps([parts for _, parts in shared.values()])
    _write_safetensors(staging / INT8_FILE, [*groups, lambda: rest], keys, metadata)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# What an int8 layer is written as (each `name.part`): bias when it has one, the last two with outlier columns.
LAYER_PARTS = ("weight_int8", "weight_scale", "weight_zero_point", "bias", "columns", "outlier_weight")


def _int8_layer_tensors(module: Int8Linear, parts: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The tensors of the layers `module` computes: each name's output channels [start, end)."""
    weight, bias = module.int8._weight_bias()  # unpacked from the kernels' layout: a copy
    if weight.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
        raise ValueError(f"{next(iter(parts))}: only per-channel int8 weights are written (found {weight.qscheme()})")
    values = weight.int_repr()[:, : module.in_features]  # without the span columns `packed_int8` adds
    scales, zero_points = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    tensors = {}
    for name, (start, end) in parts.items():
        tensors[f"{name}.weight_int8"] = values[start:end]
        tensors[f"{name}.weight_scale"] = scales[start:end]
        tensors[f"{name}.weight_zero_point"] = zero_points[start:end]
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()[start:end]
        if module.columns.numel():
            tensors[f"{name}.columns"] = module.columns
            tensors[f"{name}.outlier_weight"] = module.outlier_weight[:, start:end]
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


def load_int8(folder: Path, share_inputs: bool = True) -> PreTrainedModel:
    """The language model `save_int8` wrote into `folder`, ready to serve. Packing the weights for fbgemm's
    kernels is most of the time; the layers are packed on as many threads as torch uses. The layers the file
    names as reading one input are joined into one product (`SharedInput`), unless `share_inputs` is False."""
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
        groups = json.loads(metadata.get("shared_inputs", "[]")) if share_inputs else []
        first = {group[0]: group for group in groups}
        units = [first.get(name, [name]) for name in layout if name in first or not any(name in g for g in groups)]
        # torch's ops let go of the GIL while packing; a few layers at a time are read, so memory holds no more.
        # The int8 weights are views of the mapped file; once packed (a copy in the kernels' layout) their
        # pages are given back, or the whole file would stay resident beside the packed model.
        workers = torch.get_num_threads()
        with ThreadPoolExecutor(workers) as pool:
            packing: deque[tuple[list[str], Future, list[tuple[int, int]]]] = deque()
            for unit in units:
                if len(packing) == 2 * workers:
                    _place(model, *packing.popleft())
                tensors = [_int8_tensors(file, names, name) for name in unit]
                outputs = [model.get_submodule(name).out_features for name in unit]
                module = pool.submit(_int8_module, tensors, layout[unit[0]], outputs)
                packing.append((unit, module, mapped_ranges([part["weight_int8"] for part in tensors])))
            while packing:
                _place(model, *packing.popleft())
    for module in model.modules():  # buffers that are computed, not saved (rotary frequencies)
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            module_type = type(module)
            model.set_submodule(_name_of(model, module), module_type(config=config))
    return model.eval()


def _place(model: nn.Module, unit: list[str], packed: Future, read: list[tuple[int, int]]) -> None:
    """The layer `unit` names, or the layers it names as one product, put in place of the meta ones."""
    product, outputs = packed.result()
    if len(unit) == 1:
        model.set_submodule(unit[0], product)
    else:
        place_shared(model, unit, SharedInput(product, outputs))
    release_pages(read)


def _int8_tensors(file, names: set[str], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {key.removeprefix(prefix): file.get_tensor(key) for key in names if key.startswith(prefix)}


def _int8_module(parts: list[dict[str, torch.Tensor]], kind: str, outputs: list[int]) -> tuple[Int8Linear, list[int]]:
    """One int8 layer computing `parts` (one layer's tensors, or several that share their input) side by side."""
    if any(
        not torch.equal(part.get("columns", torch.empty(0)), parts[0].get("columns", torch.empty(0))) for part in parts
    ):
        raise ManifestError("int8 layers that share an input must share their outlier columns")
    values, scales, zero_points = (
        _side_by_side(parts, key) for key in ("weight_int8", "weight_scale", "weight_zero_point")
    )
    weight = torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)
    bias = _side_by_side(parts, "bias") if "bias" in parts[0] else None
    if kind == "int8":
        columns, outlier_weight = torch.empty(0, dtype=torch.long), torch.empty(0, sum(outputs))
    else:
        columns, outlier_weight = parts[0]["columns"], _side_by_side(parts, "outlier_weight", dim=1)
    return Int8Linear(packed_int8(weight, bias), columns, outlier_weight), outputs


def _side_by_side(parts: list[dict[str, torch.Tensor]], key: str, dim: int = 0) -> torch.Tensor:
    return parts[0][key] if len(parts) == 1 else torch.cat([part[key] for part in parts], dim=dim)


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)
