"""Evaluate a weights folder: on held-out LLaVA-style conversations, or on a standard VLM benchmark.

    python -m training.evaluate --weights runs/stage2/weights --data data/held_out.json \
        --image-folder data/coco --out runs/stage2/eval.json
    python -m training.evaluate --weights runs/stage2/weights --benchmark pope \
        --data data/pope/coco_pope_random.json --image-folder data/coco --out runs/stage2/pope.json

With --benchmark (pope, mme, gqa, vqav2, textvqa, scienceqa, mmbench) the benchmark's own files are
read (`training.vlm_benchmarks` says which), the questions are answered greedily in batches (on the GPU
when there is one) and scored by the benchmark's official rules (`training.vlm_scoring`); the JSON
report holds every prompt, answer and score.

Loss: teacher-forced, over the answers only, as in training. Accuracy: every question whose reference
answer is short (--short-answer-words) is asked through `Assistant.chat`, the app's own path, with the
conversation's earlier reference turns as history; the answer counts as an exact match when it equals
the reference after normalisation (case, punctuation, articles, spaces) and as a contains-match when
the normalised reference appears in it. Prints a table and writes every answer to --out as JSON.
Both modes run the weights with the LoRA merged, in bf16 on the GPU when there is one, else in fp32.
"""

from __future__ import annotations

import base64
import io
import json
import re
import string
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from inference.assistant import Assistant
from inference.backends.pytorch import TorchBackend
from inference.cli import ArgumentParser, command
from inference.config import GenerationOptions, atomic_write_text
from inference.loading import LoadedWeights, load_for_evaluation
from inference.prompt import Conversation, Turn, render
from inference.vision import ImageError, load_image, pixel_values, to_rgb
from training.data import Collator, DataError, Example, load_examples
from training.losses import summed_loss
from training.vlm_benchmarks import BENCHMARKS, Question, read_benchmark
from training.vlm_scoring import choice_scores, circular_scores, gqa_scores, mme_scores, pope_scores, vqa_scores

ARTICLES = re.compile(r"\b(a|an|the)\b")


def contains(predicted: str, reference: str) -> bool:
    """Whether the normalised reference appears in the normalised answer as whole words ("no" is not in "not")."""
    return bool(reference) and re.search(rf"(?<!\S){re.escape(reference)}(?!\S)", predicted) is not None


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


@torch.no_grad()
def mean_loss(loaded: LoadedWeights, examples: list[Example], image_folder: Path, batch_size: int) -> float:
    """Teacher-forced held-out loss over the answers, as training defines it (`summed_loss`)."""
    tower = loaded.model.vision_tower
    collator = Collator(
        loaded.tokenizer,
        loaded.manifest.template,
        loaded.model.max_positions,
        tower.num_patches,
        tower.image_size,
        image_folder,
    )
    examples = collator.fit(examples, "loss")
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="loss", unit="batch"):
        loss, supervised = summed_loss(loaded.model, collator(examples[start : start + batch_size]))
        total, tokens = total + loss.item(), tokens + supervised
    return total / tokens if tokens else float("nan")


def answer_accuracy(
    assistant: Assistant, examples: list[Example], image_folder: Path, max_words: int, options: GenerationOptions
) -> list[dict[str, Any]]:
    results = []
    for example in tqdm(examples, desc="answers", unit="conversation"):
        image = load_image(image_folder / example.image)
        history: list[tuple[str, str]] = []
        for turn in example.conversation.turns:
            if len(turn.answer.split()) <= max_words:
                answer = list(assistant.chat(history, image, text=turn.question, options=options))[-1].answer
                reference, predicted = normalise(turn.answer), normalise(answer)
                results.append(
                    {
                        "id": example.id,
                        "question": turn.question,
                        "reference": turn.answer,
                        "answer": answer,
                        "exact": predicted == reference,
                        "contains": contains(predicted, reference),
                    }
                )
            history.append((turn.question, turn.answer))
    return results


def evaluate(
    weights: str | Path,
    data: str | Path,
    image_folder: str | Path,
    max_words: int = 3,
    limit: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    loaded: LoadedWeights | None = None,
) -> dict[str, Any]:
    """Held-out loss and short-answer accuracy of `weights` (loaded here unless `loaded` is given), the
    answers asked through `Assistant`, the app's path."""
    loaded = loaded or load_for_evaluation(weights)
    assistant = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    examples, malformed = load_examples(data)
    examples = [example for example in examples if example.image is not None]
    if limit:
        examples = examples[:limit]
    folder = Path(image_folder)
    answers = answer_accuracy(assistant, examples, folder, max_words, GenerationOptions(max_new_tokens=max_new_tokens))
    count = len(answers)
    return {
        "weights": str(weights),
        "data": str(data),
        "conversations": len(examples),
        "malformed_skipped": sum(malformed.values()),
        "loss": mean_loss(loaded, examples, folder, batch_size),
        "short_questions": count,
        "exact_match": sum(a["exact"] for a in answers) / count if count else None,
        "contains_match": sum(a["contains"] for a in answers) / count if count else None,
        "answers": answers,
    }


