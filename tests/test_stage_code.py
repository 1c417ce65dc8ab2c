"""Stage keys cover the code a stage runs: derived from its imports, checked against the runtime import graph."""

import inspect
from types import ModuleType

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


def test_how_a_training_section_becomes_fit_settings_is_in_the_trained_stages_keys(monkeypatch):
    """The mapping of a config section onto what `fit` runs is code (training.FitSettings.from_config), not schema:
    an edit to its body moves the key of every trained stage (issue 23; config.py is not hashed)."""
    import kdpipe.training as training

    config = load_config(None, ["teachers.0.arch=mn_tiny"], check_files=False)
    trained = [stage for stage in build_stages(config) if stage.name.startswith(("train-student", "train-teacher"))]
    assert len(trained) == 2 and all(training in code_closure(stage.code) for stage in trained)
    before = [source_hash(stage.code) for stage in trained]
    real = inspect.getsource
    edited = real(training).replace("epochs=settings.epochs,", "epochs=settings.epochs + 0,")
    assert edited != real(training)
    monkeypatch.setattr(inspect, "getsource", lambda obj: edited if obj is training else real(obj))
    assert all(source_hash(stage.code) != key for stage, key in zip(trained, before))


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
    import importlib
    import pkgutil

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
