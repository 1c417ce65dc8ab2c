"""Benchmarks: our path and a naive baseline, measured side by side in one run, as a ratio.

`bench_extract` times teacher inference over a temporary waveform store of
random clips: our extraction path (prefetching loader, batched, features on
the device, bf16 on CUDA) against the way reference repos run inference (one
clip at a time, fp32, features on the CPU). `inference_clips_per_second`
times one model alone, for the speed column of the evaluation report.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from kdpipe import console
from kdpipe.classes import ClassList
from kdpipe.errors import KdpipeError
from kdpipe.extraction import Teacher, TeacherSpec, extract_local
from kdpipe.frontends import build_frontend, int16_to_float
from kdpipe.loader import BatchLoader, batch_loader, sequential_batches
from kdpipe.logits_store import TeacherLogits
from kdpipe.models import create_model
from kdpipe.models.complexity import count_macs
from kdpipe.models.windowing import clip_forward
from kdpipe.training import label_loss, train_step
from kdpipe.view_plan import ViewPlan
from kdpipe.views import CLEAN, ViewParams, apply_views, view_params
from kdpipe.waveform_store import STORE_FILE, WaveformStore

AUDIOSET_CLASSES = 527
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def random_store(path: Path, clips: int, seconds: float, sample_rate: int, classes: int, seed: int = 0) -> Path:
    """A waveform store of noise clips: what the benchmark reads, without any audio on disk."""
    rng = np.random.default_rng(seed)
    samples = round(seconds * sample_rate)
    names = tuple(f"class {i}" for i in range(classes))
    store = WaveformStore.create(path, clip_ids=[f"bench_{i}" for i in range(clips)], splits=["train"] * clips,
                                 labels=np.zeros((clips, classes), np.uint8), labelled=np.ones(clips, bool),
                                 classes=ClassList(names, names),
                                 sample_rate=sample_rate, clip_samples=samples, shard_clips=64)
    for shard in range(store.n_shards):
        rows = store.shard_rows(shard)
        waves = (rng.standard_normal((len(rows), samples)) * 3000).astype(np.int16)
        store.write_shard(shard, waves, ["ok"] * len(rows), [""] * len(rows))
        store.mark_done(shard)
    return path


def naive_logits(model: torch.nn.Module, frontend: torch.nn.Module, wave: np.ndarray, device: torch.device,
                 view: ViewParams | None = None) -> None:
    """The reference repos' way: one clip (or one view of it), fp32, audio and features computed on the CPU,
    then the model on the device."""
    with torch.no_grad():
        audio = int16_to_float(torch.from_numpy(wave[None]))
        if view is not None:
            audio = apply_views(audio, view)
        clip_forward(model, frontend(audio).to(device))


def bench_extract(arch: str, clips: int, seconds: float, batch_size: int, device: torch.device,
                  num_workers: int, naive_clips: int, compile: bool = False, precision: str = "auto",
                  rounds: int = 3, views: int = 0) -> dict[str, Any]:
    """Our extraction path against the naive loop, alternating for `rounds` rounds.

    With `views`, every clip is also run as that many augmented views (kdpipe.views), batched like clips
    on our path and one at a time in the naive loop; throughput is then in clip-views per second.

    A shared machine's speed drifts by tens of percent within a minute; pairing each of our
    passes with a naive pass run right after it, and taking the median of the paired ratios,
    keeps the ratio from reporting that drift.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = create_model(arch, num_classes=AUDIOSET_CLASSES)
        sample_rate = 32000
        store_path = random_store(root / "waves.zarr", clips, seconds, sample_rate, AUDIOSET_CLASSES)
        checkpoint = root / "teacher.pt"
        torch.save(model.state_dict(), checkpoint)
        plan = ViewPlan(count=views)
        spec = TeacherSpec(name=arch, arch=arch, checkpoints=(checkpoint,), precision=precision, compile=compile,
                           views=plan)
        teacher = Teacher(spec, sample_rate, device, batch_size)
        store = WaveformStore.open(store_path)
        warm = torch.from_numpy(store.read(np.arange(min(batch_size, clips))))
        teacher.logits(warm)  # warm-up: kernels, allocator
        model = model.eval().to(device)
        frontend = build_frontend(model.frontend_config, sample_rate).eval()
        rows = np.arange(min(naive_clips, clips))
        naive_logits(model, frontend, store.read(rows[:1])[0], device)  # the same warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ours, naive = [], []
        for round_ in range(rounds):
            logits = TeacherLogits.create(root / f"logits_{round_}.zarr", clips, AUDIOSET_CLASSES, 4096, "float16", {},
                                          plan)
            ours.append(clips * (1 + views) / extract_local(teacher, store_path, logits,
                                                            list(range(logits.n_chunks)), batch_size, num_workers))
            started = time.perf_counter()
            for row in console.track(rows, len(rows), "naive loop"):
                wave = store.read(np.array([row]))[0]
                for view in (CLEAN, *range(views)):
                    naive_logits(model, frontend, wave, device, view_params([row], view, plan.seed, plan.augment,
                                                                            sample_rate, wave.shape[0]))
            _sync(device)
            naive.append(len(rows) * (1 + views) / (time.perf_counter() - started))
        peak_memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else None

        frames = teacher.frontend(int16_to_float(warm[:1].to(device))).shape
        with torch.device("meta"):
            meta = create_model(arch)
        macs = count_macs(meta, (1, 1, frames[-2], min(frames[-1], getattr(meta, "max_frames", frames[-1]))))
    ratios = [o / n for o, n in zip(ours, naive)]
    result = {"teacher": arch, "device": device_name(device), "clips": clips, "naive_clips": len(rows),
              "rounds": rounds, "seconds_per_clip": seconds, "batch_size": teacher.batch_size, "compiled": compile,
              "precision": teacher.precision, "views": views, "ours_clips_per_s": float(np.median(ours)),
              "naive_clips_per_s": float(np.median(naive)), "speedup": float(np.median(ratios)),
              "speedup_range": f"{min(ratios):.2f}-{max(ratios):.2f}", "gmacs_per_clip": macs / 1e9,
              "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        tflops = 2 * macs * result["ours_clips_per_s"] / 1e12
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in result["device"]), None)
        result.update(achieved_tflops=tflops, peak_device_memory_mb=peak_memory / 2**20,
                      share_of_bf16_peak=tflops / peak if peak else None)
    return result


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


