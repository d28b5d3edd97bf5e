import pytest
import torch
from torch.nn import functional as F
from transformers import PhiForCausalLM

from inference.config import GenerationOptions, TemplateName
from inference.model import MultimodalPhi
from inference.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, Conversation, Turn, render
from inference.tiny import random_lora
from tests.kit import greedy_without_cache, make_shape_image, pixels, prompt_ids

IMAGE = IMAGE_PLACEHOLDER_ID


@pytest.fixture
def model(loaded) -> MultimodalPhi:
    return loaded.model


def image_embeds_for(model, *colours):
    return model.encode_images(pixels(model, *[make_shape_image(colour) for colour in colours]))


def test_image_embeddings_are_scattered_into_the_placeholder_positions(model):
    image_embeds = image_embeds_for(model, "red", "blue")
    patches = image_embeds.shape[1]
    first = [5, 6, *[IMAGE] * patches, 7, 8, 9]
    second = [*[IMAGE] * patches, 10]
    labels = [[IGNORE_INDEX, 6, *[IGNORE_INDEX] * patches, 7, 8, 9], [*[IGNORE_INDEX] * patches, 10]]
    inputs = model.build_inputs([first, second], image_embeds, labels)

    embed = model.language_model.get_input_embeddings()
    assert inputs.inputs_embeds.shape == (2, len(first), embed.embedding_dim)  # positions are as rendered
    row = inputs.inputs_embeds[0]
    torch.testing.assert_close(row[:2], embed(torch.tensor([5, 6])), rtol=0, atol=0)
    torch.testing.assert_close(row[2 : 2 + patches], image_embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(row[2 + patches :], embed(torch.tensor([7, 8, 9])), rtol=0, atol=0)
    assert inputs.labels[0].tolist() == labels[0]
    assert inputs.attention_mask[0].tolist() == [1] * len(first)

    # The shorter second row starts with the second image and is padded on the right.
    second_row = inputs.inputs_embeds[1]
    torch.testing.assert_close(second_row[:patches], image_embeds[1], rtol=0, atol=0)
    torch.testing.assert_close(second_row[patches], embed(torch.tensor(10)), rtol=0, atol=0)
    assert inputs.attention_mask[1].tolist() == [1] * len(second) + [0] * (len(first) - len(second))
    assert inputs.labels[1, len(second) :].eq(IGNORE_INDEX).all()
    assert inputs.inputs_embeds[1, len(second) :].eq(0).all()


def test_image_positions_are_never_supervised(model):
    image_embeds = image_embeds_for(model, "red")
    patches = image_embeds.shape[1]
    ids = [*[IMAGE] * patches, 5, 6]
    inputs = model.build_inputs([ids], image_embeds, [[IMAGE] * patches + [5, 6]])  # labels copied from ids
    assert inputs.labels[0].tolist() == [IGNORE_INDEX] * patches + [5, 6]


@pytest.mark.parametrize(("positions", "images"), [(49, 0), (0, 1), (98, 1), (49, 2), (48, 1)])
def test_image_positions_and_images_must_agree(model, positions, images):
    ids = [[IMAGE] * positions + [5]]
    image_embeds = image_embeds_for(model, *["red"] * images) if images else None
    with pytest.raises(ValueError, match=f"{positions} image positions but {images} images"):
        model.build_inputs(ids, image_embeds)


def test_forward_loss_is_cross_entropy_over_the_supervised_tokens(model, bpe_tokenizer):
    conversation = Conversation((Turn("What colour is the shape?", "A red circle."),))
    rendered = render(TemplateName.PHI2_CHAT, conversation, bpe_tokenizer, image_tokens=49)
    pixel_values = pixels(model, make_shape_image("red"))
    output = model([rendered.input_ids], [rendered.labels], pixel_values=pixel_values)

    inputs = model.build_inputs([rendered.input_ids], model.encode_images(pixel_values), [rendered.labels])
    logits = model.language_model(inputs_embeds=inputs.inputs_embeds).logits
    expected = F.cross_entropy(logits[0, :-1], inputs.labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss, expected)
    # Cached features give the same loss as pixels.
    features = model.vision_tower(pixel_values)
    from_cache = model([rendered.input_ids], [rendered.labels], image_features=features)
    torch.testing.assert_close(from_cache.loss, output.loss)


def test_kv_cached_generation_matches_full_recompute(model, bpe_tokenizer):
    ids = prompt_ids(bpe_tokenizer)
    image_embeds = image_embeds_for(model, "green")
    options = GenerationOptions(max_new_tokens=24)
    cached = model.generate(ids, image_embeds, options)
    recomputed = greedy_without_cache(model, ids, image_embeds, options.max_new_tokens)
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
