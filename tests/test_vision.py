import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference.vision import CLIP_MEAN, CLIP_STD, ImageError, VisionTower, preprocess, to_rgb
from tests.kit import make_shape_image

SIZE = 224


def jpeg_with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def palette_with_transparency() -> Image.Image:
    image = make_shape_image("red").convert("P")
    image.info["transparency"] = 0
    return image


IMAGES = {
    "RGB": lambda: make_shape_image("red"),
    "RGBA": lambda: make_shape_image("red", mode="RGBA"),
    "LA": lambda: make_shape_image("red", mode="LA"),
    "P": lambda: make_shape_image("red", mode="P"),
    "P+transparency": palette_with_transparency,
    "L": lambda: make_shape_image("red", mode="L"),
    "1": lambda: make_shape_image("red", mode="1"),
    "I;16": lambda: Image.fromarray(np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10),
    "I": lambda: make_shape_image("red", mode="I"),
    "F": lambda: make_shape_image("red", mode="F"),
    "CMYK": lambda: make_shape_image("red", mode="CMYK"),
    "YCbCr": lambda: make_shape_image("red", mode="YCbCr"),
    "EXIF-rotated JPEG": lambda: jpeg_with_orientation(make_shape_image("red"), 6),
    "1x1": lambda: Image.new("RGB", (1, 1), "blue"),
    "3000x1": lambda: Image.new("RGB", (3000, 1), "blue"),
    "huge 8000x6000": lambda: Image.new("RGB", (8000, 6000), "blue"),
}


@pytest.mark.parametrize("name", IMAGES)
def test_every_image_kind_becomes_normalised_224px_rgb(name):
    pixels = preprocess([IMAGES[name]()], SIZE)
    assert pixels.shape == (1, 3, SIZE, SIZE)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    # Normalised pixels stay within what (0..1 - mean) / std allows.
    low = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    high = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (pixels.amin(dim=(0, 2, 3)) >= low - 1e-5).all() and (pixels.amax(dim=(0, 2, 3)) <= high + 1e-5).all()


def test_exif_orientation_is_applied():
    # A landscape image stored with "rotate 90° clockwise to display": the model must see a portrait.
    stored = Image.new("RGB", (80, 40), "red")
    stored.paste(Image.new("RGB", (40, 40), "blue"), (40, 0))  # right half blue
    upright = to_rgb(jpeg_with_orientation(stored, 6))
    assert upright.size == (40, 80)
    top, bottom = np.asarray(upright)[10, 20], np.asarray(upright)[70, 20]
    assert top[0] > 200 and top[2] < 60  # red on top ...
    assert bottom[2] > 200 and bottom[0] < 60  # ... blue at the bottom


def test_transparency_is_shown_on_white():
    clear = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255


def test_sixteen_bit_range_is_kept_not_clipped():
    gradient = Image.fromarray(np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16))
    rgb = np.asarray(to_rgb(gradient))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200


def test_centre_crop_keeps_the_middle():
    image = Image.new("RGB", (300, 100), "black")
    image.paste(Image.new("RGB", (100, 100), "white"), (100, 0))  # white middle third
    pixels = preprocess([image], SIZE)[0]
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels[:, SIZE // 2, SIZE // 2], white, rtol=0, atol=0.05)
    for column in (4, SIZE - 5):  # the whole crop is the white middle (bicubic blurs only the outer pixels)
        torch.testing.assert_close(pixels[:, :, column].mean(1), white, rtol=0, atol=0.05)


def test_bad_images_raise_a_clear_error():
    truncated = io.BytesIO()
    make_shape_image("red", size=(256, 256)).save(truncated, format="PNG")
    broken = Image.open(io.BytesIO(truncated.getvalue()[:200]))
    with pytest.raises(ImageError, match="could not be decoded"):
        to_rgb(broken)
    with pytest.raises(ImageError, match="PIL image"):
        to_rgb("not an image")
    with pytest.raises(ImageError, match="no image"):
        preprocess([], SIZE)


def test_vision_tower_returns_patch_features_of_the_chosen_layer(clip_dir):
    pixels = preprocess([make_shape_image("red"), make_shape_image("blue")], SIZE)
    for layer in (-1, -2):
        tower = VisionTower.from_pretrained(str(clip_dir), feature_layer=layer)
        features = tower(pixels)
        assert features.shape == (2, tower.num_patches, tower.width) == (2, 49, 16)
        hidden = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(features, hidden[layer][:, 1:])
    assert not any(parameter.requires_grad for parameter in tower.parameters())
    assert not tower.train().model.training  # the frozen tower never switches to training mode
    with pytest.raises(ValueError, match="outside"):
        VisionTower.from_pretrained(str(clip_dir), feature_layer=7)


def test_load_image_refuses_what_it_cannot_use_with_readable_reasons(tmp_path):
    from inference.vision import MAX_IMAGE_PIXELS, load_image

    make_shape_image("red").save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (96, 64)
    (tmp_path / "notes.png").write_text("plain text")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "huge.png")
    with pytest.raises(ImageError, match="limit is 64 MP"):
        load_image(tmp_path / "huge.png")
    Image.new("1", (4 * side, 4 * side)).save(tmp_path / "bomb.png")  # past PIL's own bomb check
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(tmp_path / "bomb.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="could not be decoded"):
        load_image(tmp_path / "cut.png")