class _DecodingClips(torch.utils.data.Dataset):
    """The reference repos' loader: each item decodes its mp3 and computes features on the CPU."""

    def __init__(self, paths: list[Path], sample_rate: int, clip_samples: int):
        self.paths, self.sample_rate, self.clip_samples = paths, sample_rate, clip_samples
        self.frontend = build_frontend({"kind": "mel", "sample_rate": sample_rate, "n_mels": 128}, sample_rate)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from kdpipe.audio_io import load_clip

        wave, _ = load_clip(self.paths[index], sample_rate=self.sample_rate, clip_samples=self.clip_samples,
                            min_seconds=0.0)
        with torch.no_grad():
            return self.frontend.train()(int16_to_float(torch.from_numpy(wave[None])))[0]


def prepared_demo(root: Path, clips: int, seconds: float) -> tuple[Path, list[Path]]:
    """Demo clips as mp3 files (mixed sample rates) and the waveform store prepared from them."""
    from kdpipe.config import load_config
    from kdpipe.demo_data import write_demo_dataset
    from kdpipe.preparation import prepare_store

    dataset = write_demo_dataset(root / "audio", n_train=clips, n_eval=1, clip_seconds=seconds)
    manifest = root / "audio" / "mp3.csv"  # AudioSet as users hold it: mp3 (PaSST's HDF5 files)
    with open(dataset.manifest) as source, open(manifest, "w") as target:
        for line in source:
            clip_id, path, rest = line.split(",", 2)
            if clip_id != "clip_id":
                audio, rate = soundfile.read(root / "audio" / path)
                path = f"audio/{clip_id}.mp3"
                soundfile.write(root / "audio" / path, audio, rate, format="MP3")
            target.write(f"{clip_id},{path},{rest}")
    config = load_config(None, [f"cache_dir={root / 'cache'}", f"data.sources.0.path={manifest}",
                                f"data.class_list={dataset.class_list}", f"data.clip_seconds={seconds}"])
    prepare_store(config, root / "prepared", {})
    store_path = root / "prepared" / STORE_FILE
    paths = sorted((root / "audio" / "audio").glob("demo_train_*.mp3"))
    return store_path, paths


