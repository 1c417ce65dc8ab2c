"""Stage keys cover the code a stage runs: derived from its imports, checked against the runtime import graph."""

import inspect
from types import ModuleType

from kdpipe.config import load_config
from kdpipe.fingerprint import NOT_RESULTS, code_closure, source_hash
from kdpipe.stages import build_stages


def runtime_dependencies(module: ModuleType) -> set[str]:
    """kdpipe modules reachable through the names modules bind at import time (an independent view)."""
    todo, seen = [module], set()
    while todo:
        current = todo.pop()
        if current.__name__ in seen or current.__name__ in NOT_RESULTS:
            continue
        seen.add(current.__name__)
        for value in vars(current).values():
            if inspect.ismodule(value) and value.__name__.startswith(current.__name__ + "."):
                continue  # a package's submodule bound by the import system, not imported by its code
            owner = value if inspect.ismodule(value) else inspect.getmodule(value)
            if owner is not None and owner.__name__.startswith("kdpipe.") and owner is not current:
                todo.append(owner)
    return seen


def test_every_module_a_stage_imports_is_in_its_key():
    config = load_config(None, ["teachers.0.arch=mn_tiny", "teachers.1.arch=passt_tiny"], check_files=False)
    for stage in build_stages(config):
        hashed = {obj.__name__ if inspect.ismodule(obj) else inspect.getmodule(obj).__name__
                  for obj in code_closure(stage.code)}
        for obj in stage.code:
            module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
            missing = runtime_dependencies(module) - hashed - NOT_RESULTS
            assert not missing, f"{stage.name}: {sorted(missing)} shape its outputs but are not in its key"


def test_editing_an_imported_module_changes_the_key(monkeypatch):
    """A module the student imports but does not list (windowing, via training) still moves its key."""
    import kdpipe.models.windowing as windowing

    config = load_config(None, ["student.kd.enabled=false"], check_files=False)
    student = next(stage for stage in build_stages(config) if stage.name == "train-student")
    assert windowing not in student.code and windowing in code_closure(student.code)
    before = source_hash(student.code)
    real = inspect.getsource

    def edited(obj):
        return real(obj) + "\nEDITED = 1\n" if obj is windowing else real(obj)

    monkeypatch.setattr(inspect, "getsource", edited)
    assert source_hash(student.code) != before
