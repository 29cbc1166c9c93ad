"""The vision scripts end to end on the tiny CLIP config and generated image folders (CPU, offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from talos.io import load_tensors
from talos.modes import MODES, run_order
from talos.task_vector import TaskVector
from tests.helpers import (assert_finetune_skips_when_done, assert_results_hold_every_mode_and_merge,
                           assert_resume_matches_uninterrupted, distributed_run_matches_one_process,
                           finetune_artifacts_config, sweep)
from vision import eval_single_task, eval_task_addition, finetune

TASKS = "SynthShapes,SynthColors"


def common(data, save, *extra):
    return ["--model", "talos-tiny-vit", "--pretrained", "none", "--data-location", str(data), "--save", str(save),
            "--eval-datasets", TASKS, "--control-dataset", "SynthControl", "--batch-size", "16", "--lr", "1e-3",
            "--warmup-length", "2", "--epochs", "2", "--calibration-batch-size", "8", "--eval-batch-size", "64",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--n-eval-points", "3",
            "--plugins", "vision.synthetic", *extra]


def run_dir(save, mode, task):
    (d,) = list((save / "vision" / "talos-tiny-vit" / mode / task).iterdir())
    return d


@pytest.fixture(scope="module")
def pipeline(data, tmp_path_factory):
    """Every training mode fine-tuned on both tasks and evaluated by every protocol, then every merge of the
    standard task vectors in addition and negation, all into one results.json (built once per module)."""
    argv = lambda save, *extra: common(data, save, *extra)  # noqa: E731
    return sweep("vision", argv, run_order(), TASKS.split(","), tmp_path_factory.mktemp("pipeline"))


def test_run_order_holds_every_training_mode_in_dependency_order():
    modes = run_order()
    assert set(modes) == {n for n in MODES.names() if MODES.get(n).trains}  # (imported: vision/import_checkpoints.py)
    assert modes.index("standard") < modes.index("lota")  # LoTA reads the standard task vector


def test_every_mode_trains_every_task_for_the_expected_steps(pipeline):
    assert set(pipeline.metrics) == {(m, t) for m in run_order() for t in TASKS.split(",")}
    for key, m in pipeline.metrics.items():
        assert m["steps"] == 2 * 6, key  # 90 train images (100 minus 10 val), batch 16, 2 epochs


def test_finetune_writes_its_artifacts_and_config(pipeline):
    cfg = finetune_artifacts_config(run_dir(pipeline.save, "talos", "SynthShapes"))
    assert cfg["settings"]["method"]["sparsity"] == 0.9


def test_results_json_has_a_row_per_mode_and_per_merge(pipeline):
    assert_results_hold_every_mode_and_merge(pipeline.results, run_order(), TASKS.split(","))


def test_task_vector_density_per_mode(pipeline):
    density = pipeline.results["task_vector_density"]
    assert density["standard"]["SynthShapes"] == 1.0
    assert density["posthoc"] == density["standard"]  # posthoc evaluates the standard task vectors
    for mode in ("talos", "lota", "random_mask", "magnitude_mask"):  # 90% sparse masks, different choices
        assert density[mode]["SynthShapes"] < 0.5, mode


def test_posthoc_evaluates_the_standard_vectors_through_the_linearized_model(pipeline, data, tmp_path, monkeypatch):
    import shutil

    from talos.linearize import LinearizedModel

    model_dir = Path("vision") / "talos-tiny-vit"
    shutil.copytree(pipeline.save / model_dir / "standard", tmp_path / model_dir / "standard")  # no eval results
    calls = []
    real = LinearizedModel.forward
    monkeypatch.setattr(LinearizedModel, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = {}
    for mode in ("standard", "posthoc"):
        calls.clear()
        got[mode] = eval_single_task.main(common(data, tmp_path, "--finetuning-mode", mode))
        assert bool(calls) == (mode == "posthoc"), mode  # only posthoc runs through the Taylor expansion
        assert got[mode]["test"]["finetuned"] == pipeline.results["single_task"][mode]  # as in the full sweep
    for split in ("val", "test"):  # at θ0 the linearized model is the model itself
        assert got["posthoc"][split]["zeroshot"] == got["standard"][split]["zeroshot"]


def test_lora_moves_only_the_query_and_value_rows(pipeline):
    lora = TaskVector.load(run_dir(pipeline.save, "lora", "SynthShapes") / "task_vector.safetensors")
    assert len(lora.keys()) == 2 and all(k.endswith("attn.in_proj_weight") for k in lora.keys())  # 2 blocks
    E = 64  # in_proj rows: q, k, v of width 64
    for k in lora.keys():
        assert lora[k][:E].abs().sum() > 0 and lora[k][2 * E:].abs().sum() > 0
        assert not lora[k][E:2 * E].any()


def test_finetune_skips_when_its_task_vector_exists(pipeline, data):
    argv = common(data, pipeline.save, "--finetuning-mode", "talos", "--train-dataset", "SynthShapes")
    assert_finetune_skips_when_done(finetune, argv, run_dir(pipeline.save, "talos", "SynthShapes"))


def test_talos_task_vector_is_as_sparse_as_the_mask(data, tmp_path):
    save = tmp_path / "runs"
    finetune.main(common(data, save, "--finetuning-mode", "talos", "--train-dataset", "SynthStripes",
                         "--freeze-embeddings", "--eval-datasets", "SynthStripes"))
    d = run_dir(save, "talos", "SynthStripes")
    masks, tv = load_tensors(d / "mask.safetensors"), TaskVector.load(d / "task_vector.safetensors")
    assert set(tv.keys()) == set(masks)  # embeddings frozen: only eligible tensors
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    z = 2 * 32  # the official count also holds the text tower's ln_final (width 32), always kept
    assert kept == int(0.1 * (total + z)) - z
    for n, m in masks.items():
        assert not tv[n][~m].any(), n  # nothing moved outside the mask
    assert tv.nnz() > 0.5 * kept  # and most trainable entries did move


def test_resume_after_interruption_matches_uninterrupted(data, tmp_path):
    args = ["--finetuning-mode", "talos", "--train-dataset", "SynthShapes", "--eval-datasets", "SynthShapes"]
    argv = lambda save, *extra: common(data, save, *args, *extra)  # noqa: E731
    assert_resume_matches_uninterrupted("vision", "talos-tiny-vit", argv, "SynthShapes", 4, tmp_path)


def test_wandb_offline(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "runs"
    finetune.main(common(data, save, "--finetuning-mode", "standard", "--train-dataset", "SynthColors",
                         "--eval-datasets", "SynthColors", "--wandb", "--wandb-project", "talos-test"))
    d = run_dir(save, "standard", "SynthColors")
    assert list((d / "wandb").glob("offline-run-*"))
    eval_single_task.main(common(data, save, "--finetuning-mode", "standard", "--eval-datasets", "SynthColors",
                                 "--wandb", "--wandb-project", "talos-test"))
    (ev,) = list((save / "vision" / "talos-tiny-vit" / "eval" / "single_task").iterdir())
    (offline,) = list((ev / "wandb").glob("offline-run-*"))
    (table,) = list(offline.rglob("per_task*.table.json"))  # the per-task results table
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["task", "split", "zeroshot", "finetuned"]
    assert sorted(row[:2] for row in logged["data"]) == [["SynthColors", "test"], ["SynthColors", "val"]]


@pytest.mark.parametrize("bad, message", [
    (["--train-dataset", "Nope"], "unknown dataset"),
    (["--train-dataset", "SynthShapes", "--model", "ViT-Nope"], "unknown model"),
    (["--train-dataset", "SynthShapes", "--finetuning-mode", "magic"], "unknown fine-tuning mode"),
    (["--train-dataset", "SynthShapes", "--sparsity", "1.5"], "sparsity"),
    (["--train-dataset", "SynthShapes", "--sparsity", "0"], "sparsity"),
    (["--train-dataset", "SynthShapes", "--merge", "average"], "unknown merge method"),
])
def test_bad_input_fails_before_loading(data, tmp_path, monkeypatch, capsys, bad, message):
    monkeypatch.setattr("vision.models.load_clip", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        finetune.main(common(data, tmp_path, *bad))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_fails_before_loading_and_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setattr("vision.common.load_clip", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(FileNotFoundError) as e:
        finetune.main(common(tmp_path / "empty", tmp_path, "--train-dataset", "SynthShapes"))
    msg = str(e.value)
    assert "SynthShapes" in msg and str(tmp_path / "empty") in msg and "prepare_datasets.py" in msg
    assert not (tmp_path / "vision").exists()  # nothing half-written


def test_missing_task_vector_names_the_command(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="vision/finetune.py"):
        eval_task_addition.main(common(data, tmp_path, "--finetuning-mode", "talos"))


def test_eval_cache_gives_the_same_accuracy_and_decodes_once(data, tmp_path, monkeypatch):
    from vision.args import parse_args
    from vision.common import VisionSetup, make_evaluator

    accs, builds = {}, {}
    for mb in (0, 64, 1):  # off, on, too small for the split (falls back to reading the images)
        torch.manual_seed(0)
        setup = VisionSetup(parse_args(common(data, tmp_path, "--eval-cache-mb", str(mb))))
        calls = []
        real = setup.dataset
        monkeypatch.setattr(setup, "dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
        if mb == 1:
            setup._eval_cache_bytes = 2**20 - 1000  # 1000 bytes left: no split fits
        ev = make_evaluator(setup)
        edit = TaskVector({n: torch.full_like(p, 1e-3) for n, p in setup.classifier.named_parameters()
                           if n in setup.eligible[:2]})
        accs[mb] = [ev(e, t, s) for e in (None, edit, edit * 2) for t in ("SynthShapes", "SynthColors")
                    for s in ("val", "test")]
        builds[mb] = len(calls)
    assert accs[0] == accs[64] == accs[1]
    assert builds[64] == 4 and builds[0] == builds[1] == 12  # 3 edits x 4 splits (zero-shot: memoised)


def test_zeroshot_head_shape_and_norm():
    from vision.models import ImageClassifier, load_clip, zeroshot_head

    torch.manual_seed(0)
    clip, _, _, tok = load_clip("talos-tiny-vit", "none")
    head = zeroshot_head(clip, tok, ["cat", "dog", "car"], ["a photo of a {}.", "a {}."])
    assert head.shape == (3, 32)
    norms = head.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((3,), float(clip.logit_scale.detach().exp())), rtol=1e-5, atol=1e-5)
    logits = ImageClassifier(clip.visual, head)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)


def test_merge_flags_reach_the_merge(data, tmp_path):
    from talos.merges import hparams_of
    from vision.args import parse_args

    from vision.models import official_leftover_entries

    args = parse_args(common(data, tmp_path, "--merge", "ties", "--ties-k", "0.2", "--tall-masks-lam", "0.6"))
    # the default variant is the official scripts', with the vision scripts' key filters and leftover count
    assert args.merge_hparams("ties") == {
        "variant": "official", "k": 0.2, "extra_zeros": official_leftover_entries("talos-tiny-vit"),
        "negation_keys": "attn,mlp,conv"}
    assert args.merge_hparams("tall_masks") == {"variant": "official", "lam": 0.6}
    assert args.merge_hparams("dare") == {
        "variant": "official", "p": 0.9, "seed": 0, "skip_keys": "positional_embedding,text_projection,logit_scale",
        "negation_keys": "attn,mlp,conv"}
    paper = parse_args(common(data, tmp_path, "--merge-variant", "paper"))
    assert paper.merge_hparams("dare") == {"variant": "paper", **hparams_of("dare")}


@pytest.mark.distributed
def test_distributed_finetune_and_eval_write_one_copy(data, tmp_path):
    distributed_run_matches_one_process("vision", "talos-tiny-vit", lambda save, *extra: common(data, save, *extra),
                                        "SynthShapes", tmp_path / "runs")


def test_grad_checkpointing_flag():
    from vision.args import parse_args

    base = ["--model", "talos-tiny-vit", "--pretrained", "none", "--train-dataset", "SynthShapes", "--device", "cpu",
            "--grad-checkpointing"]
    assert parse_args(base + ["--finetuning-mode", "talos"], need_train_dataset=True).grad_checkpointing
    with pytest.raises(SystemExit):  # torch.func.jvp cannot run through checkpointed blocks
        parse_args(base + ["--finetuning-mode", "linear"], need_train_dataset=True)


PINNED_VISION = ("7d8efc7be0", "f10282274f")  # talos, standard


def test_hash_of_the_real_default_configuration_is_pinned():
    """The paper's default runs (ViT-B-32, openai, Cars) keep their folders: a change here orphans real runs.

    Reads open_clip's configs only (no download). Precision and activation are part of the hash."""
    from vision import args as vargs
    from vision.common import RUNS

    def run(*extra):
        a = vargs.parse_args(["--train-dataset", "Cars", "--device", "cpu", *extra], need_train_dataset=True)
        return RUNS.finetune(a, "Cars")

    talos_run, std_run = run(), run("--finetuning-mode", "standard")
    # only what differs from the declared defaults: resolved presets, activation and precision
    assert dict(talos_run.hparams) == {"mode": "talos", "task": "Cars", "activation": "quick_gelu",
                                       "precision": "fp32", "epochs": 35, "calibration_batch_size": 64}
    assert dict(std_run.hparams) == {"mode": "standard", "task": "Cars", "activation": "quick_gelu",
                                     "precision": "fp32", "epochs": 35}
    assert (talos_run.hash, std_run.hash) == PINNED_VISION
    assert run("--precision", "bf16").hash != talos_run.hash
    assert run("--activation", "gelu", "--allow-activation-mismatch").hash != talos_run.hash
    assert run("--fisher-target", "log_prob").hparams["fisher_target"] == "log_prob"
    no_ln = run("--no-count-text-ln-final")  # the official eligible set counts ln_final: the default
    assert no_ln.hparams["count_text_ln_final"] is False and no_ln.hash != talos_run.hash


