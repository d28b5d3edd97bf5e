"""Export a weights folder's language model (LoRA merged) as GGUF, the file llama.cpp, ollama and LM Studio load.

    python -m training.export_gguf --weights runs/stage2/weights --out runs/stage2/gguf --type q8_0

phi-2 is llama.cpp's `phi2` architecture: the same LayerNorm, parallel attention and MLP, partial
rotary embedding and biased `lm_head` as transformers' `PhiForCausalLM`, so the tensors go over one to
one, renamed (`model.layers.N.self_attn.q_proj` → `blk.N.attn_q`, ...). The file is written with the
`gguf` package, llama.cpp's own reader and writer. Types: `f16`, or `q8_0` (blocks of 32 weights
with one scale each, quantized by `gguf`); vectors (norms, biases) stay f32. The vocabulary is phi's
byte-level BPE (GPT-2's tokens, merges and pre-tokenizer), padded to the model's 51,200 rows.

Status: this writes the language model only. The vision encoder and projector (llama.cpp's `mmproj`
file) come next; until then llama.cpp answers text prompts, or prompts whose image positions are fed
as embeddings through its C API (benchmarks/cpu_inference.py does that).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PhiForCausalLM, PreTrainedTokenizerBase

from inference.cli import ArgumentParser, UsageError, command
from inference.loading import load_weights
from inference.precision import Precision

TYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
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


def write_language_model(model: PhiForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path, kind: str) -> Path:
    """`model` (adapter already merged) and its tokenizer as one GGUF file of type `kind`."""
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
    for name, tensor in tqdm(model.state_dict().items(), desc=f"writing {path.name}", unit="tensor"):
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 1:  # norms and biases stay f32, as llama.cpp's own converter keeps them
            writer.add_tensor(gguf_name(name), data.astype(np.float32))
        elif kind == "f16":
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, TYPES[kind]), raw_dtype=TYPES[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export(weights: str | Path, out: Path, kind: str = "q8_0") -> Path:
    """The weights folder's language model, LoRA merged in fp32, as `out/language-model-<kind>.gguf`."""
    if kind not in TYPES:
        raise UsageError(f"--type must be one of {', '.join(TYPES)}, got {kind}")
    loaded = load_weights(weights, precision=Precision.FP32)
    with torch.no_grad():
        return write_language_model(
            loaded.model.language_model, loaded.tokenizer, out / f"language-model-{kind}.gguf", kind
        )


@command
def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True, help="a weights folder or Hub repo id")
    parser.add_argument("--out", type=Path, required=True, help="folder the GGUF file is written to")
    parser.add_argument("--type", default="q8_0", choices=list(TYPES), help="f16, or q8_0 (about half the size)")
    args = parser.parse_args(argv)
    path = export(args.weights, args.out, args.type)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
    return path


if __name__ == "__main__":
    main()
