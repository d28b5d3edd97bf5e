"""The repository's promises: README commands, Space header, file map and dependencies."""

import ast
import re
from pathlib import Path

import yaml

from inference import assistant as assistant_module
from inference.assistant import start_references
from inference.config import PHI2_ID, TINYCLIP_ID, Manifest
from inference.hub import parse_reference
from inference.original import ORIGINAL_SPACE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(block for block in bash_blocks(README) if "pytest" in block)
    ci_commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_commands
    assert "set -euo pipefail" in ci_commands


def space_header() -> dict:
    return yaml.safe_load(README.split("---")[1])


def test_readme_starts_with_the_space_header():
    fields = space_header()
    assert fields["sdk"] == "gradio" and fields["app_file"] == "app.py"
    requirements = (ROOT / "requirements.txt").read_text()
    assert f"gradio=={fields['sdk_version']}" in requirements
    assert str(fields["python_version"]) == "3.11"


def preloaded() -> set[tuple[str, str | None]]:
    """(repo, commit or None) of each `preload_from_hub` entry: `owner/name [files [commit]]`."""
    entries = [entry.split() for entry in space_header()["preload_from_hub"]]
    return {(entry[0], entry[2] if len(entry) > 2 else None) for entry in entries}


def covered(references: list[str]) -> bool:
    """Whether the Space preloads each reference, a pinned one (`owner/name@commit`) at that commit."""
    return {parse_reference(reference) for reference in references} <= preloaded()


def test_the_space_preloads_every_hub_repo_the_app_loads_at_start(tmp_path, monkeypatch):
    # Until weights/ holds trained weights the app imports the original checkpoint (two small files from
    # the original Space, fetched once: README says so) over the same base models.
    untrained = start_references()
    assert covered([reference for reference in untrained if reference != ORIGINAL_SPACE]) and len(untrained) == 3
    trained = tmp_path / "weights"  # what training writes into weights/: its manifest names the base models
    Manifest(name="trained").save(trained)
    monkeypatch.setattr(assistant_module, "DEFAULT_WEIGHTS", trained)
    assert set(start_references()) == {PHI2_ID, TINYCLIP_ID} and covered(start_references())
    Manifest(name="elsewhere", language_model="someone/other-phi").save(trained)  # a base model not listed
    assert not covered(start_references())
    Manifest(name="pinned", language_model=f"{PHI2_ID}@{'a' * 40}").save(trained)  # listed, not at that commit
    assert start_references()[0] == f"{PHI2_ID}@{'a' * 40}" and not covered(start_references())


def test_every_file_in_the_readme_map_exists():
    file_map = README.split("## Files")[1].split("```")[1]
    paths = [line.split()[0] for line in file_map.strip().splitlines()]
    assert len(paths) > 10
    for path in paths:
        assert list(ROOT.glob(path)), f"README lists {path}, which does not exist"


def test_dependencies_are_pinned_and_avoid_the_broken_ones():
    lines = [
        line.split("#")[0].strip()
        for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt")
        for line in (ROOT / name).read_text().splitlines()
    ]
    packages = [line for line in lines if line and not line.startswith("-r")]
    for package in packages:
        assert re.search(r"==|<", package), f"{package} is not pinned"
    names = {re.split(r"[=<>]", package)[0].lower() for package in packages}
    assert not names & {"torchvision", "timm", "open_clip_torch", "open-clip-torch"}
    assert "torch==2.13.0" in packages


def imports_of(path: Path) -> set[str]:
    """The project modules a file imports (`inference.x`, `training.y`, `benchmarks.z`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("inference", "training", "benchmarks")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_files() -> list[Path]:
    """Every Python file of the library and the commands, subpackages included, and app.py."""
    return [*ROOT.glob("inference/**/*.py"), *ROOT.glob("training/**/*.py"), ROOT / "app.py"]


# training.refresh's stages run the other commands, through their typed entry points and nothing else.
CONDUCTOR = "training.refresh.stages"
ENTRY_POINTS = {"run", "prepare", "build_cache", "evaluate", "run_benchmark", "merge"}
ENTRY_POINTS |= {"Stage1Config", "Stage2Config", "PretrainConfig"}


def test_no_command_is_imported_for_its_helpers_and_benchmarks_stand_alone():
    library = library_files()
    assert ROOT / "inference" / "backends" / "pytorch.py" in library  # subpackages are checked too
    commands = {
        module_name(path)
        for path in library
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in ast.parse(path.read_text()).body)
    }
    assert {"training.stage1_align", "training.pretrain", "training.push", "training.refresh"} <= commands
    for path in library:
        if module_name(path) == CONDUCTOR:
            used = {
                f"{node.value.id}.{node.attr}"
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                if f"training.{node.value.id}" in commands
            }
            assert {name.split(".")[1] for name in used} <= ENTRY_POINTS, f"the conductor uses {used}"
            continue
        own = {module_name(path), module_name(path).removesuffix(".__main__")}  # a package's command and __main__
        imported = imports_of(path) & commands - own
        assert not imported, f"{path.name} imports a command: {imported}"
    for path in ROOT.glob("benchmarks/*.py"):
        assert not {name for name in imports_of(path) if name.startswith("benchmarks")}, path.name


def test_library_and_command_files_stay_readable_in_size():
    for path in library_files():
        assert len(path.read_text().splitlines()) <= 400, path.name


def test_the_trainer_knows_nothing_multimodal():
    forbidden = {"inference.model", "inference.prompt", "inference.vision", "training.data", "training.multimodal"}
    assert not imports_of(ROOT / "training" / "trainer.py") & forbidden