def bench_loader(clips: int, seconds: float, batch_size: int, workers: int, device: torch.device) -> dict[str, Any]:
    """Features per second delivered to the device: our store loader against per-item decoding.

    Both are timed from their second batch on: worker start-up is paid once per run (our
    workers persist across passes), and the figure is the rate a long epoch runs at.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store_path, paths = prepared_demo(Path(tmp), clips, seconds)
        store = WaveformStore.open(store_path)
        rows = store.rows("train")
        frontend = build_frontend({"kind": "mel", "sample_rate": store.sample_rate, "n_mels": 128},
                                  store.sample_rate).train().to(device)
        batches = sequential_batches(np.random.default_rng(0).permutation(rows), batch_size)
        if len(batches) < 2:
            raise KdpipeError(f"bench loader needs at least 2 batches (the first is not timed); "
                              f"{len(rows)} clips at batch size {batch_size} make {len(batches)}")
        loader = BatchLoader(store_path, num_workers=workers, pin_memory=device.type == "cuda")

        def delivered(batch: tuple[torch.Tensor, torch.Tensor], features: bool) -> int:
            waves = batch[0].to(device, non_blocking=True)
            if features:
                with torch.no_grad():
                    frontend(int16_to_float(waves))
            return len(waves)

        # What a training step waits for (int16 batches on the device), then with the device's features too:
        # on a GPU the second costs little more; on a CPU the features dominate both loaders.
        batches_only = _steady_rate(loader(batches), lambda b: delivered(b, False), device, "our loader")
        ours = _steady_rate(loader(batches), lambda b: delivered(b, True), device, "our loader + features")
        naive_set = _DecodingClips(paths, store.sample_rate, store.clip_samples)
        naive_loader = torch.utils.data.DataLoader(naive_set, batch_size=batch_size, shuffle=True,
                                                   num_workers=workers, multiprocessing_context="spawn"
                                                   if workers else None)
        naive = _steady_rate(naive_loader, lambda features: len(features.to(device)), device, "naive loader")
    return {"device": device_name(device), "clips": len(rows), "seconds_per_clip": seconds,
            "batch_size": batch_size, "workers": workers, "ours_batches_clips_per_s": batches_only,
            "ours_clips_per_s": ours, "naive_clips_per_s": naive, "batches_speedup": batches_only / naive,
            "speedup": ours / naive}


def _steady_rate(batches: Any, deliver: Callable[[Any], int], device: torch.device, description: str) -> float:
    """Clips/s from the second batch on; `deliver` takes a batch to the device and returns its clips."""
    iterator = iter(batches)
    deliver(next(iterator))
    _sync(device)
    started, clips = time.perf_counter(), 0
    for batch in console.track(iterator, len(batches) - 1, description):
        clips += deliver(batch)
    _sync(device)
    return clips / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def inference_clips_per_second(infer: Callable[[torch.Tensor], torch.Tensor], clip_samples: int, batch_size: int,
                               device: torch.device, clips: int = 64, budget_seconds: float = 0.5) -> float:
    """Clips/s of `infer` (int16 waveforms -> logits, frontend included) on batches of random clips.

    One batch warms up (kernels and oneDNN primitives are built per input shape: the first pass at a
    new batch size can take 10x longer); then batches are timed until `clips` are done or
    `budget_seconds` have passed (at least one batch). On a CPU batches are at most 8 clips (larger
    ones are no faster there), so a large teacher costs seconds, not minutes.
    """
    batch_size = min(batch_size, clips if device.type == "cuda" else 8)
    waves = np.random.default_rng(0).standard_normal((batch_size, clip_samples)) * 3000
    batch = torch.from_numpy(waves.astype(np.int16))
    infer(batch)
    _sync(device)
    timed, started = 0, time.perf_counter()
    while timed < clips and (timed == 0 or time.perf_counter() - started < budget_seconds):
        infer(batch)
        _sync(device)
        timed += len(batch)
    return timed / (time.perf_counter() - started)


def bench_train(arch: str, clips: int, seconds: float, batch_size: int, workers: int, device: torch.device,
                compile: bool = False) -> dict[str, Any]:
    """Clips/s of train-student's step (train_step) on our loader, and the share of time spent waiting for data.

    The first batch is a warm-up (worker start-up, kernel selection, compilation) and is not counted.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store_path, _paths = prepared_demo(Path(tmp), clips, seconds)
        store = WaveformStore.open(store_path)
        labels = torch.from_numpy(store.column("labels")).to(device, dtype=torch.float32)
        model = create_model(arch, num_classes=len(store.classes)).to(device, memory_format=torch.channels_last)
        stepped = torch.compile(model.train()) if compile else model.train()
        frontend = build_frontend(model.frontend_config, store.sample_rate).train().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        batches = sequential_batches(np.random.default_rng(0).permutation(store.rows("train")), batch_size)
        if len(batches) < 2:
            raise KdpipeError(f"bench train needs at least 2 batches (a warm-up and one timed); "
                              f"{clips} clips at batch size {batch_size} make {len(batches)}")
        rng = np.random.default_rng(0)

        def step(waves: torch.Tensor, rows: torch.Tensor) -> None:
            train_step(stepped, frontend, optimizer, waves, rows, labels, label_loss, 0.3, rng, device.type == "cuda",
                       getattr(model, "max_frames", None))
            _sync(device)

        loader = iter(batch_loader(store_path, batches, num_workers=workers, pin_memory=device.type == "cuda"))
        step(*next(loader))
        waiting = computing = 0.0
        trained = 0
        for _ in console.track(range(len(batches) - 1), len(batches) - 1, "training steps"):
            started = time.perf_counter()
            waves, rows = next(loader)
            fetched = time.perf_counter()
            step(waves, rows)
            waiting += fetched - started
            computing += time.perf_counter() - fetched
            trained += len(rows)
    return {"model": arch, "device": device_name(device), "clips": trained, "seconds_per_clip": seconds,
            "batch_size": batch_size, "workers": workers, "compiled": compile,
            "train_clips_per_s": trained / (computing + waiting), "data_wait_share": waiting / (computing + waiting)}
