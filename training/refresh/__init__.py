"""One command refreshes every checkpoint: data → models → features → stage 1 → stage 2 → evaluation →
the Space's weights → GGUF → the Hub, and writes a report.

    python -m training.refresh --workdir runs/refresh --push-to-hub OWNER/phi2-tinyclip
    python -m training.refresh --workdir runs/refresh --plan            # estimates and a disk check only
    python -m training.refresh --workdir runs/refresh --resume          # after an interruption
    python -m training.refresh --workdir runs/refresh --from stage2     # rerun stage 2 and what follows
    python -m training.refresh --workdir runs/refresh --only evaluate
    python -m training.refresh --workdir runs/smoke --smoke             # on a GPU machine: the smoke test
    python -m training.refresh --recipe training/recipes/tiny.yaml --workdir runs/tiny   # all of it on a CPU

The recipe (training/recipes/phi2.yaml by default) says what is trained on what. Every stage calls the
project's own command for it, so a stage can also be run by hand; `training/refresh/stages.py` says what
each leaves and how it is checked. A stage whose products are complete is skipped (they are opened and
checked, not assumed from a marker); an interrupted training stage continues from its last checkpoint
with --resume, so a pre-empted machine loses at most one checkpoint interval (--save-every in the
recipe). With several GPUs the training stages run under `accelerate launch`, as their own docs say.

--with-pretrain adds part 1 (phi-1.5 from scratch, the recipe's `pretrain` file). --smoke runs every
stage on random weights of the recipe's real sizes and synthetic shapes data (no downloads, a few
steps each), prints each stage's time and peak GPU memory and appends them to benchmarks/RESULTS.md.
At the end: one summary table, and OUT/report.md with the loss plots.
"""

from __future__ import annotations

import gc
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from inference.cli import ArgumentParser, UsageError, command
from inference.config import atomic_write_text
from inference.hub import parse_reference
from inference.measuring import RESULTS
from training.refresh import stages
from training.refresh.recipe import DEFAULT_RECIPE, Gpus, PretrainRecipe, Recipe
from training.refresh.work import Work

# Sizes of the real data (for --plan before anything is downloaded).
COCO_IMAGES, COCO_TRAIN_CAPTIONS, LLAVA_INSTRUCT_CONVERSATIONS, POPE_QUESTIONS = 123_287, 591_753, 157_712, 9_000
PRETRAIN_MFU = 0.4  # model FLOPs utilisation assumed for part 1's estimate


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    run: Callable[[Work], dict[str, Any]]
    done: Callable[[Work], bool]


def stage_list(with_pretrain: bool, push: bool) -> list[Stage]:
    listed = [
        Stage("data", "download and prepare the data", stages.run_data, stages.data_done),
        Stage("models", "base models into the Hub cache (or built here)", stages.run_models, stages.models_done),
        Stage("pretrain", "part 1: pretrain phi-1.5 from scratch", stages.run_pretrain, stages.pretrain_done),
        Stage("features", "cache the vision features", stages.run_features, stages.features_done),
        Stage(
            "stage1",
            "align the projector on captions",
            lambda w: stages.run_stage(w, "stage1"),
            lambda w: stages.trained(w, "stage1"),
        ),
        Stage(
            "stage2",
            "QLoRA instruction tuning",
            lambda w: stages.run_stage(w, "stage2"),
            lambda w: stages.trained(w, "stage2"),
        ),
        Stage("evaluate", "held-out split and POPE", stages.run_evaluate, stages.evaluate_done),
        Stage(
            "weights",
            "merge the adapter and quantize to int8: the Space's weights",
            stages.run_weights,
            stages.space_weights_done,
        ),
        Stage("gguf", "export the GGUF pair for llama.cpp", stages.run_gguf, stages.gguf_done),
        Stage("push", "push every product with its card", lambda w: stages.run_push(w, with_pretrain), lambda w: False),
    ]
    return [s for s in listed if (s.name != "pretrain" or with_pretrain) and (s.name != "push" or push)]


