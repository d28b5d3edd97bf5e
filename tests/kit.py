"""The offline test kit: tiny random models, tokenizers, weights folders, images and speech, built locally.

Every builder writes a folder that stands in for a Hub repo, so production loading code reads it by
path. Used by tests/conftest.py and by benchmarks that need a real tokenizer.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import cache
from pathlib import Path

import torch
import whisper
from peft import LoraConfig, get_peft_model
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from inference.config import Manifest, ProjectorConfig, ProjectorType, TemplateName
from inference.loading import save_weights
from inference.projector import build_projector
from inference.prompt import PHI2_SYSTEM
from training.trainer import Trainer

EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256  # <|endoftext|> in GPT-2's (and phi-2's) vocabulary
PHI_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]  # the original project's LoRA modules

# Words the tiny BPE learns from: the template's own text and the vocabulary of the tests' questions.
CORPUS = [
    PHI2_SYSTEM,
    "USER: ASSISTANT: What is in this picture? Describe the image. What colour is the shape?",
    "A red circle on the left. A blue square on the right. A green triangle in the middle.",
    "Is the shape on the left or the right? How many shapes are there? There is one shape.",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters), strict=True))


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def build_bpe_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in place, with `<|endoftext|>` as its one special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return _wrap(tokenizer)


@cache
def _gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = Path(whisper.__file__).parent / "assets" / "gpt2.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_text = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[byte] for byte in token)

    # Each multi-byte token is the merge of the two parts that BPE, limited to lower ranks, leaves.
    # The file lists tokens by rank, so the merges come out in priority order.
    merges = [tuple(map(text, _bpe_split(ranks, token, rank))) for token, rank in ranks.items() if len(token) > 1]
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOS] = GPT2_EOS_ID
    return vocab, merges


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([byte]) for byte in token]
    while True:
        best = None
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (index, rank)
        if best is None:
            return parts
        index = best[0]
        parts[index : index + 2] = [parts[index] + parts[index + 1]]


def build_gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's genuine BPE (phi-2's base vocabulary), rebuilt from the ranks openai-whisper ships."""
    vocab, merges = _gpt2_vocab_and_merges()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return _wrap(tokenizer)


def build_tiny_phi(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A 2-layer `PhiForCausalLM` with phi-2's structure (partial rotary, biases), saved with its tokenizer."""
    torch.manual_seed(seed)
    config = PhiConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # padded to a multiple of 64, as phi-2's 51200 is
        hidden_size=64,  # bitsandbytes' CPU 4-bit kernels need layers at least one 64-wide block wide
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,  # phi-2's context, so prompts fit as they would in production
        partial_rotary_factor=0.5,  # phi-1.5's value; phi-2's 0.4 would give an odd rotary size here
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = PhiForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pretrain_tiny_phi(source: Path, folder: Path, texts: list[str], steps: int = 200, seed: int = 0) -> Path:
    """A copy of a tiny Phi trained on `texts` (each ending in end-of-text), standing in for a pretrained LM.

    Stages that freeze the language model need one that already knows the language of their data, as
    phi-2 does; a random one cannot be steered by image embeddings.
    """
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = PhiForCausalLM.from_pretrained(source)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    length = max(map(len, encoded))
    ids = torch.tensor([row + [tokenizer.eos_token_id] * (length - len(row)) for row in encoded])
    labels = torch.tensor([row + [-100] * (length - len(row)) for row in encoded])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path, seed: int = 0, width: int = 16) -> Path:
    """A 2-layer `CLIPVisionModel` with TinyCLIP's geometry: 224 px, 32 px patches → 49 patch tokens."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
        projection_dim=width,
    )
    model = CLIPVisionModel(config)
    # CLIP's random init gives position embeddings 1/50 of the patch content's scale (std 0.02 against
    # about 1), so a random tower barely knows where a patch is; a pretrained ViT does. At half the
    # content's scale the stand-in's features carry position without drowning what the patch shows
    # (at 1.0, shape answers fell to ~50 %; at 0.3, position answers to ~75 %).
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(std=0.5)
    model.save_pretrained(folder)
    return folder


def build_tiny_whisper(path: Path, seed: int = 0) -> Path:
    """A whisper checkpoint of tiny dimensions, in the `.pt` format `whisper.load_model(path)` reads."""
    torch.manual_seed(seed)
    dims = whisper.model.ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,  # 30 s of audio after the encoder's stride-2 convolution
        n_audio_state=16,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51864,  # the English-only vocabulary, so whisper picks its English tokenizer
        n_text_ctx=448,
        n_text_state=16,
        n_text_head=2,
        n_text_layer=1,
    )
    model = whisper.model.Whisper(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def random_lora(language_model: PhiForCausalLM, seed: int = 0, rank: int = 4):
    """A peft LoRA on the original project's modules, with random (not zero) B so merging changes outputs."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=8, target_modules=PHI_LORA_TARGETS, init_lora_weights=False)
    return get_peft_model(language_model, config)


def build_weights_folder(
    folder: Path,
    phi_dir: Path,
    clip_dir: Path,
    projector_type: ProjectorType = ProjectorType.MLP2X_GELU,
    adapter: bool = True,
    seed: int = 0,
    feature_layer: int = -2,
) -> Path:
    """A complete weights folder over the tiny base models: manifest, random projector, optional LoRA."""
    language_model = PhiForCausalLM.from_pretrained(phi_dir)
    vision = CLIPVisionConfig.from_pretrained(clip_dir)
    projector_config = ProjectorConfig(projector_type, vision.hidden_size, language_model.config.hidden_size)
    torch.manual_seed(seed)
    manifest = Manifest(
        name="tiny-test-weights",
        language_model=str(phi_dir),
        vision_model=str(clip_dir),
        vision_feature_layer=feature_layer,
        image_tokens=(vision.image_size // vision.patch_size) ** 2,
        projector=projector_config,
        template=TemplateName.PHI2_CHAT,
        adapter=adapter,
        training={"stage": "test kit", "note": "random weights"},
    )
    lora = random_lora(language_model, seed) if adapter else None
    return save_weights(folder, manifest, build_projector(projector_config), lora)


def make_shape_image(colour: str = "red", size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A coloured ellipse on a grey background, converted to `mode`."""
    image = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), fill=colour)
    return image.convert(mode)


@contextmanager
def killed_at_step(step: int) -> Iterator[None]:
    """Make a training run die (KeyboardInterrupt) as optimizer step `step` (1-based) begins, like a kill."""
    real_step, calls = Trainer.train_step, []

    def crash(self, micro_batches):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt(f"killed at step {step}")
        return real_step(self, micro_batches)

    Trainer.train_step = crash
    try:
        yield
    finally:
        Trainer.train_step = real_step


def speak(text: str, path: Path) -> Path:
    """Speech made with espeak-ng (an apt package that the test command installs)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run the README's test command, which installs it")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path
