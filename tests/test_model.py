import itertools
import threading

import pytest
import torch
from torch.nn import functional as F
from transformers import PhiForCausalLM

from inference.config import GenerationOptions, TemplateName
from inference.model import MultimodalPhi
from inference.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, Conversation, Turn, render
from inference.tiny import random_lora
from tests.kit import make_shape_image


@pytest.fixture
def model(loaded) -> MultimodalPhi:
    return loaded.model


def image_embeds_for(model, *colours):
    pixels = model.vision_tower.preprocess([make_shape_image(colour) for colour in colours])
    return model.encode_images(pixels)


def test_image_embeddings_land_exactly_at_the_placeholder(model):
    image_embeds = image_embeds_for(model, "red", "blue")
    first = [5, 6, IMAGE_PLACEHOLDER_ID, 7, 8, 9]
    second = [IMAGE_PLACEHOLDER_ID, 10]
    labels = [[IGNORE_INDEX, 6, IGNORE_INDEX, 7, 8, 9], [IGNORE_INDEX, 10]]
    inputs = model.build_inputs([first, second], image_embeds, labels)

    patches = image_embeds.shape[1]
    embed = model.language_model.get_input_embeddings()
    assert inputs.inputs_embeds.shape == (2, len(first) - 1 + patches, embed.embedding_dim)
    row = inputs.inputs_embeds[0]
    torch.testing.assert_close(row[:2], embed(torch.tensor([5, 6])), rtol=0, atol=0)
    torch.testing.assert_close(row[2 : 2 + patches], image_embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(row[2 + patches :], embed(torch.tensor([7, 8, 9])), rtol=0, atol=0)
    assert inputs.labels[0].tolist() == [IGNORE_INDEX, 6] + [IGNORE_INDEX] * patches + [7, 8, 9]
    assert inputs.attention_mask[0].tolist() == [1] * inputs.inputs_embeds.shape[1]

    # The shorter second row starts with the second image and is padded on the right.
    second_row = inputs.inputs_embeds[1]
    torch.testing.assert_close(second_row[:patches], image_embeds[1], rtol=0, atol=0)
    torch.testing.assert_close(second_row[patches], embed(torch.tensor(10)), rtol=0, atol=0)
    assert inputs.attention_mask[1].tolist() == [1] * (patches + 1) + [0] * (len(first) - len(second))
    assert inputs.labels[1, patches + 1 :].eq(IGNORE_INDEX).all()
    assert inputs.inputs_embeds[1, patches + 1 :].eq(0).all()


@pytest.mark.parametrize(("placeholders", "images"), [(1, 0), (0, 1), (2, 1), (1, 2)])
def test_placeholders_and_images_must_agree(model, placeholders, images):
    ids = [[IMAGE_PLACEHOLDER_ID] * placeholders + [5]]
    image_embeds = image_embeds_for(model, *["red"] * images) if images else None
    with pytest.raises(ValueError, match=f"{placeholders} image placeholders but {images} images"):
        model.build_inputs(ids, image_embeds)


def test_forward_loss_is_cross_entropy_over_the_supervised_tokens(model, bpe_tokenizer):
    conversation = Conversation((Turn("What colour is the shape?", "A red circle."),))
    rendered = render(TemplateName.PHI2_CHAT, conversation, bpe_tokenizer)
    pixels = model.vision_tower.preprocess([make_shape_image("red")])
    output = model([rendered.input_ids], [rendered.labels], pixel_values=pixels)

    inputs = model.build_inputs([rendered.input_ids], model.encode_images(pixels), [rendered.labels])
    logits = model.language_model(inputs_embeds=inputs.inputs_embeds).logits
    expected = F.cross_entropy(logits[0, :-1], inputs.labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss, expected)
    # Cached features give the same loss as pixels.
    features = model.vision_tower(pixels)
    from_cache = model([rendered.input_ids], [rendered.labels], image_features=features)
    torch.testing.assert_close(from_cache.loss, output.loss)


def prompt_ids(tokenizer, question="What is in this picture?"):
    conversation = Conversation((Turn(question),))
    return render(TemplateName.PHI2_CHAT, conversation, tokenizer, add_generation_prompt=True).input_ids


def test_kv_cached_generation_matches_full_recompute(model, bpe_tokenizer):
    ids = prompt_ids(bpe_tokenizer)
    image_embeds = image_embeds_for(model, "green")
    options = GenerationOptions(max_new_tokens=24)
    cached = model.generate(ids, image_embeds, options)
    recomputed = model.greedy_without_cache(ids, image_embeds, options.max_new_tokens)
    assert cached == recomputed
    assert len(cached) == 24 or cached[-1] == model.eos_token_id


def test_sampling_is_seeded_and_differs_from_greedy(model, bpe_tokenizer):
    ids = prompt_ids(bpe_tokenizer)
    image_embeds = image_embeds_for(model, "green")
    sample = GenerationOptions(max_new_tokens=16, temperature=1.5)
    torch.manual_seed(1)
    first = model.generate(ids, image_embeds, sample)
    torch.manual_seed(1)
    assert model.generate(ids, image_embeds, sample) == first
    assert first != model.generate(ids, image_embeds, GenerationOptions(max_new_tokens=16))


def overfit(model, tokenizer, conversation, image, steps=150):
    """Train the tiny model on one example until it repeats the answer (and its end token) greedily."""
    rendered = render(TemplateName.PHI2_CHAT, conversation, tokenizer)
    features = model.vision_tower(model.vision_tower.preprocess([image]))
    parameters = [*model.language_model.parameters(), *model.projector.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)  # peft leaves the merged base model frozen
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model([rendered.input_ids], [rendered.labels], image_features=features).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def test_streaming_grows_the_answer_and_stops_at_end_of_text(model, bpe_tokenizer):
    answer = "A red circle on the left."
    image = make_shape_image("red")
    model, loss = overfit(model, bpe_tokenizer, Conversation((Turn("What is in this picture?", answer),)), image)
    assert loss < 0.05
    ids = prompt_ids(bpe_tokenizer)
    image_embeds = model.encode_images(model.vision_tower.preprocess([image]))
    options = GenerationOptions(max_new_tokens=64)

    texts = list(model.stream(bpe_tokenizer, ids, image_embeds, options))
    assert texts[-1].strip() == answer
    assert len(texts) > 1
    for shorter, longer in itertools.pairwise(texts):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    tokens = model.generate(ids, image_embeds, options)
    assert tokens[-1] == model.eos_token_id and len(tokens) < options.max_new_tokens
    assert bpe_tokenizer.decode(tokens[:-1]).strip() == answer


def test_closing_the_stream_stops_generation(model, bpe_tokenizer):
    stream = model.stream(bpe_tokenizer, prompt_ids(bpe_tokenizer), image_embeds_for(model, "red"))
    next(stream)
    before = {thread for thread in threading.enumerate() if thread.name == "generate"}
    assert before
    stream.close()
    assert not any(thread.is_alive() for thread in before)


def test_errors_in_generation_reach_the_reader(model, bpe_tokenizer):
    too_wide = torch.zeros(1, 49, model.language_model.config.hidden_size + 1)
    with pytest.raises(ValueError, match="wide"):
        list(model.stream(bpe_tokenizer, prompt_ids(bpe_tokenizer), too_wide))


def test_lora_merged_logits_match_unmerged(phi_dir):
    base = PhiForCausalLM.from_pretrained(phi_dir)
    lora = random_lora(base, seed=3).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        unmerged = lora(ids).logits
        with lora.disable_adapter():
            base_logits = lora(ids).logits
        merged = lora.merge_and_unload()(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
