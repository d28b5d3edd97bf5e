"""Serving precisions on the CPU: int8 really is int8, and its answers stay close to fp32's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, PhiForCausalLM

from inference import loading, precision, tiny
from inference.assistant import Assistant
from inference.backends.llamacpp import LlamaCpp
from inference.backends.pytorch import TorchBackend, load_torch
from inference.config import GenerationOptions, Manifest
from inference.gguf_files import export
from inference.int8_files import INT8_DIR, INT8_FILE, save_int8
from inference.int8_linear import DynamicLinear, Int8Linear, Int8Part
from inference.loading import load_weights
from inference.precision import DEFAULT_PRECISION, Precision
from inference.serving_cache import int8_source
from inference.standins import outlier_dims, plant_outliers
from tests.kit import make_shape_image, pixels, prompt_ids
from training.shapes import CORPUS, warm_up_language_model

QUESTIONS = [
    "What is in this picture?",
    "What colour is the shape?",
    "Is the shape on the left or the right?",
    "Look at the picture.\nDescribe the shape, its colour and its place.",  # "\n": a massive activation mid-prompt
]
TOKENS = 24


@pytest.fixture(scope="module")
def trained_phi(phi_dir, tmp_path_factory):
    """A tiny Phi that has learnt some text, so its greedy choices are not coin flips."""
    return warm_up_language_model(phi_dir, tmp_path_factory.mktemp("precision") / "phi", CORPUS, steps=150)


@pytest.fixture(scope="module")
def trained_weights(trained_phi, clip_dir):
    return tiny.build_weights_folder(trained_phi.parent / "weights", trained_phi, clip_dir, adapter=False)


@pytest.fixture(scope="module")
def planted_weights(trained_phi, clip_dir):
    """The trained tiny Phi with trained LLMs' outliers planted through its weights (inference/standins.py):
    4 systematic LayerNorm output dimensions ×30, and a massive activation (1000× the median embedding,
    √width after LayerNorm) at the served prompt's first token and at "\n"."""
    model = PhiForCausalLM.from_pretrained(trained_phi)
    tokenizer = AutoTokenizer.from_pretrained(trained_phi)
    first = prompt_ids(tokenizer, QUESTIONS[0])[0]
    plant_outliers(model, massive_tokens=sorted({first, *tokenizer("\n")["input_ids"]}))
    model.save_pretrained(trained_phi.parent / "planted-phi")
    tokenizer.save_pretrained(trained_phi.parent / "planted-phi")
    return tiny.build_weights_folder(
        trained_phi.parent / "planted", trained_phi.parent / "planted-phi", clip_dir, adapter=False
    )


def continuations(weights, precision: Precision, reference: list[list[int]] | None = None):
    """Per question: (greedy tokens, logits at each answer position with the answer teacher-forced).

    With `reference`, those answers are forced instead of the model's own, so every precision is
    scored on the same positions: top-1 agreement there does not compound like free-running text.
    """
    loaded = load_weights(weights, precision=precision)
    model = loaded.model
    image_embeds = model.encode_images(pixels(model, make_shape_image("red")))
    results = []
    for index, question in enumerate(QUESTIONS):
        ids = prompt_ids(loaded.tokenizer, question, loaded.manifest.image_tokens)
        tokens = model.generate(ids, image_embeds, GenerationOptions(TOKENS))
        forced = reference[index] if reference is not None else tokens
        with torch.no_grad():
            prompt_length = len(ids)
            inputs = model.build_inputs([ids + forced], image_embeds)
            logits = model.language_model(inputs_embeds=inputs.inputs_embeds).logits[0].float()
        results.append((tokens, logits[prompt_length - 1 : prompt_length - 1 + len(forced)]))
    return results


def test_int8_is_the_default_and_quantizes_every_linear_layer(weights_dir):
    assert DEFAULT_PRECISION is Precision.INT8
    language_model = load_weights(weights_dir, precision=Precision.INT8).model.language_model
    quantized = [m for m in language_model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    float_linear = [m for m in language_model.modules() if type(m) is nn.Linear]
    layers = language_model.config.num_hidden_layers
    # Per layer: q, k, v and fc1 (one input, one product), dense, fc2; and lm_head.
    assert len(quantized) == layers * 3 + 1 and not float_linear
    for layer in language_model.model.layers:
        parts = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.fc1]
        assert all(isinstance(part, Int8Part) and part.shared is parts[0].shared for part in parts)
        assert isinstance(layer.self_attn.dense, Int8Linear) and isinstance(layer.mlp.fc2, Int8Linear)
    assert all(p.dtype == torch.float32 for p in language_model.parameters())


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.BF16])
def test_answers_stay_close_to_fp32(trained_weights, precision):
    reference = continuations(trained_weights, Precision.FP32)
    forced = [tokens for tokens, _ in reference]
    results = continuations(trained_weights, precision, forced)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(results, reference, strict=True):
        assert F.cosine_similarity(logits, ref_logits, dim=-1).min() > 0.995
        assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
        top1 = (logits.argmax(-1) == torch.tensor(ref_tokens)).float().mean()
        assert top1 >= 0.9, (precision, top1.item())  # the answer fp32 gave is what this precision would give
        assert tokens[:4] == ref_tokens[:4]  # and the free-running answer starts the same


