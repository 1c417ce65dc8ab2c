"""`kdpipe train-student` on two machines, played on one: two `--nnodes 2` commands of two gloo ranks each, as
each node's user starts them, meeting at a rendezvous on localhost and sharing the cache folder.

AST has no dropout or random patchout and mixup is off, so nothing random differs between ranks: 4 ranks x
batch 2 train as 1 process x batch 8 (gradients are averaged), to float tolerance.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from typer.testing import CliRunner

from kdpipe.cli import app

import helpers

COMMON = ("student.arch=ast_tiny", "student.mixup_alpha=0", "student.epochs=2", "student.epoch_samples=16",
          "device=cpu")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_command(items: list[str], rank: int, port: int, join_timeout: int = 120) -> list[str]:
    return [sys.executable, "-m", "kdpipe", "train-student", "--gpus", "2", "--nnodes", "2", "--node-rank", str(rank),
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--join-timeout", str(join_timeout),
            *[f"--set={item}" for item in items]]


def start_nodes(items: list[str]) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(node_command(items, rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for rank in (0, 1)]


def finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    return [(node.wait(timeout=timeout), *node.communicate()) for node in nodes]


def student_folder(cache: Path) -> Path:
    return next(cache.glob("train-student/*/metrics.jsonl")).parent


def metrics(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(small_demo, student_upstream, tmp_path_factory):
    """The single-process student (batch 8) and the uninterrupted two-node one (4 ranks x batch 2)."""
    root = tmp_path_factory.mktemp("two_nodes")
    single = helpers.make(helpers.STUDENT_RUN, small_demo, helpers.copy_cache(student_upstream, root / "single"),
                          *COMMON, "student.batch_size=8").ensure("train-student")
    items = lambda cache: helpers.settings(helpers.STUDENT_RUN, small_demo, cache, *COMMON,  # noqa: E731
                                           "student.batch_size=2")
    helpers.copy_cache(student_upstream, root / "nodes")
    results = finish(start_nodes(items(root / "nodes")))
    assert all(code == 0 for code, _, _ in results), [err[-3000:] for _, _, err in results]
    return single, results, items


def test_two_nodes_of_two_ranks_train_like_one_process_with_their_combined_batch(runs, tmp_path):
    single, results, items = runs
    (_, out0, err0), (_, out1, err1) = results
    assert err0.count("train-student: building") == 1 and "building" not in err1  # node 0's rank 0 writes
    folder = Path(out0.strip()).parent
    assert out1.strip() == "" and (folder / "record.json").is_file()
    assert [line["epoch"] for line in metrics(folder)] == [1, 2]
    for a, b in zip(metrics(folder), metrics(single)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["validation"]["mAP"] == pytest.approx(b["validation"]["mAP"], abs=1e-6)
    trained = torch.load(folder / "last.pt", weights_only=True)
    reference = torch.load(single / "last.pt", weights_only=True)
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=0, atol=1e-6)


def test_a_rank_killed_mid_epoch_stops_every_process_and_the_rerun_resumes_bit_identical(runs, student_upstream,
                                                                                          tmp_path):
    """kill -9 of one rank on node 1 during epoch 2 (of 2): every process of both nodes exits within seconds, each
    node with one line that says what happened; rerunning the two commands resumes after epoch 1 and ends exactly
    where the uninterrupted two-node run ended. (The one resume test of training: a single process runs the same
    save and resume code as a world of one.)"""
    _, results, items = runs
    cache = helpers.copy_cache(student_upstream, tmp_path / "cache")
    nodes = start_nodes(items(cache))
    family: dict[int, psutil.Process] = {}
    victim, deadline = None, time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and all(node.poll() is None for node in nodes):
        for node in nodes:
            for child in psutil.Process(node.pid).children(recursive=True):
                family.setdefault(child.pid, child)
        if next(cache.glob("train-student/*/resume.pt"), None) is not None:
            victim = next((p for p in psutil.Process(nodes[1].pid).children(recursive=True)
                           if p.environ().get("RANK") == "3"), None)
        time.sleep(0.02)
    assert victim is not None, "no epoch was saved before the deadline"
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    stopped = finish(nodes, timeout=120)
    assert time.monotonic() - killed_at < 90
    assert [code for code, _, _ in stopped] == [1, 1], [err[-2000:] for _, _, err in stopped]
    _, left = psutil.wait_procs(list(family.values()), timeout=10)
    assert not left, f"left behind: {[p.pid for p in left]}"
    node0, node1 = stopped[0][2], stopped[1][2]
    assert "lost contact with the other ranks" in node0 and "Rerun the same command on every node" in node0, node0
    assert "node 1 of 2: training stopped:" in node1 and "rank 3 (killed by SIGKILL)" in node1, node1[-2000:]
    assert "Traceback" not in node0 + node1

    resumed = finish(start_nodes(items(cache)))
    assert [code for code, _, _ in resumed] == [0, 0], [err[-3000:] for _, _, err in resumed]
    assert "resuming after epoch 1" in resumed[0][2], resumed[0][2]
    folder, uninterrupted = student_folder(cache), Path(results[0][1].strip()).parent
    assert metrics(folder) == metrics(uninterrupted)  # the lines written after the last save were dropped
    assert not (folder / "resume.pt").exists()
    a, b = torch.load(folder / "last.pt", weights_only=True), torch.load(uninterrupted / "last.pt", weights_only=True)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_node_started_alone_says_whom_it_waits_for(small_demo, prepared, tmp_path, rank):
    items = helpers.settings(helpers.STUDENT_RUN, small_demo, tmp_path / "cache", *COMMON)
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(app, node_command(items, rank, int(endpoint.rsplit(":")[1]), join_timeout=3)[3:])
    assert result.exit_code == 1 and time.monotonic() - started < 30, result.output
    assert f"node {rank} of 2: waited 3 s" in result.output and endpoint in result.output, result.output
    assert ("--node-rank 0" if rank else "--node-rank 1..1") in result.output
