"""One pass of phi's decoder for a joining question's prompt and the running answers' next step (`TorchRows.start`).

Computed apart, the prompt's pass reads every weight and the step after it reads them all again, for a few rows.
In one pass the running rows ride along the prompt's positions (chunked prefill, as vLLM and llama.cpp's server
schedule it): their products cost a few more rows of a product that computes dozens, and they get their next token
while the question's prompt is computed instead of waiting for it.

Each part computes what it computes alone, bit for bit in int8: the products and everything else but the attention
work position by position, and the attention computes the prompt's positions as `MultimodalPhi.prefill` does (the
same call and mask) and each running row as `TorchRows.step` does (`row_by_row_attention`, `step_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers.masking_utils import create_causal_mask


class JointCache:
    """What the pass's layers write their keys and values to: the prompt's positions (the first `positions`)
    continue its own cache, each running row's new position goes to its row of the batch's. The attention reads the
    prompt's from what `update` returns, the rows' from the batch's cache (`row_by_row_attention`'s `step_cache`)."""

    def __init__(self, prompt: DynamicCache, batch: Cache, positions: int) -> None:
        self.prompt, self.batch, self.positions = prompt, batch, positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # (1, heads, prompt + rows, width): the rows' part as a step's (rows, heads, 1, width)
        rows = (states[:, :, self.positions :].transpose(0, 2) for states in (key_states, value_states))
        self.batch.layers[layer_idx].update(*rows)
        prompt = (states[:, :, : self.positions] for states in (key_states, value_states))
        return self.prompt.update(*prompt, layer_idx)


@torch.no_grad()
def prompt_and_step(
    language_model: PreTrainedModel,
    prompt_embeds: torch.Tensor,
    prompt_cache: DynamicCache,
    tokens: Sequence[int],
    positions: Sequence[int],
    batch_cache: Cache,
    row_starts: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's new positions (`prompt_embeds`, (1, positions, width), after `prompt_cache`'s) and each running
    row's newest token at its position (`row_starts`: each row's first column in `batch_cache`), through the
    decoder layers of a transformers `PhiForCausalLM` in one pass: (the prompt's last logits (vocabulary,), the rows'
    logits (rows, vocabulary)). Both caches are written as the prompt's prefill and the step would write them."""
    decoder = language_model.model
    past, length = prompt_cache.get_seq_length(), prompt_embeds.shape[1]
    prompt_positions = torch.arange(past, past + length)[None]
    # The prompt's mask, as the model makes it for the prompt alone (before its cache holds the new positions).
    mask = create_causal_mask(
        config=language_model.config,
        inputs_embeds=prompt_embeds,
        attention_mask=None,
        cache=prompt_cache,
        position_ids=prompt_positions,
    )
    rows = decoder.embed_tokens(torch.tensor([list(tokens)]))
    hidden = decoder.embed_dropout(torch.cat([prompt_embeds, rows.to(prompt_embeds.dtype)], dim=1))
    position_ids = torch.cat([prompt_positions, torch.tensor([list(positions)])], dim=1)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    cache = JointCache(prompt_cache, batch_cache, length)
    for layer in decoder.layers[: language_model.config.num_hidden_layers]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
            row_starts=row_starts,
            step_cache=batch_cache,
        )
    logits = language_model.lm_head(decoder.final_layernorm(hidden[:, length - 1 :]))
    return logits[0, 0], logits[0, 1:]
