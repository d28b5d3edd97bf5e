"""The int8 layers the CPU serves: `Int8Linear` (per-row activation scales, fp32 outlier columns) and
`SharedInput`, the Linear layers that read one input computed as one int8 product.

`precision.quantize_int8` makes them from a checkpoint; `int8_files` writes and reads them.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from itertools import accumulate

import torch
from torch import nn

from inference import native

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear


SPAN = 4  # input columns an int8 product gets beyond its layer's: +1, -1 and zeros (a multiple of fbgemm's 4)


class Int8Linear(nn.Module):
    """A dynamic int8 Linear with one activation scale per row (token), whose outlier input columns, if any, are
    multiplied in fp32 (LLM.int8()'s decomposition).

    torch.ao's dynamic int8 Linear quantizes its input with one scale for the whole tensor. Two things
    follow, and both are undone here. A few large input columns (trained LLMs' systematic outlier
    dimensions, and the massive activation of the first token and "\\n", which sits in a fixed dimension
    too) would set the step for every other value: those columns are zeroed in the int8 product's input
    and weight and added back as a small fp32 product. And one row would set the step of every other
    row: a token's answer would depend on the other prompts of a batch (`inference.batching`) or the
    other positions of a prefill. So each row is divided by its own largest magnitude, and every row goes
    in with +1 and -1 in `SPAN` input columns of its own, whose weights are zero: the kernel's range is
    always [-1, 1], whatever else is in the batch, and the product is scaled back row by row. The int8
    product itself is exact integer arithmetic, so a row computes the same alone as in any batch. (A row
    of +1 and -1 below the others pins the range too, but it turns a product of 8 rows, a batch's decode
    step, into one of 9, which fbgemm computes in a second block of rows.)
    """

    def __init__(self, int8: nn.Module, columns: torch.Tensor, outlier_weight: torch.Tensor) -> None:
        super().__init__()
        self.int8 = int8  # a dynamic int8 Linear whose weight is zero in `columns` and its last `SPAN` columns
        self.in_features, self.out_features = int8.in_features - SPAN, int8.out_features
        # Read through raw pointers by `inference/int8_rows.c`: int64, and fp32 rows one after another.
        self.register_buffer("columns", columns.to(torch.int64))
        self.register_buffer("outlier_weight", outlier_weight.float().contiguous())  # (columns, out_features)
        # Added back after the per-row scaling (the kernel adds it before); not saved: the int8 part holds it.
        self.register_buffer("bias", int8.bias(), persistent=False)
        self.register_buffer("span", torch.tensor([[1.0, -1.0] + [0.0] * (SPAN - 2)]), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, columns: torch.Tensor, qconfig) -> Int8Linear:
        from torch.ao.quantization import quantize_dynamic

        weight = linear.weight.detach().float()
        # Built on the meta device and given its tensors, and quantized in place: no initialised or copied
        # full-size weight beside the one quantized (the most memory a first start takes).
        rest = nn.Linear(linear.in_features + SPAN, linear.out_features, bias=linear.bias is not None, device="meta")
        span = weight.new_zeros(linear.out_features, SPAN)
        rest.weight = nn.Parameter(torch.cat([weight.index_fill(1, columns, 0.0), span], 1), requires_grad=False)
        if linear.bias is not None:
            rest.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        int8 = quantize_dynamic(nn.Sequential(rest), {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)[0]
        return cls(int8, columns, weight[:, columns].T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)
        functions = row_scaling()
        if functions is None or rows.dtype != torch.float32 or self.outlier_weight.dtype != torch.float32:
            return self.forward_in_torch(x)
        stage, finish = functions
        rows, (count, width), threads = rows.contiguous(), rows.shape, torch.get_num_threads()
        staged, scale = rows.new_empty(count, width + SPAN), rows.new_empty(count)
        columns = (self.columns.data_ptr(), self.columns.numel())
        stage(rows.data_ptr(), count, width, *columns, staged.data_ptr(), width + SPAN, scale.data_ptr(), threads)
        output = self.int8(staged)
        size, bias = output.shape[1], None if self.bias is None else self.bias.data_ptr()
        inputs = (scale.data_ptr(), rows.data_ptr(), width, *columns, self.outlier_weight.data_ptr())
        finish(output.data_ptr(), count, size, bias, *inputs, threads)
        return output.view(*x.shape[:-1], size)

    def forward_in_torch(self, x: torch.Tensor) -> torch.Tensor:
        """What `forward` computes (through `inference/int8_rows.c` where it is built), in torch ops."""
        rows = x.flatten(0, -2)
        inliers = rows.index_fill(-1, self.columns, 0.0) if self.columns.numel() else rows
        scale = inliers.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        output = self.int8(torch.cat([inliers / scale, self.span.expand(len(rows), -1)], 1))
        output = output * scale if self.bias is None else torch.addcmul(self.bias, output.sub_(self.bias), scale)
        # The outlier columns one at a time, element by element: a matrix product's kernel (and so its rounding)
        # changes with the number of rows, and a row must compute the same alone as in a batch.
        for column, weight in zip(rows.index_select(-1, self.columns).T, self.outlier_weight, strict=True):
            output.addcmul_(column[:, None], weight)
        return output.view(*x.shape[:-1], output.shape[-1])


@functools.cache
def row_scaling() -> tuple[Callable, Callable] | None:
    """`inference/int8_rows.c`'s two functions, the per-row scaling before and after the int8 product (one pass
    each instead of one per torch op: the elementwise work that grows with a batch's rows), or None where they
    cannot be built."""
    library = native.library("int8_rows")
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.int8_stage.argtypes = [pointer, size, size, pointer, size, pointer, size, pointer, ctypes.c_int]
    finish = [pointer, size, size, pointer, pointer, pointer, size, pointer, size, pointer, ctypes.c_int]
    library.int8_finish.argtypes = finish
    return library.int8_stage, library.int8_finish


def packed_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """fbgemm's dynamic int8 Linear holding `weight` (per-channel quantized, out × in) and `bias`, with `SPAN` input
    columns of zero weight after `weight`'s (`Int8Linear`'s span)."""
    zero_points = weight.q_per_channel_zero_points()
    values = torch.cat([weight.int_repr(), zero_points[:, None].to(torch.int8).expand(-1, SPAN)], 1)
    weight = torch._make_per_channel_quantized_tensor(values, weight.q_per_channel_scales(), zero_points, 0)
    # Made 1 × 1 and given its size after: built at full size, it would first pack a full-size empty weight,
    # which cost as much as packing the real one (fbgemm's prepack is most of a second start).
    int8 = DynamicLinear(1, 1, bias_=bias is not None, dtype=torch.qint8)
    int8.out_features, int8.in_features = weight.shape
    int8.set_weight_bias(weight, bias)
    return int8


class SharedInput(nn.Module):
    """Linear layers that read one input, computed as one int8 product (`Int8Linear`) and handed out in parts.

    phi's q, k, v (attention) and fc1 (MLP) all read the decoder layer's LayerNorm output. Apart, a decode
    step runs four products, each scaling and quantizing the same row again; joined, it reads the same
    weights in one product (`benchmarks/int8_decode.py` measures the difference). The numbers are the same:
    the four were calibrated on one input, so their outlier columns are the same, each row's scale is the
    same, and every output channel has its own weight scale either way.

    Each original layer is replaced by an `Int8Part`; the model's own forward is unchanged. The first part
    called with an input computes the whole product and keeps it until every part has taken its slice.
    A part called with another input, or twice, computes the product again, so the answer never depends on
    the order in which the model calls its layers, only the speed does.
    """

    def __init__(self, product: Int8Linear, sizes: Sequence[int]) -> None:
        super().__init__()
        self.product = product
        self.bounds = [0, *accumulate(sizes)]  # part i is output columns bounds[i]:bounds[i + 1]
        self._kept = threading.local()  # (input, output, parts taken) of the product being handed out

    def part(self, index: int) -> Int8Part:
        return Int8Part(self, index)

    def output_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        kept = self._kept
        if getattr(kept, "input", None) is not x or index in kept.taken:
            kept.input, kept.output, kept.taken = x, self.product(x), set()
        kept.taken.add(index)
        output = kept.output
        if len(kept.taken) == len(self.bounds) - 1:  # every part took its slice: let the product go
            kept.input = kept.output = None
        return output[..., self.bounds[index] : self.bounds[index + 1]]


class Int8Part(nn.Module):
    """One Linear layer's outputs, a slice of its `SharedInput`'s product."""

    def __init__(self, shared: SharedInput, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: it is registered once, beside its parts
        self.index = index
        self.in_features = shared.product.in_features
        self.out_features = shared.bounds[index + 1] - shared.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x, self.index)


def place_shared(root: nn.Module, names: Sequence[str], shared: SharedInput) -> str:
    """Put `shared` into `root` beside the layers `names` (beneath their common parent) and an `Int8Part` in each
    one's place; returns the name it was given."""
    paths = [name.split(".") for name in names]
    common = 0
    while all(len(path) > common + 1 and path[common] == paths[0][common] for path in paths):
        common += 1
    name = ".".join([*paths[0][:common], f"shared_{paths[0][-1]}"])  # e.g. model.layers.0.shared_q_proj
    root.set_submodule(name, shared, strict=False)
    for index, part in enumerate(names):
        root.set_submodule(part, shared.part(index))
    return name


def shared_inputs(root: nn.Module) -> dict[str, tuple[SharedInput, list[str]]]:
    """Each `SharedInput` in `root` by its name, with the names of its parts in order."""
    found = {id(module): (name, module, {}) for name, module in root.named_modules() if isinstance(module, SharedInput)}
    for name, module in root.named_modules():
        if isinstance(module, Int8Part):
            found[id(module.shared)][2][module.index] = name
    return {name: (module, [parts[i] for i in sorted(parts)]) for name, module, parts in found.values()}
