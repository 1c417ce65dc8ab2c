"""`kdpipe bench extract` measures both paths in one run and prints their ratio."""

import re

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app


def test_bench_extract_prints_both_throughputs_and_the_ratio():
    result = CliRunner().invoke(app, ["bench", "extract", "--arch", "mn_tiny", "--clips", "8", "--naive-clips",
                                      "4", "--seconds", "1", "--batch-size", "4", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    match = re.search(r"ours ([\d.]+) clips/s, naive ([\d.]+) clips/s: ([\d.]+)x$", result.output.strip())
    assert match, result.output
    ours, naive, ratio = map(float, match.groups())
    assert ours > 0 and naive > 0  # the shown figures are rounded to 0.1 clips/s and 0.01x
    assert ratio == pytest.approx(ours / naive, rel=0.05 / ours + 0.05 / naive + 0.01)
    assert "gmacs_per_clip" in result.output and re.search(r"naive_clips\s+│ 4\b", result.output)


def test_bench_extract_pairs_rounds_and_reports_the_median_ratio():
    result = CliRunner().invoke(app, ["bench", "extract", "--arch", "mn_tiny", "--clips", "4", "--naive-clips",
                                      "2", "--seconds", "1", "--batch-size", "4", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    match = re.search(r": ([\d.]+)x \(median of 2 paired rounds, ([\d.]+)-([\d.]+)\)", result.output)
    assert match, result.output
    ratio, low, high = map(float, match.groups())
    assert low <= ratio <= high and ratio == pytest.approx((low + high) / 2, abs=0.011)  # two rounds: their mean


def test_bench_loader_prints_both_throughputs_and_the_ratio():
    result = CliRunner().invoke(app, ["bench", "loader", "--clips", "8", "--seconds", "1", "--batch-size", "4",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    match = re.search(r"ours ([\d.]+) clips/s with features on the device \(([\d.]+) clips/s for the batches "
                      r"alone\), naive ([\d.]+) clips/s: ([\d.]+)x \(([\d.]+)x for the batches alone\)",
                      result.output.replace("\n", " "))
    assert match, result.output
    ours, batches_only, naive, ratio, batches_ratio = map(float, match.groups())
    assert min(ours, batches_only, naive) > 0
    assert ratio == pytest.approx(ours / naive, rel=0.05 / ours + 0.05 / naive + 0.01)
    assert batches_ratio == pytest.approx(batches_only / naive, rel=0.05 / batches_only + 0.05 / naive + 0.01)
    assert re.search(r"clips\s+│ 8\b", result.output)


def test_bench_train_reports_throughput_and_data_wait():
    result = CliRunner().invoke(app, ["bench", "train", "--arch", "mn_tiny", "--clips", "8", "--seconds", "1",
                                      "--batch-size", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    match = re.search(r"training ([\d.]+) clips/s, waiting for data ([\d.]+) % of step time", result.output)
    assert match and float(match.group(1)) > 0 and 0 <= float(match.group(2)) <= 100
