"""Synthetic shapes: the tiny recipe's data and stand-in models, in the formats the real stages read.

Images of one shape (circle, square, triangle) in one colour, size and position on a varied background.
Stage 1 gets COCO-format caption files (read by training.prepare_coco); stage 2 gets LLaVA-style
question–answer conversations with bare image names (read by training.prepare_instruct), as
LLaVA-Instruct ships them; evaluation gets POPE-format yes/no questions. Train and held-out images
never overlap. `training.refresh --recipe training/recipes/tiny.yaml` runs every stage on them on a
CPU; the tests use the same data and stand-ins.

phi-2 arrives pretrained, able to read its context; a tiny random Phi cannot be steered by image
embeddings, so the tiny recipe first teaches it the data's language from text alone
(`warm_up_language_model` on `language_texts`), with a byte-level BPE trained in place (`build_bpe_tokenizer`).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PhiForCausalLM, PreTrainedTokenizerFast

from inference.prompt import PHI2_SYSTEM
from inference.tiny import EOS, wrap_tokenizer

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220)}
SIDES = ("left", "right")
IMAGE_SIZE = 96
QUESTIONS = {
    "colour": ("What colour is the shape?", lambda s: f"{s.colour.capitalize()}."),
    "shape": ("What shape is this?", lambda s: f"{s.shape.capitalize()}."),
    "position": ("Is the shape on the left or the right?", lambda s: f"{s.side.capitalize()}."),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    side: str

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape} on the {self.side}."

    @property
    def description(self) -> str:
        """The scene in words: what the stand-in language model learns to read from its context."""
        return f"{self.colour} {self.shape} {self.side}."


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    grey = rng.randint(150, 250)
    background = tuple(min(255, grey + rng.randint(-15, 15)) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    radius = rng.randint(14, 22)
    centre_x = (
        rng.randint(radius + 2, IMAGE_SIZE // 2 - 6)
        if scene.side == "left"
        else rng.randint(IMAGE_SIZE // 2 + 6, IMAGE_SIZE - radius - 2)
    )
    centre_y = rng.randint(radius + 2, IMAGE_SIZE - radius - 2)
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(centre_x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def scenes(count: int, rng: random.Random) -> list[Scene]:
    """Every combination in turn (balanced classes), shuffled."""
    combos = all_scenes()
    chosen = [combos[index % len(combos)] for index in range(count)]
    rng.shuffle(chosen)
    return chosen


def all_scenes() -> list[Scene]:
    """Every shape, colour and side once: what `language_texts` teaches the stand-in language model."""
    return [Scene(shape, colour, side) for shape in SHAPES for colour in COLOURS for side in SIDES]


def conversation(scene: Scene, image: str, record_id: str, rng: random.Random) -> dict:
    kinds = list(QUESTIONS)
    rng.shuffle(kinds)
    messages = []
    for index, kind in enumerate(kinds):
        question, answer = QUESTIONS[kind]
        messages.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
        messages.append({"from": "gpt", "value": answer(scene)})
    return {"id": record_id, "image": image, "conversations": messages}


def make_dataset(root: Path, seed: int, train_images: int = 360, held_out_images: int = 90) -> dict[str, list[Scene]]:
    """Write images, COCO captions (train/val) and instruction conversations; returns the scenes per split."""
    rng = random.Random(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    result = {}
    for split, count, first_id in (("train", train_images, 1), ("val", held_out_images, 100_000)):
        folder = root / f"{split}2017"
        folder.mkdir(exist_ok=True)
        split_scenes = scenes(count, rng)
        images, captions, conversations = [], [], []
        for number, scene in enumerate(split_scenes):
            image_id, name = first_id + number, f"{first_id + number:012d}.png"
            draw(scene, rng).save(folder / name)
            images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
            captions.append({"id": image_id, "image_id": image_id, "caption": scene.caption})
            conversations.append(conversation(scene, name, str(image_id), rng))
        coco = {"info": {}, "licenses": [], "images": images, "annotations": captions}
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(coco))
        (root / f"instruct_{split}.json").write_text(json.dumps(conversations))
        result[split] = split_scenes
    return result


def language_texts(train: list[Scene]) -> list[str]:
    """Text-only data to teach the stand-in language model to caption and answer from a description.

    phi-2 arrives able to read its context; the tiny random model does not, so it first learns
    "red circle left. A red circle on the left." and the same for answers. It never sees an image.
    """
    texts = set()
    for scene in set(train):
        texts.add(f"{scene.description} {scene.caption}")
        for question, answer in QUESTIONS.values():
            texts.add(f"{scene.description} USER: {question} ASSISTANT: {answer(scene)}")
    return sorted(texts)


# Words the tiny BPE learns from: the template's own text and the vocabulary of the tests' questions.
CORPUS = [
    PHI2_SYSTEM,
    "USER: ASSISTANT: What is in this picture? Describe the image. What colour is the shape?",
    "A red circle on the left. A blue square on the right. A green triangle in the middle.",
    "Is the shape on the left or the right? How many shapes are there? There is one shape.",
]


def build_bpe_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in place, with `<|endoftext|>` as its one special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return wrap_tokenizer(tokenizer)


def warm_up_language_model(source: Path, folder: Path, texts: list[str], steps: int = 200, seed: int = 0) -> Path:
    """A copy of a tiny Phi trained on `texts` (each ending in end-of-text), standing in for a pretrained LM.

    Stages that freeze the language model need one that already knows the language of their data, as
    phi-2 does; a random one cannot be steered by image embeddings.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = PhiForCausalLM.from_pretrained(source)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    length = max(map(len, encoded))
    ids = torch.tensor([row + [tokenizer.eos_token_id] * (length - len(row)) for row in encoded])
    labels = torch.tensor([row + [-100] * (length - len(row)) for row in encoded])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pope_questions(root: Path, held_out: list[Scene], seed: int = 0) -> Path:
    """POPE's format for the held-out images: one "Is there a {shape} in the image?" per image, asked of
    its own shape ("yes") or another ("no") in turn; the file named as POPE names its random split."""
    rng = random.Random(seed)
    lines = []
    for number, scene in enumerate(held_out):
        asked = scene.shape if number % 2 == 0 else rng.choice([s for s in SHAPES if s != scene.shape])
        name = f"COCO_val2014_{100_000 + number:012d}.jpg"  # found by id among the COCO 2017 files
        lines.append(
            {
                "question_id": number + 1,
                "image": name,
                "text": f"Is there a {asked} in the image?",
                "label": "yes" if asked == scene.shape else "no",
            }
        )
    path = root / "pope" / "coco_pope_random.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- scoring a run of the tiny recipe

KIND_OF_QUESTION = {question: kind for kind, (question, _) in QUESTIONS.items()}
CHANCE = {"colour": 1 / 3, "position": 1 / 2, "shape": 1 / 3}
# What tests/test_pipeline_learns.py requires of a trained run, whatever the seed and CPU; every run of
# benchmarks/learning_cpu_classes.py clears it by a margin (README "Watch it learn on a CPU").
LEARNING_BARS = {"colour": 0.9, "position": 0.9, "shape": 0.8}


def accuracy_by_kind(report: dict) -> dict[str, float]:
    """Exact-answer accuracy per kind of question in an evaluation report (`training.evaluate`'s JSON)."""
    hits = defaultdict(list)
    for answer in report["answers"]:
        hits[KIND_OF_QUESTION[answer["question"]]].append(answer["exact"])
    return {kind: sum(values) / len(values) for kind, values in sorted(hits.items())}
