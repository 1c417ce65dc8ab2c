"""Stage two: the KD loss, the student stage, its caching and exact resume."""

import json
import shutil
from types import SimpleNamespace
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kdpipe import students, training
from kdpipe.cli import app
from kdpipe.collaborative import StudentGroup, collaborative_loss, mutual_term
from kdpipe.distributed import shard
from kdpipe.distributed import Ranks
from kdpipe.frontends import build_frontend
from kdpipe.config import load_config
from kdpipe.models import create_model, load_checkpoint
from kdpipe.runner import Pipeline
from kdpipe.training import Mixup
from kdpipe.stages import build_stages
from kdpipe.distill import kd_loss
from kdpipe.students import build_student, trained_student

import helpers


def _reference_term(logits, targets, has, lam, perm):
    """One term of the KD loss, clip by clip: own and partner BCE, renormalised over the partners with a target."""
    terms = []
    for i, j in enumerate(perm):
        own, partner = lam[i] * has[i], (1 - lam[i]) * has[j]
        if own + partner > 0:
            terms.append((own * F.binary_cross_entropy_with_logits(logits[i], targets[i])
                          + partner * F.binary_cross_entropy_with_logits(logits[i], targets[j])) / (own + partner))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def test_kd_loss_is_efficientat_s_when_every_clip_has_labels_and_a_teacher():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), (torch.rand(6, 5) > 0.7).float()
    targets = torch.sigmoid(torch.randn(10, 5) / 2.0)
    rows = torch.tensor([0, 3, 5, 7, 8, 9])
    stored = SimpleNamespace(probabilities=targets, present=torch.ones(10))
    loss = kd_loss(stored, torch.ones(10), 0.1)(logits, rows, labels, None)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(loss, 0.1 * bce(logits, labels) + 0.9 * bce(logits, targets[rows]))
    mixup = Mixup(torch.tensor([0.7, 0.9, 0.5, 0.6, 0.8, 0.55]), torch.tensor([1, 0, 3, 2, 5, 4]))
    lam = mixup.lam[:, None]
    mixed = kd_loss(stored, torch.ones(10), 0.1)(logits, rows, labels, mixup)
    teacher = targets[rows]
    torch.testing.assert_close(mixed, 0.1 * bce(logits, lam * labels + (1 - lam) * labels[mixup.perm])
                               + 0.9 * bce(logits, lam * teacher + (1 - lam) * teacher[mixup.perm]))


def test_each_kd_term_averages_the_clips_it_has_targets_for_and_renormalises_mixup_partners():
    """Row 3 has no teacher, rows 5 and 8 no labels: each term is a mean over the clips (or mixup pairs) with its
    targets, a partner without one hands its share to the clip that has one; nothing is divided by a batch
    that includes clips without targets."""
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 5), (torch.rand(6, 5) > 0.7).float()
    targets = torch.rand(10, 5)
    present, labelled = torch.ones(10), torch.ones(10)
    present[3] = 0.0
    labelled[[5, 8]] = 0.0
    rows = torch.tensor([0, 3, 5, 7, 8, 9])  # position 1 has no teacher, positions 2 and 4 no labels
    stored = SimpleNamespace(probabilities=targets, present=present)
    bce = F.binary_cross_entropy_with_logits
    kd_only = kd_loss(stored, labelled, 0.0)(logits, rows, labels, None)
    taught = [0, 2, 3, 4, 5]
    torch.testing.assert_close(kd_only, bce(logits[taught], targets[rows[taught]]))
    label_only = kd_loss(stored, labelled, 1.0)(logits, rows, labels, None)
    kept = [0, 1, 3, 5]
    torch.testing.assert_close(label_only, bce(logits[kept], labels[kept]))
    for perm in ([1, 0, 3, 2, 5, 4], [2, 4, 0, 5, 1, 3]):
        mixup = Mixup(torch.tensor([0.6, 0.75, 0.5, 0.9, 0.65, 0.8]), torch.tensor(perm))
        mixed = kd_loss(stored, labelled, 0.3)(logits, rows, labels, mixup)
        expected = (0.3 * _reference_term(logits, labels, labelled[rows], mixup.lam, perm)
                    + 0.7 * _reference_term(logits, targets[rows], present[rows], mixup.lam, perm))
        torch.testing.assert_close(mixed, expected)
    # the pair (1, 0) of the first permutation: clip 1 has no teacher, so clip 0's KD term is its own target alone
    alone = Mixup(torch.tensor([0.6, 0.6]), torch.tensor([1, 0]))
    pair = kd_loss(stored, labelled, 0.0)(logits[:2], rows[:2], labels[:2], alone)
    torch.testing.assert_close(pair, (bce(logits[0], targets[0]) + bce(logits[1], targets[0])) / 2)
    nobody = kd_loss(stored, torch.zeros(10), 1.0)(logits, rows, labels, mixup)
    assert nobody.item() == 0.0  # a batch of unlabelled clips only: no label term, no division by zero