def trained_language_model(weights) -> PhiForCausalLM:
    return load_weights(weights, precision=Precision.FP32).model.language_model


def test_planted_outlier_dimensions_change_nothing_in_fp32(trained_weights):
    """SmoothQuant's equivalence run backwards: LayerNorm ×scale, the Linear inputs reading it ÷scale."""
    model = trained_language_model(trained_weights)
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        outliers = plant_outliers(model, massive_tokens=[])
        after = model(input_ids=ids).logits
        normed = model.model.layers[0].input_layernorm(model.get_input_embeddings()(ids))[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    others = [d for d in range(normed.shape[-1]) if d not in outliers.dims]
    ratio = normed[:, list(outliers.dims)].abs().mean() / normed[:, others].abs().mean()
    assert ratio > outliers.scale / 3  # what a per-tensor int8 scale now has to span


def test_planted_massive_activation_is_about_root_width_after_layernorm(trained_weights):
    model = trained_language_model(trained_weights)
    newline = 7
    with torch.no_grad():
        outliers = plant_outliers(model, massive_tokens=[newline])
        embeddings = model.get_input_embeddings().weight
        normed = model.model.layers[0].input_layernorm(embeddings[[3, newline]])
    assert outliers.massive_value == pytest.approx(1000 * embeddings[:newline].abs().median().item(), rel=0.05)
    width = model.config.hidden_size
    assert normed[1, outliers.massive_dim] == pytest.approx(width**0.5, rel=0.1)  # about 50 for phi-2
    assert normed[0, outliers.massive_dim].abs() < 5  # other tokens are untouched


@pytest.fixture(scope="module")
def planted_reference(planted_weights):
    return continuations(planted_weights, Precision.FP32)


def fidelity(results, reference) -> tuple[float, float]:
    """Minimum logit cosine and top-1 agreement against fp32, over every teacher-forced answer position."""
    logits = torch.cat([logits for _, logits in results])
    ref_logits = torch.cat([logits for _, logits in reference])
    ref_tokens = torch.tensor([token for tokens, _ in reference for token in tokens])
    cosine = F.cosine_similarity(logits, ref_logits, dim=-1).min().item()
    return cosine, (logits.argmax(-1) == ref_tokens).float().mean().item()


def llama_cpp_continuations(weights, reference, folder) -> list[tuple[None, torch.Tensor]]:
    """`continuations` for the app's llama.cpp backend (Q8_0, the image encoded in PyTorch), teacher-forced."""
    loaded = load_weights(weights, precision=Precision.FP32)
    llm = LlamaCpp(export(weights, folder, "q8_0").language_model, threads=2)
    with torch.no_grad():
        image_embeds = loaded.model.encode_images(pixels(loaded.model, make_shape_image("red")))[0].numpy()
    results = []
    for question, (forced, _) in zip(QUESTIONS, reference, strict=True):
        ids = prompt_ids(loaded.tokenizer, question, loaded.manifest.image_tokens)
        llm.clear()
        every = llm.decode(ids + forced, image_embeds, 0, outputs="all")
        results.append((None, torch.from_numpy(every[len(ids) - 1 : len(ids) - 1 + len(forced)]).float()))
    return results


@pytest.mark.parametrize("served", ["int8", "llama.cpp-q8_0"])
def test_served_precisions_stay_faithful_with_planted_outliers(planted_weights, planted_reference, served, tmp_path):
    """The int8 issue's bar, on the model that carries trained LLMs' outliers: at every answer position."""
    reference = planted_reference
    forced = [tokens for tokens, _ in reference]
    if served == "int8":
        results = continuations(planted_weights, Precision.INT8, forced)
    else:
        results = llama_cpp_continuations(planted_weights, reference, tmp_path)
    cosine, top1 = fidelity(results, reference)
    assert cosine >= 0.995 and top1 >= 0.98, (served, cosine, top1)


def test_without_the_outlier_columns_int8_drifts_from_fp32(planted_weights, planted_reference, monkeypatch):
    """The fp32 outlier columns carry int8's fidelity: without them the planted outlier dimensions set each
    token's activation scale, and the logits drift far further from fp32's (1 - cosine) than the served
    int8's do: about 175× natively and 99× on the AVX2 kernel class, so the bar is 20×. (Per-token scales
    alone pass the bar above on this tiny model; with one scale for the whole tensor, as torch.ao computes
    it, the massive activation of the first token set every other position's scale and missed it.)"""
    reference = planted_reference
    monkeypatch.setattr(precision, "outlier_columns", lambda peaks: torch.empty(0, dtype=torch.long))
    results = continuations(planted_weights, Precision.INT8, [tokens for tokens, _ in reference])
    assert not any(
        isinstance(m, Int8Linear) and m.columns.numel()
        for m in load_weights(planted_weights, precision=Precision.INT8).model.modules()
    )
    cosine, _ = fidelity(results, reference)
    monkeypatch.undo()
    served, _ = fidelity(continuations(planted_weights, Precision.INT8, [tokens for tokens, _ in reference]), reference)
    assert 1 - cosine > 20 * (1 - served)


def test_int8_finds_the_planted_columns_and_keeps_them_fp32(planted_weights):
    language_model = load_weights(planted_weights, precision=Precision.INT8).model.language_model
    planted = set(outlier_dims(language_model.config.hidden_size))
    layer = language_model.model.layers[0]
    # q, k, v and fc1 read the input LayerNorm as one product (tests/test_int8_linear.py); the head, the last one
    for linear in (layer.self_attn.q_proj.shared.product, language_model.lm_head):
        assert isinstance(linear, Int8Linear) and planted <= set(linear.columns.tolist())
        assert len(linear.columns) <= 8


def test_int8_answers_with_a_reused_prefix_equal_answers_without(planted_weights):
    loaded = load_weights(planted_weights, precision=Precision.INT8)
    reusing = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    image, history, options = make_shape_image("blue"), [], GenerationOptions(max_new_tokens=12)
    for question in ("What colour is it?", "Where is it?", "Is it round?"):
        answer = list(reusing.chat(history, image, text=question, options=options))[-1].answer
        fresh = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)  # nothing cached
        assert list(fresh.chat(history, image, text=question, options=options))[-1].answer == answer
        history.append((question, answer))


