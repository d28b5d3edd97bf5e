"""TinyCLIP vision tower: any PIL image → patch features (B, patches, width).

Loaded with transformers `CLIPVisionModel` (no open_clip, no torchvision): preprocessing is done here
with PIL and NumPy so it behaves the same in training and serving.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from transformers import CLIPVisionModel

# The normalisation CLIP was trained with (OpenAI CLIP; TinyCLIP keeps it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Transparent pixels are shown on white, as an image viewer would.
BACKGROUND = (255, 255, 255)
# Larger images are first shrunk cheaply (box filter) to this many times the model's size, then
# resized properly: the result is the same to the eye and a 50-megapixel photo costs milliseconds.
COARSE_SHRINK_FACTOR = 4
# Files with more pixels are refused before decoding: a 64-megapixel RGB image already takes 192 MB,
# and a small file can declare billions of pixels (a "decompression bomb").
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be turned into model input."""


def load_image(path: str | Path) -> Image.Image:
    """Open and decode an image file, refusing non-images and oversized images with a readable reason."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path.name!r} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageError(f"{path.name!r} has too many pixels (the limit is {MAX_IMAGE_PIXELS // 10**6} MP)") from None
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        raise ImageError(f"{path.name!r} is not an image file this app can read (try JPEG, PNG or WebP)") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        megapixels = image.width * image.height / 1e6
        raise ImageError(
            f"{path.name!r} is {image.width}×{image.height} ({megapixels:.0f} MP); "
            f"the limit is {MAX_IMAGE_PIXELS // 10**6} MP, so shrink it first"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path.name!r} could not be decoded ({error})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (EXIF-rotated, RGBA, LA, palette, grayscale, 16-bit, CMYK, 1-bit) → upright RGB."""
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError("the image is empty (0 pixels)")
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, BACKGROUND)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            return _high_bit_depth_to_rgb(image)
        return image.convert("RGB")
    except (OSError, SyntaxError) as error:  # truncated or corrupt pixel data surfaces on first access
        raise ImageError(f"the image could not be decoded: {error}") from error


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit or float grayscale: stretch its own range to 0–255 (PIL's convert would clip)."""
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")


def image_key(image: Image.Image) -> str:
    """Names an upright RGB image (`to_rgb`'s) by its pixels and size: the same picture gets the same key however
    it arrives (uploaded again, or in another file format), so its conversation and cached embeddings continue."""
    return hashlib.sha1(image.tobytes(), usedforsecurity=False).hexdigest() + str(image.size)


def image_problem(path: Path) -> str | None:
    """None if the file opens as an image and its structure checks out, else why not ('missing' or 'corrupt').

    Cheaper than decoding (`load_image`): for checking a data set's hundred thousand files up front.
    """
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises many types for broken files
        return "corrupt"
    return None


def preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Any PIL images → normalised pixels (B, 3, size, size): upright RGB, shortest side to `size`, centre crop."""
    return pixel_values([to_rgb(image) for image in images], size)


def pixel_values(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images (from `to_rgb`) → normalised pixels (B, 3, size, size): shortest side to `size`, centre crop."""
    if not images:
        raise ImageError("no image given")
    if any(image.mode != "RGB" for image in images):
        raise ImageError("pixel_values takes RGB images; convert with to_rgb (or call preprocess)")
    batch = np.stack([_resize_and_crop(image, size) for image in images])
    # In numpy: a visitor's thread runs this, and no torch operation there (`inference.batching`).
    pixels = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(CLIP_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CLIP_STD, np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((pixels - mean) / std))


def _resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    if min(image.size) > COARSE_SHRINK_FACTOR * size:
        image = image.reduce(min(image.size) // (COARSE_SHRINK_FACTOR * size))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class VisionTower(nn.Module):
    """A frozen CLIP vision transformer that returns one feature vector per image patch."""

    def __init__(self, model: CLIPVisionModel, feature_layer: int) -> None:
        super().__init__()
        layers = model.config.num_hidden_layers
        # hidden_states holds the embeddings plus one entry per layer: valid indices are -(L+1)..L.
        if not -(layers + 1) <= feature_layer <= layers:
            raise ValueError(f"feature layer {feature_layer} is outside this {layers}-layer vision model")
        self.model = model.requires_grad_(False).eval()
        self.feature_layer = feature_layer

    @classmethod
    def from_pretrained(cls, model_id: str, feature_layer: int, dtype: torch.dtype = torch.float32) -> VisionTower:
        return cls(CLIPVisionModel.from_pretrained(model_id, dtype=dtype), feature_layer)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def num_patches(self) -> int:
        return (self.model.config.image_size // self.model.config.patch_size) ** 2

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) → patch features (B, patches, width), the CLS token dropped."""
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        return outputs.hidden_states[self.feature_layer][:, 1:]

    def train(self, mode: bool = True) -> VisionTower:
        """The tower stays frozen in eval mode, even inside a model put into training mode."""
        return super().train(False)
