"""Weights in and out: model cards, pushing (against a stand-in for HfApi), Hub ids, the original checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionModel, PhiForCausalLM

import app
from inference import Assistant, GenerationOptions, hub, original
from inference import assistant as assistant_module
from inference.assistant import choose_weights
from inference.backends.pytorch import TorchBackend
from inference.cards import weights_card
from inference.config import PHI2_ID, TINYCLIP_ID, Manifest, ManifestError, ProjectorConfig, TemplateName
from inference.loading import load_weights
from inference.projector import PROJECTOR_FILE
from inference.tiny import random_lora
from inference.vision import preprocess
from tests.kit import make_shape_image
from training import hub_upload, push

TOKEN = "hf_SecretToken0123456789abcdef"


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def saved(weights_dir, tmp_path) -> Path:
    """A saved weights folder with its card, as training leaves it."""
    folder = tmp_path / "weights"
    shutil.copytree(weights_dir, folder)
    (tmp_path / "log.csv").write_text("step,train_loss\n1,2.0\n")
    hub_upload.complete_folder(folder, tmp_path, weights_card(folder, {"steps": 1, "final_train_loss": 2.0}))
    return folder


def test_save_load_round_trip_is_exact(weights_dir, tmp_path):
    from inference.loading import save_weights

    loaded = load_weights(weights_dir, dtype=torch.float32)
    copy = save_weights(
        tmp_path / "copy", loaded.manifest, loaded.model.projector, adapter_files=weights_dir / "adapter"
    )
    assert Manifest.load(copy) == loaded.manifest
    assert folder_digest(copy) == folder_digest(weights_dir)
    reloaded = load_weights(copy, dtype=torch.float32)
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reloaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_model_card_names_the_base_models_and_hub_metadata(tmp_path):
    manifest = Manifest(name="stage2", projector=ProjectorConfig(), adapter=True, training={"stage": "stage2_instruct",
                        "command": "python -m training.stage2_instruct --lr 2e-4"})  # fmt: skip
    manifest.save(tmp_path)
    card = weights_card(tmp_path, {"steps": 100, "final_eval_loss": 1.25}, ("liuhaotian/LLaVA-Instruct-150K",))
    metadata = card_metadata(card)
    assert metadata["base_model"] == [PHI2_ID, TINYCLIP_ID]
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["datasets"] == ["liuhaotian/LLaVA-Instruct-150K"] and metadata["license"] == "mit"
    assert "python -m training.stage2_instruct --lr 2e-4" in card and "| final_eval_loss | 1.25 |" in card


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records what would be uploaded, fails as told."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        if self.failures:
            raise self.failures.pop(0)
        self.commits.append((repo_id, commit_message, folder_digest(Path(folder_path))))


def test_push_uploads_exactly_the_folder_in_one_commit(saved):
    fake, logged = FakeHub(), []
    url = hub_upload.push_folder(saved, "me/tiny", private=True, api=fake, log=logged.append)
    assert url == "https://huggingface.co/me/tiny"
    assert fake.repos == [("me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert len(fake.commits) == 1 and fake.commits[0][2] == folder_digest(saved)
    assert {"README.md", "manifest.json", "log.csv", "adapter/adapter_config.json"} <= set(fake.commits[0][2])
    assert logged == [f"pushed {saved} to {url}"]


def test_failing_push_is_retried_then_reported_without_the_token(saved, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = folder_digest(saved)
    flaky = FakeHub([ConnectionError(f"reset (Authorization: Bearer {TOKEN})")])
    waits = []
    hub_upload.push_folder(saved, "me/tiny", api=flaky, wait=waits.append)
    assert len(flaky.commits) == 1 and waits == [2.0]

    down = FakeHub([TimeoutError(f"timed out for {TOKEN}")] * hub_upload.PUSH_ATTEMPTS)
    with pytest.raises(hub_upload.PublishError) as raised:
        hub_upload.push_folder(saved, "me/tiny", api=down, wait=waits.append)
    message = str(raised.value)
    assert f"after {hub_upload.PUSH_ATTEMPTS} attempts" in message and "folder is intact" in message
    assert "python -m training.push" in message
    assert TOKEN not in message and TOKEN not in capsys.readouterr().out
    assert folder_digest(saved) == before and not down.commits


def test_errors_a_retry_cannot_fix_fail_at_once(saved):
    refused = FakeHub([PermissionError("403 Forbidden: you cannot write to me/tiny")])
    with pytest.raises(hub_upload.PublishError, match=r"after 1 attempt\)"):
        hub_upload.push_folder(saved, "me/tiny", api=refused, wait=lambda seconds: pytest.fail("retried"))
    with pytest.raises(hub_upload.PublishError, match="not a Hub repo id"):
        hub_upload.push_folder(saved, "not a repo", api=FakeHub())


def test_push_command_pushes_an_existing_folder(saved, monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub_upload, "HfApi", lambda: fake)
    assert push.main([str(saved), "me/tiny", "--message", "by hand"]) == "https://huggingface.co/me/tiny"
    assert fake.commits[0][1] == "by hand"


def test_references_to_hub_repos():
    assert hub.parse_reference("me/weights") == ("me/weights", None)
    assert hub.parse_reference("me/weights@v1.0") == ("me/weights", "v1.0")
    for not_a_repo in ("weights", "runs/stage2/weights", "./me/weights", "/abs/path"):
        assert hub.parse_reference(not_a_repo) is None


def fake_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef") -> None:
    """The Hub cache layout that `snapshot_download` leaves: a snapshot per commit and a ref to it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_once_downloaded_loads_offline(weights_dir, tmp_path):
    fake_hub_cache(tmp_path, "me/tiny-weights", weights_dir)
    folder = hub.resolve_weights("me/tiny-weights", cache_dir=tmp_path)  # HF_HUB_OFFLINE=1 in the tests
    assert folder.name == "0123456789abcdef" and Manifest.load(folder).name == "tiny-test-weights"
    with pytest.raises(ManifestError, match="could not be fetched"):
        hub.resolve_weights("me/never-downloaded", cache_dir=tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        hub.resolve_weights(tmp_path / "missing")


def test_base_models_are_pinned_to_the_commit_they_were_loaded_from_and_served_from_it(
    gpt2_phi_dir, clip_dir, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    from inference.assistant import start_references
    from inference.config import ProjectorType
    from inference.loading import new_manifest, save_weights
    from inference.projector import build_projector

    cache = tmp_path / "hub"
    phi_commit, clip_commit = "a" * 40, "b" * 40
    fake_hub_cache(cache, "someone/phi", gpt2_phi_dir, phi_commit)
    fake_hub_cache(cache, "someone/clip", clip_dir, clip_commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    manifest = new_manifest("pinned", "someone/phi", "someone/clip", -2, ProjectorType.LINEAR, TemplateName.PHI2_CHAT)
    assert manifest.language_model == f"someone/phi@{phi_commit}"
    assert manifest.vision_model == f"someone/clip@{clip_commit}"
    weights = save_weights(tmp_path / "weights", manifest, build_projector(manifest.projector))
    assert start_references(weights) == [manifest.language_model, manifest.vision_model]  # what the Space preloads
    for repo in ("someone--phi", "someone--clip"):  # the repos move on: main is now a commit not downloaded
        (cache / f"models--{repo}" / "refs" / "main").write_text("c" * 40)
    loaded = load_weights(weights)  # offline, from the pinned snapshots
    assert loaded.manifest.language_model == f"someone/phi@{phi_commit}"
    card = weights_card(weights)
    assert "- someone/phi\n" in card and f"someone/phi@{phi_commit}" in card  # metadata: the repo id
    assert hub.model_source("someone/phi") == "someone/phi" and hub.pin_revision(str(gpt2_phi_dir)) == str(gpt2_phi_dir)


@pytest.fixture(scope="module")
def original_checkpoint(gpt2_phi_dir, clip_dir, tmp_path_factory) -> Path:
    """A checkpoint in the original project's exact format, at tiny dimensions (old peft: adapter_model.bin)."""
    space = tmp_path_factory.mktemp("original-space")
    folder = space / "model_chkpt"
    folder.mkdir()
    vision_width = CLIPVisionModel.from_pretrained(clip_dir).config.hidden_size
    text_width = PhiForCausalLM.from_pretrained(gpt2_phi_dir).config.hidden_size
    torch.manual_seed(1)
    torch.save(torch.nn.Linear(vision_width, text_width).state_dict(), folder / "ft_projection.pth")
    lora = random_lora(PhiForCausalLM.from_pretrained(gpt2_phi_dir), seed=2)
    lora.save_pretrained(folder / "qlora_adaptor")
    adapter = folder / "qlora_adaptor"
    state = load_file(adapter / "adapter_model.safetensors")
    torch.save(state, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": PHI2_ID}))
    return space


def original_answer(space: Path, phi_dir: Path, clip_dir: Path, image, question: str, tokens: int) -> list[int]:
    """The original project's inference, re-implemented directly: no template, full recompute, greedy."""
    tokenizer = AutoTokenizer.from_pretrained(phi_dir)
    merged = PeftModel.from_pretrained(
        PhiForCausalLM.from_pretrained(phi_dir), space / "model_chkpt" / "qlora_adaptor"
    ).merge_and_unload()
    clip = CLIPVisionModel.from_pretrained(clip_dir)
    state = torch.load(space / "model_chkpt" / "ft_projection.pth", weights_only=True)
    projection = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    projection.load_state_dict(state)
    embed = merged.get_input_embeddings()
    with torch.no_grad():
        pixels = preprocess([image], clip.config.image_size)
        image_embeds = projection(clip(pixel_values=pixels).last_hidden_state[:, 1:, :])
        separator = embed(torch.tensor([[23893]]))
        question_embeds = embed(tokenizer(question, return_tensors="pt")["input_ids"])
        sequence = torch.cat([image_embeds, separator, question_embeds], dim=1)
        answer = []
        for _ in range(tokens):
            token = merged(inputs_embeds=sequence).logits[0, -1].argmax()
            if token.item() == tokenizer.eos_token_id:
                break
            answer.append(token.item())
            sequence = torch.cat([sequence, embed(token.view(1, 1))], dim=1)
    return answer


def test_imported_original_checkpoint_answers_as_the_original_did(
    original_checkpoint, gpt2_phi_dir, clip_dir, tmp_path
):
    folder = original.import_original(
        original_checkpoint, tmp_path / "imported", language_model=str(gpt2_phi_dir), vision_model=str(clip_dir)
    )
    manifest = Manifest.load(folder)
    assert manifest.template is TemplateName.ORIGINAL and manifest.vision_feature_layer == -1
    assert manifest.projector.type.value == "linear" and (folder / PROJECTOR_FILE).is_file()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "README.md").is_file()

    loaded = load_weights(folder, dtype=torch.float32)
    assistant = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    image, question, tokens = make_shape_image("red"), "What is in the picture?", 12
    *_, reply = assistant.chat([("earlier?", "ignored")], image, question, options=GenerationOptions(tokens))
    expected = original_answer(original_checkpoint, gpt2_phi_dir, clip_dir, image, question, tokens)
    assert len(expected) > 0
    assert reply.answer == loaded.tokenizer.decode(expected).lstrip()  # shown without a leading space


def test_the_original_answers_50_tokens_by_default_and_its_import_records_the_space_commit(
    original_checkpoint, gpt2_phi_dir, clip_dir, tmp_path
):
    models = dict(language_model=str(gpt2_phi_dir), vision_model=str(clip_dir))
    notes = []
    folder = original.import_original(original_checkpoint, tmp_path / "imported", revision="aaa111", **models)
    manifest = Manifest.load(folder)
    assert manifest.generation.max_new_tokens == 50 and manifest.training["source_revision"] == "aaa111"
    loaded = load_weights(folder, dtype=torch.float32)
    assistant = Assistant(TorchBackend(loaded.model), loaded.tokenizer, loaded.manifest)
    image, question = make_shape_image("red"), "What is in the picture?"
    *_, reply = assistant.chat([], image, question)  # no options given: the weights' own
    *_, fifty = assistant.chat([], image, question, options=GenerationOptions(max_new_tokens=50))
    *_, longer = assistant.chat([], image, question, options=GenerationOptions(max_new_tokens=60))
    assert reply.answer == fifty.answer != longer.answer  # the random weights never stop by themselves
    demo_config = app.build_demo(assistant).config
    sliders = [c["props"] for c in demo_config["components"] if c["props"].get("label") == "Max new tokens"]
    assert sliders[0]["value"] == 50  # the app's setting starts from the weights' default

    original.import_original(original_checkpoint, folder, revision="aaa111", log=notes.append, **models)
    assert notes == []  # the same commit again: nothing to say
    original.import_original(original_checkpoint, folder, revision="bbb222", log=notes.append, **models)
    assert notes == ["the original Space's checkpoint changed since the last import (aaa111 → bbb222): re-imported"]
    assert Manifest.load(folder).training["source_revision"] == "bbb222"


def test_an_adapter_whose_tensors_fit_no_module_is_refused(weights_dir, tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(weights_dir, folder)
    path = folder / "adapter" / "adapter_model.safetensors"
    renamed = {name.replace("q_proj", "query"): tensor for name, tensor in load_file(path).items()}
    save_file(renamed, path)  # as an adapter made for a model that names its attention differently
    refused = pytest.raises(ManifestError, match=r"4 of the 24 tensors of the adapter .* fit no module")
    with pytest.warns(UserWarning, match="missing adapter keys"), refused:  # peft itself only warns
        load_weights(folder, dtype=torch.float32)


def test_a_broken_original_checkpoint_is_refused(tmp_path):
    (tmp_path / "model_chkpt" / "qlora_adaptor").mkdir(parents=True)
    (tmp_path / "model_chkpt" / "qlora_adaptor" / "adapter_config.json").write_text("{}")
    torch.save({"weight": torch.zeros(4, 3)}, tmp_path / "model_chkpt" / "ft_projection.pth")
    with pytest.raises(ManifestError, match="not a Linear layer"):
        original.import_original(tmp_path, tmp_path / "out")
    with pytest.raises(ManifestError, match="does not hold"):
        original.import_original(tmp_path / "elsewhere", tmp_path / "out")


def test_app_defaults_to_trained_weights_then_the_original_then_says_what_to_do(
    weights_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(assistant_module, "DEFAULT_WEIGHTS", tmp_path / "weights")  # no manifest yet
    monkeypatch.setattr(original, "DEFAULT_FOLDER", tmp_path / "original")  # nothing imported, offline
    monkeypatch.delenv("WEIGHTS", raising=False)
    with pytest.raises(SystemExit) as stopped:
        app.main([])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1 and "could not be downloaded" in message
    assert all(advice in message for advice in ("Train", "--weights", "--demo"))

    shutil.copytree(weights_dir, tmp_path / "original")  # as if imported on an earlier, online start
    assert choose_weights(None) == tmp_path / "original"
    shutil.copytree(weights_dir, tmp_path / "weights")  # trained weights take precedence
    assert choose_weights(None) == tmp_path / "weights"
    assert choose_weights("me/repo") == "me/repo"
