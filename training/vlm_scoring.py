"""The official scoring rules of the standard VLM benchmarks, on answers already generated.

Each function takes the model's raw answers and the references as the benchmark distributes them,
and returns the metrics its authors report, so a score here can be set beside a published one:

- VQAv2 / TextVQA: VQA accuracy. An answer's score against one annotator subset is
  min(#annotators in the subset who gave that answer / 3, 1); the score is the mean over the 10 subsets
  of 9 annotators (GT-Vision-Lab's `vqaEval.py`). Answers are normalised as that script does
  (punctuation, number words, articles, contractions), and the prediction first as LLaVA-1.5 does
  before submitting (EvalAI's answer processor: lower case, then the same rules).
- GQA: exact match after the same normalisation.
- POPE: the answer is "no" when its first sentence has the word "no", "No" or "not", else "yes"
  (LLaVA's `eval_pope.py`); accuracy, precision, recall, F1 and the ratio of "yes" answers per split.
- MME: an answer is yes/no by its first four characters (MME's `calculation.py`); per category,
  accuracy over questions plus accuracy+ over images (both of an image's questions right), in
  percent, summed into the perception (10 categories, at most 2000) and cognition (4, at most 800) scores.
- ScienceQA / MMBench: the option letter is read from the answer (a bare letter, "A." or "(A)" at the
  start, "The answer is A", or the text of exactly one option); an answer with no letter is wrong.
  MMBench scores circularly: a question counts only if every rotation of its options is answered right.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

# The official VQA normalisation.
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit ("2." loses it, "2.5" keeps it)
_DIGIT_COMMA = re.compile(r"\d,\d")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The contracted forms the official table restores. Its keys are each form with one apostrophe left
# out ("dont" → "don't"; "couldnt've" and "couldn'tve" → "couldn't've"). The table's "I" forms have
# capital keys and never match lower-cased text, so they are not listed.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
"""
_CONTRACTIONS = {
    form[:index] + form[index + 1 :]: form
    for form in _CONTRACTED.split()
    for index, char in enumerate(form)
    if char == "'"
}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table has this one entry the wrong way round