def test_merge_variant_is_part_of_the_evaluation_hash():
    from vision import args as vargs
    from vision.common import RUNS

    def ev(*extra):
        return RUNS.evaluation(vargs.parse_args(["--device", "cpu", "--merge", "ties", *extra]), "addition")

    official, paper = ev(), ev("--merge-variant", "paper")
    assert official.hparams["merge_kwargs"]["variant"] == "official" and official.hash != paper.hash


def test_each_stage_uses_its_preprocessing(data, tmp_path, monkeypatch):
    """Calibration (<Task>Val) and fine-tuning read the training transform, evaluation the validation one,
    as the official code does (model.train_preprocess / val_preprocess)."""
    from vision.common import VisionSetup

    calls = []
    real = VisionSetup.dataset

    def spy(self, task, split, train_transform=False):
        calls.append((split, train_transform, self.train_preprocess if train_transform else self.val_preprocess))
        return real(self, task, split, train_transform)

    monkeypatch.setattr(VisionSetup, "dataset", spy)
    flags = ["--finetuning-mode", "talos", "--epochs", "1", "--calibration-rounds", "1"]
    finetune.main(common(data, tmp_path, *flags, "--train-dataset", "SynthShapes"))
    assert {(s, t) for s, t, _ in calls} == {("val", True), ("train", True)}
    calls.clear()
    eval_single_task.main(common(data, tmp_path, *flags, "--eval-datasets", "SynthShapes"))
    assert calls and all(not t for _, t, _ in calls) and {s for s, _, _ in calls} == {"val", "test"}
