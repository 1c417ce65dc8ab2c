"""No model is chosen on the clips it is scored on: the evaluation split's labels reach evaluate and nothing else."""

import csv
import json

import numpy as np
import torch
import zarr

from kdpipe.config import load_config
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages

from helpers import STUDENT_RUN, settings

# A teacher trained here and both students, each keeping its best epoch on the validation split: the choices that
# selecting on the evaluation split would move.
RUN = (*STUDENT_RUN, "teacher_training.epochs=2", "teacher_training.keep=best", "student.epochs=2",
       "student.keep=best", "evaluation.baseline=true", "evaluation.batch_size=8")
TRAINED = ("train-teacher/mn_tiny", "train-student", "train-student/no-kd")


def _with_other_eval_labels(small_demo, out):
    """small_demo's manifest with every eval clip's label set replaced by its complement (audio paths absolute)."""
    with open(small_demo.class_list) as handle:
        mids = [row["mid"] for row in csv.DictReader(handle)]
    with open(small_demo.manifest) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str((small_demo.manifest.parent / row["path"]).resolve())
        if row["split"] == "eval":
            row["labels"] = ";".join(mid for mid in mids if mid not in row["labels"].split(";"))
    out.mkdir()
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


def _run(small_demo, cache, manifest=None):
    items = settings(RUN, small_demo, cache, *([f"data.sources.0.path={manifest}"] if manifest else []))
    config = load_config(None, items)
    pipeline = Pipeline(build_stages(config), config)
    pipeline.ensure("evaluate")
    return pipeline


def _weights(folder):
    return torch.load(folder / "model.pt", weights_only=True)


def test_other_eval_labels_change_evaluate_s_numbers_and_nothing_trained(small_demo, tmp_path):
    """Every eval label flipped: the teacher's kept checkpoint, its logits, the ensemble and both students are
    bit-identical, and only evaluate's figures move. Every key changes, because prepare's key covers the
    manifest (eval labels included) and every stage is downstream of prepare: the stages rebuild, and agree."""
    original = _run(small_demo, tmp_path / "original")
    flipped = _run(small_demo, tmp_path / "flipped", _with_other_eval_labels(small_demo, tmp_path / "data"))
    assert original.key("prepare") != flipped.key("prepare")
    for name in TRAINED:
        before, after = original.built(name), flipped.built(name)
        assert json.loads((before / "kept.json").read_text()) == json.loads((after / "kept.json").read_text())
        a, b = _weights(before), _weights(after)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    assert json.loads((original.built("train-student") / "kept.json").read_text())["keep"] == "best"
    for stage, arrays in (("extract/mn_tiny", ("logits",)), ("extract-teachers", ("ensemble/logits",
                                                                                  "teachers/mn_tiny/logits"))):
        store = "teachers.zarr" if stage == "extract-teachers" else "logits.zarr"
        for array in arrays:
            a = zarr.open_group(original.built(stage) / store, mode="r")[array][:]
            b = zarr.open_group(flipped.built(stage) / store, mode="r")[array][:]
            np.testing.assert_array_equal(a, b)

    def scores(pipeline):
        return {m["id"]: m["mAP"] for m in json.loads((pipeline.built("evaluate") / "metrics.json").read_text())
                ["models"]}

    before, after = scores(original), scores(flipped)
    assert list(before) == ["teacher_mn_tiny", "ensemble", "student_kd", "student_no_kd"] == list(after)
    assert all(before[model] != after[model] for model in before)
