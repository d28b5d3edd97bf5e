"""The GGUF export, checked by llama.cpp itself, and the app's llama.cpp backend.

The greedy-answer agreement on a trained model is measured after the tiny recipe's training
(tests/test_pipeline_learns.py); here the tiny random models check the layout, every tensor and the plumbing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from inference import tiny
from inference.assistant import Assistant
from inference.backends.llamacpp import LlamaCpp, LlamaCppBackend, load_llamacpp
from inference.config import GenerationOptions, ProjectorType
from inference.loading import load_weights
from inference.precision import Precision
from inference.vision import pixel_values
from tests.kit import ask_together, batch_sizes, four_requests, held, make_shape_image, pixels, prompt_ids
from tests.llamacpp_vision import LlamaCppVision
from tests.test_hub import FakeHub
from training import export_gguf, hub_upload

QUESTION = "What is in this picture? Describe it in detail, please."


@pytest.fixture(scope="module")
def weights(gpt2_phi_dir, tmp_path_factory):
    """A weights folder over a tiny Phi with GPT-2's genuine vocabulary, a LoRA to merge, and a 3-layer
    vision tower (feature layer -2: the exported tower has 2 layers) wide enough for distinct patches."""
    root = tmp_path_factory.mktemp("gguf")
    clip = tiny.build_tiny_clip(root / "clip", seed=1, width=32)
    return tiny.build_weights_folder(root / "weights", gpt2_phi_dir, clip)


@pytest.fixture(scope="module")
def loaded(weights):
    return load_weights(weights, precision=Precision.FP32)


def watch_starts(backend: LlamaCppBackend) -> list[int]:
    """The first position of every prompt part `backend` decodes from now on (after what its cache held)."""
    starts, decode = [], backend.llm.decode
    backend.llm.decode = lambda ids, embeds, start, **kwargs: (
        starts.append(start),
        decode(ids, embeds, start, **kwargs),
    )[1]
    return starts


def forget(backend: LlamaCppBackend) -> None:
    """Empty every sequence's KV cache: the next prompt is computed whole."""
    backend.batcher.call(lambda: [backend.rows.forget(index) for index in range(len(backend.rows.held))])


def pytorch_logits(model, ids, image_embeds):
    with torch.no_grad():
        inputs = model.build_inputs([ids], image_embeds)
        return model.language_model(inputs_embeds=inputs.inputs_embeds).logits[0]


@pytest.mark.parametrize("kind, cosine", [("f16", 0.9999), ("q8_0", 0.999), ("q4_k_m", 0.95)])
def test_llama_cpp_computes_what_pytorch_does_on_the_export(weights, loaded, tmp_path, kind, cosine):
    exported = export_gguf.main(["--weights", str(weights), "--out", str(tmp_path), "--type", kind])
    llm = LlamaCpp(exported.language_model, threads=2)
    ids = prompt_ids(loaded.tokenizer, QUESTION, loaded.manifest.image_tokens)
    with torch.no_grad():
        image_embeds = loaded.model.encode_images(pixels(loaded.model, make_shape_image("red")))
    expected = pytorch_logits(loaded.model, ids, image_embeds)
    actual = torch.from_numpy(llm.decode(ids, image_embeds[0].numpy(), 0, outputs="all"))
    # Every position, the image's included: layout, rotary dimensions, biases and the merged LoRA all agree.
    assert F.cosine_similarity(actual, expected, dim=-1).min() > cosine
    if kind == "f16":  # a random tiny model's logits are nearly flat: f16 rounding flips a near-tie now and then
        assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    assert llm.tokenize(QUESTION) == loaded.tokenizer(QUESTION)["input_ids"]  # the same BPE and pre-tokenizer
    card = (tmp_path / "README.md").read_text()
    assert all(name in card for name in (exported.language_model.name, "mmproj-f16.gguf", "llama-server", "FROM"))


def llama_cpp_graph(model, pixel_values):
    """What llama.cpp's LLaVA graph computes (llama-cpp-python 0.3.36): the class token after the patches,
    position embeddings 0..49 in that order, the rows after the first kept (ggml-org/llama.cpp#25814), and
    the projector's GELU in its tanh approximation."""
    tower = model.vision_tower.model
    embeddings = tower.embeddings
    patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    hidden = torch.cat([patches, embeddings.class_embedding.view(1, 1, -1)], 1)
    hidden = tower.pre_layrnorm(hidden + embeddings.position_embedding.weight[None])
    for layer in tower.encoder.layers[: model.vision_tower.feature_layer % (len(tower.encoder.layers) + 1)]:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    projector = model.projector
    return projector[2](F.gelu(projector[0](hidden[:, 1:]), approximate="tanh"))[0]


