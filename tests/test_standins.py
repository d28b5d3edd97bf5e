"""The phi stand-ins built in place compute what the same weights compute once saved and loaded as a checkpoint."""

from __future__ import annotations

import torch
from transformers import PhiForCausalLM

from inference.standins import random_phi


@torch.no_grad()
def test_random_phi_computes_what_its_saved_checkpoint_computes(tmp_path):
    model = random_phi("small")  # built on the meta device: every buffer must be set, not only the weights
    model.save_pretrained(tmp_path)
    loaded = PhiForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 50000, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = model.float().eval()(ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, loaded(ids).logits)
    unplaced = model(ids, position_ids=torch.zeros(1, 24, dtype=torch.long)).logits  # the rotary positions count
    assert not torch.allclose(unplaced[0, 1:], logits[0, 1:], atol=1e-3)
