"""training.refresh: the conductor's plan, skipping, reruns, resume after a kill, pushes and smoke results.

The tiny recipe in --smoke mode (random tiny models, a few steps per stage) keeps these fast; the full
tiny recipe, and that it learns, is tests/test_pipeline_learns.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from inference.cli import UsageError
from inference.config import Manifest
from tests import kit
from training import refresh
from training.config import parse_config
from training.refresh import stages
from training.refresh.recipe import RECIPES, Gpus, Recipe
from training.refresh.work import Work
from training.stage1_align import Stage1Config

TINY = str(RECIPES / "tiny.yaml")
STAGES = ["data", "models", "features", "stage1", "stage2", "evaluate", "weights", "gguf"]


def statuses(result: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in result["rows"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("refresh")
    results = root / "RESULTS.md"
    result = refresh.main(["--recipe", TINY, "--workdir", str(root / "run"), "--smoke", "--results", str(results)])
    return root / "run", results, result


def test_smoke_runs_every_stage_and_appends_its_measurements(smoke):
    work, results, result = smoke
    assert statuses(result) == dict.fromkeys(STAGES, "ran")
    assert result["metrics"]["stage2"]["steps"] == 4 and result["metrics"]["stage2"]["seconds_per_step"] > 0
    text = results.read_text()
    assert "## training.refresh --smoke" in text and "recipe tiny-shapes" in text
    assert all(f"| {stage} |" in text for stage in STAGES)
    report = (work / "report.md").read_text()
    assert "![stage2 loss](stage2/loss.png)" in report and "| evaluate | ran |" in report
    # The Space's weights: the adapter merged, the evaluation beside it, a card with its results.
    manifest = Manifest.load(work / "weights")
    assert not manifest.adapter and (work / "weights" / "eval-pope.json").is_file()
    assert "pope_f1" in (work / "weights" / "README.md").read_text()
    assert (work / "gguf" / "language-model-q8_0.gguf").is_file()
    pope = json.loads((work / "eval" / "pope.json").read_text())
    assert pope["questions"] == 8 and set(pope["scores"]) == {"random", "average_f1"}


def test_a_second_run_checks_and_skips_complete_stages(smoke, tmp_path):
    work, _, _ = smoke
    again = refresh.main(["--recipe", TINY, "--workdir", str(work), "--smoke", "--results", str(tmp_path / "r.md")])
    assert statuses(again) == dict.fromkeys(STAGES, "complete: skipped")
    assert again["metrics"]["stage2"]["steps"] == 4  # read back from the stage's record


def test_only_and_from_rerun_what_they_name(smoke, tmp_path, capsys):
    work, _, _ = smoke
    arguments = ["--recipe", TINY, "--workdir", str(work), "--smoke", "--results", str(tmp_path / "r.md")]
    only = refresh.main([*arguments, "--only", "evaluate"])
    assert statuses(only)["evaluate"] == "ran" and statuses(only)["weights"] == "not in this run"
    start = refresh.main([*arguments, "--from", "weights"])
    assert [s for s, status in statuses(start).items() if status == "ran"] == ["weights", "gguf"]
    with pytest.raises(SystemExit):
        refresh.main([*arguments, "--only", "stage3"])
    assert "no stage 'stage3' in this run" in capsys.readouterr().err


def test_a_damaged_product_is_rebuilt_with_everything_after_it(smoke, tmp_path):
    work, _, _ = smoke
    (work / "stage2" / "weights" / "manifest.json").unlink()  # checked, not assumed from a marker
    result = refresh.main(["--recipe", TINY, "--workdir", str(work), "--smoke", "--results", str(tmp_path / "r.md")])
    ran = [stage for stage, status in statuses(result).items() if status == "ran"]
    assert ran == ["stage2", "evaluate", "weights", "gguf"]


def test_a_killed_training_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    command = [sys.executable, "-m", "training.refresh", "--recipe", TINY, "--workdir", str(tmp_path / "run")]
    command += ["--smoke", "--results", str(tmp_path / "RESULTS.md")]
    # Stage 1 takes 4 steps; the 7th step is stage 2's 3rd, after its checkpoint at step 2.
    assert kit.run_killed(command, crash_at="train-step@7") < 0
    assert (tmp_path / "run" / "stage2" / "checkpoint").is_dir() and not (
        tmp_path / "run" / "stage2" / "run.json"
    ).exists()
    resumed = refresh.main([*command[3:], "--resume"])
    assert statuses(resumed)["stage1"] == "complete: skipped" and statuses(resumed)["stage2"] == "ran"
    assert "stage2/checkpoint at step 2" in capsys.readouterr().out  # continued, not restarted
    assert json.loads((tmp_path / "run" / "stage2" / "run.json").read_text())["steps"] == 4


def test_plan_prints_estimates_and_runs_nothing(tmp_path, capsys):
    result = refresh.main(["--workdir", str(tmp_path / "plan"), "--plan", "--with-pretrain"])
    out = capsys.readouterr().out
    assert "phi2-tinyclip" in out and "(estimate)" in out and "GB free" in out
    assert all(f"| {stage} |" in out for stage in ["pretrain", *STAGES])
    assert result["disk_needed_gb"] > 40  # COCO alone
    assert not (tmp_path / "plan").exists()


def test_not_enough_disk_stops_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(refresh, "free_disk_gb", lambda path: 1.0)
    with pytest.raises(SystemExit):
        refresh.main(["--workdir", str(tmp_path / "run")])
    assert re.search(r"need about 7\d GB; 1 GB is free", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_push_sends_every_product_to_its_repo(smoke, monkeypatch, tmp_path):
    work, _, _ = smoke
    pushed = {}

    def push_folder(folder, repo, private=False, log=print):
        pushed[repo] = (Path(folder), private)
        return f"https://huggingface.co/{repo}"

    monkeypatch.setattr(stages, "push_folder", push_folder)
    arguments = ["--recipe", TINY, "--workdir", str(work), "--push-to-hub", "me/tiny", "--private"]
    result = refresh.main([*arguments, "--results", str(tmp_path / "r.md")])
    assert statuses(result)["push"] == "ran"
    assert pushed == {
        "me/tiny": (work / "weights", True),
        "me/tiny-stage1": (work / "stage1" / "weights", True),
        "me/tiny-stage2": (work / "stage2" / "weights", True),
        "me/tiny-GGUF": (work / "gguf", True),
    }
    assert "pushed me/tiny-GGUF" in (work / "report.md").read_text()


def test_recipes_are_checked(tmp_path):
    assert Recipe.load(RECIPES / "phi2.yaml").language_model == "microsoft/phi-2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: shapes\nlanguage_model: a\nvision_model: b\nstage1: {output_dir: elsewhere}\n")
    with pytest.raises(UsageError, match="stage1 may not set output_dir"):
        Recipe.load(bad)
    bad.write_text("name: x\ndata: shapes\nlanguage_model: a\nvision_model: b\nepochs: 3\n")
    with pytest.raises(UsageError, match="unknown recipe field"):
        Recipe.load(bad)


def test_with_pretrain_runs_part_one_from_its_own_recipe(smoke, tmp_path):
    work, _, _ = smoke
    arguments = ["--recipe", TINY, "--workdir", str(work), "--smoke", "--results", str(tmp_path / "r.md")]
    result = refresh.main([*arguments, "--with-pretrain", "--only", "pretrain"])
    assert statuses(result)["pretrain"] == "ran" and result["metrics"]["pretrain"]["steps"] == 4
    assert (work / "pretrain" / "model" / "config.json").is_file()
    assert "![pretrain loss](pretrain/loss.png)" in (work / "report.md").read_text()


def test_several_gpus_launch_the_training_stages_with_accelerate(smoke, monkeypatch):
    work_dir, _, _ = smoke
    launched = []
    monkeypatch.setattr(stages.subprocess, "run", lambda command, check: launched.append(command))
    work = Work(work_dir, Recipe.load(TINY), Gpus(2, "NVIDIA A100-SXM4-80GB", 80.0, 312.0), smoke=True)
    summary = stages.run_stage(work, "stage1")  # reads the run.json the launched processes write
    command = launched[0]
    assert command[:6] == ["accelerate", "launch", "--num_processes", "2", "-m", "training.stage1_align"]
    config = parse_config(Stage1Config, command[6:])
    assert config.output_dir == str(work_dir / "stage1") and config.global_batch_size == 8  # 4 per GPU
    assert summary["steps"] == 4


def test_pope_files_are_fetched_once(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    for split in stages.POPE_SPLITS:
        line = {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?", "label": "no"}
        (served / f"coco_pope_{split}.json").write_text(json.dumps(line) + "\n")
    monkeypatch.setattr(stages, "POPE_URL", served.as_uri() + "/")
    stages.fetch_pope(tmp_path / "pope")
    fetched = sorted(path.name for path in (tmp_path / "pope").iterdir())
    assert fetched == ["coco_pope_adversarial.json", "coco_pope_popular.json", "coco_pope_random.json"]
    (served / "coco_pope_random.json").unlink()
    stages.fetch_pope(tmp_path / "pope")  # present files are not fetched again
