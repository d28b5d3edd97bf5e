"""The standard VLM benchmarks' files, as their authors distribute them → questions to ask, with prompts.

Each reader returns `Question`s: the image (a file, or the bytes MMBench embeds), the prompt as
LLaVA-1.5 words it (short-answer suffix; the option-letter suffix for multiple choice), and a `row`
holding what the benchmark's scorer (`training.vlm_scoring`) needs; the row goes into the JSON report
beside the answer, so every score can be audited.

- pope: `coco_pope_{random,popular,adversarial}.json` (JSON lines: question_id, image, text, label),
  or a folder holding them. Images are COCO val2014 files; they are found by image id among the COCO
  2017 files the training stages download (`train2017/`, `val2017/`) as well as under their own name.
- mme: the `MME_Benchmark_release_version` folder: one folder per category, each image with a .txt of
  "question<TAB>Yes|No" lines, side by side or in `images/` and `questions_answer_YN/`.
- gqa: `testdev_balanced_questions.json` (question id → imageId, question, answer); images `{imageId}.jpg`.
- vqav2: the questions JSON (`--data`) and the annotations JSON (`--annotations`) of val2014, images as
  for POPE. The published VQAv2 numbers are test-dev, scored by the evaluation server; this scores val.
- textvqa: `TextVQA_0.5.1_val.json` (questions with their 10 answers); images `{image_id}.jpg`. Asked
  without the OCR tokens that some papers add to the prompt.
- scienceqa: `problems.json`, the questions with an image in one split (default test); images
  `{pid}/image.png` under --image-folder (or under its `{split}/`).
- mmbench: the dev TSV (index, question, hint, A–D, answer, category, base64 image). Each question is
  asked once per rotation of its options (circular evaluation).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data import DataError
from training.vlm_scoring import LETTERS

BENCHMARKS = ("pope", "mme", "gqa", "vqav2", "textvqa", "scienceqa", "mmbench")
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".PNG")


@dataclass
class Question:
    id: str
    image: Path | str  # a file, or a base64-encoded image (MMBench)
    prompt: str
    row: dict[str, Any] = field(default_factory=dict)  # what the scorer needs; reported with the answer


def read_benchmark(
    benchmark: str,
    data: Sequence[Path],
    image_folder: Path | None,
    annotations: Path | None = None,
    split: str = "test",
) -> list[Question]:
    """The benchmark's questions, in file order; every image is checked to exist before any is asked."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    for path in data:
        if not path.exists():
            raise DataError(f"{path} does not exist")
    if benchmark not in ("mme", "mmbench") and image_folder is None:
        raise DataError(f"{benchmark} needs --image-folder")
    if benchmark == "vqav2" and annotations is None:
        raise DataError("vqav2 needs --annotations (the val annotations JSON; test-dev is scored by its server)")
    readers = {
        "pope": lambda: _pope(data, image_folder),
        "mme": lambda: _mme(data[0]),
        "gqa": lambda: _gqa(data[0], image_folder),
        "vqav2": lambda: _vqav2(data[0], annotations, image_folder),
        "textvqa": lambda: _textvqa(data[0], image_folder),
        "scienceqa": lambda: _scienceqa(data[0], image_folder, split),
        "mmbench": lambda: _mmbench(data[0]),
    }
    questions = readers[benchmark]()
    missing = [question for question in questions if isinstance(question.image, Path) and not question.image.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(questions)} questions' images are missing under {image_folder}, "
            f"for example {missing[0].image}"
        )
    if not questions:
        raise DataError(f"no {benchmark} questions found in {', '.join(map(str, data))}")
    return questions


def coco_image(folder: Path, image_id: int, name: str = "") -> Path:
    """A COCO image by id: under its own (val2014) name, or as the COCO 2017 file of the same id."""
    candidates = [folder / name, folder / "val2014" / name] if name else []
    for suffix in (".jpg", ".png"):  # COCO's are JPEG; the tiny recipe's synthetic images are PNG
        new_name = f"{image_id:012d}{suffix}"
        candidates += [folder / new_name, folder / "val2017" / new_name, folder / "train2017" / new_name]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not JSON: {error}") from None


def _short(question: str) -> str:
    return f"{question.strip()}\n{SHORT_ANSWER}"


def _pope(data: Sequence[Path], image_folder: Path) -> list[Question]:
    files = [file for path in data for file in (sorted(path.glob("*pope*.json")) if path.is_dir() else [path])]
    questions = []
    for file in files:
        split = file.stem.removeprefix("coco_pope_")
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, text, label = record["image"], record["text"], record["label"].strip().lower()
                image_id = int(Path(name).stem.rsplit("_", 1)[-1])
            except (json.JSONDecodeError, KeyError, ValueError, AttributeError) as error:
                raise DataError(f"{file}:{number} is not a POPE question ({error!r})") from None
            row = {"split": split, "reference": label, "image_name": name}
            image = coco_image(image_folder, image_id, name)
            questions.append(Question(f"{split}/{record.get('question_id', number)}", image, _short(text), row))
    return questions


