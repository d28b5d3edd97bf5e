"""Standard VLM benchmarks: each file format as distributed, scored by hand from the official rules."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import torch

from tests import kit
from training import evaluate
from training.data import DataError
from training.vlm_benchmarks import read_benchmark
from training.vlm_scoring import normalise_answer, normalise_prediction, option_letter, vqa_accuracy


def scored(benchmark: str, questions, answers: list[str]) -> dict:
    rows = [{"id": q.id, "answer": a, **q.row} for q, a in zip(questions, answers, strict=True)]
    return evaluate.SCORERS[benchmark](rows)


def save_image(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kit.make_shape_image(colour).save(path)
    return path


# --- the official normalisation and VQA accuracy ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two.", "2"),  # number word, final full stop
        ("The Dog", "dog"),  # article, case
        ("a red-car", "red car"),  # "-" between words becomes a space
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("2.5", "2.5"),  # a decimal point stays
        ("1,000", "1000"),  # a digit comma: punctuation is dropped, not spaced
        ("yes!", "yes"),
        ("man's hat", "man 's hat"),  # EvalAI splits "'s" off the prediction
    ],
)
def test_predictions_are_normalised_as_the_official_scripts_do(raw, normal):
    assert normalise_prediction(raw) == normal


def test_vqa_accuracy_by_hand():
    # References differ, so they are normalised: "2", "2", "2" (from "two"), seven "3". The prediction
    # "Two" is "2": left out of 3 subsets with a "2" (2 matches, 2/3), in 7 subsets 3 matches (1).
    assert vqa_accuracy("Two", ["2", "2", "two", *["3"] * 7]) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # One annotator agrees: 0 in the subset without them, 1/3 in the other nine.
    assert vqa_accuracy("red", ["red", *["blue"] * 9]) == pytest.approx(0.3)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0  # the prediction is always normalised
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("No", ["yes"] * 10) == 0.0
    # The official VQAv2 script leaves identical references as they are; TextVQA's normalises them.
    assert vqa_accuracy("dog", ["the dog"] * 10) == 0.0
    assert vqa_accuracy("dog", ["The Dog"] * 10, always_normalise=True) == 1.0


def test_references_keep_their_case_until_digits_and_articles():
    assert normalise_answer("A Cat, sitting") == "cat sitting"


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) blue", "C"),
        ("A. red", "A"),
        ("The answer is B.", "B"),
        ("blue", "C"),  # the text of exactly one option
        ("A cat", None),  # "A" as an article is not a letter
        ("D", None),  # not among three options
        ("maybe", None),
    ],
)
def test_option_letters_are_read_from_answers(answer, letter):
    assert option_letter(answer, ["red", "green", "blue"]) == letter


# --- each format as distributed, read and scored --------------------------------------------------


def test_pope_reads_its_question_files_and_finds_coco_2017_images(tmp_path):
    coco = tmp_path / "coco"
    save_image(coco / "val2017" / "000000000001.jpg")
    save_image(coco / "train2017" / "000000000002.jpg")
    pope = tmp_path / "pope"
    pope.mkdir()
    for split in ("random", "adversarial"):
        lines = [
            {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a car?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a dog?", "label": "no"},
            {"question_id": 3, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?", "label": "yes"},
            {"question_id": 4, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a cup?", "label": "no"},
        ]
        (pope / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    questions = read_benchmark("pope", [pope], coco)
    assert [q.image.parent.name for q in questions[:2]] == ["val2017", "train2017"]
    assert questions[0].prompt == "Is there a car?\nAnswer the question using a single word or phrase."
    # Files in name order: adversarial first. Labels yes, no, yes, no in each.
    # adversarial: "Yes" TP, "It is not there." no → TN, "No. Yes." no (first sentence) → FN, "no" TN.
    # random: "Yes, a car." TP; "Not really." is yes by LLaVA's rule (only no/No/not count) → FP;
    # "no" FN; "Yes" FP.
    answers = ["Yes", "It is not there.", "No. Yes.", "no", "Yes, a car.", "Not really.", "no", "Yes"]
    scores = scored("pope", questions, answers)
    assert scores["adversarial"] == {
        "accuracy": 75.0,
        "precision": 100.0,
        "recall": 50.0,
        "f1": pytest.approx(66.67),
        "yes_ratio": 25.0,
        "questions": 4,
    }
    assert scores["random"]["accuracy"] == 25.0 and scores["random"]["precision"] == pytest.approx(33.33)
    assert scores["random"]["recall"] == 50.0 and scores["random"]["yes_ratio"] == 75.0
    assert scores["average_f1"] == pytest.approx((66.67 + 40.0) / 2, abs=0.01)


def test_pope_names_missing_images(tmp_path):
    file = tmp_path / "coco_pope_random.json"
    line = {"question_id": 1, "image": "COCO_val2014_000000000009.jpg", "text": "Is there a car?", "label": "yes"}
    file.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match="1 of 1 questions' images are missing"):
        read_benchmark("pope", [file], tmp_path)


def build_mme(root: Path) -> Path:
    """Two categories in MME's two layouts: side by side, and images/ + questions_answer_YN/."""
    for stem in ("a", "b"):
        save_image(root / "color" / f"{stem}.jpg")
        lines = [f"Is the shape red? Please answer yes or no.\t{'Yes' if stem == 'a' else 'No'}"]
        lines.append(f"Is the shape blue? Please answer yes or no.\t{'No' if stem == 'a' else 'Yes'}")
        (root / "color" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    save_image(root / "code_reasoning" / "images" / "c.png")
    (root / "code_reasoning" / "questions_answer_YN").mkdir(parents=True)
    text = "Does the code print 3? Please answer yes or no.\tYes\nDoes it print 4? Please answer yes or no.\tNo\n"
    (root / "code_reasoning" / "questions_answer_YN" / "c.txt").write_text(text)
    return root


def test_mme_scores_accuracy_plus_and_the_sums(tmp_path):
    questions = read_benchmark("mme", [build_mme(tmp_path / "MME")], None)
    assert [(q.row["category"], q.row["image_name"]) for q in questions][:3] == [
        ("code_reasoning", "c.png"),
        ("code_reasoning", "c.png"),
        ("color", "a.jpg"),
    ]
    # code_reasoning: both right → 100 + 100. color: a right/right, b right/"Maybe" (other → wrong):
    # accuracy 3/4 = 75, accuracy+ 1/2 = 50.
    scores = scored("mme", questions, ["Yes", "no.", "Yes, it is", "No", "NO", "Maybe"])
    assert scores["per_category"]["code_reasoning"] == {"accuracy": 100.0, "accuracy_plus": 100.0, "score": 200.0}
    assert scores["per_category"]["color"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert scores["perception"] == 125.0 and scores["cognition"] == 200.0
    assert "OCR" in scores["categories_missing"]


def test_gqa_exact_match_after_normalisation(tmp_path):
    images = tmp_path / "images"
    save_image(images / "n1.jpg")
    questions = {
        "q1": {"imageId": "n1", "question": "What color is it?", "answer": "red"},
        "q2": {"imageId": "n1", "question": "Is it a circle?", "answer": "no"},
        "q3": {"imageId": "n1", "question": "What is it?", "answer": "shape"},
    }
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    read = read_benchmark("gqa", [tmp_path / "testdev_balanced_questions.json"], images)
    assert scored("gqa", read, ["Red.", "No", "a shape"])["accuracy"] == 100.0
    assert scored("gqa", read, ["red", "yes", "shapes"])["accuracy"] == pytest.approx(33.33)


def test_vqav2_joins_questions_and_annotations(tmp_path):
    save_image(tmp_path / "coco" / "val2017" / "000000000007.jpg")
    questions = {"questions": [{"question_id": 70, "image_id": 7, "question": "How many?"}]}
    questions["questions"].append({"question_id": 71, "image_id": 7, "question": "Is it red?"})
    answers = [["2", "2", "two", *["3"] * 7], ["yes"] * 10]
    notes = {
        "annotations": [
            {
                "question_id": 70 + index,
                "image_id": 7,
                "answer_type": kind,
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(given)],
            }
            for index, (given, kind) in enumerate(zip(answers, ["number", "yes/no"], strict=True))
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(notes))
    read = read_benchmark("vqav2", [tmp_path / "q.json"], tmp_path / "coco", tmp_path / "a.json")
    scores = scored("vqav2", read, ["Two", "Yes"])
    assert scores["accuracy"] == 95.0  # (90 + 100) / 2
    assert scores["per_answer_type"] == {"number": 90.0, "yes/no": 100.0}
    with pytest.raises(DataError, match="--annotations"):
        read_benchmark("vqav2", [tmp_path / "q.json"], tmp_path / "coco")


def test_textvqa_normalises_every_reference(tmp_path):
    save_image(tmp_path / "train_images" / "abc.jpg")
    data = {"data": [{"question_id": 5, "image_id": "abc", "question": "What brand?", "answers": ["Coca-Cola"] * 10}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    read = read_benchmark("textvqa", [tmp_path / "TextVQA_0.5.1_val.json"], tmp_path / "train_images")
    assert scored("textvqa", read, ["coca cola"])["accuracy"] == 100.0


def test_scienceqa_asks_image_questions_of_one_split(tmp_path):
    save_image(tmp_path / "images" / "test" / "11" / "image.png")
    problems = {
        "11": {
            "question": "Which is red?",
            "choices": ["sky", "apple"],
            "answer": 1,
            "hint": "Look.",
            "image": "image.png",
            "split": "test",
        },
        "12": {"question": "No image", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"},
        "13": {"question": "Wrong split", "choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "train"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    read = read_benchmark("scienceqa", [tmp_path / "problems.json"], tmp_path / "images")
    assert [q.id for q in read] == ["11"]
    assert read[0].prompt == (
        "Context: Look.\nWhich is red?\nA. sky\nB. apple\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert scored("scienceqa", read, ["B"]) == {"accuracy": 100.0, "no_letter": 0}
    assert scored("scienceqa", read, ["I think so"]) == {"accuracy": 0.0, "no_letter": 1}


def build_mmbench(path: Path) -> Path:
    buffer = io.BytesIO()
    kit.make_shape_image("blue").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = [
        {
            "index": "0",
            "question": "Which colour?",
            "hint": "nan",
            "A": "red",
            "B": "blue",
            "C": "nan",
            "D": "nan",
            "answer": "B",
            "category": "colour",
            "image": image,
        },
        {
            "index": "1",
            "question": "Which shape?",
            "hint": "A drawing.",
            "A": "circle",
            "B": "square",
            "C": "line",
            "D": "nan",
            "answer": "A",
            "category": "shape",
            "image": "0",
        },
    ]
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mmbench_is_circular(tmp_path):
    read = read_benchmark("mmbench", [build_mmbench(tmp_path / "mmbench_dev.tsv")], None)
    assert [q.id for q in read] == ["0/0", "0/1", "1/0", "1/1", "1/2"]
    # Rotating the options moves the answer: blue is B, then A; circle is A, then C, then B.
    assert [q.row["reference"] for q in read] == ["B", "A", "A", "C", "B"]
    assert read[3].prompt.startswith("A drawing.\nWhich shape?\nA. square\nB. line\nC. circle\n")
    assert read[3].image == read[0].image  # the row's image field pointed at row 0
    # Question 0 right in both rotations; question 1 right twice, wrong once → not counted.
    scores = scored("mmbench", read, ["B", "blue", "A.", "C", "A"])
    assert scores["circular_accuracy"] == 50.0 and scores["first_pass_accuracy"] == 100.0
    assert scores["per_category"] == {"colour": 100.0, "shape": 0.0}


# --- batched generation and the command end to end ------------------------------------------------


def test_batched_answers_equal_one_at_a_time(loaded):
    model = loaded.model
    questions = ["Colour?", "What is in this picture, and where exactly is it?", "Is it round?"]
    prompts = [kit.prompt_ids(loaded.tokenizer, q, model.vision_tower.num_patches) for q in questions]
    images = [kit.make_shape_image(colour) for colour in ("red", "blue", "green")]
    embeds = model.encode_images(kit.pixels(model, *images))
    batched = model.generate_batch(prompts, embeds, max_new_tokens=8)
    for index, prompt in enumerate(prompts):
        alone = kit.greedy_without_cache(model, prompt, embeds[index : index + 1], 8)
        assert batched[index] == [token for token in alone if token != model.eos_token_id]
    assert len({len(p) for p in prompts}) == 3  # the prompts really needed padding


def test_benchmark_command_reports_every_answer(weights_dir, tmp_path, capsys):
    path = build_mmbench(tmp_path / "mmbench_dev.tsv")
    out = tmp_path / "mmbench.json"
    arguments = ["--weights", str(weights_dir), "--benchmark", "mmbench", "--data", str(path), "--out", str(out)]
    report = evaluate.main([*arguments, "--batch-size", "2", "--max-new-tokens", "4", "--limit", "1"])
    assert report["questions"] == 2 and report["limited"]  # both rotations of the first question
    saved = json.loads(out.read_text())
    assert [row["id"] for row in saved["answers"]] == ["0/0", "0/1"]
    assert saved["scores"] == evaluate.SCORERS["mmbench"]([dict(row) for row in saved["answers"]])
    assert "circular_accuracy" in capsys.readouterr().out


def test_benchmark_answers_do_not_depend_on_the_batch(loaded, tmp_path):
    read = read_benchmark("mmbench", [build_mmbench(tmp_path / "mmbench_dev.tsv")], None)
    with torch.no_grad():
        one = evaluate.answer_questions(loaded, read, batch_size=1, max_new_tokens=6)
        five = evaluate.answer_questions(loaded, read, batch_size=5, max_new_tokens=6)
    assert one == five
