"""Serving precisions on the CPU: int8 really is int8, and its answers stay close to fp32's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from inference import tiny
from inference.config import GenerationOptions
from inference.loading import load_weights
from inference.precision import DEFAULT_PRECISION, Precision
from tests.kit import CORPUS, make_shape_image, pixels, pretrain_tiny_phi, prompt_ids

QUESTIONS = ["What is in this picture?", "What colour is the shape?", "Is the shape on the left or the right?"]
TOKENS = 24


@pytest.fixture(scope="module")
def trained_weights(phi_dir, clip_dir, tmp_path_factory):
    """Weights over a tiny Phi that has learnt some text, so its greedy choices are not coin flips."""
    folder = tmp_path_factory.mktemp("precision")
    language_model = pretrain_tiny_phi(phi_dir, folder / "phi", CORPUS, steps=150)
    return tiny.build_weights_folder(folder / "weights", language_model, clip_dir, adapter=False)


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
    assert len(quantized) == layers * 6 + 1 and not float_linear  # q, k, v, dense, fc1, fc2 per layer + lm_head
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