def _mme(folder: Path) -> list[Question]:
    questions = []
    for category in sorted(path for path in folder.iterdir() if path.is_dir()):
        texts, images = category, category
        if (category / "questions_answer_YN").is_dir():
            texts, images = category / "questions_answer_YN", category / "images"
        for text in sorted(texts.glob("*.txt")):
            image = next(
                (images / (text.stem + s) for s in IMAGE_SUFFIXES if (images / (text.stem + s)).is_file()), None
            )
            if image is None:
                raise DataError(f"{text} has no image beside it in {images}")
            for number, line in enumerate(line for line in text.read_text().splitlines() if line.strip()):
                question, _, answer = line.rpartition("\t")
                if not question or answer.strip().lower() not in ("yes", "no"):
                    raise DataError(f"{text}: line {number + 1} is not 'question<TAB>Yes|No'")
                row = {"category": category.name, "image_name": image.name, "reference": answer.strip()}
                questions.append(Question(f"{category.name}/{text.stem}/{number}", image, _short(question), row))
    return questions


def _gqa(path: Path, image_folder: Path) -> list[Question]:
    records = _json(path)
    if not isinstance(records, dict):
        raise DataError(f"{path} is not GQA's questions file (a question id → question object)")
    return [
        Question(
            qid, image_folder / f"{record['imageId']}.jpg", _short(record["question"]), {"reference": record["answer"]}
        )
        for qid, record in records.items()
    ]


def _vqav2(path: Path, annotations: Path, image_folder: Path) -> list[Question]:
    questions, notes = _json(path), _json(annotations)
    if "questions" not in questions or "annotations" not in notes:
        raise DataError("vqav2 takes the questions JSON as --data and the annotations JSON as --annotations")
    by_id = {note["question_id"]: note for note in notes["annotations"]}
    items = []
    for record in questions["questions"]:
        note = by_id.get(record["question_id"])
        if note is None:
            raise DataError(f"question {record['question_id']} has no annotation in {annotations}")
        image = coco_image(image_folder, record["image_id"], f"COCO_val2014_{record['image_id']:012d}.jpg")
        row = {"references": [a["answer"] for a in note["answers"]], "answer_type": note.get("answer_type")}
        items.append(Question(str(record["question_id"]), image, _short(record["question"]), row))
    return items


def _textvqa(path: Path, image_folder: Path) -> list[Question]:
    records = _json(path)
    if not isinstance(records, dict) or "data" not in records:
        raise DataError(f"{path} is not a TextVQA file (an object with 'data')")
    return [
        Question(
            str(record["question_id"]),
            image_folder / f"{record['image_id']}.jpg",
            _short(record["question"]),
            {"references": record["answers"]},
        )
        for record in records["data"]
    ]


def multiple_choice(question: str, options: Sequence[str], hint: str = "") -> str:
    """LLaVA-1.5's multiple-choice prompt: the hint, the question, one "A. option" line each, the instruction."""
    lines = [hint.strip()] if hint.strip() else []
    lines += [question.strip(), *(f"{LETTERS[i]}. {option}" for i, option in enumerate(options)), OPTION_LETTER]
    return "\n".join(lines)


def _scienceqa(path: Path, image_folder: Path, split: str) -> list[Question]:
    problems = _json(path)
    if not isinstance(problems, dict):
        raise DataError(f"{path} is not ScienceQA's problems.json (a problem id → problem object)")
    items = []
    for pid, problem in problems.items():
        if problem.get("split") != split or not problem.get("image"):
            continue
        image = image_folder / pid / problem["image"]
        if not image.is_file():
            image = image_folder / split / pid / problem["image"]
        hint = problem.get("hint") or ""
        prompt = multiple_choice(problem["question"], problem["choices"], f"Context: {hint}" if hint else "")
        row = {"options": problem["choices"], "reference": LETTERS[problem["answer"]]}
        items.append(Question(pid, image, prompt, row))
    return items


def _mmbench(path: Path) -> list[Question]:
    csv.field_size_limit(sys.maxsize)  # the images are base64 in a cell
    with open(path, newline="", encoding="utf-8") as file:
        records = list(csv.DictReader(file, delimiter="\t"))
    if not records or not {"index", "question", "answer", "image"} <= set(records[0]):
        raise DataError(f"{path} is not an MMBench TSV (index, question, A–D, answer, image columns)")
    images = {record["index"]: record["image"] for record in records}
    items = []
    for record in records:
        options = [record[letter] for letter in LETTERS[:8] if _present(record.get(letter))]
        answer = LETTERS.index(record["answer"].strip())
        image = record["image"]
        image = images.get(image, image) if image.isdigit() else image  # later versions point at a row's image
        hint = record.get("hint") or ""
        for rotation in range(len(options)):
            rotated = options[rotation:] + options[:rotation]
            row = {
                "question_index": record["index"],
                "rotation": rotation,
                "options": rotated,
                "reference": LETTERS[(answer - rotation) % len(options)],
                "category": record.get("category"),
            }
            prompt = multiple_choice(record["question"], rotated, hint if _present(hint) else "")
            items.append(Question(f"{record['index']}/{rotation}", image, prompt, row))
    return items


def _present(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "nan", "NaN")
