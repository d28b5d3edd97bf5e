"""The real models' shapes, each written once: phi-2, phi-1.5, TinyCLIP-ViT-61M and Whisper's English sizes.

Like whisper's `ModelDimensions`, a shape is a small frozen dataclass that makes the model's config.
Pretraining builds phi-1.5 from one, the benchmarks build random weights of the real sizes from them,
and the tiny stand-ins the tests and `--demo` use are these shapes shrunk with `dataclasses.replace`,
so they keep the structure (partial rotary, biases, 224 px images in 32 px patches) that is not shrunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import CLIPVisionConfig, PhiConfig


@dataclass(frozen=True)
class PhiDimensions:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    partial_rotary_factor: float  # share of each head's dimensions that are rotated
    vocab_size: int = 51_200  # GPT-2's 50,257 ids plus phi's added tokens, padded to a multiple of 64
    max_position_embeddings: int = 2_048  # the context, in positions
    resid_pdrop: float = 0.0  # dropout on each block's output (phi-2 trains with 0.1)

    def config(self, **overrides) -> PhiConfig:
        """A transformers `PhiConfig` of this shape (phi's defaults otherwise: gelu_new, LayerNorm, untied head)."""
        return PhiConfig(**(asdict(self) | overrides))


PHI2 = PhiDimensions(2560, 10240, 32, 32, partial_rotary_factor=0.4, resid_pdrop=0.1)
PHI15 = PhiDimensions(2048, 8192, 24, 32, partial_rotary_factor=0.5)
PHI_SMALL = PhiDimensions(768, 3072, 12, 12, partial_rotary_factor=0.5)  # phi-1.5's structure at GPT-2-small's size
PHI_SIZES = {"phi-2": PHI2, "phi-1.5": PHI15, "small": PHI_SMALL}
# The linears of phi's attention and MLP, each given a LoRA (the original project's choice, kept).
PHI_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
GPT2_EOS_ID = 50256  # <|endoftext|> in GPT-2's vocabulary, which phi-1.5 and phi-2 share


@dataclass(frozen=True)
class VisionDimensions:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 224  # input pixels per side
    patch_size: int = 32  # pixels per patch side

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (the CLS token apart): (224 / 32)² = 49 for TinyCLIP."""
        return (self.image_size // self.patch_size) ** 2

    def config(self, **overrides) -> CLIPVisionConfig:
        return CLIPVisionConfig(**(asdict(self) | {"projection_dim": self.hidden_size} | overrides))


TINYCLIP_61M = VisionDimensions(640, 2560, 12, 10)  # TinyCLIP-ViT-61M-32's vision transformer


@dataclass(frozen=True)
class WhisperDimensions:
    width: int  # audio and text transformer width
    heads: int
    layers: int  # per transformer (encoder and decoder alike)

    def dimensions(self):
        """whisper's own `ModelDimensions` for this shape (English-only vocabulary, 30 s windows)."""
        import whisper

        audio = dict(n_audio_state=self.width, n_audio_head=self.heads, n_audio_layer=self.layers)
        text = dict(n_text_state=self.width, n_text_head=self.heads, n_text_layer=self.layers)
        # 1500 audio positions: 30 s of 10 ms mel frames after the encoder's stride-2 convolution.
        return whisper.model.ModelDimensions(
            n_mels=80, n_audio_ctx=1500, n_vocab=51864, n_text_ctx=448, **audio, **text
        )


WHISPER_SIZES = {
    "tiny.en": WhisperDimensions(384, 6, 4),
    "base.en": WhisperDimensions(512, 8, 6),
    "small.en": WhisperDimensions(768, 12, 12),
}