SCORERS = {
    "pope": pope_scores,
    "mme": mme_scores,
    "gqa": gqa_scores,
    "vqav2": vqa_scores,
    "textvqa": lambda rows: vqa_scores(rows, always_normalise=True),
    "scienceqa": choice_scores,
    "mmbench": circular_scores,
}
NOTES = {
    "vqav2": "scored on the public val annotations; published VQAv2 numbers are test-dev, scored by its server",
    "textvqa": "asked without OCR tokens in the prompt",
    "mmbench": "letters read by rules, without the GPT matcher of MMBench's server",
}


def _image(question: Question):
    try:
        if isinstance(question.image, Path):
            return to_rgb(load_image(question.image))
        return to_rgb(Image.open(io.BytesIO(base64.b64decode(question.image))))
    except (ImageError, OSError, ValueError) as error:
        raise DataError(f"the image of question {question.id} could not be read: {error}") from None


def answer_questions(
    loaded: LoadedWeights, questions: list[Question], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers, `batch_size` questions per generation call, in the order given."""
    model, tokenizer, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    answers: list[str] = []
    progress = tqdm(total=len(questions), desc="answers", unit="question")
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        prompts = []
        for question in batch:
            conversation = Conversation((Turn(question.prompt),))
            ids = render(manifest.template, conversation, tokenizer, True, image_tokens=manifest.image_tokens)
            if len(ids.input_ids) + max_new_tokens > model.max_positions:
                raise DataError(f"question {question.id} does not fit the {model.max_positions}-position context")
            prompts.append(ids.input_ids)
        pixels = pixel_values([_image(question) for question in batch], model.vision_tower.image_size)
        with torch.no_grad():
            tokens = model.generate_batch(prompts, model.encode_images(pixels), max_new_tokens)
        answers += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
        progress.update(len(batch))
    progress.close()
    return answers


def first_questions(questions: list[Question], limit: int) -> list[Question]:
    """The first `limit` questions, keeping every rotation of an MMBench question together."""
    kept, names = [], set()
    for question in questions:
        name = question.row.get("question_index", question.id)
        if name not in names and len(names) == limit:
            break
        names.add(name)
        kept.append(question)
    return kept


def run_benchmark(
    benchmark: str,
    weights: str | Path,
    data: list[Path],
    image_folder: Path | None,
    annotations: Path | None = None,
    split: str = "test",
    limit: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    loaded: LoadedWeights | None = None,
) -> dict[str, Any]:
    questions = read_benchmark(benchmark, data, image_folder, annotations, split)
    if limit:
        questions = first_questions(questions, limit)
    loaded = loaded or load_for_evaluation(weights)
    answers = answer_questions(loaded, questions, batch_size, max_new_tokens)
    rows = [{"id": q.id, "prompt": q.prompt, "answer": a, **q.row} for q, a in zip(questions, answers, strict=True)]
    return {
        "benchmark": benchmark,
        "weights": str(weights),
        "data": [str(path) for path in data],
        "questions": len(rows),
        "limited": bool(limit),
        "note": NOTES.get(benchmark),
        "scores": SCORERS[benchmark](rows),
        "answers": rows,
    }


def _flat(scores: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in scores.items():
        name = f"{prefix}{key}"
        rows += _flat(value, name + " · ") if isinstance(value, dict) else [(name, value)]
    return rows


def benchmark_table(report: dict[str, Any]) -> str:
    lines = [f"| {report['benchmark']} ({report['questions']} questions) | value |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if value is None else value} |" for name, value in _flat(report["scores"])]
    return "\n".join(lines + ([f"\n{report['note']}."] if report["note"] else []))


def table(report: dict[str, Any]) -> str:
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"

    return "\n".join(
        [
            "| metric | value |",
            "|---|---|",
            f"| conversations | {report['conversations']} |",
            f"| loss (answers, teacher-forced) | {report['loss']:.4f} |",
            f"| short questions asked | {report['short_questions']} |",
            f"| exact match | {percent(report['exact_match'])} |",
            f"| contains match | {percent(report['contains_match'])} |",
        ]
    )


@command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--benchmark", choices=BENCHMARKS, help="a standard benchmark instead of held-out data")
    parser.add_argument(
        "--data", type=Path, nargs="+", required=True, help="held-out LLaVA-style JSON, or the benchmark's file(s)"
    )
    parser.add_argument("--image-folder", type=Path, help="images (not needed for mme and mmbench)")
    parser.add_argument("--annotations", type=Path, help="vqav2: the annotations JSON that goes with --data")
    parser.add_argument("--split", default="test", help="scienceqa: the split asked (default test)")
    parser.add_argument("--out", type=Path, help="JSON report with every answer")
    parser.add_argument("--short-answer-words", type=int, default=3, help="questions with longer answers are not asked")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N conversations or questions")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (held-out loss), 16 (benchmark)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (held-out), 16 (benchmark)")
    args = parser.parse_args(argv)
    if args.benchmark:
        report = run_benchmark(
            args.benchmark,
            args.weights,
            args.data,
            args.image_folder,
            args.annotations,
            args.split,
            args.limit,
            args.batch_size or 16,
            args.max_new_tokens or 16,
        )
        print(benchmark_table(report))
    else:
        if len(args.data) != 1 or args.image_folder is None:
            parser.error("held-out evaluation takes one --data file and --image-folder")
        report = evaluate(
            args.weights,
            args.data[0],
            args.image_folder,
            args.short_answer_words,
            args.limit,
            args.batch_size or 8,
            args.max_new_tokens or 32,
        )
        print(table(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
