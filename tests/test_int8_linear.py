"""int8 layers that read one input run as one product (`inference.int8_linear.SharedInput`) with the same numbers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PhiForCausalLM

from inference.config import TemplateName
from inference.int8_files import INT8_FILE, load_int8, save_int8
from inference.int8_linear import Int8Linear, Int8Part, SharedInput, row_scaling
from inference.loading import calibration_ids
from inference.precision import quantize_int8
from inference.standins import plant_outliers

PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")  # phi's readers of input_layernorm


@pytest.fixture(scope="module")
def planted(phi_dir):
    """The tiny Phi with outliers planted (so the int8 layers have fp32 outlier columns), and what it calibrates on."""
    model = PhiForCausalLM.from_pretrained(phi_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(phi_dir)
    ids = calibration_ids(tokenizer, TemplateName.PHI2_CHAT)
    with torch.no_grad():
        plant_outliers(model, massive_tokens=[ids[0], *tokenizer("\n")["input_ids"]])
    return model, ids


@pytest.fixture(scope="module")
def shared_and_apart(planted):
    model, ids = planted
    return quantize_int8(copy.deepcopy(model), ids), quantize_int8(copy.deepcopy(model), ids, share_inputs=False)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_the_layers_reading_one_input_become_one_product_with_the_same_logits(planted, shared_and_apart):
    shared, apart = shared_and_apart
    _, ids = planted
    for layer in shared.model.layers:
        products = [module for module in layer.children() if isinstance(module, SharedInput)]
        assert len(products) == 1 and products[0].product.columns.numel() > 0  # the planted outlier columns
        parts = [layer.get_submodule(name) for name in PARTS]
        assert all(isinstance(part, Int8Part) and part.shared is products[0] for part in parts)
        assert [part.index for part in parts] == [0, 1, 2, 3]
        assert isinstance(layer.self_attn.dense, Int8Linear) and isinstance(layer.mlp.fc2, Int8Linear)
    calls = []
    for layer in shared.model.layers:
        next(m for m in layer.children() if isinstance(m, SharedInput)).product.register_forward_hook(
            lambda *args: calls.append(1)
        )
    prompt = [*ids, *range(3, 30)]
    assert torch.equal(logits(shared, prompt), logits(apart, prompt))
    assert len(calls) == len(shared.model.layers)  # one product per layer, not four
    assert all(getattr(m._kept, "output", None) is None for m in shared.modules() if isinstance(m, SharedInput))


def test_a_part_asked_out_of_order_or_twice_still_gets_its_own_outputs(shared_and_apart):
    shared, apart = shared_and_apart
    layer, reference = shared.model.layers[0], apart.model.layers[0]
    width = shared.config.hidden_size
    x, y = torch.randn(3, width), torch.randn(3, width)
    with torch.no_grad():
        for name, inputs in (("mlp.fc1", x), ("self_attn.q_proj", y), ("self_attn.q_proj", y), ("self_attn.k_proj", x)):
            assert torch.equal(layer.get_submodule(name)(inputs), reference.get_submodule(name)(inputs)), name


def test_a_saved_int8_model_names_its_layers_and_loads_as_one_product_or_apart(planted, shared_and_apart, tmp_path):
    shared, _ = shared_and_apart
    _, ids = planted
    save_int8(shared, tmp_path / "int8")
    with safe_open(str(tmp_path / "int8" / INT8_FILE), "pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert f"model.layers.0.{PARTS[0]}.weight_int8" in keys and not any("shared_" in key for key in keys)
    groups = json.loads(metadata["shared_inputs"])
    assert groups[0] == [f"model.layers.0.{part}" for part in PARTS] and len(groups) == len(shared.model.layers)
    joined, separate = load_int8(tmp_path / "int8"), load_int8(tmp_path / "int8", share_inputs=False)
    assert isinstance(joined.model.layers[0].mlp.fc1, Int8Part)
    assert isinstance(separate.model.layers[0].mlp.fc1, Int8Linear)
    expected = logits(shared, ids)
    assert torch.equal(logits(joined, ids), expected) and torch.equal(logits(separate, ids), expected)


def test_a_row_of_an_int8_product_is_the_same_alone_and_in_a_batch(shared_and_apart):
    shared, _ = shared_and_apart
    product = next(m for m in shared.model.layers[0].children() if isinstance(m, SharedInput)).product
    assert product.columns.numel() > 0  # the outlier columns' fp32 part counts too
    rows = torch.randn(9, product.in_features, generator=torch.Generator().manual_seed(0))
    rows[:, product.columns] *= 30
    with torch.no_grad():
        batched = product(rows)
        assert all(torch.equal(batched[row : row + 1], product(rows[row : row + 1])) for row in range(9))
        assert row_scaling() is not None  # that was `inference/int8_rows.c`; the same in torch ops:
        torch.testing.assert_close(batched, product.forward_in_torch(rows), rtol=1e-6, atol=1e-6)
        apart = product.forward_in_torch(rows[4:5])
        assert torch.equal(product.forward_in_torch(rows)[4:5], apart)


def test_an_int8_layer_reads_its_outlier_columns_whatever_their_integer_type(shared_and_apart):
    # `inference/int8_rows.c` reads the columns as int64 and the outlier weights as fp32 rows through raw pointers.
    shared, _ = shared_and_apart
    product = next(m for m in shared.model.layers[0].children() if isinstance(m, SharedInput)).product
    other = Int8Linear(product.int8, product.columns.int(), product.outlier_weight.T.contiguous().T)
    rows = torch.randn(3, product.in_features, generator=torch.Generator().manual_seed(1))
    rows[:, product.columns] *= 30
    with torch.no_grad():
        assert torch.equal(other(rows), product(rows))
