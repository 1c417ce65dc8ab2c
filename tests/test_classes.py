"""The class list: AudioSet's official file, and a module light enough for every loader worker."""

import csv
import subprocess
import sys

from kdpipe.classes import read_class_list


def test_official_class_list(audioset_metadata):
    classes = read_class_list(audioset_metadata / "class_labels_indices.csv")
    assert len(classes) == 527
    assert (classes.mids[0], classes.names[0]) == ("/m/09x0r", "Speech")
    with open(audioset_metadata / "class_labels_indices.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert classes.names[137] == rows[137][2]
    lookup = classes.lookup()
    assert lookup["Speech"] == lookup["/m/09x0r"] == 0


def test_waveform_store_imports_neither_pydantic_nor_h5py():
    """Every loader worker imports the waveform store; config validation and HDF5 are not its business."""
    code = "import kdpipe.waveform_store, sys; assert 'pydantic' not in sys.modules and 'h5py' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
