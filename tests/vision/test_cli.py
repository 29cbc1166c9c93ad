"""The vision scripts end to end on the tiny CLIP config and generated image folders (CPU, offline)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from talos.io import load_tensors
from talos.merges import MERGES
from talos.modes import MODES, run_order
from talos.task_vector import TaskVector
from vision import eval_single_task, eval_task_addition, eval_task_negation, finetune

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


def test_pipeline_end_to_end_every_mode(data, tmp_path):
    save, results = tmp_path / "runs", tmp_path / "results.json"
    modes = run_order()
    assert set(modes) == {n for n in MODES.names() if MODES.get(n).trains}  # (imported: vision/import_checkpoints.py)
    assert modes.index("standard") < modes.index("lota")
    for mode in modes:
        for task in TASKS.split(","):
            m = finetune.main(common(data, save, "--finetuning-mode", mode, "--train-dataset", task))
            assert m["steps"] == 2 * 6  # 90 train images (100 minus 10 val), batch 16, 2 epochs
        for script in (eval_single_task, eval_task_addition, eval_task_negation):
            script.main(common(data, save, "--finetuning-mode", mode, "--results-json", str(results)))
    d = run_dir(save, "talos", "SynthShapes")
    for f in ("config.json", "mask.safetensors", "calibration.json", "finetuned.safetensors",
              "task_vector.safetensors", "metrics.json"):
        assert (d / f).exists(), f
    assert not (d / "checkpoint.pt").exists()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["settings"]["method"]["sparsity"] == 0.9 and cfg["versions"]["torch"] and "git_commit" in cfg
    for merge in MERGES.names():  # every merge of the standard task vectors, in addition and negation
        eval_task_addition.main(common(data, save, "--finetuning-mode", "standard", "--merge", merge,
                                       "--results-json", str(results)))
        if merge != "sum":
            eval_task_negation.main(common(data, save, "--finetuning-mode", "standard", "--merge", merge,
                                           "--results-json", str(results)))
    res = json.loads(results.read_text())
    for mode in modes:
        assert set(res["single_task"][mode]) == set(TASKS.split(","))
        assert set(res["addition"][mode]) == {"absolute", "normalized", "coef"}
        assert set(res["negation"][mode]) == {"target", "control", "coef"}
    assert set(res["merges"]) == set(MERGES.names())
    assert set(res["negation_merges"]) == set(MERGES.names())  # sum: the standard negation row
    assert res["negation_merges"]["sum"] == res["negation"]["standard"]
    assert res["merges"]["sum"] == res["addition"]["standard"]
    assert res["task_vector_density"]["standard"]["SynthShapes"] == 1.0
    assert res["task_vector_density"]["talos"]["SynthShapes"] < 0.5
    assert res["task_vector_density"]["posthoc"] == res["task_vector_density"]["standard"]
    posthoc = MODES.get("posthoc")  # standard's vectors, evaluated through the linearized model
    assert posthoc.source_mode == "standard" and posthoc.eval_linearized and not MODES.get("standard").eval_linearized
    for mode in ("lota", "random_mask", "magnitude_mask"):  # same density as TaLoS, different masks
        assert res["task_vector_density"][mode]["SynthShapes"] < 0.5
    lora = TaskVector.load(run_dir(save, "lora", "SynthShapes") / "task_vector.safetensors")
    assert all(k.endswith("attn.in_proj_weight") for k in lora.keys())
    E = 64  # q and v rows move, k rows do not
    for k in lora.keys():
        assert lora[k][:E].abs().sum() > 0 and lora[k][2 * E:].abs().sum() > 0
        assert not lora[k][E:2 * E].any()
    # stages skip when their artifacts exist
    before = (d / "task_vector.safetensors").stat().st_mtime_ns
    finetune.main(common(data, save, "--finetuning-mode", "talos", "--train-dataset", "SynthShapes"))
    assert (d / "task_vector.safetensors").stat().st_mtime_ns == before


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
    finetune.main(common(data, tmp_path / "a", *args))
    out = finetune.main(common(data, tmp_path / "b", *args, "--stop-after", "4"))
    assert out["interrupted"] and out["steps"] == 4
    d = run_dir(tmp_path / "b", "talos", "SynthShapes")
    assert (d / "checkpoint.pt").exists() and not (d / "task_vector.safetensors").exists()
    finetune.main(common(data, tmp_path / "b", *args))
    a = TaskVector.load(run_dir(tmp_path / "a", "talos", "SynthShapes") / "task_vector.safetensors")
    b = TaskVector.load(d / "task_vector.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a.keys())


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
    from vision.common import Evaluator, VisionSetup

    accs, builds = {}, {}
    for mb in (0, 64, 1):  # off, on, too small for the split (falls back to reading the images)
        torch.manual_seed(0)
        setup = VisionSetup(parse_args(common(data, tmp_path, "--eval-cache-mb", str(mb))))
        calls = []
        real = setup.dataset
        monkeypatch.setattr(setup, "dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
        if mb == 1:
            setup._eval_cache_bytes = 2**20 - 1000  # 1000 bytes left: no split fits
        ev = Evaluator(setup)
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
    torch.testing.assert_close(norms, torch.full((3,), float(clip.logit_scale.exp())), rtol=1e-5, atol=1e-5)
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


def _vision_worker(rank, world, port, data, save, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = common(data, save, "--finetuning-mode", "talos", "--eval-datasets", "SynthShapes")
    finetune.main(args + ["--train-dataset", "SynthShapes"])
    eval_single_task.main(args + ["--results-json", str(results)])
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_distributed_finetune_and_eval_write_one_copy(data, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save, results = tmp_path / "runs", tmp_path / "results.json"
    mp.start_processes(_vision_worker, args=(2, port, str(data), str(save), str(results)), nprocs=2, join=True,
                       start_method="spawn")
    d = run_dir(save, "talos", "SynthShapes")
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == sorted(  # (.lock: the run lock)
        ["calibration.json", "config.json", "finetuned.safetensors", "manifest.json", "mask.safetensors",
         "metrics.json", "task_vector.safetensors"])
    assert json.loads((d / "config.json").read_text())["world_size"] == 2
    sharded = json.loads(results.read_text())["single_task"]
    # the same task vector evaluated by one process gives the same accuracies as two sharded ranks
    import shutil

    shutil.rmtree(save / "vision" / "talos-tiny-vit" / "eval")  # force a fresh single-process evaluation
    single = eval_single_task.main(common(data, tmp_path / "runs", "--finetuning-mode", "talos",
                                          "--eval-datasets", "SynthShapes"))
    assert single["test"]["finetuned"]["SynthShapes"] == sharded["talos"]["SynthShapes"]


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
