"""Pretraining from scratch on real text (this Python's standard library): data preparation, learning, resume.

The corpus is the standard library's own modules (code) and their docstrings (English documentation),
in all three input formats. Training runs use the test kit's tiny byte-level BPE (512 ids) so that a few
hundred steps fit in seconds on a CPU; the preparation test also packs GPT-2's genuine BPE, phi's
vocabulary, whose ids need all 16 bits.
"""

from __future__ import annotations

import ast
import csv
import json
import sysconfig
import typing
from pathlib import Path

import bitsandbytes
import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PhiForCausalLM

from benchmarks import pretrain_gpu
from inference.cli import UsageError
from tests.kit import killed_at_step
from training import hub_upload, prepare_text, pretrain
from training.config import parse_config
from training.optim import build_optimizer
from training.pretrain import PretrainConfig
from training.text_shards import split_held_out
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODULES = 90  # standard-library modules in the corpus: ~1.5 M byte-level tokens of code


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much when another process holds the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stdlib_modules() -> list[tuple[str, str]]:
    """(name, source) of the first top-level standard-library modules that parse, in name order."""
    modules = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            ast.parse(text)
        except SyntaxError:
            continue
        modules.append((path.stem, text))
        if len(modules) == MODULES:
            return modules
    raise AssertionError(f"this Python's standard library has fewer than {MODULES} modules")


def docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = [tree, *(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef))]
    return [text for node in nodes if (text := ast.get_docstring(node)) and len(text) > 40]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, typing.Any]:
    """Code as .txt files and a .parquet file; documentation (docstrings, each once) as .jsonl."""
    folder = tmp_path_factory.mktemp("stdlib")
    modules = stdlib_modules()
    (folder / "code").mkdir()
    for name, text in modules[::2]:
        (folder / "code" / f"{name}.txt").write_text(text)
    rest = [text for _, text in modules[1::2]]
    pyarrow.parquet.write_table(pyarrow.table({"content": rest}), folder / "more_code.parquet")
    docs = list(dict.fromkeys(doc for _, text in modules for doc in docstrings(text)))
    with open(folder / "docs.jsonl", "w") as file:
        for number, doc in enumerate(docs):
            file.write(json.dumps({"id": number, "content": doc}) + "\n")
    code = [text for _, text in modules]
    return {"code": code, "docs": docs, "folder": folder}


