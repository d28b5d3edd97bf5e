"""The decode step's attention kernel (`inference.decode_attention`): sdpa's numbers, each row over its own
positions, the same bit for bit in any batch; and torch's sdpa where it cannot be built."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import inference.model
from inference.backends.pytorch import TorchBackend
from inference.decode_attention import decode_attention, fits, kernel
from inference.loading import load_weights
from inference.model import row_by_row_attention
from inference.precision import Precision
from tests.kit import four_requests


def cache_like(rows: int, heads: int, positions: int, width: int, capacity: int, seed: int = 0):
    """A decode step's query and a batch KV cache's keys and values as `GrowingLayer` holds them: views of buffers
    with room after the positions written (so a head's positions are not where the next head's begin)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, 1, width, generator=generator)
    key, value = (torch.randn(rows + 1, heads, capacity, width, generator=generator) for _ in range(2))
    return query, key[:rows, :, :positions], value[:rows, :, :positions]


def sdpa_row(query, key, value, row: int, first: int) -> torch.Tensor:
    module = torch.nn.Module()
    keys, values = key[row : row + 1, :, first:], value[row : row + 1, :, first:]
    return sdpa_attention_forward(module, query[row : row + 1], keys, values, None)[0][0]  # (1, heads, width)


@pytest.fixture
def compiled():
    if kernel() is None:  # a test machine has a C compiler (packages.txt, the CI image): this is a failure
        pytest.fail("the decode attention kernel was not built")
    return kernel()


@pytest.mark.parametrize("width", [16, 80, 7])  # the tiny models', phi-2's, and one no vector width divides
def test_the_kernel_computes_sdpa_for_each_row_over_its_own_positions(compiled, width):
    query, key, value = cache_like(rows=5, heads=3, positions=33, width=width, capacity=40)
    firsts = [0, 3, 10, 32, 7]  # each row's left padding; row 3 has one position
    assert fits(query, key, value)
    out = decode_attention(query, key, value, firsts, width**-0.5)
    assert out.shape == (5, 1, 3, width)
    for row, first in enumerate(firsts):
        torch.testing.assert_close(out[row], sdpa_row(query, key, value, row, first), rtol=1e-5, atol=1e-6)


def test_a_row_computes_the_same_bit_for_bit_alone_and_in_any_batch(compiled):
    query, key, value = cache_like(rows=6, heads=4, positions=50, width=16, capacity=64)
    firsts = [5, 0, 20, 49, 12, 30]
    together = decode_attention(query, key, value, firsts, 0.25)
    for row, first in enumerate(firsts):
        alone = decode_attention(query[row : row + 1], key[row : row + 1], value[row : row + 1], [first], 0.25)
        assert torch.equal(together[row], alone[0])
    # Other rows and another number of threads change nothing either.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        some = decode_attention(query[2:5], key[2:5], value[2:5], firsts[2:5], 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together[2:5], some)


def test_row_by_row_attention_serves_left_padded_decode_steps_through_the_kernel(compiled):
    query, key, value = cache_like(rows=3, heads=2, positions=9, width=16, capacity=12)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    module = torch.nn.Module().eval()
    rows, _ = row_by_row_attention(module, query, key, value, mask)
    assert torch.equal(rows, decode_attention(query, key, value, [0, 4, 0], 16**-0.5))
    torch.testing.assert_close(rows[1], sdpa_row(query, key, value, 1, 4), rtol=1e-5, atol=1e-6)
    assert not fits(query.double(), key.double(), value.double())  # not fp32: torch's sdpa, row by row
    assert not fits(query, key.transpose(2, 3), value)  # a head's positions not one after another


def test_a_served_answer_decodes_through_the_kernel(weights_dir, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return decode_attention(*args)

    monkeypatch.setattr(inference.model, "decode_attention", counted)
    loaded = load_weights(weights_dir, precision=Precision.INT8)
    ids, embeds, options = four_requests(loaded)[0]
    answer = TorchBackend(loaded.model).generate(ids, embeds, options, image_key="x")
    layers = loaded.model.language_model.config.num_hidden_layers
    assert len(answer) > 1 and len(calls) == layers * (len(answer) - 1) and set(calls) == {1}
