"""The training loop every stage shares, knowing nothing of what it trains.

One process per device (plain `python`, `torchrun` or `accelerate launch`; accelerate picks DDP, on
GPUs over NCCL or on CPUs over gloo). Each optimizer step takes `global_batch_size` samples: micro-
batches of `batch_size` per device, accumulated. The data order is a seeded shuffle per epoch, split
into whole optimizer steps and dealt out to the ranks, so a resumed run sees exactly the batches an
uninterrupted one would. Checkpoints (trainable weights, optimizer, scheduler, loss scaler, step,
every rank's RNG state, the config) survive a kill at any instant (`training.checkpoint`). A step whose
loss is not finite is skipped and counted (`training.losses.BadSteps`).

A `TrainingJob` gives the loop everything stage-specific, as arguments: the model and its parameter groups,
data and collator, how to count a batch's tokens, how to sample generations, how to save the weights
and write their card. The multimodal stages build theirs with `training.multimodal.multimodal_stage`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.checkpoint import CHECKPOINT, crash_point, load_checkpoint, save_checkpoint, trainable_checksum
from training.config import TrainConfig
from training.hub_upload import PublishError, complete_folder, push_folder
from training.losses import BadSteps, mean_finite, summed_loss
from training.optim import build_optimizer, lr_factor
from training.run_log import append_row, plot_losses, truncate_log

SAMPLE_TOKENS = 32  # length of the sample generations shown at each evaluation
# At most this share of a run warms up: a short run of a long recipe (pretraining's 2,000 warmup steps)
# would otherwise end before reaching its learning rate. Half keeps the original 2,000 of 4,000.
MAX_WARMUP_SHARE = 0.5


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def epoch_batches(size: int, micro: int, world: int, accumulation: int, seed: int, epoch: int, rank: int):
    """This rank's micro-batches (lists of example indices) for one epoch, whole optimizer steps only."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_step = micro * world * accumulation
    batches = []
    for start in range(0, size - per_step + 1, per_step):
        step = order[start : start + per_step]
        for index in range(accumulation):
            first = (index * world + rank) * micro
            batches.append(step[first : first + micro])
    return batches


@dataclass
class TrainingJob:
    """What a training stage gives the loop."""

    model: torch.nn.Module  # any module whose forward(**batch) returns an output with .loss
    param_groups: list[dict[str, Any]]  # torch optimizer groups over the trainable parameters
    collator: Callable[[list[Any]], dict[str, Any]]  # examples → the model's keyword arguments
    train: Sequence[Any]  # training examples, indexed by the seeded data order
    eval: Sequence[Any]  # held-out examples (empty: no evaluation)
    save_weights: Callable[[Any, Path, dict[str, Any]], None]  # (model, folder, run summary) → the final folder
    card: Callable[[Path, dict[str, Any]], str]  # (published folder, run summary) → its model card
    count_tokens: Callable[[dict[str, Any]], int]  # positions the model processes for a batch (tokens/s)
    # (model, how many) → sample records {"id", "reference", "generated", ...}; called on the main process
    # only, without gradients, under autocast. None: no samples.
    sample: Callable[[Any, int], list[dict[str, Any]]] | None = None
    folder: str = "weights"  # name of the published folder inside output_dir
    # Model FLOPs per trained token (forward and backward, recomputation not counted) and one device's peak
    # FLOP/s: with both, the log reports model FLOPs utilisation (MFU).
    flops_per_token: float = 0.0
    peak_flops: float | None = None
    evaluate_at_start: bool = False  # also log the untrained model's held-out loss (step 0) in a fresh run
    extra: dict[str, Any] = field(default_factory=dict)  # stage facts recorded in run.json


