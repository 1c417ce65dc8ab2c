"""Config loading: precedence, YAML 1.1 quirks, validation messages and exit codes."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import ConfigError, canonical_json, load_config, parse_yaml, to_plain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_set_flags(tmp_path):
    path = write(tmp_path, "student:\n  width: 0.5\n  epochs: 7\n")
    assert load_config(None).student.width == 1.0
    assert load_config(path).student.width == 0.5
    config = load_config(path, ["student.width=1.5"])
    assert (config.student.width, config.student.epochs) == (1.5, 7)
    assert load_config(path, ["student.width=1.5"], {"student.width": 2.0}).student.width == 2.0
    assert load_config(path, [], {"student.width": None}).student.width == 0.5  # flag not given


def test_yaml_11_quirks_are_read_as_they_look():
    assert parse_yaml("a: 1e-3\nb: yes\nc: 010\nd: 2026-11-21\ne: off", "t") == {
        "a": 0.001, "b": "yes", "c": 10, "d": "2026-11-21", "e": "off"}


def test_values_are_coerced_by_schema_and_hash_canonically(tmp_path):
    a = load_config(write(tmp_path, "student:\n  lr: 1e-3\n  epochs: 3\n"))
    b = load_config(None, ["student.lr=0.001", "student.epochs=3.0"])
    assert a.student.lr == 0.001 and isinstance(b.student.epochs, int)
    assert canonical_json(to_plain(a)) == canonical_json(to_plain(b))


@pytest.mark.parametrize(("override", "expected"), [
    ("student.widht=2", ["student.widht", "did you mean width"]),
    ("studnet.width=2", ["studnet", "did you mean student"]),
    ("student.width=-1", ["student.width", "greater than 0"]),
    ("student.width=wide", ["student.width", "valid number"]),
    ("prepare.on_error=maybe", ["prepare.on_error", "'skip' or 'fail'"]),
    ("device=gpu0", ["device", "auto|cpu|cuda"]),
    ("data.sample_rate=1e-3", ["data.sample_rate", "integer"]),
    ("student.width", ["KEY=VALUE"]),
    ("student.arch=mn100", ["student.arch: unknown model 'mn100'", "did you mean mn10", "registry: ast_10_10"]),
    ("teachers=[{arch: passt_s10}]", ["teachers.0.arch: unknown model", "did you mean passt_s_s10"]),
    ("student.precision=fp16", ["student.precision", "'auto', 'fp32' or 'bf16'"]),
])
def test_invalid_values_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for fragment in expected:
        assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_missing_input_file_names_the_key(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - path: nowhere.csv\n")
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.path: no such file"):
        load_config(path)
    assert load_config(path, check_files=False).data.sources[0].path == Path("nowhere.csv")


def test_list_entries_can_be_overridden_by_index(tmp_path):
    path = write(tmp_path, "teachers:\n  - {arch: passt_s_s10, weight: 1.0}\n  - {arch: ast_10_10}\n")
    config = load_config(path, ["teachers.1.weight=0.25"])
    assert [t.weight for t in config.teachers] == [1.0, 0.25]
    with pytest.raises(ConfigError, match="not a valid index"):
        load_config(path, ["teachers.5.weight=1"])


def test_shipped_configs_are_valid():
    for name in ("demo.yaml", "audioset.yaml", "finetune.yaml"):
        config = load_config(CONFIGS / name, check_files=False)
        assert config.data.sources
    audioset = load_config(CONFIGS / "audioset.yaml", check_files=False)
    assert audioset.student.lr == 8e-4 and audioset.student.init.name == "mn10_im.pt"  # EfficientAT's recipe


def test_cli_config_error_exits_2_without_traceback():
    result = CliRunner().invoke(app, ["config", "show", "--set", "student.kd.temprature=2"])
    assert result.exit_code == 2
    assert "student.kd.temprature" in result.output and "temperature" in result.output
    assert "Traceback" not in result.output


def test_cli_config_show_resolves_overrides():
    result = CliRunner().invoke(app, ["config", "show", "--set", "student.width=2.5", "--stage", "prepare"])
    assert result.exit_code == 0, result.output
    assert "student" not in result.output and "prepare:\n" in result.output and "  shard_clips: 256" in result.output
    shown = CliRunner().invoke(app, ["config", "show", "--set", "student.width=2.5"])
    assert "width: 2.5" in shown.output


def test_every_spelling_of_one_run_has_one_key(tmp_path, small_demo, monkeypatch):
    """Settings that default to others enter keys resolved: each spelling finds the same cache entries."""
    from kdpipe.runner import Pipeline
    from kdpipe.stages import build_stages

    monkeypatch.chdir(small_demo.root)
    base = [f"cache_dir={tmp_path}", f"data.class_list={small_demo.class_list}", "data.clip_seconds=1.0",
            "teachers.0.arch=passt_tiny", "seed=3"]

    def keys(*items: str) -> dict[str, str]:
        config = load_config(None, [*base, *items])
        return Pipeline(build_stages(config), config).referenced_keys()

    plain = keys(f"data.sources.0.path={small_demo.manifest}", "student.arch=mn10")
    assert len(plain) == 6
    spellings = [
        ["data.sources.0.path=manifest.csv", "student.arch=mn10"],  # relative to the working directory
        [f"data.sources.0.path={small_demo.manifest}", "student.arch=mobilenetv3", "student.width=1.0"],
        [f"data.sources.0.path={small_demo.manifest}", "student.arch=mn10", "student.width=2.5"],  # width unread
        [f"data.sources.0.path={small_demo.manifest}", "student.arch=mn10", "student.seed=3"],
        [f"data.sources.0.path={small_demo.manifest}", "student.arch=mn10", "teachers.0.name=passt_tiny"],
        [f"data.sources.0.path={small_demo.manifest}", "student.arch=mn10", "student.precision=fp32",
         "teacher_training.precision=fp32", "extract.precision=fp32", "device=cpu"],  # auto on a CPU
    ]
    for items in spellings:
        assert keys(*items) == plain, items
    different = keys(f"data.sources.0.path={small_demo.manifest}", "student.arch=mn10", "student.seed=4")
    assert different["train-student"] != plain["train-student"]
    assert {name: key for name, key in different.items() if name not in ("train-student", "evaluate")} == \
        {name: key for name, key in plain.items() if name not in ("train-student", "evaluate")}


@pytest.mark.parametrize("override, expected", [
    ("student.lr=.inf", "student.lr: Input should be a finite number"),
    ("teachers.0.weight=.nan", "teachers.0.weight: Input should be a finite number"),
    ("student.options.widht=2", "student: mobilenetv3 takes no option widht; it takes"),
    ("teachers.0.options.depht=2", "teachers.0: passt_tiny takes no option depht"),
])
def test_non_finite_floats_and_unknown_model_options_fail_when_the_config_loads(override, expected):
    result = CliRunner().invoke(app, ["status", "--set", "teachers.0.arch=passt_tiny", "--set", override])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in " ".join(result.output.split())


def test_an_empty_config_file_is_an_error(tmp_path):
    empty = tmp_path / "kdpipe.yaml"
    empty.write_text("# nothing yet\n")
    result = CliRunner().invoke(app, ["status", "--config", str(empty)])
    assert result.exit_code == 2 and "the file is empty" in " ".join(result.output.split())
