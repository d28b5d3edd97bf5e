"""Evaluate a weights folder on held-out LLaVA-style conversations: loss and short-answer accuracy.

    python -m training.evaluate --weights runs/stage2/weights --data data/held_out.json \
        --image-folder data/coco --out runs/stage2/eval.json

Loss: teacher-forced, over the answers only, as in training. Accuracy: every question whose reference
answer is short (--short-answer-words) is asked through `Assistant.chat`, the app's own path, with the
conversation's earlier reference turns as history; the answer counts as an exact match when it equals
the reference after normalisation (case, punctuation, articles, spaces) and as a contains-match when
the normalised reference appears in it. Prints a table and writes every answer to --out as JSON.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from inference.assistant import Assistant
from inference.cli import ArgumentParser, command
from inference.config import GenerationOptions, atomic_write_text
from inference.precision import Precision
from inference.vision import load_image
from training.data import Collator, Example, load_examples
from training.losses import summed_loss

ARTICLES = re.compile(r"\b(a|an|the)\b")


def contains(predicted: str, reference: str) -> bool:
    """Whether the normalised reference appears in the normalised answer as whole words ("no" is not in "not")."""
    return bool(reference) and re.search(rf"(?<!\S){re.escape(reference)}(?!\S)", predicted) is not None


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


@torch.no_grad()
def mean_loss(assistant: Assistant, examples: list[Example], image_folder: Path, batch_size: int) -> float:
    """Teacher-forced held-out loss over the answers, as training defines it (`summed_loss`)."""
    tower = assistant.model.vision_tower
    collator = Collator(
        assistant.tokenizer,
        assistant.manifest.template,
        assistant.max_positions,
        tower.num_patches,
        tower.image_size,
        image_folder,
    )
    examples = collator.fit(examples, "loss")
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="loss", unit="batch"):
        loss, supervised = summed_loss(assistant.model, collator(examples[start : start + batch_size]))
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
    assistant: Assistant | None = None,
) -> dict[str, Any]:
    assistant = assistant or Assistant.from_weights(weights, whisper_model=None, precision=Precision.FP32)
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
        "loss": mean_loss(assistant, examples, folder, batch_size),
        "short_questions": count,
        "exact_match": sum(a["exact"] for a in answers) / count if count else None,
        "contains_match": sum(a["contains"] for a in answers) / count if count else None,
        "answers": answers,
    }


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
    parser.add_argument("--data", type=Path, required=True, help="held-out LLaVA-style JSON")
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="JSON report with every answer")
    parser.add_argument("--short-answer-words", type=int, default=3, help="questions with longer answers are not asked")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N conversations")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    report = evaluate(
        args.weights,
        args.data,
        args.image_folder,
        args.short_answer_words,
        args.limit,
        args.batch_size,
        args.max_new_tokens,
    )
    print(table(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