class Trainer:
    def __init__(self, config: TrainConfig, stage: TrainingJob, accelerator: Accelerator) -> None:
        self.config = config
        self.stage = stage
        self.accelerator = accelerator
        self.output = Path(config.output_dir)
        self.world = accelerator.num_processes
        self.accumulation = config.accumulation_steps(self.world)
        self.steps_per_epoch = len(stage.train) // config.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(stage.train)} training examples do not fill one global batch of {config.global_batch_size}"
            )
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        requested = config.warmup_for(self.total_steps)
        warmup = min(requested, int(MAX_WARMUP_SHARE * self.total_steps))
        if warmup < requested and accelerator.is_main_process:
            tqdm.write(f"warmup capped at {warmup} of this run's {self.total_steps} steps ({requested} asked)")
        self.trainable = [p for group in stage.param_groups for p in group["params"]]
        optimizer = build_optimizer(config, stage.param_groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, self.total_steps, warmup, config.lr_schedule, config.min_lr_ratio),
        )
        self.model, self.optimizer = accelerator.prepare(stage.model, optimizer)
        self.step = 0
        self.samples_seen = 0
        self.bad_steps = BadSteps()
        self.last_losses: dict[str, float] = {}

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`, evaluating, logging and checkpointing on the way; returns the run summary."""
        started = time.time()
        if self.config.resume:
            self.load_checkpoint()
        elif self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "log.csv").unlink(missing_ok=True)
        if self.main:
            self.config.save(self.output)
        if self.stage.evaluate_at_start and self.step == 0:
            self.evaluate()
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not self.main, desc="train", unit="step")
        window_loss, window_start, window_samples, window_tokens = [], time.time(), 0, 0
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = epoch_batches(
                len(self.stage.train),
                self.config.batch_size,
                self.world,
                self.accumulation,
                self.config.seed,
                epoch,
                self.accelerator.process_index,
            )[offset * self.accumulation :]
            # The loader's own generator: creating its iterator must not draw from the global RNG, which
            # dropout draws from; otherwise a run resumed mid-epoch would drop other units than an
            # uninterrupted one.
            loader = DataLoader(
                self.stage.train,
                batch_sampler=batches,
                collate_fn=self.stage.collator,
                num_workers=self.config.num_workers,
                generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch),
            )
            micro_batches = iter(loader)
            for _ in range(self.steps_per_epoch - offset):
                if self.step >= self.total_steps:
                    break
                loss, samples, tokens = self.train_step(micro_batches)
                self.step += 1
                window_loss.append(loss)
                window_samples += samples
                window_tokens += tokens
                progress.update()
                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.time() - window_start
                    row = self.log_train(window_loss, window_samples / elapsed, window_tokens / elapsed)
                    postfix = {"loss": f"{row['train_loss']:.4f}", "lr": f"{row['lr']:.2e}"}
                    postfix["tok/s"] = f"{row['tokens_per_s']:.0f}"
                    if row["mfu"] is not None:
                        postfix["mfu"] = f"{row['mfu']:.1%}"
                    progress.set_postfix(postfix)
                    window_loss, window_samples, window_tokens = [], 0, 0
                if self.step % self.config.eval_every == 0 or self.step == self.total_steps:
                    self.evaluate()
                if self.step % self.config.save_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if not window_loss:  # a window just closed: evaluation and saving are not training time
                    window_start = time.time()
        progress.close()
        return self.finish(time.time() - started)

    def train_step(self, micro_batches: Iterator[dict[str, Any]]) -> tuple[float, int, int]:
        """One optimizer step over `accumulation` micro-batches; returns (mean loss, samples, tokens) globally.

        When any rank's loss is not finite the step is skipped on all of them (no update; the schedule
        still moves on with the data): the loss returned is NaN and the skip is counted.
        """
        self.model.train()
        total, samples, tokens, finite = 0.0, 0, 0, True
        for index in range(self.accumulation):
            batch = to_device(next(micro_batches), self.accelerator.device)
            samples += self.config.batch_size  # every micro-batch is whole (epoch_batches)
            tokens += self.stage.count_tokens(batch)
            last = index == self.accumulation - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    loss = self.model(**batch).loss
                self.accelerator.backward(loss / self.accumulation)  # every rank, or DDP's all-reduce waits
            crash_point("train-step")
            value = loss.detach().float().item()
            finite = finite and math.isfinite(value)
            total += value / self.accumulation
        stats = [total if finite else 0.0, samples, tokens, 0 if finite else 1]
        stats = torch.tensor(stats, dtype=torch.float64, device=self.accelerator.device)
        stats = self.accelerator.reduce(stats, reduction="sum")
        if stats[3] == 0:
            if self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.optimizer.step()
            self.bad_steps.good()
            self.scheduler.step()
        else:
            self.bad_steps.bad(self.step + 1, log=tqdm.write if self.main else None)
            with warnings.catch_warnings():  # the schedule moves on with the data although nothing stepped
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_seen += samples
        loss = stats[0].item() / self.world if stats[3] == 0 else math.nan
        return loss, int(stats[1]), int(stats[2])

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation: the FLOP/s the model's arithmetic needs over what the devices peak at."""
        if not self.stage.flops_per_token or not self.stage.peak_flops:
            return None
        return tokens_per_s * self.stage.flops_per_token / (self.stage.peak_flops * self.world)

    def log_train(self, losses: list[float], samples_per_s: float, tokens_per_s: float) -> dict[str, Any]:
        memory = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        mfu = self.mfu(tokens_per_s)
        row = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "train_loss": mean_finite(losses),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": round(samples_per_s, 2),
            "tokens_per_s": round(tokens_per_s, 1),
            "gpu_mem_gb": None if memory is None else round(memory, 2),
            "mfu": None if mfu is None else round(mfu, 4),
        }
        self.last_losses["train"] = row["train_loss"]
        self.write_log(row)
        return row

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Held-out loss (averaged over ranks), a few sample generations, and a fresh loss plot."""
        if not self.stage.eval:
            return None
        model, rank = self.unwrapped, self.accelerator.process_index
        model.eval()
        size = self.config.batch_size
        batches = [list(range(i, min(i + size, len(self.stage.eval)))) for i in range(0, len(self.stage.eval), size)]
        if self.config.eval_batches:
            batches = batches[: self.config.eval_batches]
        mine = batches[rank :: self.world]
        totals = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for indices in mine:
            batch = to_device(self.stage.collator([self.stage.eval[i] for i in indices]), self.accelerator.device)
            with self.accelerator.autocast():
                loss, tokens = summed_loss(model, batch)
            totals += torch.tensor([loss.item(), tokens], dtype=torch.float64, device=totals.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        eval_loss = (totals[0] / totals[1]).item() if totals[1] else math.nan
        self.last_losses["eval"] = eval_loss
        if self.main:
            self.write_log(
                {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "eval_loss": eval_loss}
            )
            self.write_samples(model)
            plot_losses(self.output / "log.csv", self.output / "loss.png", title=self.output.name)
            tqdm.write(f"step {self.step}: held-out loss {eval_loss:.4f}")
        return eval_loss

    def write_samples(self, model: torch.nn.Module) -> None:
        """The stage's sample generations, printed and appended to samples.jsonl."""
        if self.stage.sample is None:
            return
        with self.accelerator.autocast():
            records = self.stage.sample(model, self.config.samples)
        with open(self.output / "samples.jsonl", "a") as log:
            for record in records:
                log.write(json.dumps({"step": self.step, **record}) + "\n")
                name, reference, generated = record["id"], record["reference"], record["generated"]
                tqdm.write(f"  [{name}] reference: {reference!r}\n  [{name}] generated: {generated!r}")

    def write_log(self, row: dict[str, Any]) -> None:
        if self.main:
            append_row(self.output / "log.csv", row)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach().cpu().clone()
            for name, parameter in self.unwrapped.named_parameters()
            if parameter.requires_grad
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides every rank's RNG state (`training.checkpoint`)."""
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "bad_steps": self.bad_steps.state_dict(),
            "world_size": self.world,
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.accelerator.scaler is not None:  # fp16 loss scaling (CUDA only)
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def save_checkpoint(self) -> None:
        save_checkpoint(self.output, self.accelerator, self.state_dict, self.config.save)
        if self.main and self.config.push_to_hub and self.config.push_checkpoints and self.step < self.total_steps:
            self.publish({"steps": self.step, **self.last_losses}, final=False)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> None:
        state = load_checkpoint(self.output, self.accelerator)
        parameters = dict(self.unwrapped.named_parameters())
        if set(state["trainable"]) != {name for name, p in parameters.items() if p.requires_grad}:
            raise ValueError("the checkpoint's trainable parameters differ from this model's")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                parameters[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.bad_steps.load_state_dict(state.get("bad_steps", {}))
        if self.main:
            truncate_log(self.output / "log.csv", self.step)
            written_by = state["world_size"]
            note = "" if written_by == self.world else f" (written by {written_by} processes, now {self.world})"
            tqdm.write(f"resumed from {self.output / CHECKPOINT} at step {self.step}{note}")

    def finish(self, seconds: float) -> dict[str, Any]:
        """Check that all ranks hold the same weights, then write the weights folder and run.json."""
        checksums = gather_object([trainable_checksum(self.trainable_state())])
        samples = gather_object([self.samples_seen])
        if len(set(checksums)) != 1:
            raise RuntimeError(f"ranks finished with different weights: {checksums}")
        summary = {
            "steps": self.step,
            "world_size": self.world,
            "samples_per_rank": samples,
            "skipped_steps": self.bad_steps.total,
            "trainable_checksum_per_rank": checksums,
            "final_train_loss": self.last_losses.get("train"),
            "final_eval_loss": self.last_losses.get("eval"),
            "seconds": round(seconds, 1),
            **self.stage.extra,
            "config": self.config.to_dict(),
        }
        if self.main:
            (self.output / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
            # Evaluations redraw the plot; a run without held-out data gets its training curve here.
            plot_losses(self.output / "log.csv", self.output / "loss.png", title=self.output.name)
            self.publish(summary, final=True)
        self.accelerator.wait_for_everyone()
        return summary

    def publish(self, summary: dict[str, Any], final: bool) -> None:
        """Write the complete weights folder (weights, config, metrics, plot, card); push it if asked.

        A failed push at a checkpoint is reported and training goes on; at the end it is an error, with
        the local folder already complete.
        """
        folder = self.output / self.stage.folder
        self.stage.save_weights(self.unwrapped, folder, summary)
        complete_folder(folder, self.output, self.stage.card(folder, summary))
        if not self.config.push_to_hub:
            return
        message = f"{'Final weights' if final else 'Checkpoint'} at step {self.step}"
        try:
            push_folder(folder, self.config.push_to_hub, self.config.hub_private, message, log=tqdm.write)
        except PublishError as error:
            if final:
                raise
            tqdm.write(f"warning: {error}")
