"""The C kernels of the CPU serving path (`inference.native`): where they cannot be built, the same work runs in
torch ops, with the same numbers."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from inference import decode_attention, int8_linear, native
from inference.model import row_by_row_attention


def clear() -> None:
    for cached in (native.library, decode_attention.kernel, int8_linear.row_scaling):
        cached.cache_clear()


@pytest.fixture(params=["no compiler", "VQA_C_KERNELS=0"])
def torch_only(request, monkeypatch):
    """The process as it runs where the kernels cannot be built; built again afterwards."""
    clear()
    if request.param == "no compiler":
        monkeypatch.setenv("CC", "no-such-compiler")
    else:
        monkeypatch.setenv("VQA_C_KERNELS", "0")
    yield
    monkeypatch.undo()
    clear()
    assert decode_attention.kernel() is not None and int8_linear.row_scaling() is not None


def test_without_the_kernels_decode_steps_attend_through_sdpa_row_by_row(torch_only):
    assert decode_attention.kernel() is None
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 2, 1, 8, generator=generator)
    key, value = (torch.randn(3, 2, 8, 8, generator=generator)[:2, :, :6] for _ in range(2))
    rows, _ = row_by_row_attention(torch.nn.Module().eval(), query, key, value, None, row_starts=[0, 2])
    alone, _ = sdpa_attention_forward(torch.nn.Module(), query[1:2], key[1:2, :, 2:], value[1:2, :, 2:], None)
    assert torch.equal(rows[1:2], alone)


@pytest.mark.filterwarnings("ignore:.*(torch.ao.quantization is deprecated|quantize_per_).*")
@pytest.mark.parametrize("bias", [True, False])
def test_without_the_kernels_int8_layers_scale_their_rows_in_torch_ops(torch_only, bias):
    from torch.ao.quantization import per_channel_dynamic_qconfig

    assert int8_linear.row_scaling() is None
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=bias)
    columns = torch.tensor([3, 17])
    layer = int8_linear.Int8Linear.from_linear(linear, columns, per_channel_dynamic_qconfig)
    rows = torch.randn(5, 64)
    rows[:, columns] *= 30
    with torch.no_grad():
        assert torch.equal(layer(rows), layer.forward_in_torch(rows))
        torch.testing.assert_close(layer(rows), linear(rows), rtol=0.05, atol=0.05)  # int8: near the fp32 layer