def estimate(work: Work, stage: str) -> tuple[float | None, float | None, float]:
    """(seconds, GPU GiB, disk GB) for a stage: ESTIMATES from the recipe, scaled to the detected GPUs."""
    rates, gpus, recipe = work.recipe.estimates, work.gpus, work.recipe
    memory = rates.get("gpu_memory_gb", {}).get(stage)
    disk = rates.get("disk_gb", {}).get(stage, 0.0)
    speed = gpus.speed

    def per_second(count: float, key: str) -> float | None:
        return count / (rates[key] * speed) if rates.get(key) else None

    if work.shapes_data:
        images = sum(work.shape_settings[key] for key in ("train_images", "held_out_images"))
        captions, conversations, questions = images, images, work.shape_settings["held_out_images"] * 4
    else:
        images, captions, conversations = COCO_IMAGES, COCO_TRAIN_CAPTIONS, LLAVA_INSTRUCT_CONVERSATIONS
        questions = (work.evaluate_settings["held_out_limit"] or recipe.held_out) * 3 + POPE_QUESTIONS
    if stage in ("data", "models"):
        rate = rates.get("download_mb_per_s")
        seconds = disk * 1000 / rate if rate else 10.0
    elif stage == "features":
        seconds = per_second(images, "features_images_per_s")
    elif stage in ("stage1", "stage2"):
        fields = work.training_fields(stage)
        if fields.get("max_steps"):
            samples = fields["max_steps"] * fields.get("global_batch_size", 256 if stage == "stage1" else 128)
        else:
            samples = (captions if stage == "stage1" else conversations) * fields.get("epochs", 1.0)
        seconds = per_second(samples, f"{stage}_samples_per_s")
    elif stage == "evaluate":
        seconds = per_second(questions, "evaluate_questions_per_s")
    elif stage == "pretrain":
        seconds, memory, disk = pretrain_estimate(work)
    elif stage == "push":  # at about 20 MB/s
        seconds = sum(rates.get("disk_gb", {}).values()) * 1000 / 20
    else:  # merging (and quantizing to int8) or exporting, on the CPU: minutes at phi-2's size
        seconds = 5.0 if work.shapes_data else 240.0 if stage == "weights" else 120.0
    return seconds, memory, disk


def pretrain_estimate(work: Work) -> tuple[float | None, float | None, float]:
    import yaml

    recipe = PretrainRecipe.load(work.recipe.pretrain)
    fields = yaml.safe_load(Path(recipe.config).read_text()) | recipe.overrides
    tokens = fields.get("max_steps", 0) * fields.get("global_batch_size", 4) * fields.get("block_size", 2048)
    parameters = 1.4e9 if fields.get("size", "phi-1.5") == "phi-1.5" else 1e7
    peak = (work.gpus.tflops or 312.0) * 1e12 * max(1, work.gpus.count) * PRETRAIN_MFU
    return 6 * parameters * tokens / peak, 30.0 if parameters > 1e9 else None, 15.0 if parameters > 1e9 else 0.01


