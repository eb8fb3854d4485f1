"""dvc.yaml as the table of contents: each stage's code deps are exactly the repo modules its command
imports, so an edit to any of them re-runs exactly the stages it can change (and no other edit re-runs a
stage). tests/stages/test_pipeline_dvc.py checks the same with the real `dvc status` after a build."""

from __future__ import annotations

import pytest

from tests.fixtures.code_deps import declared_code_deps, import_closure, pipeline, stage_command_module

STAGES = pipeline()["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_import_closure(name: str) -> None:
    stage = STAGES[name]
    expected = import_closure(stage_command_module(stage))
    declared = declared_code_deps(stage)
    listing = "\n".join(f"  - {path}" for path in sorted(expected))
    assert declared == expected, (
        f"dvc.yaml stage {name}: code deps differ from what `{stage_command_module(stage)}` imports\n"
        f"missing: {sorted(expected - declared)}\nnot imported: {sorted(declared - expected)}\n"
        f"the stage's code deps should be (`python -m tests.fixtures.code_deps` writes them):\n{listing}"
    )


def test_every_stage_command_is_a_stage_module() -> None:
    modules = {stage_command_module(stage) for stage in STAGES.values()}
    assert modules == {
        "stages.fetch",
        "stages.convert",
        "stages.vae",
        "stages.merge",
        "stages.verify",
        "stages.addon",
    }


def test_the_closure_sees_lazy_imports() -> None:
    # stages.convert imports diffusers inside functions only, and the repo modules it needs at the top; a
    # module imported only inside a function still counts (an edit to it changes what the stage does).
    assert "stages/local_files.py" in import_closure("stages.convert")
    assert "fuseline/core/catalog/model.py" in import_closure("stages.merge")
    assert "stages/sources/lock.py" not in import_closure("stages.merge")  # `fuseline lock`'s, not a stage's


def test_every_dep_is_one_path() -> None:
    # A dep list indented unevenly in YAML folds into one string with spaces: a path DVC cannot find.
    for name, stage in STAGES.items():
        for dep in stage.get("do", stage).get("deps", []):
            assert dep == dep.strip() and " " not in dep, (name, dep)