settings = partial(helpers.settings, helpers.STUDENT_RUN)
make = partial(helpers.make, helpers.STUDENT_RUN)


@pytest.mark.parametrize("bf16", [False, True])
def test_train_step_runs_the_model_under_the_asked_precision_and_the_loss_in_fp32(bf16):
    torch.manual_seed(0)
    model = create_model("mn_tiny", num_classes=5).to(memory_format=torch.channels_last).train()
    frontend = build_frontend(model.frontend_config, 32000).train()
    seen = {}
    model.register_forward_hook(lambda _m, _i, output: seen.update(dtype=output.dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    waves = (torch.randn(4, 32000) * 3000).to(torch.int16)
    labels = (torch.rand(8, 5) > 0.5).float()
    loss = training.train_step(model, frontend, optimizer, waves, torch.tensor([0, 2, 4, 6]), labels,
                               training.label_loss, 0.3, np.random.default_rng(0), bf16)
    assert seen["dtype"] == (torch.bfloat16 if bf16 else torch.float32)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss) and not loss.requires_grad
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every parameter stepped


def test_precision_auto_is_bf16_on_cuda_only():
    settings = dict(epochs=1, lr=1e-3, optimizer="adam", weight_decay=0.0, warmup_epochs=0, rampdown_start=0,
                    rampdown_epochs=1, last_lr_factor=1.0, mixup_alpha=0.0, eval_batch_size=4, num_workers=0, seed=0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not training.FitSettings(**settings).bf16(cpu) and training.FitSettings(**settings).bf16(cuda)
    assert training.FitSettings(**settings, precision="bf16").bf16(cpu)
    assert not training.FitSettings(**settings, precision="fp32").bf16(cuda)


def test_student_trains_from_cached_teachers_and_width_changes_only_the_student(small_demo, student_upstream,
                                                                               tmp_path):
    pipeline = make(small_demo, helpers.copy_cache(student_upstream, tmp_path))
    out = pipeline.ensure("train-student")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    model = load_checkpoint(create_model("mobilenetv3", width=0.2, num_classes=12), out / "model.pt")
    assert model.width == 0.2 and json.loads((out / "kept.json").read_text())["epoch"] == 2  # keep: last
    wider = make(small_demo, tmp_path)
    result = CliRunner().invoke(app, ["train-student", "--width", "0.3",
                                      *[f"--set={item}" for item in settings(small_demo, tmp_path)]])
    assert result.exit_code == 0, result.output
    assert "train-student: building" in result.output and "extract-teachers: cached" in result.output
    assert "train-teacher/mn_tiny: cached" in result.output
    assert wider.status("train-student").state == "fresh"  # the 0.2 student is still cached


def test_no_kd_baseline_needs_no_teachers(small_demo, prepared, tmp_path):
    helpers.copy_cache(prepared, tmp_path)
    config = load_config(None, [item for item in settings(small_demo, tmp_path, "student.kd.enabled=false")
                                if not item.startswith(("teachers.", "teacher_training."))])
    pipeline = Pipeline(build_stages(config), config)
    assert [name for name in pipeline.stages if name.startswith("train-student")] == ["train-student/no-kd"]
    assert pipeline.stage("train-student/no-kd").upstream == ("prepare",)
    pipeline.ensure("train-student/no-kd")
    without_teachers = [f"--set={item}" for item in settings(small_demo, tmp_path) if not item.startswith("teachers.")]
    with_kd = load_config(None, [item.removeprefix("--set=") for item in without_teachers])
    assert "train-student" not in [stage.name for stage in build_stages(with_kd)]
    result = CliRunner().invoke(app, ["train-student", *without_teachers])
    assert result.exit_code == 1 and "teachers is empty" in result.output
    result = CliRunner().invoke(app, ["train-student", "--baseline", *without_teachers])  # the same build
    assert result.exit_code == 0 and "train-student/no-kd: cached" in result.output


@pytest.mark.parametrize(("teacher", "student"), [("dymn_tiny", "passt_tiny"), ("ast_tiny", "dymn_tiny")])
def test_cmkd_in_both_directions(small_demo, prepared, tmp_path, teacher, student):
    """CNN -> transformer and transformer -> CNN: any registry model learns from any teacher's logits
    (DyMN as the CNN both times: trained as a teacher, and as a KD student)."""
    helpers.copy_cache(prepared, tmp_path)
    pipeline = make(small_demo, tmp_path, f"teachers.0.arch={teacher}", f"student.arch={student}")
    out = pipeline.ensure("train-student")
    record = pipeline.cache.record("train-student", pipeline.key("train-student"))
    assert record["summary"]["arch"] == student and record["summary"]["kd"] is True
    assert pipeline.stage("train-student").upstream == ("prepare", "extract-teachers")
    load_checkpoint(create_model(student, num_classes=12), out / "model.pt")
    if student.startswith("dymn"):  # EfficientAT's temperature schedule ran, one value per epoch
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [line["temperature"] for line in lines] == [30.0, 29.0]
        assert trained_student(out, pipeline.config.student, 12).temperature == 29.0  # the kept epoch's


def test_finetuning_starts_from_init_weights_and_keys_their_content(small_demo, prepared, tmp_path):
    """configs/finetune.yaml's command, from ImageNet-shaped weights: the 1,000-class head starts afresh, the body
    starts from the file, and the stage key follows the file's content, not its path."""
    helpers.copy_cache(prepared, tmp_path)
    torch.manual_seed(1)
    imagenet = create_model("mobilenetv3", width=0.2, num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "mn02_im.pt")
    items = [item for item in settings(small_demo, tmp_path, "student.epochs=1", "student.lr=1e-9")
             if not item.startswith(("teachers.", "teacher_training."))]
    finetune = helpers.ROOT / "configs" / "finetune.yaml"
    result = CliRunner().invoke(app, ["train-student", "--config", str(finetune), "--init", str(tmp_path / "mn02_im.pt"),
                                      *[f"--set={item}" for item in items]])
    assert result.exit_code == 0, result.output
    assert "re-initialised classifier.5 (the head of other classes)" in result.output
    items.append(f"student.init={tmp_path / 'mn02_im.pt'}")
    config = load_config(finetune, items)
    pipeline = Pipeline(build_stages(config), config)
    name = "train-student/no-kd"
    key = pipeline.key(name)
    summary = pipeline.cache.record(name, key)["summary"]
    assert summary["init"] == {"weights": str(tmp_path / "mn02_im.pt"), "reinitialised": ["classifier.5"]}
    trained = torch.load(pipeline.output(name, False) / "model.pt", weights_only=True)
    for conv in ("features.0.0.weight", "features.5.block.1.0.weight", "classifier.2.weight"):  # lr 1e-9: unmoved
        torch.testing.assert_close(trained[conv], imagenet[conv], atol=1e-6, rtol=0)
    assert trained["classifier.5.weight"].shape == (12, 256)

    def key_with(init):
        moved = load_config(finetune, [*items, f"student.init={init}"])
        return Pipeline(build_stages(moved), moved).key(name)

    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "mn02_im.pt", tmp_path / "elsewhere" / "copy.pt")
    assert key_with(tmp_path / "elsewhere" / "copy.pt") == key  # same content, another path
    imagenet["features.0.0.weight"][0, 0, 0, 0] += 1
    torch.save(imagenet, tmp_path / "elsewhere" / "copy.pt")
    assert key_with(tmp_path / "elsewhere" / "copy.pt") != key
    assert key_with(pipeline.output(name, False)) != key  # a kdpipe output folder: the student it kept
    assert students.init_weights(pipeline.output(name, False)) == pipeline.output(name, False) / "model.pt"


def test_shard_gives_each_rank_every_world_th_batch():
    batches = [np.arange(i * 4, i * 4 + 4) for i in range(7)]
    first, second = shard(batches, Ranks(0, 2)), shard(batches, Ranks(1, 2))
    assert len(first) == len(second) == 3  # the seventh batch would leave rank 1 without a partner
    for a, b, whole in zip(first, second, [batches[0:2], batches[2:4], batches[4:6]]):
        assert np.array_equal(np.concatenate([a, b]), np.concatenate(whole))
    assert shard(batches, Ranks()) == batches


def test_mutual_term_is_nonzero_and_changes_every_members_gradients():
    torch.manual_seed(0)
    students = {rep: create_model("mn_tiny", num_classes=5) for rep in ("mel", "mfcc")}
    group = StudentGroup(students)
    features = tuple(torch.randn(3, 1, 128, 100) for _ in students)
    labels, rows = (torch.rand(3, 5) > 0.5).float(), torch.arange(3)

    def gradients(mutual_weight: float) -> dict[str, torch.Tensor]:
        group.zero_grad()
        collaborative_loss(training.label_loss, mutual_weight)(group(features), rows, labels, None).backward()
        return {key: p.grad.clone() for key, p in group.named_parameters() if p.grad is not None}

    group.eval()  # BatchNorm statistics stay put between the two passes
    with torch.no_grad():  # fresh mn heads give logits of about 1e-9: make the members disagree visibly
        for parameter in group.parameters():
            parameter.normal_(0.0, 0.2)
    logits = group(features)
    assert logits.shape == (3, 2, 5)
    term = mutual_term(logits)
    expected = (F.binary_cross_entropy_with_logits(logits[:, 0], torch.sigmoid(logits[:, 1]))
                + F.binary_cross_entropy_with_logits(logits[:, 1], torch.sigmoid(logits[:, 0]))) / 2
    torch.testing.assert_close(term, expected)
    assert term.item() > 0
    alone, together = gradients(0.0), gradients(1.0)
    assert alone.keys() == together.keys()
    for name in students:  # each member's gradients move once its peer's predictions count
        member = [key for key in alone if key.startswith(f"students.{name}.")]
        assert member and any(not torch.equal(alone[key], together[key]) for key in member)
    assert mutual_term(logits[:, :1]).item() == 0.0


def test_multi_representation_students_train_together_and_keep_the_best_on_validation(small_demo, student_upstream,
                                                                                      tmp_path):
    helpers.copy_cache(student_upstream, tmp_path)
    pipeline = make(small_demo, tmp_path, "student.arch=mn_tiny", "student.representations=[mel,mfcc,stft]",
                    "student.keep_members=all", "student.epochs=1")
    out = pipeline.ensure("train-student")
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["validation"]
    assert set(line["members"]) == {"mel", "mfcc", "stft"}
    assert line["mAP"] == max(member["mAP"] for member in line["members"].values())
    description = json.loads((out / "student.json").read_text())
    assert description["representation"] == line["best_member"]
    assert description["frontend"]["kind"] == line["best_member"]
    assert sorted(path.name for path in (out / "students").iterdir()) == ["mel.pt", "mfcc.pt", "stft.pt"]
    config = pipeline.config
    student = trained_student(out, config.student, 12)
    assert student.frontend_config == description["frontend"]
    stft = build_student(config.student, 12, "stft")
    load_checkpoint(stft, out / "students" / "stft.pt")  # each kept member is a plain student
    assert stft.frontend_config["kind"] == "stft"
