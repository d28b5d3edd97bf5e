import json

import pytest

from inference.config import (
    GenerationOptions,
    Manifest,
    ManifestError,
    ProjectorConfig,
    ProjectorType,
    TemplateName,
)


def test_manifest_round_trips_through_json(tmp_path):
    manifest = Manifest(
        name="run-7",
        vision_feature_layer=-1,
        projector=ProjectorConfig(ProjectorType.LINEAR, 640, 2560),
        template=TemplateName.PLAIN,
        adapter=True,
        training={"stage": 1, "steps": 10_000},
    )
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["projector"] == {"type": "linear", "in_features": 640, "out_features": 2560}
    assert saved["template"] == "plain"
    assert list(tmp_path.iterdir()) == [tmp_path / "manifest.json"]  # no temp file left behind


def test_defaults_describe_tinyclip_and_phi2():
    manifest = Manifest()
    assert manifest.language_model == "microsoft/phi-2"
    assert manifest.vision_model == "wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M"
    assert (manifest.image_tokens, manifest.projector.in_features, manifest.projector.out_features) == (49, 640, 2560)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"projector": {"type": "mlp3x", "in_features": 640, "out_features": 2560}}, "projector.type must be one of"),
        ({"projector": {"type": "linear", "in_features": 0, "out_features": 2560}}, "in_features"),
        ({"template": "chatml"}, "template must be one of"),
        ({"image_tokens": -1}, "image_tokens"),
        ({"language_model": ""}, "language_model"),
        ({"adapter": "yes"}, "adapter"),
        ({"format": 99}, "format 99"),
        ({"projector_type": "linear"}, "unknown fields"),
    ],
)
def test_invalid_manifests_fail_with_a_clear_message(tmp_path, change, message):
    data = Manifest().to_dict() | change
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(tmp_path)


def test_missing_or_broken_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_generation_options_are_greedy_by_default_and_validated():
    assert GenerationOptions().generate_kwargs() == {
        "max_new_tokens": 256,
        "do_sample": False,
        "repetition_penalty": 1.0,
    }
    sampled = GenerationOptions(temperature=0.7, top_p=0.9).generate_kwargs()
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"repetition_penalty": 0.5}):
        with pytest.raises(ValueError):
            GenerationOptions(**bad)
