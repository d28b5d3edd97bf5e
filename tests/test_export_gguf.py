"""The GGUF export, checked by llama.cpp itself: its logits on an exported tiny model are PyTorch's."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from inference import tiny
from inference.loading import load_weights
from inference.precision import Precision
from tests.kit import make_shape_image, pixels, prompt_ids
from training import export_gguf

pytestmark = pytest.mark.llama_cpp

QUESTION = "What is in this picture? Describe it in detail, please."


@pytest.fixture(scope="module")
def weights(gpt2_phi_dir, clip_dir, tmp_path_factory):
    """A weights folder over a tiny Phi with GPT-2's genuine vocabulary and a LoRA to merge."""
    return tiny.build_weights_folder(tmp_path_factory.mktemp("gguf") / "weights", gpt2_phi_dir, clip_dir)


def pytorch_logits(model, ids, image_embeds):
    with torch.no_grad():
        inputs = model.build_inputs([ids], image_embeds)
        return model.language_model(inputs_embeds=inputs.inputs_embeds).logits[0]


@pytest.mark.parametrize("kind, cosine", [("f16", 0.9999), ("q8_0", 0.999)])
def test_llama_cpp_computes_what_pytorch_does_on_the_export(weights, tmp_path, kind, cosine):
    from inference.llamacpp import LlamaCpp

    loaded = load_weights(weights, precision=Precision.FP32)
    path = export_gguf.main(["--weights", str(weights), "--out", str(tmp_path), "--type", kind])
    llm = LlamaCpp(path, threads=2)
    ids = prompt_ids(loaded.tokenizer, QUESTION, loaded.manifest.image_tokens)
    with torch.no_grad():
        image_embeds = loaded.model.encode_images(pixels(loaded.model, make_shape_image("red")))
    expected = pytorch_logits(loaded.model, ids, image_embeds)
    actual = torch.from_numpy(llm.decode(ids, image_embeds[0].numpy(), 0, outputs="all"))
    # Every position, the image's included: layout, rotary dimensions, biases and the merged LoRA all agree.
    assert F.cosine_similarity(actual, expected, dim=-1).min() > cosine
    # A random tiny model's logits are nearly flat: f16 rounding alone flips a near-tie now and then.
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    assert llm.tokenize(QUESTION) == loaded.tokenizer(QUESTION)["input_ids"]  # the same BPE and pre-tokenizer
