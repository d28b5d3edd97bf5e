"""llama.cpp's files for a weights folder: the language model (LoRA merged) and the `mmproj` (vision encoder
and projector), written with the `gguf` package, llama.cpp's own reader and writer.

Language model. phi-2 is llama.cpp's `phi2` architecture: the same LayerNorm, parallel attention and
MLP, partial rotary embedding and biased `lm_head` as transformers' `PhiForCausalLM`, so the tensors go
over one to one, renamed (`model.layers.N.self_attn.q_proj` → `blk.N.attn_q`, ...). Types: `f16`,
`q8_0` (blocks of 32 weights with one scale each, quantized by `gguf`), or `q4_k_m` (llama.cpp's k-quant
mix, made from the f16 file by llama.cpp itself); vectors (norms, biases) stay f32. The vocabulary is
phi's byte-level BPE (GPT-2's tokens, merges and pre-tokenizer), padded to the embedding's rows, and the
manifest's chat template goes in as Jinja for llama-server and ollama.

mmproj. TinyCLIP is a standard CLIP ViT and the `mlp2x_gelu` projector is LLaVA-1.5's, so the file is
llama.cpp's `clip` architecture with its `mlp` projector: the class embedding, patch and position
embeddings, pre-LayerNorm, the layers up to the feature layer (`clip.vision.feature_layer` says to take
their output; later layers are not written), no post-LayerNorm (CLIP applies it to the pooled output
only), CLIP's activation (quick_gelu unless the config says gelu), its mean and std, and the projector as
`mm.0`/`mm.2`. What llama.cpp computes differently: its `mlp` projector's GELU is the tanh
approximation (ours is exact), and its LLaVA graph mis-orders the class token (see `gguf_card`). The
`linear` projector has no counterpart (llama.cpp's `mlp` applies GELU after the first Linear): no
mmproj is written for it, and images reach llama.cpp as embeddings computed in PyTorch, as the app's
llama.cpp backend feeds them for every model.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PhiForCausalLM, PreTrainedTokenizerBase

from inference.cards import gguf_card
from inference.cli import UsageError
from inference.config import Manifest, ProjectorType, TemplateName, atomic_write_text
from inference.loading import load_weights
from inference.precision import Precision
from inference.prompt import PHI2_SYSTEM
from inference.vision import CLIP_MEAN, CLIP_STD, VisionTower

TYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
F32 = gguf.GGMLQuantizationType.F32
KINDS = [*TYPES, "q4_k_m"]  # q4_k_m: written as f16, then quantized by llama.cpp
# transformers' PhiForCausalLM names → llama.cpp's phi2 names ({} is the layer number)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.dense": "attn_output",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
NAMES = {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm", "lm_head": "output"}


def gguf_name(name: str) -> str:
    """A `PhiForCausalLM` parameter name → its llama.cpp name (`model.layers.3.mlp.fc1.bias` → `blk.3.ffn_up.bias`)."""
    module, _, kind = name.rpartition(".")
    if module in NAMES:
        return f"{NAMES[module]}.{kind}"
    prefix, layer, rest = module.split(".", 3)[1:] if module.startswith("model.layers.") else ("", "", "")
    if prefix == "layers" and rest in LAYER_NAMES:
        return f"blk.{layer}.{LAYER_NAMES[rest]}.{kind}"
    raise ValueError(f"no llama.cpp name for {name}")


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, rows: int) -> None:
    """phi's byte-level BPE: tokens by id (padded to the embedding's rows), their types, the merges."""
    vocabulary = {index: token for token, index in tokenizer.get_vocab().items()}
    added = set(tokenizer.get_added_vocab())
    tokens, types = [], []
    for index in range(rows):
        token = vocabulary.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in added else gguf.TokenType.NORMAL)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("phi-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id)
    writer.add_add_bos_token(False)


def chat_template(manifest: Manifest) -> str | None:
    """The manifest's template as the Jinja that llama-server and ollama apply to chat messages, the image
    marker placed in the first question's text; None for the stage-1 and original templates (no chat)."""
    if manifest.template is not TemplateName.PHI2_CHAT:
        return None
    return (
        f"{PHI2_SYSTEM}\n"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% if not loop.first %}\n{% endif %}USER: {{ message['content'] }} ASSISTANT:"
        "{% elif message['role'] == 'assistant' %} {{ message['content'] }}<|endoftext|>{% endif %}{% endfor %}"
    )


