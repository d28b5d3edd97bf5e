import shutil
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PhiForCausalLM

from inference.config import Manifest, ManifestError, ProjectorConfig, ProjectorType
from inference.loading import load_weights, save_weights
from inference.projector import build_projector, load_projector, save_projector
from inference.tiny import build_weights_folder, random_lora


def test_weights_folder_round_trips_exactly(tmp_path, phi_dir, clip_dir):
    manifest = Manifest(
        name="round-trip",
        language_model=str(phi_dir),
        vision_model=str(clip_dir),
        image_tokens=49,
        projector=ProjectorConfig(ProjectorType.MLP2X_GELU, 16, 64),
        adapter=True,
        training={"stage": 2},
    )
    torch.manual_seed(0)
    projector = build_projector(manifest.projector)
    lora = random_lora(PhiForCausalLM.from_pretrained(phi_dir), seed=5).eval()
    folder = save_weights(tmp_path / "weights", manifest, projector, lora)

    loaded = load_weights(folder, dtype=torch.float32)
    assert loaded.manifest == manifest
    for name, tensor in projector.state_dict().items():
        assert torch.equal(loaded.model.projector.state_dict()[name], tensor)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = lora(ids).logits
        actual = loaded.model.language_model(ids).logits
    assert not isinstance(loaded.model.language_model, PeftModel)  # merged for inference
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["weights"]  # no staging folder left


def test_saving_over_a_folder_replaces_it_whole(tmp_path, phi_dir, clip_dir):
    folder = build_weights_folder(tmp_path / "weights", phi_dir, clip_dir, adapter=True)
    assert (folder / "adapter").is_dir()
    build_weights_folder(folder, phi_dir, clip_dir, ProjectorType.LINEAR, adapter=False, seed=1)
    assert not (folder / "adapter").exists()
    assert Manifest.load(folder).projector.type is ProjectorType.LINEAR
    assert set(load_file(folder / "projector.safetensors")) == {"weight", "bias"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["weights"]


def test_a_failed_save_leaves_the_old_folder_intact(tmp_path, weights_dir, monkeypatch):
    folder = tmp_path / "weights"
    shutil.copytree(weights_dir, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    manifest = Manifest.load(folder)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("inference.loading.save_projector", fail)
    with pytest.raises(OSError, match="disk full"):
        save_weights(folder, replace(manifest, adapter=False), torch.nn.Linear(1, 1))
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["weights"]


def test_projector_file_must_match_the_manifest(tmp_path):
    path = tmp_path / "projector.safetensors"
    save_projector(build_projector(ProjectorConfig(ProjectorType.LINEAR, 16, 32)), path)
    with pytest.raises(ValueError, match="holds tensors"):
        load_projector(ProjectorConfig(ProjectorType.MLP2X_GELU, 16, 64), path)
    with pytest.raises(ValueError, match="shape"):
        load_projector(ProjectorConfig(ProjectorType.LINEAR, 640, 32), path)


def test_loading_checks_the_manifest_against_the_base_models(tmp_path, weights_dir):
    folder = tmp_path / "weights"
    shutil.copytree(weights_dir, folder)
    manifest = Manifest.load(folder)
    replace(manifest, image_tokens=50).save(folder)
    with pytest.raises(ManifestError, match="49 patches ≠ image_tokens 50"):
        load_weights(folder)

    manifest.save(folder)
    shutil.rmtree(folder / "adapter")
    with pytest.raises(ManifestError, match="adapter"):
        load_weights(folder)
    with pytest.raises(ManifestError, match="does not exist"):
        load_weights(tmp_path / "missing")


def test_int8_files_are_written_one_group_at_a_time_as_standard_safetensors(tmp_path):
    from inference.int8_files import _write_safetensors

    first = {"a": torch.randn(3, 5).bfloat16(), "b": torch.tensor(7, dtype=torch.int64)}
    second = {"c": torch.tensor([True, False]), "d": torch.randint(-128, 127, (4, 2), dtype=torch.int8)}
    made = []
    groups = [lambda: made.append(1) or first, lambda: made.append(2) or second]
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, groups, ["a", "b", "c", "d", "never made"], {"format": "x"})
    assert made == [1, 2]
    loaded = load_file(path)  # safetensors' own reader checks the header, the offsets and the size
    assert loaded.keys() == first.keys() | second.keys()
    assert all(torch.equal(loaded[key], value) for key, value in (first | second).items())
    with pytest.raises(ValueError, match="not one of the expected"):
        _write_safetensors(path, groups, ["a", "b"], {})
