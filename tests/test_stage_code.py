"""Stage keys cover the code a stage runs: derived from its imports, checked against the runtime import graph."""

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

from kdpipe.config import load_config
from kdpipe.fingerprint import NOT_RESULTS, code_closure, source_hash
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages

RUN = ["teachers.0.arch=mn_tiny", "teachers.1.arch=passt_tiny", "evaluation.baseline=true"]


def keys(tmp_path, *settings: str) -> dict[str, str]:
    config = load_config(None, [f"cache_dir={tmp_path}", *RUN, *settings], check_files=False)
    return Pipeline(build_stages(config), config).referenced_keys()


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
    student = next(stage for stage in build_stages(config) if stage.name == "train-student/no-kd")
    assert windowing not in student.code and windowing in code_closure(student.code)
    before = source_hash(student.code)
    real = inspect.getsource

    def edited(obj):
        return real(obj) + "\nEDITED = 1\n" if obj is windowing else real(obj)

    monkeypatch.setattr(inspect, "getsource", edited)
    assert source_hash(student.code) != before


# Functions that turn settings into behaviour, each with an edit to its body, and the stages whose keys must move.
SHAPING_EDITS = {
    "kdpipe.training": ("epochs=settings.epochs,", "epochs=settings.epochs + 0,", ("train-student", "train-teacher")),
    "kdpipe.distill": ("return config.student.kd.enabled and resolved_kd_views(config)",
                       "return bool(config.student.kd.enabled) and resolved_kd_views(config)", ("train-student",)),
    "kdpipe.students": ('return family, presets[arch]', 'return family, 1.0 * presets[arch]',
                        ("train-student",)),
    "kdpipe.view_plan": ("return cls(extract.views, extract.view_seed,", "return cls(extract.views + 0, extract.view_seed,",
                         ("train-student", "extract/")),
}


@pytest.mark.parametrize("module_name", sorted(SHAPING_EDITS))
def test_editing_a_function_that_shapes_training_moves_the_trained_stages_keys(tmp_path, monkeypatch, module_name):
    """How settings become behaviour is code in the module that uses it (training.FitSettings.from_config,
    distill.learns_from_views, students.canonical_arch, ViewPlan.from_config), never schema: an edit to its
    body moves the keys of the stages that run it, and only theirs (config.py is not hashed; issue 23)."""
    module = importlib.import_module(module_name)
    old, new, moved = SHAPING_EDITS[module_name]
    before = keys(tmp_path, "extract.views=2")
    real = inspect.getsource
    assert real(module).count(old) == 1
    edited = real(module).replace(old, new)
    monkeypatch.setattr(inspect, "getsource", lambda obj: edited if obj is module else real(obj))
    after = keys(tmp_path, "extract.views=2")
    changed = {name for name in before if after[name] != before[name]}
    assert all(any(name.startswith(prefix) for name in changed) for prefix in moved), changed
    assert "prepare" not in changed


def test_editing_a_description_in_the_schema_moves_no_key(tmp_path, monkeypatch):
    """The schema's words are not code that shapes results: rewording a keyed field's description (extract.dtype)
    rebuilds nothing."""
    import kdpipe.config as config_module

    before = keys(tmp_path)
    real = inspect.getsource
    edited = real(config_module).replace('description="stored logits"', 'description="the dtype of stored logits"')
    assert edited != real(config_module)
    monkeypatch.setattr(inspect, "getsource", lambda obj: edited if obj is config_module else real(obj))
    assert keys(tmp_path) == before


def test_no_module_imports_itself_through_others():
    """The installed package has no import circle: every kdpipe module (library, CLI and stages), every import
    statement (at the top, in functions and for type checking alike) followed; a circle found is printed."""
    import kdpipe
    import kdpipe.stages
    from kdpipe.fingerprint import kdpipe_imports

    names = sorted({name for package in (kdpipe, kdpipe.stages)  # stages/ installs as kdpipe.stages, apart
                    for _, name, _ in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}
                   - {"kdpipe.__main__"})  # the entry point: importing it runs the CLI, and nothing imports it
    assert {"kdpipe.stages.train_student", "kdpipe.cli.common", "kdpipe.models.windowing"} <= set(names)
    graph = {name: kdpipe_imports(importlib.import_module(name)) - {name} for name in names}
    finished: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in finished:
            return
        for imported in sorted(graph.get(name, ())):
            visit(imported, path + [name])
        finished.add(name)

    for name in names:
        visit(name, [])


def test_unkeyed_fields_never_reach_a_key(tmp_path):
    """Fields marked unkeyed in the config schema (speed and placement) rebuild nothing; a keyed one does."""
    base = keys(tmp_path)
    assert set(base) == {"prepare", "train-teacher/mn_tiny", "train-teacher/passt_tiny", "extract/mn_tiny",
                         "extract/passt_tiny", "extract-teachers", "train-student", "train-student/no-kd", "evaluate"}
    speed_only = keys(tmp_path, "prepare.workers=3", "teacher_training.num_workers=0", "teacher_training.compile=true",
                      "extract.batch_size=3", "extract.engine=dask", "extract.num_workers=5", "extract.compile=true",
                      "extract.dask_workers=4", "student.num_workers=7", "student.compile=true",
                      "evaluation.batch_size=5", "device=cpu")
    assert speed_only == base
    changed = keys(tmp_path, "student.lr=0.1")
    assert {name for name in base if changed[name] != base[name]} == {"train-student", "train-student/no-kd",
                                                                     "evaluate"}


def test_the_baseline_is_one_build_for_every_kd_setting(tmp_path):
    """The no-KD student's key ignores `student.kd`: a KD run's baseline is the no-KD run's student."""
    base = keys(tmp_path)["train-student/no-kd"]
    assert keys(tmp_path, "student.kd.temperature=3", "student.kd.label_weight=0.5")["train-student/no-kd"] == base
    no_kd = keys(tmp_path, "student.kd.enabled=false")
    assert "train-student" not in no_kd and no_kd["train-student/no-kd"] == base
    assert "train-student/no-kd" not in keys(tmp_path, "evaluation.baseline=false")


def test_the_library_is_one_layer_under_the_stages():
    """No library module imports kdpipe.stages (the CLI aside), and no stage module imports another stage."""
    import kdpipe
    import kdpipe.stages
    from kdpipe.fingerprint import kdpipe_imports

    library = [name for _, name, _ in pkgutil.walk_packages(kdpipe.__path__, "kdpipe.")
               if not name.startswith(("kdpipe.stages", "kdpipe.cli", "kdpipe.configs", "kdpipe.__main__"))]
    assert "kdpipe.runner" in library and "kdpipe.models.mobilenet" in library
    for name in library:
        upward = {i for i in kdpipe_imports(importlib.import_module(name)) if i.startswith("kdpipe.stages")}
        assert not upward, f"{name} imports {sorted(upward)}"
    for _, name, _ in pkgutil.iter_modules(kdpipe.stages.__path__, "kdpipe.stages."):
        sideways = {i for i in kdpipe_imports(importlib.import_module(name)) if i.startswith("kdpipe.stages")}
        assert not sideways, f"{name} imports {sorted(sideways)}"