def refuse_to_quantize(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("quantized again")

    monkeypatch.setattr(loading, "quantize_int8", refuse)


def same_logits(a, b) -> bool:
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        return torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_int8_is_quantized_once_and_loaded_from_the_cache_after(planted_weights, tmp_path, monkeypatch):
    cache = tmp_path / "int8"
    first = load_torch(planted_weights, Precision.INT8, cache).backend.model.language_model
    (saved,) = cache.glob(f"*/{INT8_FILE}")
    refuse_to_quantize(monkeypatch)
    second = load_torch(planted_weights, Precision.INT8, cache).backend.model.language_model
    assert isinstance(second.model.layers[0].mlp.fc2, Int8Linear) and same_logits(first, second)
    int8_layers = [module for module in second.modules() if isinstance(module, DynamicLinear)]
    assert int8_layers and all(  # each loaded layer knows its real size (it is built 1 × 1, then filled)
        layer.weight().shape == (layer.out_features, layer.in_features) for layer in int8_layers
    )
    # Other sources (here the base model's files changed) are quantized afresh; the cache keeps the latest.
    monkeypatch.undo()
    os.utime(planted_weights.parent / "planted-phi" / "model.safetensors", ns=(0, 0))
    load_torch(planted_weights, Precision.INT8, cache)
    assert [path.parent for path in cache.glob(f"*/{INT8_FILE}")] != [saved.parent]
    assert len(list(cache.iterdir())) == 1


def test_an_int8_model_published_in_the_weights_folder_is_served_while_it_fits(weights_dir, tmp_path, monkeypatch):
    """Training writes the int8 model into the weights folder (weights/int8/): a Space that restarts from an
    empty disk loads it instead of quantizing; retrained weights (another adapter) no longer match it."""
    weights = Path(shutil.copytree(weights_dir, tmp_path / "weights"))
    quantized = load_weights(weights, precision=Precision.INT8).model.language_model
    save_int8(quantized, weights / INT8_DIR, int8_source(weights, Manifest.load(weights)))
    refuse_to_quantize(monkeypatch)
    backend = load_torch(weights, Precision.INT8, None).backend
    served = backend.model.language_model
    assert backend.describe() == "PyTorch int8"
    assert same_logits(quantized, served)
    adapter = weights / "adapter" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    save_file({name: value + 0.01 for name, value in tensors.items()}, adapter)
    with pytest.raises(AssertionError, match="quantized again"):
        load_torch(weights, Precision.INT8, None)
