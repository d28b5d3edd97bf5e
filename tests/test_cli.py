"""Every entry point reports a user's mistake the same way: one line naming the flag or file, exit status 2.

And each command line reaches its typed entry point with the flags as given (the other tests call the
typed functions directly: `prepare(...)`, `run(Config(...))`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import app
from training import (
    cache_features,
    evaluate,
    import_original,
    merge_adapter,
    prepare_coco,
    prepare_instruct,
    prepare_text,
    pretrain,
    push,
    stage1_align,
    stage2_instruct,
)

MISSING = "/no/such/place"


def cases(tmp: Path) -> list[tuple[object, list[str], str]]:
    """(entry point, arguments with one mistake, what the one line must name)."""
    data = ["--train-data", f"{MISSING}/train.json", "--image-folder", str(tmp)]
    (tmp / "empty.json").write_text("[]")
    (tmp / "doc.txt").write_text("A document.")
    readable = ["--train-data", str(tmp / "empty.json"), "--image-folder", str(tmp)]
    return [
        (app, ["--weights", MISSING], MISSING),
        (app, ["--precision", "int4"], "--precision"),
        (stage1_align, data, f"{MISSING}/train.json"),
        (stage1_align, [*data, "--lr", "0"], "--lr"),
        (stage1_align, [*data, "--lr", "fast"], "--lr"),
        (stage1_align, ["--image-folder", str(tmp)], "--train-data"),
        (stage1_align, [*data, "--config", f"{MISSING}/recipe.yaml"], f"{MISSING}/recipe.yaml"),
        (stage1_align, [*readable, "--language-model", MISSING], f"language model '{MISSING}'"),
        (stage1_align, [*readable, "--language-model", "nobody/no-such-model"], "nobody/no-such-model"),
        (stage2_instruct, ["--stage1-weights", MISSING, *data], MISSING),
        (stage2_instruct, [*data, "--lora-r", "0", "--stage1-weights", "x"], "--lora-r"),
        (pretrain, ["--data", MISSING], MISSING),
        (pretrain, ["--data", "x", "--block-size", "4096"], "--block-size"),
        (prepare_text, ["--source", MISSING, "--out", str(tmp / "corpus")], MISSING),
        (prepare_text, ["--source", "x", "--out", str(tmp), "--held-out", "1.5"], "--held-out"),
        (
            prepare_text,
            ["--source", str(tmp / "doc.txt"), "--out", str(tmp / "c"), "--tokenizer", MISSING],
            "--tokenizer",
        ),
        (prepare_coco, ["--coco-dir", MISSING, "--out", str(tmp)], MISSING),
        (prepare_instruct, ["--data", f"{MISSING}.json", "--image-folder", str(tmp), "--out", "x"], MISSING),
        (cache_features, ["--data", f"{MISSING}.json", "--image-folder", str(tmp), "--out", str(tmp)], MISSING),
        (evaluate, ["--weights", MISSING, "--data", "x.json", "--image-folder", str(tmp)], MISSING),
        (merge_adapter, ["--weights", MISSING, "--out", str(tmp / "merged")], MISSING),
        (push, [MISSING, "me/weights"], MISSING),
        (push, [str(tmp), "not a repo"], "not a repo"),
        (import_original, ["--checkpoint", MISSING, "--out", str(tmp / "imported")], MISSING),
    ]


@pytest.mark.parametrize("case", range(len(cases(Path("/tmp")))))
def test_a_mistake_is_one_line_naming_the_flag_or_file_and_exit_status_2(case, tmp_path, capsys):
    entry_point, arguments, named = cases(tmp_path)[case]
    with pytest.raises(SystemExit) as stopped:
        entry_point.main(arguments)
    assert stopped.value.code == 2
    output = capsys.readouterr()
    lines = output.err.strip().splitlines()
    assert len(lines) == 1, output.err
    program = "app" if entry_point is app else entry_point.__name__
    assert lines[0].startswith(f"python -m {program}: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in output.err + output.out


def test_each_command_line_reaches_its_typed_entry_point(monkeypatch, tmp_path):
    calls = {}

    def record(name):
        return lambda *args, **kwargs: calls.setdefault(name, (args, kwargs))

    monkeypatch.setattr(prepare_coco, "prepare", record("coco"))
    prepare_coco.main(["--coco-dir", "c", "--out", "o", "--download", "--splits", "val"])
    assert calls["coco"] == ((Path("c"), Path("o"), True, ("val",)), {})

    monkeypatch.setattr(prepare_instruct, "prepare", record("instruct"))
    prepare_instruct.main(["--data", "d.json", "--image-folder", "i", "--out", "o.json", "--image-prefix", "p"])
    expected = dict(data=Path("d.json"), image_folder=Path("i"), out=Path("o.json"), image_prefix="p")
    assert calls["instruct"] == ((), {**expected, "verify_images": False})

    monkeypatch.setattr(prepare_text, "prepare", record("text"))
    prepare_text.main(["--source", "a=x", "--source", "b=y", "--weights", "a=1", "b=3", "--out", "o", "--seed", "4"])
    _, text = calls["text"]
    assert (text["sources"], text["weights"], text["out"], text["seed"]) == (
        ["a=x", "b=y"],
        ["a=1", "b=3"],
        Path("o"),
        4,
    )

    def build_cache(*args):
        calls["features"] = args
        return {"cached": 0, "failed": {}}

    monkeypatch.setattr(cache_features, "build_cache", build_cache)
    cache_features.main(["--data", "a.json", "b.json", "--image-folder", "i", "--out", "o", "--feature-layer", "-1"])
    paths = [Path("a.json"), Path("b.json")], Path("i"), Path("o")
    assert calls["features"][:5] == (*paths, cache_features.TINYCLIP_ID, -1)

    for module, config_type in ((stage1_align, "Stage1Config"), (stage2_instruct, "Stage2Config")):
        monkeypatch.setattr(module, "run", record(module.__name__))
        arguments = ["--train-data", "t.json", "--image-folder", "i", "--lr", "0.5", "--stage1-weights", "w"]
        module.main(arguments if module is stage2_instruct else arguments[:-2])
        (config,), _ = calls[module.__name__]
        assert type(config).__name__ == config_type and (config.train_data, config.lr) == ("t.json", 0.5)