def test_the_mmproj_holds_our_vision_tower_and_projector_as_llama_cpp_reads_them(weights, loaded, tmp_path):
    exported = export_gguf.main(["--weights", str(weights), "--out", str(tmp_path), "--type", "f16"])
    vision = LlamaCppVision(exported.mmproj, LlamaCpp(exported.language_model, threads=2), threads=2)
    image = make_shape_image("blue", size=(224, 224))
    actual = torch.from_numpy(vision.encode(image))
    with torch.no_grad():
        pixels_224 = pixel_values([image], 224)
        as_llama_cpp_defines = llama_cpp_graph(loaded.model, pixels_224)
        ours = loaded.model.encode_images(pixels_224)[0]
    # Every tensor, the feature layer, the activation, mean and std are right: llama.cpp computes its graph.
    assert F.cosine_similarity(actual, as_llama_cpp_defines, dim=-1).min() > 0.999
    # Its graph is not ours (the class-token bug): patches come out shifted. When a llama.cpp release fixes
    # it, this fails: then the mmproj path answers as PyTorch does, and README's caveat goes.
    assert F.cosine_similarity(actual, ours, dim=-1).min() < 0.99


def test_a_linear_projector_exports_the_language_model_alone(gpt2_phi_dir, clip_dir, tmp_path, capsys):
    weights = tiny.build_weights_folder(tmp_path / "weights", gpt2_phi_dir, clip_dir, ProjectorType.LINEAR)
    exported = export_gguf.main(["--weights", str(weights), "--out", str(tmp_path / "gguf"), "--type", "q8_0"])
    assert exported.mmproj is None and exported.language_model.is_file()
    assert "no llama.cpp counterpart" in capsys.readouterr().out
    assert "no mmproj" in (tmp_path / "gguf" / "README.md").read_text()


def test_the_export_command_pushes_its_folder(weights, tmp_path, monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub_upload, "HfApi", lambda: fake)
    export_gguf.main(["--weights", str(weights), "--out", str(tmp_path), "--type", "q8_0", "--push-to-hub", "me/g"])
    (repo, message, files) = fake.commits[0]
    assert repo == "me/g" and "q8_0" in message
    assert set(files) == {"README.md", "language-model-q8_0.gguf", "mmproj-f16.gguf"}


def test_the_llama_cpp_backend_streams_follows_up_and_stops_as_the_torch_one(weights, loaded, tmp_path):
    served = load_llamacpp(weights, None, threads=2, cache=tmp_path)  # exported once into the cache (q8_0)
    assert len(list(tmp_path.iterdir())) == 1 and load_llamacpp(weights, None, 2, tmp_path).backend.llm
    assert len(list(tmp_path.iterdir())) == 1  # the second start found the export
    model = served.backend  # Q8_0, the precision the app serves
    assistant = Assistant(model, served.tokenizer, served.manifest)
    image, options = make_shape_image("green"), GenerationOptions(max_new_tokens=12)
    replies = [reply.answer for reply in assistant.chat([], image, "What is it?", options=options)]
    assert len(replies) > 2 and all(a == b[: len(a)] for a, b in itertools.pairwise(replies))
    # A follow-up reuses the first answer's cache and answers as a fresh context does.
    starts = watch_starts(model)
    history = [("What is it?", replies[-1])]
    follow_up = [reply.answer for reply in assistant.chat(history, image, "And then?", options=options)][-1]
    reused = starts[-1]
    forget(model)  # the whole prompt is computed again
    assert [reply.answer for reply in assistant.chat(history, image, "And then?", options=options)][-1] == follow_up
    assert reused > 2 * loaded.manifest.image_tokens and starts[-1] == 0
    # Greedy tokens equal PyTorch's where the logits are not near-ties (the model is random), in F16.
    ids = prompt_ids(loaded.tokenizer, QUESTION, loaded.manifest.image_tokens)
    with torch.no_grad():
        embeds = loaded.model.encode_images(pixels(loaded.model, image))
        expected = loaded.model.generate(ids, embeds, GenerationOptions(max_new_tokens=4))
    f16 = export_gguf.main(["--weights", str(weights), "--out", str(tmp_path / "f16"), "--type", "f16"])
    exact = LlamaCppBackend(loaded.model, f16.language_model, threads=2)
    assert exact.generate(ids, embeds, GenerationOptions(max_new_tokens=4))[:2] == expected[:2]
    stop = threading.Event()
    stop.set()
    assert model.generate(ids, embeds, options, stop=stop) == []
    sampled = GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    assert len(model.generate(ids, embeds, sampled)) <= 6
    assert served.backend.max_positions == loaded.model.max_positions
    assert served.backend.describe() == "llama.cpp Q8_0"
    # Warmed, every sequence holds the system prompt, and the first question answers as it did without.
    forget(model)
    assistant.warm()
    assert all(held.ids == ids[: ids.index(-200)] for held in model.rows.held)
    assert [reply.answer for reply in assistant.chat([], image, "What is it?", options=options)][-1] == replies[-1]
    assert starts[-1] == ids.index(-200)  # the question went on from the system prompt
    # An image read on upload: a sequence holds the prompt through it, and the question answers as without.
    red = make_shape_image("red")
    forget(model)
    unread = [reply.answer for reply in assistant.chat([], red, "What is it?", options=options)][-1]
    forget(model)
    assistant.look(red)
    read = [held.ids for held in model.rows.held if -200 in held.ids]
    assert len(read) == 1 and read[0].count(-200) == loaded.manifest.image_tokens and read[0][-1] != -200
    assert [reply.answer for reply in assistant.chat([], red, "What is it?", options=options)][-1] == unread
    assert starts[-1] == len(read[0])  # the question went on from the image read on upload


