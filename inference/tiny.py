"""Tiny, randomly initialised models of the real architectures, built offline in seconds.

They stand in for Hub repos: each builder writes a folder (or a whisper `.pt`) that the production
loading code reads by path. `python app.py --demo` serves them so the UI can be tried on any machine
without downloads (its answers are meaningless); the tests build their fixtures with them.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path

import torch
import whisper
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPVisionModel, PhiForCausalLM, PreTrainedTokenizerFast

from inference.config import ProjectorType, TemplateName
from inference.dimensions import GPT2_EOS_ID, PHI2, PHI_LORA_MODULES, TINYCLIP_61M, WHISPER_SIZES
from inference.loading import new_manifest, save_weights
from inference.projector import build_projector

EOS = "<|endoftext|>"


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


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


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
    return wrap_tokenizer(tokenizer)


def build_tiny_phi(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A 2-layer `PhiForCausalLM`: phi-2's shape shrunk (partial rotary, biases, context), saved with its tokenizer."""
    torch.manual_seed(seed)
    shape = replace(
        PHI2,
        hidden_size=64,  # bitsandbytes' CPU 4-bit kernels need layers at least one 64-wide block wide
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        partial_rotary_factor=0.5,  # phi-1.5's value; phi-2's 0.4 would give an odd rotary size here
        vocab_size=-(-len(tokenizer) // 64) * 64,  # padded to a multiple of 64, as phi-2's 51200 is
        resid_pdrop=0.0,  # deterministic training in the tests that compare runs
    )
    config = shape.config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = PhiForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path, seed: int = 0, width: int = 16) -> Path:
    """A 2-layer `CLIPVisionModel`: TinyCLIP's shape shrunk, with its geometry (224 px, 32 px patches → 49)."""
    torch.manual_seed(seed)
    shape = replace(
        TINYCLIP_61M, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2
    )
    model = CLIPVisionModel(shape.config())
    # CLIP's random init gives position embeddings 1/50 of the patch content's scale (std 0.02 against
    # about 1), so a random tower barely knows where a patch is; a pretrained ViT does. At half the
    # content's scale the stand-in's features carry position without drowning what the patch shows
    # (much larger drowned the shapes, much smaller lost the positions, in the tiny recipe's answers).
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(std=0.5)
    model.save_pretrained(folder)
    return folder


def build_tiny_whisper(path: Path, seed: int = 0) -> Path:
    """A whisper checkpoint of base.en's structure shrunk, in the `.pt` format `whisper.load_model(path)` reads."""
    torch.manual_seed(seed)
    dims = replace(WHISPER_SIZES["base.en"], width=16, heads=2, layers=1).dimensions()
    model = whisper.model.Whisper(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def random_lora(language_model: PhiForCausalLM, seed: int = 0, rank: int = 4):
    """A peft LoRA on the original project's modules, with random (not zero) B so merging changes outputs."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=8, target_modules=PHI_LORA_MODULES, init_lora_weights=False)
    return get_peft_model(language_model, config)


def build_weights_folder(
    folder: Path,
    phi_dir: Path,
    clip_dir: Path,
    projector_type: ProjectorType = ProjectorType.MLP2X_GELU,
    adapter: bool = True,
    seed: int = 0,
    feature_layer: int = -2,
    name: str = "tiny-test-weights",
) -> Path:
    """A complete weights folder over tiny base models: manifest, random projector, optional random LoRA."""
    manifest = new_manifest(
        name, str(phi_dir), str(clip_dir), feature_layer, projector_type, TemplateName.PHI2_CHAT, adapter
    )
    manifest = replace(manifest, training={"stage": "test kit", "note": "random weights"})
    language_model = PhiForCausalLM.from_pretrained(phi_dir)
    torch.manual_seed(seed)
    lora = random_lora(language_model, seed) if adapter else None
    return save_weights(folder, manifest, build_projector(manifest.projector), lora)


def build_demo_weights(folder: Path) -> tuple[Path, Path]:
    """Everything `app.py --demo` serves, under `folder`: (weights folder, whisper `.pt`). No downloads.

    The language model speaks GPT-2's real vocabulary (phi-2's), so its random answers are real words.
    """
    folder.mkdir(parents=True, exist_ok=True)
    phi_dir = build_tiny_phi(folder / "tiny-phi", build_gpt2_tokenizer())
    clip_dir = build_tiny_clip(folder / "tiny-clip")
    weights = build_weights_folder(folder / "weights", phi_dir, clip_dir, name="demo (tiny random models)")
    return weights, build_tiny_whisper(folder / "tiny-whisper.pt")