def _punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        # Removed where it touches a space (or anywhere, once a digit comma appears), else a space.
        joined = mark + " " in text or " " + mark in text or digit_comma
        out = out.replace(mark, "" if joined else " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalise_answer(text: str) -> str:
    """The official VQA normalisation of one answer (`processPunctuation`, then `processDigitArticle`)."""
    return _digits_articles(_punctuation(" ".join(text.split())))


def normalise_prediction(text: str) -> str:
    """EvalAI's answer processor, which LLaVA-1.5 applies to its answers before submitting and TextVQA's
    evaluator to every answer: lower case, "," and "?" dropped, "'s" split off, then `normalise_answer`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return normalise_answer(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], always_normalise: bool = False) -> float:
    """One question's VQA accuracy: min(matches among 9 annotators / 3, 1), averaged over the 10 subsets.

    The official VQAv2 script normalises the references only when they disagree (`always_normalise`
    False); TextVQA's evaluator always does.
    """
    predicted = normalise_prediction(prediction)
    references = [" ".join(answer.split()) for answer in answers]
    if always_normalise:
        references = [normalise_prediction(answer) for answer in references]
    elif len(set(references)) > 1:
        references = [normalise_answer(answer) for answer in references]
    matches = sum(reference == predicted for reference in references)
    # Leaving out annotator i removes one match when i gave the predicted answer.
    scores = [min(1.0, (matches - (reference == predicted)) / 3) for reference in references]
    return sum(scores) / len(scores)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def vqa_scores(rows: Sequence[dict[str, Any]], always_normalise: bool = False) -> dict[str, Any]:
    """VQA accuracy (percent) overall and per answer type; sets each row's `score`."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        row["score"] = vqa_accuracy(row["answer"], row["references"], always_normalise)
        by_type[row.get("answer_type") or "all"].append(row["score"])
    scores = {"accuracy": _percent(mean(row["score"] for row in rows))}
    if set(by_type) != {"all"}:
        scores["per_answer_type"] = {kind: _percent(mean(values)) for kind, values in sorted(by_type.items())}
    return scores


def gqa_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    for row in rows:
        row["score"] = float(normalise_prediction(row["answer"]) == normalise_answer(row["reference"]))
    return {"accuracy": _percent(mean(row["score"] for row in rows))}


def pope_label(answer: str) -> str:
    """LLaVA's rule: "no" if the first sentence contains the word no/No/not, otherwise "yes"."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per split (random/popular/adversarial): accuracy, precision, recall, F1, yes-ratio, in percent."""
    splits: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        row["predicted"] = pope_label(row["answer"])
        row["score"] = float(row["predicted"] == row["reference"])
        splits[row["split"]].append(row)
    scores = {}
    for split, members in sorted(splits.items()):
        pairs = [(row["predicted"] == "yes", row["reference"] == "yes") for row in members]
        tp = sum(p and r for p, r in pairs)
        fp = sum(p and not r for p, r in pairs)
        fn = sum(r and not p for p, r in pairs)
        tn = len(pairs) - tp - fp - fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[split] = {
            "accuracy": _percent((tp + tn) / len(pairs)),
            "precision": _percent(precision),
            "recall": _percent(recall),
            "f1": _percent(f1),
            "yes_ratio": _percent((tp + fp) / len(pairs)),
            "questions": len(pairs),
        }
    if scores:
        scores["average_f1"] = round(sum(split["f1"] for split in scores.values()) / len(scores), 2)
    return scores


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(answer: str) -> str:
    """MME's rule: "yes"/"no" when the answer is that word or starts with it (first 4 characters), else "other"."""
    answer = answer.strip().lower()
    if answer in ("yes", "no"):
        return answer
    return "yes" if "yes" in answer[:4] else "no" if "no" in answer[:4] else "other"


def mme_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per category: accuracy + accuracy+ (both in percent); perception and cognition: their sums."""
    categories: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        row["score"] = float(mme_label(row["answer"]) == row["reference"].strip().lower())
        categories[row["category"]][row["image_name"]].append(row["score"])
    per_category = {}
    for name, images in sorted(categories.items()):
        answers = [score for scores in images.values() for score in scores]
        accuracy = 100 * sum(answers) / len(answers)
        accuracy_plus = 100 * sum(all(scores) for scores in images.values()) / len(images)
        per_category[name] = {
            "accuracy": round(accuracy, 2),
            "accuracy_plus": round(accuracy_plus, 2),
            "score": round(accuracy + accuracy_plus, 2),
        }

    def total(names: tuple[str, ...]) -> float | None:
        present = [per_category[name]["score"] for name in names if name in per_category]
        return round(sum(present), 2) if present else None

    missing = sorted(set(MME_PERCEPTION + MME_COGNITION) - set(per_category))
    return {
        "perception": total(MME_PERCEPTION),
        "cognition": total(MME_COGNITION),
        "categories_missing": missing,  # a sum over fewer categories is not comparable with published ones
        "per_category": per_category,
    }


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def option_letter(answer: str, options: Sequence[str]) -> str | None:
    """The option letter an answer gives, or None. `options` are the option texts, lettered A, B, ..."""
    letters = LETTERS[: len(options)]
    text = answer.strip()
    if len(text) == 1 and text in letters:
        return text
    start = re.match(r"\(([A-Z])\)|([A-Z])[.):](?:\s|$)", text)  # "(A) ...", "A. ...", "A) ...", "A: ..."
    if start and (start.group(1) or start.group(2)) in letters:
        return start.group(1) or start.group(2)
    said = re.findall(r"[Tt]he answer is:?\s*\(?([A-Z])\b", text)
    if len(said) == 1 and said[0] in letters:
        return said[0]
    stated = normalise_answer(text.rstrip("."))
    matching = [letter for letter, option in zip(letters, options, strict=True) if normalise_answer(option) == stated]
    return matching[0] if len(matching) == 1 else None


def choice_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """ScienceQA: accuracy over questions; answers without a readable letter count as wrong."""
    for row in rows:
        row["predicted"] = option_letter(row["answer"], row["options"])
        row["score"] = float(row["predicted"] == row["reference"])
    return {
        "accuracy": _percent(mean(row["score"] for row in rows)),
        "no_letter": sum(row["predicted"] is None for row in rows),
    }


def circular_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """MMBench: a question is right only if every rotation of its options is; also the first pass alone."""
    choice_scores(rows)
    questions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        questions[row["question_index"]].append(row)
    circular = {index: all(row["score"] for row in members) for index, members in questions.items()}
    first = [row["score"] for row in rows if row["rotation"] == 0]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for index, members in questions.items():
        by_category[members[0].get("category") or "all"].append(circular[index])
    return {
        "circular_accuracy": _percent(mean(circular.values())),
        "first_pass_accuracy": _percent(mean(first)),
        "no_letter": sum(row["predicted"] is None for row in rows),
        "per_category": {name: _percent(mean(values)) for name, values in sorted(by_category.items())},
    }


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(100 * fraction, 2)
