"""kdpipe predict: windows over files of any length and rate, the file-level answer, the CSV, model lookup, errors."""

import csv
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn
from typer.testing import CliRunner

from kdpipe.classes import ClassList
from kdpipe.cli import app
from kdpipe.frontends import build_frontend
from kdpipe.predict import predict_file, window_starts, write_windows_csv
from kdpipe.tagger import Tagger, load_tagger
from kdpipe.waveform_store import WaveformStore

from helpers import tone

RATE = 32000
MEL = {"kind": "mel", "sample_rate": RATE, "n_mels": 128, "hop_length": 320}
LOW, HIGH = 120.0, 3000.0  # Hz: mel bins ~6 and ~68 of 128


class BandLevels(nn.Module):
    """A model whose answer is known: per class, the mean level of its mel bins against the whole spectrum's."""

    def __init__(self, bands: list[slice]):
        super().__init__()
        self.bands = bands

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        levels = features.mean(dim=(1, 3))  # (batch, mels)
        return torch.stack([levels[:, band].mean(dim=1) for band in self.bands], dim=1) - levels.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def tones() -> Tagger:
    """Classes "Low tone" and "High tone", told apart by where the energy sits; 1 s training clips."""
    classes = ClassList(("/t/low", "/t/high"), ("Low tone", "High tone"))
    return Tagger("tones", BandLevels([slice(2, 10), slice(60, 76)]), build_frontend(MEL, RATE).eval(), MEL,
                  classes, RATE, 1.0, torch.device("cpu"))


def low_high_low(rate: int) -> np.ndarray:
    """1 s low tone, 1 s high tone, 0.5 s low tone: 2.5 s."""
    return np.concatenate([tone(LOW, 1.0, rate), tone(HIGH, 1.0, rate), tone(LOW, 0.5, rate)])


def top_labels(prediction, tagger: Tagger) -> list[str]:
    return [tagger.classes.names[i] for i in prediction.window_probabilities.argmax(axis=1)]


def test_window_starts_reach_the_end_and_a_short_file_is_one_window():
    assert window_starts(25, 10, 10).tolist() == [0, 10, 20]
    assert window_starts(20, 10, 10).tolist() == [0, 10]
    assert window_starts(3, 10, 10).tolist() == [0]
    assert window_starts(25, 10, 5).tolist() == [0, 5, 10, 15]


def test_windows_follow_the_sound_and_the_csv_covers_the_file(tones, tmp_path):
    path = tmp_path / "tones.wav"
    sf.write(path, low_high_low(RATE), RATE)
    prediction = predict_file(tones, path, window_seconds=1.0, hop_seconds=1.0, batch_size=2)
    assert prediction.seconds == 2.5
    assert prediction.starts.tolist() == [0.0, 1.0, 2.0] and prediction.ends.tolist() == [1.0, 2.0, 2.5]
    assert top_labels(prediction, tones) == ["Low tone", "High tone", "Low tone"]
    # the file's answer weighs the half-empty last window by the half second of audio it holds
    expected = np.average(prediction.window_probabilities, axis=0, weights=[1.0, 1.0, 0.5])
    np.testing.assert_allclose(prediction.probabilities, expected)
    assert prediction.probabilities.argmax() == 0

    out = tmp_path / "windows.csv"
    write_windows_csv([prediction], tones.classes.names, out, k=2)
    rows = list(csv.DictReader(out.open()))
    assert [(row["start"], row["end"]) for row in rows] == [("0.000", "1.000"), ("1.000", "2.000"), ("2.000", "2.500")]
    assert [row["label_1"] for row in rows] == ["Low tone", "High tone", "Low tone"]
    assert {row["file"] for row in rows} == {str(path)} and rows[0]["label_2"] == "High tone"
    assert float(rows[1]["probability_1"]) > float(rows[1]["probability_2"])

    overlapping = predict_file(tones, path, window_seconds=1.0, hop_seconds=0.5, batch_size=3)
    assert overlapping.starts.tolist() == [0.0, 0.5, 1.0, 1.5] and overlapping.ends[-1] == 2.5