def test_the_llama_cpp_backend_decodes_concurrent_answers_together_each_as_alone(weights, loaded, tmp_path):
    backend = load_llamacpp(weights, None, threads=2, cache=tmp_path, slots=4).backend
    requests = four_requests(loaded)
    alone = [backend.generate(ids, embeds, options, image_key=f"alone {index}") for index, (ids, embeds, options)
             in enumerate(requests)]  # fmt: skip
    forget(backend)
    sizes = batch_sizes(backend)
    together = ask_together(backend, requests, held(backend))
    assert together == alone
    assert max(sizes) == len(requests) and min(sizes) < len(requests)  # batched, and rows left as they ended
    assert not backend.batcher.running and not backend.rows.sequence
    # Each answer's KV stays in its sequence: a follow-up computes only its new positions, and answers as alone.
    starts = watch_starts(backend)
    ids, embeds, options = requests[1]
    follow_up = [*ids, *together[1], *ids[-6:]]
    again = backend.generate(follow_up, embeds, options, image_key="image 1")
    assert starts == [len(ids) + len(together[1]) - 1]
    forget(backend)
    assert backend.generate(follow_up, embeds, options, image_key="image 1") == again and starts[-1] == 0


def test_the_llama_cpp_backend_reads_ahead_between_steps_even_when_every_slot_answers(weights, loaded, tmp_path):
    backend = load_llamacpp(weights, None, threads=2, cache=tmp_path, slots=1).backend
    ids, embeds, _ = four_requests(loaded)[0]
    stop, long = threading.Event(), GenerationOptions(max_new_tokens=backend.max_positions - len(ids))
    answering = threading.Thread(target=lambda: backend.generate(ids, embeds, long, stop=stop, image_key="a"))
    answering.start()
    while not backend.batcher.running:
        threading.Event().wait(0.01)
    backend.prepare(ids[: ids.index(-200)])  # no free sequence: the question computes it when it comes
    assert answering.is_alive()
    stop.set()
    answering.join(60)
    starts = watch_starts(backend)
    through_image = ids[: len(ids) - ids[::-1].index(-200)]
    backend.prepare(through_image, embeds, "b")  # a new image read on upload, now that the slot is free
    assert starts == [ids.index(-200)]  # after the system prompt, which the answered conversation holds


def test_a_changed_base_model_is_exported_afresh(gpt2_phi_dir, tmp_path):
    """The export cache's key covers the base language model too (here a local folder's files; for a Hub
    id, the snapshot's commit), not only the weights folder."""
    base = Path(shutil.copytree(gpt2_phi_dir, tmp_path / "phi"))
    weights = tiny.build_weights_folder(tmp_path / "weights", base, tiny.build_tiny_clip(tmp_path / "clip"))
    cache = tmp_path / "cache"
    load_llamacpp(weights, None, 2, cache)
    load_llamacpp(weights, None, 2, cache)
    assert len(list(cache.iterdir())) == 1
    os.utime(base / "model.safetensors", ns=(0, 0))  # other weights in the same place
    load_llamacpp(weights, None, 2, cache)
    assert len(list(cache.iterdir())) == 2