@pytest.fixture(scope="module")
def tokenizer_dir(bpe_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    bpe_tokenizer.save_pretrained(folder)
    return folder


def prepare(sources, tokenizer, out: Path, **settings) -> dict:
    folder = sources["folder"]
    code, docs = f"code={folder / 'code'}", f"docs={folder / 'docs.jsonl'}"
    return prepare_text.prepare(
        [code, f"code={folder / 'more_code.parquet'}", docs],
        out,
        weights=["code=0.8", "docs=0.2"],
        text_field="content",
        tokenizer=str(tokenizer),
        held_out=0.05,
        **settings,
    )


@pytest.fixture(scope="module")
def corpus(sources, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare(sources, tokenizer_dir, out)
    return out


def read_tokens(folder: Path, meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(training tokens, held-out tokens) of a prepared corpus, straight from its files."""
    train = np.concatenate([np.fromfile(folder / shard["file"], dtype=np.uint16) for shard in meta["train"]])
    held_out = meta["held_out"]["file"]
    return train, None if held_out is None else np.fromfile(folder / held_out, dtype=np.uint16)


def split_documents(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """A packed stream cut after each end-of-text: its documents, each with its end-of-text."""
    ends = np.flatnonzero(tokens == eos) + 1
    return [tuple(document.tolist()) for document in np.split(tokens, ends[:-1])]


def test_preparation_packs_the_mixture_and_holds_out_whole_documents(corpus, sources, bpe_tokenizer):
    meta = json.loads((corpus / "meta.json").read_text())
    code, docs = meta["sources"]["code"], meta["sources"]["docs"]
    assert code["files"] == MODULES // 2 + 1 and code["documents"] == MODULES
    assert docs["documents"] == len(sources["docs"]) and docs["documents_used"] == docs["documents"]
    # The scarce source (docs) is used whole; code is cut to 80 % of the mixture, to within one module.
    assert docs["share"] == pytest.approx(0.2, abs=0.02) and code["share"] == pytest.approx(0.8, abs=0.02)
    assert code["documents_used"] < code["documents"]
    train, held_out = read_tokens(corpus, meta)
    assert len(train) == meta["train_tokens"] > 100_000 and len(held_out) == meta["held_out_tokens"] > 0
    assert held_out.max() < len(bpe_tokenizer) and train.max() < len(bpe_tokenizer)
    eos = bpe_tokenizer.eos_token_id
    assert train[-1] == eos and held_out[-1] == eos  # whole documents only
    trained, evaluated = split_documents(train, eos), split_documents(held_out, eos)
    assert len(trained) + len(evaluated) == code["documents_used"] + docs["documents_used"]
    assert not set(trained) & set(evaluated)  # no document on both sides
    # Byte-level BPE is lossless: every held-out document decodes back to one of the sources' texts.
    texts = {*sources["code"], *sources["docs"]}
    assert all(bpe_tokenizer.decode(document[:-1]) in texts for document in evaluated)


def test_one_text_file_still_gets_held_out_tokens_cut_inside_it(sources, gpt2_tokenizer, tmp_path):
    """A new user's corpus: one .txt file, one document. Whole-document held-out would take nothing."""
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    book = tmp_path / "book.txt"
    book.write_text("\n".join(sources["docs"][:40]))
    meta = prepare_text.prepare([str(book)], tmp_path / "out", tokenizer=str(tmp_path / "gpt2"), held_out=0.05)
    train, held_out = read_tokens(tmp_path / "out", meta)
    document = gpt2_tokenizer(book.read_text(), add_special_tokens=False)["input_ids"] + [50256]
    assert len(held_out) == round(0.05 * len(document))
    assert [*held_out, *train] == document  # its head held out, the rest trained on, nothing lost or repeated


def test_held_out_takes_whole_documents_where_they_allow_it():
    lengths = np.array([100] * 50)
    held_out, training = split_held_out(lengths, np.arange(50), 0.1)
    assert held_out == [(i, 0, 100) for i in range(5)] and len(training) == 45
    held_out, training = split_held_out(np.array([5000, 100, 100]), np.arange(3), 0.01)
    assert held_out == [(0, 0, 52)] and training[0] == (0, 52, 5000)  # one document is 96 % of the tokens


def test_phi_vocabulary_ids_survive_uint16_packing(sources, gpt2_tokenizer, tmp_path):
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in sources["docs"][:40]))
    meta = prepare_text.prepare(
        [str(docs)], tmp_path / "out", tokenizer=str(tmp_path / "gpt2"), held_out=0, shard_tokens=1000
    )
    assert meta["sources"]["docs"]["documents"] == 40 and meta["held_out"]["tokens"] == 0
    assert len(meta["train"]) == -(-meta["train_tokens"] // 1000) > 1  # shards of 1,000 tokens
    train, held_out = read_tokens(tmp_path / "out", meta)
    assert held_out is None
    expected = [gpt2_tokenizer(doc, add_special_tokens=False)["input_ids"] + [50256] for doc in sources["docs"][:40]]
    assert sorted(split_documents(train, 50256)) == sorted(map(tuple, expected))
    assert train.max() == 50256 > 2**15  # would be negative as int16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "nowhere/at/all"], "does not exist"),
        (["--source", "a=README.md"], "unsupported file type"),
        (["--source", "x=tests/kit.py", "--weights", "y=1"], "must be exactly the sources"),
        (["--source", "hf:nobody/nothing"], "could not fetch the Hub dataset 'nobody/nothing'"),
    ],
)
def test_preparation_refuses_bad_sources_with_a_reason(args, message, tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        prepare_text.main([*args, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err


def test_preparation_will_not_overwrite_a_corpus_unasked(corpus, sources, tokenizer_dir):
    with pytest.raises(UsageError, match="--overwrite"):
        prepare(sources, tokenizer_dir, corpus)


def test_defaults_and_yaml_are_the_original_recipe():
    defaults = parse_config(pretrain.PretrainConfig, ["--data", "d"])
    recipe = ROOT / "training/configs/pretrain_original.yaml"
    original = parse_config(pretrain.PretrainConfig, ["--config", str(recipe), "--data", "d"])
    for config in (defaults, original):
        schedule = (config.optimizer, config.lr, config.lr * config.min_lr_ratio, config.warmup_steps)
        assert schedule == ("adam8bit", 6e-3, pytest.approx(6e-6), 2000)
        assert config.warmup_for(4000) == 2000
        assert (config.weight_decay, config.betas, config.max_grad_norm) == (0.1, (0.9, 0.95), 1.0)
        assert (config.batch_size, config.accumulation_steps(1), config.size) == (1, 4, "phi-1.5")
    assert yaml.safe_load((ROOT / "training/configs/pretrain_original.yaml").read_text())["max_steps"] == 4000
    optimizer = build_optimizer(defaults, [{"params": [torch.nn.Parameter(torch.zeros(8))]}])
    assert type(optimizer) is bitsandbytes.optim.Adam8bit


def test_phi_1_5_shape_and_initialisation():
    real = pretrain.build_model(pretrain.phi_config("phi-1.5", 51200, 50256), torch.device("meta"))
    assert sum(p.numel() for p in real.parameters()) == 1_418_270_720  # phi-1.5's published size
    config = real.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 24, 32)
    assert (config.intermediate_size, config.vocab_size) == (8192, 51200)
    assert config.rope_parameters["partial_rotary_factor"] == 0.5 and not config.tie_word_embeddings
    assert pretrain.flops_per_token(real, 2048) == pytest.approx(9.09e9, rel=1e-3)
    torch.manual_seed(0)
    tiny = pretrain.build_model(pretrain.phi_config("tiny", 51200, 50256), torch.device("cpu"))
    layer = tiny.model.layers[0]
    assert layer.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.fc2.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # 1/√(2 · 2 layers)
    assert layer.self_attn.dense.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.mlp.fc1.bias == 0)
    assert pretrain.peak_flops(torch.device("cpu"), "no") is None
    assert pretrain.peak_flops(torch.device("cpu"), "no", peak_tflops=2.0) == 2e12


def train_config(corpus: Path, output: Path, **settings) -> PretrainConfig:
    defaults = dict(size="tiny", vocab_size=0, block_size=64, global_batch_size=8, batch_size=4, lr=6e-3)
    defaults |= dict(warmup_steps=20, log_every=10, eval_batches=8, samples=1, num_workers=0)
    return PretrainConfig(data=str(corpus), output_dir=str(output), **(defaults | settings))


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    commits: typing.ClassVar[list[tuple[str, str, list[str]]]] = []

    def create_repo(self, repo_id, **kwargs):
        pass

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.commits.append((repo_id, commit_message, files))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A few hundred Adam8bit steps of the tiny phi, pushed to a fake Hub, and the trainer that ran them."""
    output = tmp_path_factory.mktemp("run")
    trainers, real_fit, real_api = [], Trainer.fit, hub_upload.HfApi

    def fit(self):
        trainers.append(self)
        return real_fit(self)

    Trainer.fit, hub_upload.HfApi = fit, FakeHub
    try:
        config = train_config(corpus, output, max_steps=300, eval_every=100, save_every=300, peak_tflops=0.05)
        arguments = config.command_line("training.pretrain").split()[3:]
        summary = pretrain.main([*arguments, "--push-to-hub", "me/tiny-phi"])  # the command line a user types
    finally:
        Trainer.fit, hub_upload.HfApi = real_fit, real_api
    return output, summary, trainers[0]


def test_pretraining_lowers_held_out_loss_with_8bit_adam(trained, bpe_tokenizer):
    output, summary, trainer = trained
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert type(optimizer) is bitsandbytes.optim.Adam8bit
    embedding = trainer.unwrapped.model.embed_tokens.weight
    state = optimizer.state[embedding]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8  # both moments in 8 bits
    assert state["state1"].shape == embedding.shape and state["qmap1"].numel() == 256
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]

    rows = read_log(output / "log.csv")
    evals = [(int(row["step"]), float(row["eval_loss"])) for row in rows if row["eval_loss"]]
    assert [step for step, _ in evals] == [0, 100, 200, 300]
    start, end = evals[0][1], evals[-1][1]
    assert start == pytest.approx(np.log(len(bpe_tokenizer)), abs=0.3)  # untrained: about uniform
    assert end < start - 2.5 and end < evals[1][1], evals  # ~6.1 → ~3.2, still falling after step 100
    assert summary["final_eval_loss"] == pytest.approx(end)
    training = [row for row in rows if row["train_loss"]]
    assert len(training) == 30 and all(float(row["tokens_per_s"]) > 0 for row in training)
    # MFU = tokens/s × FLOPs per token / peak (here a stated 0.05 TFLOP/s for the CPU).
    row = training[-1]
    expected = float(row["tokens_per_s"]) * summary["flops_per_token"] / 0.05e12
    assert float(row["mfu"]) == pytest.approx(expected, rel=0.01, abs=1e-4)
    assert summary["tokens_per_s"] > 0 and summary["mfu"] > 0
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [sample["step"] for sample in samples] == [0, 100, 200, 300]
    assert all(sample["prompt"] and sample["reference"] for sample in samples)
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_saved_folder_is_a_transformers_model_that_generates(trained):
    output, summary, _ = trained
    folder = output / "model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is PhiForCausalLM and model.config.hidden_size == 64
    trained_weights = torch.load(output / "checkpoint" / "trainer.pt", weights_only=False)["trainable"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained_weights[name], rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("def main(argv=None):\n    ", return_tensors="pt")
    output_ids = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output_ids.shape[1] > prompt["input_ids"].shape[1]
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "library_name: transformers" in card
    assert "base_model" not in card and "python -m training.pretrain" in card
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "log.csv", "loss.png"):
        assert (folder / name).is_file(), name
    assert json.loads((output / "run.json").read_text())["parameters"] == summary["parameters"]
    # --push-to-hub uploaded that same folder, complete, in one commit.
    [(repo_id, message, files)] = FakeHub.commits
    assert repo_id == "me/tiny-phi" and message == "Final weights at step 300"
    assert files == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_resumed_pretraining_ends_where_an_uninterrupted_run_does(corpus, tmp_path):
    settings = dict(max_steps=8, save_every=4, eval_every=4, log_every=1)
    pretrain.run(train_config(corpus, tmp_path / "whole", **settings))

    interrupted = tmp_path / "interrupted"
    with killed_at_step(6), pytest.raises(KeyboardInterrupt):
        pretrain.run(train_config(corpus, interrupted, **settings))
    assert torch.load(interrupted / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 4
    pretrain.run(train_config(corpus, interrupted, resume=True, **settings))

    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(interrupted / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)

    def losses(folder):
        return [(row["step"], row["train_loss"], row["eval_loss"], row["lr"]) for row in read_log(folder / "log.csv")]

    assert losses(interrupted) == losses(tmp_path / "whole")


def test_the_gpu_benchmark_refuses_to_run_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/pretrain_gpu.py itself")
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpu.main([])
    assert "needs a CUDA GPU" in str(exit_info.value)


def test_the_gpu_benchmark_path_runs_on_the_cpu_at_a_tiny_size(gpt2_tokenizer, tmp_path):
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    arguments = ["--cpu-smoke", "--size", "tiny", "--steps", "2", "--block-size", "64"]
    rows = pretrain_gpu.main([*arguments, "--tokenizer", str(tmp_path / "gpt2"), "--results", str(results)])
    assert [row["gradient_checkpointing"] for row in rows] == [False, True]
    assert all(row["tokens_per_s"] > 0 and row["steps"] == 2 for row in rows)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n") and "| off |" in text and "| on |" in text and "CPU" in text
