"""Pretrain phi-1.5 (or a smaller phi) from scratch on packed token shards, on one memory-limited GPU or many.

The original project's run, on one A100-40GB: phi-1.5's architecture with fresh weights, bitsandbytes'
8-bit Adam, mixed precision, micro-batch 1 × gradient accumulation 4, lr 6e-3 warmed up over 2,000 steps
then cosine-decayed to 6e-6, weight decay 0.1, betas (0.9, 0.95), gradient clipping at 1.0, on a 100 MB
RedPajama sample (80 % CommonCrawl, 20 % C4). Those are this script's defaults, for 4,000 optimizer steps
of phi-1.5's full 2,048-token context (the report gives no sequence length);
`training/configs/pretrain_original.yaml` spells them out.

Data, once (see training/prepare_text.py):
    python -m training.prepare_text --source cc=data/redpajama/common_crawl --source c4=data/redpajama/c4 \
        --weights cc=0.8 c4=0.2 --out data/pretrain
One GPU:
    python -m training.pretrain --config training/configs/pretrain_original.yaml --data data/pretrain \
        --output-dir runs/pretrain
Several GPUs (DDP; the global batch stays 4 sequences, accumulation adapts):
    accelerate launch --num_processes 4 -m training.pretrain --config training/configs/pretrain_original.yaml ...
Smaller models: --size small | mini | tiny. Less memory: --gradient-checkpointing (activations recomputed in
the backward pass). Continue an interrupted run: the same command with --resume. FSDP is not supported:
checkpoints hold the full weights and optimizer state, and phi-1.5 fits one 40 GB GPU without sharding.

The result, output_dir/model, is a transformers model folder with the tokenizer, a model card, the config,
log and loss plot (`AutoModelForCausalLM.from_pretrained("runs/pretrain/model")`); --push-to-hub OWNER/NAME
publishes it. Tokens per second and model FLOPs utilisation (MFU, against the GPU's dense bf16/fp16 peak)
are logged to log.csv and shown on the progress bar.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerBase

from inference.cards import language_model_card
from inference.cli import UsageError, command
from inference.dimensions import PHI15, PHI_SMALL
from inference.loading import replace_folder
from training.config import TrainConfig, option, parse_config
from training.data import DataError
from training.optim import gpu_peak_tflops, make_accelerator, resolve_precision
from training.run_log import throughput
from training.text_shards import TokenWindows, load_corpus, open_tokenizer
from training.trainer import SAMPLE_TOKENS, Trainer, TrainingJob

MODULE = "training.pretrain"
PHI_VOCAB = PHI15.vocab_size  # phi-1.5's embedding rows: its tokenizer's 50,295 ids padded to a multiple of 64
PHI_CONTEXT = PHI15.max_position_embeddings  # phi-1.5's context length
SIZES = {  # phi-1.5's structure (width, MLP, layers, heads) at smaller sizes; vocabulary and context apart
    "phi-1.5": PHI15,
    "small": PHI_SMALL,
    "mini": replace(PHI15, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8),
    "tiny": replace(PHI15, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}
PROMPT_TOKENS = 32  # held-out tokens each sample generation continues


@dataclass
class PretrainConfig(TrainConfig):
    """The original project's pretraining recipe as defaults; `data` is the only required field."""

    output_dir: str = option("runs/pretrain", "checkpoints, logs, plots and the final model folder go here")
    data: str = option("", "corpus folder written by training.prepare_text (meta.json and uint16 shards)")
    tokenizer: str = option("", "Hub id or folder of the tokenizer; empty = the one the corpus was prepared with")
    size: Literal["phi-1.5", "small", "mini", "tiny"] = option("phi-1.5", "model shape (phi-1.5 = the real one)")
    vocab_size: int = option(PHI_VOCAB, "embedding rows; 0 = the tokenizer's size rounded up to a multiple of 64")
    block_size: int = option(PHI_CONTEXT, "tokens per training sequence (at most phi-1.5's context, 2048)")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, one more forward"
    )
    peak_tflops: float = option(0.0, "one device's peak TFLOP/s for MFU; 0 = look the GPU up (none on the CPU)")
    datasets: list[str] = option([], "Hub ids of the data for the model card (hf: sources are added by themselves)")
    name: str = option("", "title of the model card; empty = SIZE-pretrained")
    # The original recipe.
    optimizer: Literal["adam8bit", "adamw8bit", "paged_adamw8bit", "adamw"] = option(
        "adam8bit", "bitsandbytes' 8-bit Adam (the original's), 8-bit AdamW, paged 8-bit AdamW, or torch AdamW"
    )
    lr: float = option(6e-3, "peak learning rate")
    min_lr_ratio: float = option(1e-3, "cosine decays to lr × this (6e-3 → 6e-6)")
    warmup_steps: int = option(2000, "optimizer steps of linear warmup; -1 = use --warmup-ratio instead")
    weight_decay: float = option(0.1, "decoupled weight decay on the weight matrices and embeddings")
    betas: tuple[float, float] = option((0.9, 0.95), "Adam betas")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0 = no clipping")
    global_batch_size: int = option(4, "sequences per optimizer step, over all devices and accumulation")
    batch_size: int = option(1, "sequences per device per forward (micro-batch)")
    max_steps: int = option(4000, "optimizer steps to run; 0 = derive from --epochs")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise UsageError("--data is required (a folder written by python -m training.prepare_text)")
        if not 0 < self.block_size <= PHI_CONTEXT:
            raise UsageError(f"--block-size must be in 1..{PHI_CONTEXT}, got {self.block_size}")
        for name in ("vocab_size", "peak_tflops"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")


def phi_config(size: str, vocab_size: int, eos_token_id: int) -> PhiConfig:
    """phi-1.5's configuration (dropout off, gelu_new, LayerNorm, untied head) at one of the SIZES."""
    return SIZES[size].config(
        vocab_size=vocab_size,
        hidden_act="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def initialise(model: PhiForCausalLM) -> None:
    """GPT-2-style initialisation: N(0, 0.02) weights, residual output projections scaled down with depth.

    Each layer adds its attention and MLP outputs to the residual stream; scaling those two projections by
    1/√(2·layers) keeps the stream's variance at initialisation independent of depth. Biases start at zero,
    LayerNorms at identity.
    """
    std = model.config.initializer_range
    residual_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                residual = name.endswith(("self_attn.dense", "mlp.fc2"))
                module.weight.normal_(0.0, residual_std if residual else std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def build_model(config: PhiConfig, device: torch.device) -> PhiForCausalLM:
    """A freshly initialised phi on `device` (built there: no full-size copy in CPU memory first)."""
    with device:
        model = PhiForCausalLM(config)
    initialise(model)
    return model


def parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only: decaying biases and LayerNorm gains only hurts."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def flops_per_token(model: PhiForCausalLM, block_size: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (forward 2, backward 4), plus attention's scores.

    Embedding lookups cost no multiply-adds; each layer's QKᵀ and AV products add 12 · hidden · block_size
    (counted in full, as the MFU convention does, though causal attention could skip half).
    """
    config = model.config
    multiplying = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 6.0 * multiplying + 12.0 * config.num_hidden_layers * config.hidden_size * block_size


def peak_flops(device: torch.device, precision: str, peak_tflops: float = 0.0) -> float | None:
    """One device's peak FLOP/s: the given --peak-tflops, else a known GPU's bf16/fp16 peak; None if unknown."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    tflops = gpu_peak_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def collate(windows: list[np.ndarray]) -> dict[str, Any]:
    """Token windows → the causal LM's inputs; the model shifts the labels itself."""
    input_ids = torch.from_numpy(np.stack(windows))
    return {"input_ids": input_ids, "labels": input_ids, "use_cache": False}


def release_memory() -> None:
    """Hand cached, now unused GPU blocks back: generation's caches have other shapes than training's tensors."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_continuations(
    model: PhiForCausalLM, count: int, held_out: TokenWindows, tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, Any]]:
    """Greedy continuations of the first held-out windows' opening tokens, beside what really followed."""
    device = next(model.parameters()).device
    records = []
    for index in range(min(count, len(held_out))):
        window = held_out[index]
        prompt = torch.from_numpy(window[:PROMPT_TOKENS]).to(device)[None]
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=SAMPLE_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        records.append(
            {
                "id": f"held-out-{index}",
                "prompt": tokenizer.decode(window[:PROMPT_TOKENS]),
                "reference": tokenizer.decode(window[PROMPT_TOKENS : PROMPT_TOKENS + SAMPLE_TOKENS]),
                "generated": tokenizer.decode(output[0, PROMPT_TOKENS:].tolist()),
            }
        )
    release_memory()
    return records


def save_model(model: PhiForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A transformers model folder (weights, config, generation config, tokenizer), replaced atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.staging."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_tokenizer(config: PretrainConfig, meta: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The corpus's tokenizer (or --tokenizer), refused if its ids are not the ones the shards hold."""
    reference = config.tokenizer or meta["tokenizer"]
    tokenizer = open_tokenizer(reference)
    if len(tokenizer) != meta["vocab_size"] or tokenizer.eos_token_id != meta["eos_token_id"]:
        raise DataError(
            f"tokenizer {reference} ({len(tokenizer)} ids, end-of-text {tokenizer.eos_token_id}) is not the one "
            f"{config.data} was prepared with ({meta['tokenizer']}: {meta['vocab_size']} ids)"
        )
    return tokenizer


def model_vocab_size(config: PretrainConfig, tokenizer_size: int) -> int:
    if config.vocab_size == 0:
        return 64 * math.ceil(tokenizer_size / 64)  # a multiple of 64 keeps the head's matmuls tensor-core sized
    if config.vocab_size < tokenizer_size:
        raise UsageError(f"--vocab-size {config.vocab_size} is smaller than the tokenizer's {tokenizer_size} ids")
    return config.vocab_size


def run(config: PretrainConfig) -> dict[str, Any]:
    """Pretrain as `config` says; returns the run summary (the model folder in output_dir/model)."""
    accelerator = make_accelerator(config)
    precision = resolve_precision(config.mixed_precision)
    train, held_out, meta = load_corpus(config.data, config.block_size)
    tokenizer = load_tokenizer(config, meta)
    vocab_size = model_vocab_size(config, len(tokenizer))
    sequences_per_step = config.global_batch_size
    if len(train) < sequences_per_step:
        raise DataError(
            f"--data {config.data} holds {len(train)} training sequences of {config.block_size} tokens, "
            f"fewer than one optimizer step's {sequences_per_step}"
        )
    if meta["held_out_tokens"] and not len(held_out):
        raise DataError(
            f"--data {config.data}: the held-out shard is shorter than one {config.block_size}-token sequence"
        )
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls left outside autocast
    model = build_model(phi_config(config.size, vocab_size, tokenizer.eos_token_id), accelerator.device)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    release_memory()
    parameters = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model, config.block_size)
    peak = peak_flops(accelerator.device, precision, config.peak_tflops)
    hub_datasets = [source["hub_dataset"] for source in meta["sources"].values() if source["hub_dataset"]]
    datasets = tuple(dict.fromkeys([*config.datasets, *hub_datasets]))
    if accelerator.is_main_process:
        tqdm.write(
            f"{config.size}: {parameters / 1e6:.1f} M parameters, {flops / 1e9:.2f} GFLOP per token; "
            f"{len(train):,} training sequences of {config.block_size} tokens, {len(held_out):,} held out; "
            f"precision {precision}, optimizer {config.optimizer}"
            + ("" if peak else "; MFU not reported (unknown peak: pass --peak-tflops)")
        )

    def save(model: PhiForCausalLM, folder: Path, summary: dict[str, Any]) -> None:
        save_model(model, tokenizer, folder)

    def card(folder: Path, summary: dict[str, Any]) -> str:
        tokens = summary["steps"] * config.global_batch_size * config.block_size
        return language_model_card(
            folder,
            title=config.name or f"{config.size}-pretrained",
            summary=(
                f"A phi-1.5-architecture language model ({config.size} shape, {parameters / 1e6:,.1f} M parameters) "
                f"pretrained from scratch: {summary['steps']:,} optimizer steps, {tokens:,} tokens in "
                f"{config.block_size}-token sequences, optimizer `{config.optimizer}`, peak learning rate "
                f"{config.lr:g}, {precision} mixed precision, {summary['world_size']} device(s). Load it with "
                "`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`."
            ),
            datasets=datasets,
            command=config.command_line(MODULE),
            run_summary=summary,
        )

    stage = TrainingJob(
        model,
        parameter_groups(model, config.lr, config.weight_decay),
        collate,
        train,
        held_out,
        save_weights=save,
        card=card,
        count_tokens=lambda batch: batch["input_ids"].numel(),
        sample=lambda model, count: sample_continuations(model, count, held_out, tokenizer),
        folder="model",
        flops_per_token=flops,
        peak_flops=peak,
        evaluate_at_start=True,  # the plot starts at the untrained loss, about ln(vocabulary)
        extra={"size": config.size, "parameters": parameters, "flops_per_token": flops},
    )
    summary = Trainer(config, stage, accelerator).fit()
    if accelerator.is_main_process:  # the log is the main process's
        tokens_per_s, mfu = throughput(Path(config.output_dir) / "log.csv")
        summary.update(tokens_per_s=tokens_per_s, mfu=mfu)
        speed = "n/a" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
        utilisation = "n/a" if mfu is None else f"{mfu:.1%}"
        tqdm.write(f"throughput: {speed} tokens/s, MFU {utilisation}; model folder: {config.output_dir}/model")
    return summary


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(PretrainConfig, argv, __doc__))


if __name__ == "__main__":
    main()
