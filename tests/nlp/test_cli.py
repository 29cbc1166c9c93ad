"""The NLP scripts end to end on tiny T5 / GPT-2 configs and generated tasks (CPU, offline)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlp import eval_single_task, eval_task_addition, finetune
from talos.io import load_tensors
from talos.task_vector import TaskVector
from tests.helpers import (assert_finetune_skips_when_done, assert_results_hold_every_mode_and_merge,
                           assert_resume_matches_uninterrupted, distributed_run_matches_one_process,
                           finetune_artifacts_config, sweep)

REPO = Path(__file__).resolve().parents[2]
TASKS = "synth_qa,synth_para"
MODES = ["standard", "talos"]  # the end-to-end sweep (the other modes: test_other_modes_run_on_language_models)


def common(synth, save, *extra, model="talos-tiny-t5"):
    data, tok = synth
    return ["--model", model, "--tokenizer", str(tok), "--data-location", str(data), "--save", str(save),
            "--eval-datasets", TASKS, "--control-dataset", "synth_control", "--batch-size", "8",
            "--num-grad-accumulation", "2", "--num-steps", "4", "--lr", "1e-2", "--max-seq-len", "64",
            "--calibration-batch-size", "16", "--calibration-batches", "1", "--calibration-rounds", "2",
            "--eval-batch-size", "64", "--attn-implementation", "eager", "--device", "cpu", "--no-progress",
            "--n-eval-points", "3", "--lora-rank", "2", "--plugins", "nlp.synthetic", *extra]


def run_dir(save, mode, task, model="talos-tiny-t5"):
    (d,) = list((save / "nlp" / model / mode / task).iterdir())
    return d


@pytest.fixture(scope="module")
def pipeline(synth, tmp_path_factory):
    """standard and talos fine-tuned on both tasks and evaluated by every protocol, then every merge of the
    standard task vectors in addition and negation, all into one results.json (built once per module)."""
    argv = lambda save, *extra: common(synth, save, *extra)  # noqa: E731
    return sweep("nlp", argv, MODES, TASKS.split(","), tmp_path_factory.mktemp("pipeline"))


def test_every_mode_trains_every_task_for_the_asked_steps(pipeline):
    assert set(pipeline.metrics) == {(m, t) for m in MODES for t in TASKS.split(",")}
    for key, m in pipeline.metrics.items():
        assert m["steps"] == 4 and m["interrupted"] is False, key


def test_finetune_writes_its_artifacts_and_config(pipeline):
    cfg = finetune_artifacts_config(run_dir(pipeline.save, "talos", "synth_qa"))
    assert cfg["settings"]["method"]["fisher_target"] == "logit" and cfg["hparams"]["num_grad_accumulation"] == 2
    assert cfg["versions"]["transformers"]


def test_results_json_has_a_row_per_mode_and_per_merge(pipeline):
    assert_results_hold_every_mode_and_merge(pipeline.results, MODES, TASKS.split(","))


def test_talos_task_vector_density_is_the_mask_density(pipeline):
    assert pipeline.results["task_vector_density"]["talos"]["synth_qa"] == pytest.approx(0.1, abs=0.01)


def test_stages_skip_when_their_results_exist(pipeline, synth):
    argv = common(synth, pipeline.save, "--finetuning-mode", "talos", "--train-dataset", "synth_qa")
    assert_finetune_skips_when_done(finetune, argv, run_dir(pipeline.save, "talos", "synth_qa"))
    single = eval_single_task.main(common(synth, pipeline.save, "--finetuning-mode", "talos"))
    assert single["test"]["finetuned"] == pipeline.results["single_task"]["talos"]


def test_talos_task_vector_is_sparse_where_the_mask_allows(synth, tmp_path):
    finetune.main(common(synth, tmp_path, "--finetuning-mode", "talos", "--train-dataset", "synth_coref"))
    d = run_dir(tmp_path, "talos", "synth_coref")
    mask = load_tensors(d / "mask.safetensors")
    tv = TaskVector.load(d / "task_vector.safetensors")
    assert set(tv.keys()) == set(mask)  # eligible tensors only: embeddings, relative biases, lm_head untouched
    moved = sum(int((tv[n] != 0).sum()) for n in tv.keys())
    assert moved > 0
    for n in tv.keys():
        assert not bool(((tv[n] != 0) & ~mask[n]).any()), n  # nonzero only where the mask allows
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == int(0.1 * total + 1e-6)


def test_resume_gives_the_uninterrupted_task_vector(synth, tmp_path):
    args = ["--finetuning-mode", "talos", "--train-dataset", "synth_para", "--num-steps", "6",
            "--checkpoint-every", "2"]
    assert_resume_matches_uninterrupted("nlp", "talos-tiny-t5", lambda save, *extra: common(synth, save, *args, *extra),
                                        "synth_para", 3, tmp_path)


@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_other_modes_run_on_language_models(synth, tmp_path, mode):
    args = ["--finetuning-mode", mode, "--num-steps", "2", "--eval-datasets", "synth_qa"]
    finetune.main(common(synth, tmp_path, *args, "--train-dataset", "synth_qa"))
    res = eval_single_task.main(common(synth, tmp_path, *args))
    assert 0.0 <= res["test"]["finetuned"]["synth_qa"] <= 1.0


def test_causal_lm_through_the_same_path(synth, tmp_path):
    args = ["--finetuning-mode", "talos", "--eval-datasets", "synth_coref"]
    m = finetune.main(common(synth, tmp_path, *args, "--train-dataset", "synth_coref", model="talos-tiny-gpt2"))
    assert m["task_vector_density"] == pytest.approx(0.1, abs=0.01)
    res = eval_single_task.main(common(synth, tmp_path, *args, model="talos-tiny-gpt2"))
    assert set(res["test"]["finetuned"]) == {"synth_coref"}


@pytest.mark.parametrize("extra,message", [
    (["--eval-datasets", "synth_qa,nope"], "unknown nlp task 'nope'"),
    (["--train-dataset", "nope"], "unknown nlp task 'nope'"),
    (["--finetuning-mode", "nope"], "unknown fine-tuning mode 'nope'"),
    (["--model", "not-a-model"], "unknown model 'not-a-model'"),
    (["--sparsity", "1.0"], "--sparsity must be > 0.0 and < 1.0, got 1.0"),
    (["--sparsity", "-0.5"], "--sparsity must be > 0.0 and < 1.0, got -0.5"),
    (["--merge", "nope"], "unknown merge method 'nope'"),
    (["--train-dataset", "story_cloze"], "needs --storycloze-dir"),
    (["--train-dataset", "story_cloze", "--storycloze-dir", "/nonexistent/dir"], "is not a folder"),
])
def test_bad_input_fails_before_anything_loads(synth, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        finetune.main(common(synth, tmp_path, "--train-dataset", "synth_qa", *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "nlp").exists()


def test_evaluation_of_story_cloze_checks_its_folder_first(synth, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_task_addition.main(common(synth, tmp_path, "--eval-datasets", "synth_qa,story_cloze",
                                       "--storycloze-dir", str(tmp_path)))
    assert "has no StoryCloze 2016 validation file" in capsys.readouterr().err


def test_tiny_model_needs_a_tokenizer_and_missing_vectors_name_the_command(synth, tmp_path, capsys):
    args = common(synth, tmp_path, "--finetuning-mode", "standard")
    with pytest.raises(SystemExit):
        eval_single_task.main([a for a in args if a != str(synth[1]) and a != "--tokenizer"])
    assert "pass --tokenizer" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="python nlp/finetune.py --train-dataset synth_qa"):
        eval_single_task.main(args)


def test_scripts_run_from_the_repository_root(synth, tmp_path):
    """`python nlp/<script>.py`: the repository root is importable and nlp/datasets.py does not shadow the
    Hugging Face `datasets` package (offline, the hub loader then fails with the reader's own message)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = common(synth, tmp_path, "--eval-datasets", "qasc", "--data-location", str(tmp_path / "none"))
    r = subprocess.run([sys.executable, "nlp/eval_single_task.py", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode != 0 and "task qasc: cannot load split" in r.stderr
    assert "ImportError" not in r.stderr and "load_dataset('allenai/qasc'" in r.stderr


@pytest.mark.distributed
def test_distributed_finetune_and_eval_write_one_copy(synth, tmp_path):
    d = distributed_run_matches_one_process("nlp", "talos-tiny-t5", lambda save, *extra: common(synth, save, *extra),
                                            "synth_qa", tmp_path / "runs")
    # the masks of two ranks (all-reduced Fisher sums) equal a single-process calibration
    finetune.main(common(synth, tmp_path / "one", "--finetuning-mode", "talos", "--eval-datasets", "synth_qa",
                         "--train-dataset", "synth_qa"))
    m1 = load_tensors(run_dir(tmp_path / "one", "talos", "synth_qa") / "mask.safetensors")
    m2 = load_tensors(d / "mask.safetensors")
    assert m1 and m1.keys() == m2.keys() and all(torch.equal(m1[n], m2[n]) for n in m1)


PINNED_NLP = ("90f4253288", "9ff91b1cab")  # talos, standard


def test_hash_of_the_real_default_configuration_is_pinned(monkeypatch):
    """t5-base on qasc with the default flags: the official Fisher target and precision are in the hash."""
    import nlp.models
    from nlp import args as nargs
    from nlp.common import RUNS

    monkeypatch.setattr(nlp.models, "check_model_name", lambda name, cache_dir=None: "seq2seq")  # no hub read

    def run(*extra):
        a = nargs.parse_args(["--train-dataset", "qasc", "--device", "cpu", *extra], need_train_dataset=True)
        return RUNS.finetune(a, "qasc")

    talos_run, std_run = run(), run("--finetuning-mode", "standard")
    # only what differs from the declared defaults: the resolved precision and nlp's calibration batch preset
    assert dict(talos_run.hparams) == {"mode": "talos", "task": "qasc", "precision": "fp32",
                                       "calibration_batch_size": 32}
    assert dict(std_run.hparams) == {"mode": "standard", "task": "qasc", "precision": "fp32"}
    assert (talos_run.hash, std_run.hash) == PINNED_NLP
    assert run("--precision", "bf16").hash != talos_run.hash
    assert run("--fisher-target", "log_prob").hash != talos_run.hash


def test_local_model_folder_is_hashed_by_content(tmp_path, monkeypatch):
    """Replacing the weights of a local --model folder gives a new run (not a silently reused one)."""
    import nlp.models
    from nlp import args as nargs
    from nlp.common import RUNS

    monkeypatch.setattr(nlp.models, "check_model_name", lambda name, cache_dir=None: "seq2seq")
    folder = tmp_path / "my-t5"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights v1")

    def run():
        a = nargs.parse_args(["--model", str(folder), "--train-dataset", "qasc", "--device", "cpu"],
                             need_train_dataset=True)
        return RUNS.finetune(a, "qasc")

    first = run()
    assert first.hparams["model"].startswith("sha256:")
    (folder / "model.safetensors").write_bytes(b"weights v2, replaced")
    assert run().hash != first.hash