def free_disk_gb(path: Path) -> float:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def plan(work: Work, listed: list[Stage]) -> tuple[str, float, dict[str, bool]]:
    """The plan table, the disk the stages still to run need (GB), and which stages are complete."""
    lines = [
        f"Plan for {work.recipe.name} ({work.recipe.path}) on {work.gpus.describe()}; work folder {work.root}",
        "| stage | what | state | time | GPU memory | disk |",
        "|---|---|---|---|---|---|",
    ]
    needed, complete = 0.0, {}
    for stage in listed:
        record = read_record(work, stage.name)
        done = complete[stage.name] = stage.done(work)
        seconds, memory, disk = estimate(work, stage.name)
        if record and record.get("seconds") is not None:
            time_text = f"{duration(record['seconds'])} (measured here)"
        else:
            time_text = "n/a" if seconds is None else f"~{duration(seconds)} (estimate)"
        memory_text = "—" if memory is None else f"~{memory:.0f} GiB (estimate)"
        needed += 0.0 if done else disk
        state = "complete: skipped" if done else "to run"
        lines.append(f"| {stage.name} | {stage.what} | {state} | {time_text} | {memory_text} | {disk:g} GB |")
    free = free_disk_gb(work.root)
    lines.append(f"\nDisk: the stages to run need about {needed:.1f} GB; {free:.1f} GB free at {work.root}.")
    if not work.gpus.count and not work.shapes_data:
        lines.append("No GPU here: the times are the recipe's for one A100; this recipe needs a GPU machine.")
    return "\n".join(lines), needed, complete


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def read_record(work: Work, name: str) -> dict[str, Any] | None:
    path = work.root / "stages" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_stages(
    work: Work, listed: list[Stage], complete: dict[str, bool], start: str | None, only: str | None
) -> list[dict[str, Any]]:
    """Run what is not complete (`complete`: each stage's check, made by `plan` before anything ran)."""
    names = [stage.name for stage in listed]
    for chosen in (start, only):
        if chosen and chosen not in names:
            raise UsageError(f"no stage {chosen!r} in this run; stages: {', '.join(names)}")
    rows, ran = [], False
    for index, stage in enumerate(listed):
        if only and stage.name != only:
            rows.append({"stage": stage.name, "status": "not in this run"})
            continue
        # A stage after one that ran is run again: its inputs changed.
        forced = stage.name == only or (start is not None and index >= names.index(start)) or ran
        # Until a stage runs nothing changes, so the checks made for the plan still hold.
        if not forced and complete[stage.name]:
            record = read_record(work, stage.name) or {}
            work.metrics[stage.name] = record.get("metrics", {})
            rows.append({"stage": stage.name, "status": "complete: skipped", **record})
            continue
        work.log(f"\n== [{index + 1}/{len(listed)}] {stage.name}: {stage.what} ==")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.time()
        try:
            metrics = stage.run(work) or {}
        except KeyboardInterrupt:
            work.log(f"\ninterrupted in {stage.name}; continue with the same command and --resume")
            raise
        record = {
            "metrics": metrics,
            "seconds": round(time.time() - started, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_text(work.root / "stages" / f"{stage.name}.json", json.dumps(record, indent=1) + "\n")
        work.metrics[stage.name] = metrics
        rows.append({"stage": stage.name, "status": "ran", **record})
        ran = not only
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | status | time | peak GPU memory | result |", "|---|---|---|---|---|"]
    for row in rows:
        seconds = duration(row["seconds"]) if row.get("seconds") is not None else "—"
        memory = f"{row['peak_gpu_gib']:.1f} GiB" if row.get("peak_gpu_gib") is not None else "—"
        result = ", ".join(f"{key} {_short(value)}" for key, value in (row.get("metrics") or {}).items())
        lines.append(f"| {row['stage']} | {row['status']} | {seconds} | {memory} | {result or '—'} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def write_report(work: Work, rows: list[dict[str, Any]], argv: list[str]) -> Path:
    lines = [
        f"# Refresh report: {work.recipe.name}",
        "",
        f"- command: `{shlex.join(['python', '-m', 'training.refresh', *argv])}`",
        f"- recipe: `{work.recipe.path}`{' (--smoke: random weights of the real sizes, a few steps)' * work.smoke}",
        f"- machine: {work.gpus.describe()}",
        f"- finished: {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        summary_table(rows),
        "",
    ]
    for stage in ("pretrain", "stage1", "stage2"):
        if (work.root / stage / "loss.png").is_file():
            lines += [f"## {stage}", "", f"![{stage} loss]({stage}/loss.png)", ""]
    products = [
        ("the Space's weights", work.space_weights or work.root / "weights"),
        ("GGUF", work.root / "gguf"),
        ("evaluation reports", work.root / "eval"),
    ]
    lines += ["## Products", ""] + [f"- {what}: `{path}`" for what, path in products if Path(path).exists()]
    for repo, url in (work.metrics.get("push") or {}).items():
        lines.append(f"- pushed {repo}: {url}")
    path = work.root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def append_smoke_results(work: Work, rows: list[dict[str, Any]], results: Path) -> None:
    """--smoke: each stage's time, peak GPU memory and step time, appended under one heading."""
    heading = "## training.refresh --smoke"
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    if heading not in text:
        text = text.rstrip() + f"\n\n{heading}\n\nAppended by each smoke run (random weights of the real sizes).\n"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### {when}, {work.gpus.describe()}, recipe {work.recipe.name}",
        "",
        "| stage | time | peak GPU memory | s/step |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] == "ran":
            memory = "—" if row.get("peak_gpu_gib") is None else f"{row['peak_gpu_gib']:.2f} GiB"
            step = row["metrics"].get("seconds_per_step", "—")
            lines.append(f"| {row['stage']} | {row['seconds']:.1f} s | {memory} | {step} |")
    atomic_write_text(results, text.rstrip() + "\n" + "\n".join(lines) + "\n")


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(prog="python -m training.refresh", description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True, help="every product and the report go here")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="training/recipes/*.yaml")
    parser.add_argument("--push-to-hub", default="", help="OWNER/PREFIX: push PREFIX, PREFIX-GGUF, -stage1, -stage2")
    parser.add_argument("--private", action="store_true", help="create the Hub repos as private")
    parser.add_argument(
        "--plan", action="store_true", help="print each stage's estimates and check the disk; run nothing"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue interrupted training stages from their checkpoints"
    )
    parser.add_argument("--from", dest="start", help="rerun this stage and every one after it")
    parser.add_argument("--only", help="run this stage only (again, if it is complete)")
    parser.add_argument("--with-pretrain", action="store_true", help="add part 1: pretrain phi-1.5 from scratch")
    parser.add_argument("--smoke", action="store_true", help="random real-size models, synthetic data, a few steps")
    parser.add_argument("--space-weights", type=Path, help="also write the Space's weights here (e.g. weights)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="--smoke appends its table here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.push_to_hub and (parse_reference(args.push_to_hub) is None or "@" in args.push_to_hub):
        parser.error(f"--push-to-hub {args.push_to_hub!r} is not OWNER/PREFIX")
    if args.smoke and args.push_to_hub:
        parser.error("--smoke trains random weights; it does not push")
    recipe = Recipe.load(args.recipe)
    if args.with_pretrain and not recipe.pretrain:
        parser.error(f"{args.recipe} names no pretraining recipe")
    work = Work(
        args.workdir,
        recipe,
        Gpus.detect(),
        args.seed,
        args.resume,
        args.smoke,
        args.push_to_hub,
        args.private,
        args.space_weights,
    )
    listed = stage_list(args.with_pretrain, bool(args.push_to_hub))
    table, needed, complete = plan(work, listed)
    print(table)
    if args.plan:
        return {"plan": table, "disk_needed_gb": needed}
    if needed > free_disk_gb(work.root):
        raise UsageError(f"the stages to run need about {needed:.0f} GB; {free_disk_gb(work.root):.0f} GB is free")
    work.root.mkdir(parents=True, exist_ok=True)
    rows = run_stages(work, listed, complete, args.start, args.only)
    print("\n" + summary_table(rows))
    report = write_report(work, rows, list(sys.argv[1:] if argv is None else argv))
    print(f"\nreport: {report}")
    if args.smoke:
        append_smoke_results(work, rows, args.results)
        print(f"smoke results appended to {args.results}")
    return {"rows": rows, "report": str(report), "metrics": work.metrics}