@pytest.mark.parametrize(("rate", "format"), [(48000, "FLAC"), (44100, "OGG"), (22050, "MP3")])
def test_other_rates_and_formats_give_the_32k_answer(tones, tmp_path, rate, format):
    reference = tmp_path / "tones.wav"
    sf.write(reference, low_high_low(RATE), RATE)
    other = tmp_path / f"tones.{format.lower()}"
    sf.write(other, low_high_low(rate), rate, format=format)
    expected = predict_file(tones, reference, 1.0, 1.0, 4)
    got = predict_file(tones, other, 1.0, 1.0, 4)
    assert top_labels(got, tones) == ["Low tone", "High tone", "Low tone"]
    assert got.ends[-1] == pytest.approx(2.5, abs=0.01)
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=0.02)


def test_a_short_file_is_one_padded_window(tones, tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, tone(HIGH, 0.3, RATE), RATE)
    prediction = predict_file(tones, path, 1.0, 1.0, 4)
    assert prediction.starts.tolist() == [0.0] and prediction.ends.tolist() == [0.3]
    assert top_labels(prediction, tones) == ["High tone"]


def kdpipe(run, *args: str):
    return CliRunner().invoke(app, ["predict", *args, *[f"--set={item}" for item in run.settings]])


def test_the_students_answer_is_what_it_computes_on_the_prepared_clip(trained_run, small_demo, tmp_path):
    """Decoding, resampling and windows in predict equal prepare's: the student sees what it trained on."""
    pipeline = trained_run.pipeline
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    clip_ids = store.column("clip_id").tolist()
    files = [small_demo.root / "audio" / f"{clip_id}.{extension}"
             for clip_id, extension in (("demo_train_0003", "wav"), ("demo_train_0005", "flac"))]  # 44.1 kHz, FLAC
    student = load_tagger(pipeline)
    for path in files:
        on_store = store.read(np.array([clip_ids.index(path.stem)])).astype(np.float32) / 32768.0
        expected = torch.sigmoid(student.logits(torch.from_numpy(on_store)))[0].numpy()
        np.testing.assert_allclose(predict_file(student, path, 1.0, 1.0, 8).probabilities, expected, atol=1e-3)

    result = kdpipe(trained_run, *map(str, files), "--top-k", "3", "--windows", str(tmp_path / "w.csv"))
    assert result.exit_code == 0, result.output
    shown = re.findall(r"^  (0\.\d{3})  (.+)$", result.output, flags=re.M)
    assert len(shown) == 6 and {label for _, label in shown} <= set(store.classes.names)
    assert f"{files[0]} (1.00 s, 1 window(s))" in result.output
    assert len(list(csv.DictReader((tmp_path / "w.csv").open()))) == 2


def test_a_teacher_by_name_equals_its_checkpoint_file(trained_run, small_demo):
    clip = str(small_demo.root / "audio" / "demo_eval_0000.wav")
    by_name = kdpipe(trained_run, clip, "--model", "passt_tiny")
    by_file = kdpipe(trained_run, clip, "--model", str(trained_run.teacher_checkpoint), "--arch", "passt_tiny")
    assert by_name.exit_code == by_file.exit_code == 0, by_name.output + by_file.output
    assert re.findall(r"^  .*$", by_name.output, flags=re.M) == re.findall(r"^  .*$", by_file.output, flags=re.M)


def test_user_errors_exit_2_with_a_message(trained_run, small_demo, tmp_path):
    clip = str(small_demo.root / "audio" / "demo_eval_0000.wav")
    (tmp_path / "bad.wav").write_text("not audio")
    checkpoint = str(trained_run.teacher_checkpoint)
    cases = [
        ((str(tmp_path / "missing.wav"),), "does not exist"),
        ((str(tmp_path / "bad.wav"),), "not a readable audio file"),
        ((clip, "--set=student.lr=0.01"), "train-student/no-kd is stale for this config (student.lr: 0.0008 -> "
                                          "0.01): run `kdpipe train-student --baseline` first, with the same "
                                          "--config and --set (or add --build)"),
        ((clip, "--model", "mn_tiny"), "run `kdpipe train-teacher --teacher mn_tiny` first"),
        ((clip, "--model", checkpoint, "--arch", "mn_tiny"), "does not match MobileNetV3"),
        ((clip, "--model", checkpoint), "a checkpoint file needs --arch"),
        ((clip, "--model", "nosuch"), "not a model of this config (student, mn_tiny, passt_tiny)"),
    ]
    for args, message in cases:
        result = kdpipe(trained_run, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output, result.output