def write_language_model(
    model: PhiForCausalLM, tokenizer: PreTrainedTokenizerBase, manifest: Manifest, path: Path, kind: str
) -> Path:
    """`model` (adapter already merged), its tokenizer and chat template as one GGUF file of type `kind`."""
    config = model.config
    heads = config.num_attention_heads
    rotary = (config.rope_parameters or {}).get("partial_rotary_factor", 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_name(path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_rope_dimension_count(int(rotary * config.hidden_size) // heads)
    writer.add_rope_freq_base((config.rope_parameters or {}).get("rope_theta", 10_000.0))
    writer.add_file_type(FILE_TYPES[kind])
    add_vocabulary(writer, tokenizer, model.get_input_embeddings().num_embeddings)
    if template := chat_template(manifest):
        writer.add_chat_template(template)
    tensors = {gguf_name(name): tensor for name, tensor in model.state_dict().items()}
    # Norms and biases stay f32, as llama.cpp's own converter keeps them.
    return write_tensors(writer, tensors, lambda name, tensor: F32 if tensor.ndim == 1 else TYPES[kind])


def write_tensors(
    writer: gguf.GGUFWriter,
    tensors: dict[str, torch.Tensor],
    stored_type: Callable[[str, torch.Tensor], gguf.GGMLQuantizationType],
) -> Path:
    """Header, metadata and tensor infos first, then each tensor converted and written in turn, so the
    converted file is never held in memory whole (phi-2 in fp32 plus its f16 copy would not fit 16 GB)."""
    types = {name: stored_type(name, tensor) for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), types[name])
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in tqdm(tensors.items(), desc=f"writing {Path(writer.path).name}", unit="tensor"):
        data = tensor.detach().float().cpu().numpy()
        if types[name] == F32:
            writer.write_tensor_data(data)
        elif types[name] == gguf.GGMLQuantizationType.F16:
            writer.write_tensor_data(data.astype(np.float16))
        else:
            writer.write_tensor_data(gguf.quants.quantize(data, types[name]))
    writer.close()
    return Path(writer.path)


# transformers' CLIPVisionModel names → llama.cpp's clip names ({} is the layer number)
VISION_NAMES = {
    "embeddings.patch_embedding": "v.patch_embd",
    "embeddings.position_embedding": "v.position_embd",
    "pre_layrnorm": "v.pre_ln",
}
VISION_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def vision_tensors(tower: VisionTower, projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors llama.cpp's `mlp` (LLaVA-1.5) graph reads, under its names: the layers up to the
    feature layer (later ones are never used), no post-LayerNorm (CLIP applies it to the pooled CLS only,
    not to hidden states), and the projector's two Linear layers as `mm.0` and `mm.2`."""
    layers = tower.feature_layer % (tower.model.config.num_hidden_layers + 1)  # hidden_states[i] = after i layers
    tensors = {"v.class_embd": tower.model.embeddings.class_embedding}
    for name, tensor in tower.model.state_dict().items():
        module, _, kind = name.rpartition(".")
        if module in VISION_NAMES:
            tensors[f"{VISION_NAMES[module]}.{kind}"] = tensor
        elif module.startswith("encoder.layers."):
            layer, rest = module.removeprefix("encoder.layers.").split(".", 1)
            if int(layer) < layers:
                tensors[f"v.blk.{layer}.{VISION_LAYER_NAMES[rest]}.{kind}"] = tensor
    for index in (0, 2):
        tensors[f"mm.{index}.weight"] = projector[index].weight
        tensors[f"mm.{index}.bias"] = projector[index].bias
    return tensors


def write_mmproj(tower: VisionTower, projector: torch.nn.Module, manifest: Manifest, path: Path) -> Path:
    """The vision tower and projector as llama.cpp's `mmproj` file (matrices f16, the rest f32)."""
    if manifest.projector.type is not ProjectorType.MLP2X_GELU:
        raise UsageError(
            f"the {manifest.projector.type.value} projector has no llama.cpp counterpart (its `mlp` projector "
            "applies GELU after the first Linear); export the language model alone with --no-mmproj"
        )
    config = tower.model.config
    layers = tower.feature_layer % (config.num_hidden_layers + 1)
    if layers == 0:
        raise UsageError("feature layer 0 (the patch embeddings before any layer) has no llama.cpp counterpart")
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{manifest.name} vision encoder and projector")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", config.image_size)
    writer.add_uint32("clip.vision.patch_size", config.patch_size)
    writer.add_uint32("clip.vision.embedding_length", config.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", config.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", manifest.projector.out_features)
    writer.add_uint32("clip.vision.block_count", layers)
    writer.add_uint32("clip.vision.attention.head_count", config.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", config.layer_norm_eps)
    writer.add_array("clip.vision.feature_layer", [layers])  # run `layers` layers, take their output
    writer.add_array("clip.vision.image_mean", list(CLIP_MEAN))
    writer.add_array("clip.vision.image_std", list(CLIP_STD))
    # quick_gelu unless told otherwise; llama.cpp's "gelu" is the tanh approximation of HF's exact GELU.
    writer.add_bool("clip.use_gelu", config.hidden_act == "gelu")
    matrices = gguf.GGMLQuantizationType.F16
    return write_tensors(
        writer,
        vision_tensors(tower, projector),
        lambda name, tensor: matrices if tensor.ndim == 2 and name != "v.position_embd.weight" else F32,
    )


@dataclass(frozen=True)
class Exported:
    language_model: Path
    mmproj: Path | None  # None for a projector llama.cpp cannot express


def quantize_q4_k_m(source: Path, path: Path) -> Path:
    """llama.cpp's own k-quant mix (`llama_model_quantize`; the gguf package has no Q4_K quantizer)."""
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("--type q4_k_m needs llama-cpp-python (pip install -r requirements-dev.txt)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not quantize {source}")
    return path


def export(weights: str | Path, out: Path, kind: str = "q8_0") -> Exported:
    """The weights folder as llama.cpp's pair in `out`: `language-model-<kind>.gguf` (LoRA merged in fp32)
    and `mmproj-f16.gguf`, with a README (the folder's model card) saying how to run them."""
    if kind not in KINDS:
        raise UsageError(f"--type must be one of {', '.join(KINDS)}, got {kind}")
    loaded = load_weights(weights, precision=Precision.FP32)
    manifest = loaded.manifest
    out.mkdir(parents=True, exist_ok=True)
    language_model = out / f"language-model-{kind}.gguf"
    with torch.no_grad():
        if kind == "q4_k_m":
            staged = write_language_model(
                loaded.model.language_model, loaded.tokenizer, manifest, out / ".f16.gguf", "f16"
            )
            quantize_q4_k_m(staged, language_model)
            staged.unlink()
        else:
            write_language_model(loaded.model.language_model, loaded.tokenizer, manifest, language_model, kind)
        mmproj = None
        if manifest.projector.type is ProjectorType.MLP2X_GELU:
            mmproj = write_mmproj(loaded.model.vision_tower, loaded.model.projector, manifest, out / "mmproj-f16.gguf")
        else:
            print(
                f"no mmproj: the {manifest.projector.type.value} projector has no llama.cpp counterpart (llama.cpp's "
                "`mlp` projector applies GELU after its first Linear); the app's llama.cpp backend still serves "
                "this model, encoding images in PyTorch"
            )
    atomic_write_text(out / "README.md", gguf_card(manifest, language_model.name, mmproj and mmproj.name))
    return Exported(language_model, mmproj)
