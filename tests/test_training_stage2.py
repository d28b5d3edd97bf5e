"""Stage 2 on tiny models: 4-bit QLoRA on multi-turn conversations → a weights folder the app serves."""

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PhiForCausalLM

from inference import Assistant, GenerationOptions, Manifest, TemplateName
from inference.precision import Precision
from inference.prompt import IGNORE_INDEX
from inference.tiny import build_weights_folder
from tests.kit import make_shape_image, pixels, prompt_ids, run_killed, with_phi2_dropout
from training import evaluate, merge_adapter, prepare_instruct, stage2_instruct
from training.data import Collator, Example, load_examples
from training.optim import resolve_precision
from training.shapes import warm_up_language_model
from training.stage2_instruct import Stage2Config

COLOURS = ["red", "green", "blue"]
QUESTIONS = [("What colour is the shape?", "{colour}."), ("Is it on the left or the right?", "On the {side}.")]
MALFORMED = [
    {"id": "no-conversations", "image": "x.png"},
    {"id": "odd", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
    {
        "id": "roles",
        "image": "x.png",
        "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
    },
]


def conversation_record(number: int, colour: str, side: str) -> dict:
    messages = []
    for index, (question, answer) in enumerate(QUESTIONS):
        messages.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
        messages.append({"from": "gpt", "value": answer.format(colour=colour.capitalize(), side=side)})
    return {"id": str(number), "image": f"images/{number}.png", "conversations": messages}


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instruct")
    (root / "images").mkdir()
    records = []
    for number in range(24):
        colour, side = COLOURS[number % 3], ["left", "right"][number // 3 % 2]
        image = make_shape_image("white", size=(96, 96))
        image.paste(make_shape_image(colour, size=(40, 40)), (10 if side == "left" else 46, 28))
        image.save(root / "images" / f"{number}.png")
        records.append(conversation_record(number, colour, side))
    (root / "train.json").write_text(json.dumps(records + MALFORMED))
    (root / "eval.json").write_text(json.dumps(records[:4]))
    return root


@pytest.fixture(scope="module")
def chat_lm(phi_dir, tmp_path_factory) -> Path:
    """The tiny Phi after learning to answer from a description in its context, standing in for phi-2.

    A random frozen tiny LM cannot be tuned by a LoRA alone: its frozen output layer is too small to
    move the loss (it stayed at 4.9 nats); phi-2 arrives knowing how to answer.
    """
    texts = [
        f"{colour} {side}. USER: {question} ASSISTANT: {answer.format(colour=colour.capitalize(), side=side)}"
        for colour in COLOURS
        for side in ("left", "right")
        for question, answer in QUESTIONS
    ]
    return warm_up_language_model(phi_dir, tmp_path_factory.mktemp("chat-lm"), texts, steps=400)


@pytest.fixture(scope="module")
def stage1_weights(tmp_path_factory, chat_lm, clip_dir) -> Path:
    """Stage-1 stand-in: a weights folder over the chat LM with a fresh (untrained) projector."""
    return build_weights_folder(tmp_path_factory.mktemp("stage1") / "weights", chat_lm, clip_dir, adapter=False)


def stage2_config(data: Path, stage1: Path, output: Path, **settings) -> Stage2Config:
    defaults = dict(batch_size=4, global_batch_size=8, lr=1e-2, projector_lr=1e-2, lora_r=8, lora_alpha=16)
    defaults |= dict(lora_dropout=0.0, warmup_ratio=0.05, log_every=5, eval_every=20, save_every=20, samples=1)
    return Stage2Config(
        stage1_weights=str(stage1),
        train_data=str(data / "train.json"),
        eval_data=str(data / "eval.json"),
        image_folder=str(data),
        output_dir=str(output),
        num_workers=0,
        **(defaults | settings),
    )


def test_multi_turn_labels_are_exactly_the_answers_and_their_end_tokens(instruct_data, bpe_tokenizer):
    examples, malformed = load_examples(instruct_data / "train.json")
    assert len(examples) == 24 and sum(malformed.values()) == 3
    batch = Collator(bpe_tokenizer, TemplateName.PHI2_CHAT, 512, 49, 224, instruct_data)(examples[:1])
    labels = batch["labels"][0]
    supervised = [token for token in labels if token != IGNORE_INDEX]
    eos = bpe_tokenizer.eos_token_id
    expected = bpe_tokenizer(" Red.", add_special_tokens=False)["input_ids"] + [eos]
    expected += bpe_tokenizer(" On the left.", add_special_tokens=False)["input_ids"] + [eos]
    assert supervised == expected
    assert batch["pixel_values"].shape == (1, 3, 224, 224)


def test_a_budget_in_positions_keeps_whole_answers_or_drops_and_counts(instruct_data, bpe_tokenizer, capsys):
    example = load_examples(instruct_data / "train.json")[0][0]
    full = Collator(bpe_tokenizer, TemplateName.PHI2_CHAT, 4096, 49, 224, instruct_data)
    first_turn = replace(example, conversation=replace(example.conversation, turns=example.conversation.turns[:1]))
    first_length = len(full.render(first_turn.conversation).input_ids)
    assert first_length > 49  # the image counts as its 49 patch positions
    tight = Collator(bpe_tokenizer, TemplateName.PHI2_CHAT, first_length, 49, 224, instruct_data)
    kept = tight.fit([example, example], "train")
    assert [len(e.conversation.turns) for e in kept] == [1, 1]  # the second turn went whole
    labels = tight(kept)["labels"][0]
    assert labels[-1] == bpe_tokenizer.eos_token_id  # the kept answer ends with its end token
    rendered_again = tight([Example(e.id, e.conversation, e.image) for e in kept])  # fit's rendering is reused
    assert tight(kept)["input_ids"] == rendered_again["input_ids"] and tight(kept)["labels"] == rendered_again["labels"]
    assert Collator(bpe_tokenizer, TemplateName.PHI2_CHAT, first_length - 1, 49, 224).fit([example], "eval") == []
    report = capsys.readouterr().out
    assert "train: 2 conversations cut to their first whole turns and 0 dropped" in report
    assert "eval: 0 conversations cut to their first whole turns and 1 dropped" in report
    with pytest.raises(ValueError, match="over max_length"):
        tight([example])


def greedy_answers(generate, data: Path, count: int = 6) -> list[str]:
    examples, _ = load_examples(data / "train.json")
    answers = []
    for example in examples[:count]:
        question = example.conversation.turns[0].question
        answers.append(generate(question, data / example.image))
    return answers


@pytest.fixture(scope="module")
def qlora_run(instruct_data, stage1_weights, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("stage2") / "run"
    arguments = stage2_config(instruct_data, stage1_weights, output, max_steps=60).command_line("x").split()[3:]
    summary = stage2_instruct.main(arguments)  # the command line, as a user would type it
    assert summary["steps"] == 60
    return output


def test_qlora_run_learns_and_its_weights_answer_like_the_training_model(instruct_data, stage1_weights, qlora_run):
    output = qlora_run
    train = [float(row.split(",")[2]) for row in (output / "log.csv").read_text().splitlines()[1:] if row.split(",")[2]]
    assert sum(train[-3:]) / 3 < 0.5 * sum(train[:3]) / 3, train
    weights = output / "weights"
    assert (weights / "adapter" / "adapter_config.json").is_file()

    # The training model: 4-bit phi-2 + unmerged LoRA + projector, restored from the final checkpoint.
    config = stage2_config(instruct_data, stage1_weights, output)
    manifest = stage2_instruct.instruct_manifest(config)
    model, tokenizer = stage2_instruct.build(config, manifest, resolve_precision("auto"), torch.device("cpu"))
    assert model.language_model.base_model.model.model.layers[0].mlp.fc1.base_layer.weight.dtype == torch.uint8
    trained = torch.load(output / "checkpoint" / "trainer.pt", weights_only=False)["trainable"]
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trained.items():
            parameters[name].copy_(tensor)
    model.eval()
    options = GenerationOptions(max_new_tokens=8)

    def training_model(question, image_path):
        image_embeds = model.encode_images(pixels(model, make_image(image_path)))
        tokens = model.generate(prompt_ids(tokenizer, question), image_embeds, options)
        return tokenizer.decode(tokens, skip_special_tokens=True).lstrip()  # as the assistant shows an answer

    expected = greedy_answers(training_model, instruct_data)
    assert greedy_answers(served_by(weights), instruct_data) == expected
    assert {answer.strip() for answer in expected} <= {"Red.", "Green.", "Blue."}  # it learned to answer


def served_by(weights: Path):
    assistant = Assistant.load(weights, whisper_model=None, precision=Precision.FP32)

    def answer(question, image_path):
        return list(
            assistant.chat([], make_image(image_path), text=question, options=GenerationOptions(max_new_tokens=8))
        )[-1].answer

    return answer


def test_merged_folder_is_a_model_folder_and_serves_the_same_answers(instruct_data, qlora_run, tmp_path):
    merged = merge_adapter.main(
        ["--weights", str(qlora_run / "weights"), "--out", str(tmp_path / "merged"), "--dtype", "float32"]
    )
    assert isinstance(AutoModelForCausalLM.from_pretrained(merged), PhiForCausalLM)
    manifest = Manifest.load(merged)
    assert manifest.language_model == "." and not manifest.adapter and not (merged / "adapter").exists()
    assert greedy_answers(served_by(merged), instruct_data) == greedy_answers(
        served_by(qlora_run / "weights"), instruct_data
    )


def test_evaluation_reports_loss_and_answer_accuracy(instruct_data, qlora_run, tmp_path, capsys):
    weights, data = qlora_run / "weights", instruct_data / "eval.json"
    arguments = ["--weights", str(weights), "--data", str(data), "--image-folder", str(instruct_data)]
    report = evaluate.main([*arguments, "--out", str(tmp_path / "eval.json"), "--max-new-tokens", "8"])
    assert report["conversations"] == 4 and report["short_questions"] == 8
    assert report["exact_match"] >= 0.75 and report["contains_match"] >= report["exact_match"]
    assert report["loss"] < 0.5
    assert json.loads((tmp_path / "eval.json").read_text())["answers"][0]["reference"] == "Red."
    assert "| exact match |" in capsys.readouterr().out


def test_contains_match_is_on_whole_words():
    assert evaluate.contains("red circle on left", "red circle") and evaluate.contains("it is 12", "12")
    assert not evaluate.contains("not sure", "no") and not evaluate.contains("12 cats", "2")
    assert not evaluate.contains("anything", "")


def test_normalisation_for_answer_matching():
    assert evaluate.normalise("  The RED circle!! ") == "red circle"
    assert evaluate.normalise("On the left.") == "on left"


def test_instruction_data_is_validated_with_counts(instruct_data, tmp_path):
    records = json.loads((instruct_data / "train.json").read_text())
    bare = [dict(record, image=record["image"].removeprefix("images/")) for record in records[:5]]
    bare[0] = dict(bare[0], image="missing.png")
    source = tmp_path / "raw.json"
    source.write_text(json.dumps(bare + MALFORMED))
    report = prepare_instruct.prepare(source, instruct_data, tmp_path / "clean.json", "images", verify_images=True)
    assert report["kept"] == 4 and sum(report["skipped"].values()) == 4
    assert report["skipped"]["image missing"] == 1
    clean = json.loads((tmp_path / "clean.json").read_text())
    assert [record["image"] for record in clean] == [f"images/{n}.png" for n in range(1, 5)]


def make_image(path: Path) -> Image.Image:
    return Image.open(path)


def test_a_qlora_run_with_dropout_killed_mid_step_resumes_bit_for_bit(instruct_data, chat_lm, clip_dir, tmp_path):
    """phi-2's dropout (0.1) and LoRA dropout (0.05) on; the run is SIGKILLed after a micro-batch's backward."""
    lm = with_phi2_dropout(chat_lm, tmp_path / "lm")
    stage1 = build_weights_folder(tmp_path / "stage1", lm, clip_dir, adapter=False)
    settings = dict(max_steps=6, save_every=2, eval_every=3, lora_dropout=0.05)

    def command(config: Stage2Config) -> list[str]:
        return [
            sys.executable,
            "-m",
            "training.stage2_instruct",
            *config.command_line("training.stage2_instruct").split()[3:],
        ]

    assert run_killed(command(stage2_config(instruct_data, stage1, tmp_path / "whole", **settings))) == 0
    killed = stage2_config(instruct_data, stage1, tmp_path / "killed", **settings)
    assert run_killed(command(killed), "train-step@5") == -signal.SIGKILL  # in step 3, after the checkpoint of 2
    assert run_killed(command(replace(killed, resume=True))) == 0
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        whole = load_file(tmp_path / "whole" / "weights" / name)
        resumed = load_file(tmp_path / "killed" / "weights" / name)
        assert whole.keys() == resumed.keys() and all(torch.equal(resumed[key], whole[key]) for key in whole)


def test_plain_lora_without_quantisation_trains_and_saves(instruct_data, stage1_weights, tmp_path):
    output = tmp_path / "lora"
    summary = stage2_instruct.run(
        stage2_config(instruct_data, stage1_weights, output, max_steps=6, quantize=False, log_every=1)
    )
    assert summary["steps"] == 6 and (output / "weights" / "adapter" / "adapter_model.safetensors").is_file()
    losses = [
        float(row.split(",")[2]) for row in (output / "log.csv").read_text().splitlines()[1:] if row.split(",")[2]
    ]
    assert len(losses) == 6 and losses[-1] < losses[0]
