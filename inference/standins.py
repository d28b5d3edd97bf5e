"""Stand-ins of the real models for benchmarks and smoke runs: phi of a real size with random weights
(`random_phi`), and what breaks quantization of the real phi-2: outliers, planted through the weights.

Random and tiny models lack the activation outliers of trained LLMs, so a quantization scheme can
look faithful on them and fail on phi-2. `plant_outliers` gives a `PhiForCausalLM` both kinds, by
editing weights only (no forward hooks), so that every export of the checkpoint carries them:

- **Systematic outlier dimensions** (Dettmers et al., LLM.int8(), 2022): in a few fixed feature
  dimensions every token's LayerNorm output is `scale` (20–50) times larger than elsewhere. Planted as
  SmoothQuant's equivalence run backwards: each LayerNorm's weight and bias are multiplied by `scale`
  in those dimensions and the matching input columns of the Linear layers that read its output
  (attention q/k/v and fc1 after `input_layernorm`; lm_head after `final_layernorm`) are divided by it.
  In exact arithmetic the model computes the same function; only a quantizer sees the difference.
- **Massive activations** (Sun et al., "Massive Activations in Large Language Models", COLM 2024,
  phi-2 among the models studied): at the first token and at weak tokens such as "\\n", one fixed
  residual dimension holds a value about 1000× the median residual magnitude. Planted through those
  tokens' embedding rows, so it rides the residual stream through every layer; after a LayerNorm it
  is about √width in that dimension (about 50 for phi-2). This changes the model's function at those
  tokens (as the real property does); fidelity is measured against fp32 of the same planted weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PhiForCausalLM

from inference.dimensions import GPT2_EOS_ID, PHI_SIZES


def random_phi(size: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> PhiForCausalLM:
    """phi of a real size (`PHI_SIZES`: phi-2, phi-1.5, small) with random weights in `dtype`, as a trained
    checkpoint's are spread (matrices normal with std 0.02, LayerNorms 1 and 0), GPT-2's end-of-text id:
    built on the meta device and filled in place, so billions of parameters need no init loop."""
    config = PHI_SIZES[size].config(bos_token_id=GPT2_EOS_ID, eos_token_id=GPT2_EOS_ID, dtype=str(dtype)[6:])
    with torch.device("meta"):
        model = PhiForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0)
    for module in model.modules():  # `to_empty` leaves buffers unset: the rotary frequencies, made as loading does
        if hasattr(module, "original_inv_freq"):
            made = type(module)(model.config)
            module.inv_freq, module.original_inv_freq = made.inv_freq, made.original_inv_freq
    return model


@dataclass(frozen=True)
class Outliers:
    """What was planted, for reports and tests."""

    dims: tuple[int, ...]  # systematic outlier dimensions of every LayerNorm output
    scale: float  # how much larger those dimensions are
    massive_dim: int  # the residual dimension that carries the massive activation
    massive_tokens: tuple[int, ...]  # token ids whose embedding carries it
    massive_value: float  # its value in the embedding


def outlier_dims(width: int, count: int = 4) -> tuple[int, ...]:
    """Fixed, spread-out dimensions (the same for every layer, as in trained models)."""
    return tuple(int(width * (index + 0.5) / count) + 7 for index in range(count))


@torch.no_grad()
def plant_outliers(
    model: PhiForCausalLM, massive_tokens: Sequence[int], scale: float = 30.0, ratio: float = 1000.0, count: int = 4
) -> Outliers:
    """Plant systematic outlier dimensions and massive activations into `model`'s weights, in place."""
    width = model.config.hidden_size
    dims = outlier_dims(width, count)
    index = torch.tensor(dims)
    decoder = model.model
    pairs = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                      layer.mlp.fc1]) for layer in decoder.layers]  # fmt: skip
    pairs.append((decoder.final_layernorm, [model.lm_head]))
    for norm, readers in pairs:
        norm.weight[index] *= scale
        norm.bias[index] *= scale
        for linear in readers:
            linear.weight[:, index] /= scale
    embeddings = model.get_input_embeddings().weight
    massive_dim = width // 3 + 1  # not one of the systematic dimensions
    value = ratio * embeddings.float().abs().median().item()
    for token in massive_tokens:
        embeddings[token, massive_dim] = value
    return Outliers(dims, scale, massive_dim, tuple(massive_tokens), value)
