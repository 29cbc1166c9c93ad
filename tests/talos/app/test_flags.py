"""The application layer (talos.app): flags from typed settings, validation, run hashes, resume checks, device."""
from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch

from talos.app import checks
from talos.app.flags import Domain, build_parser, parse
from talos.app.runs import RunPaths
from talos.app.settings import StepSettings
from talos.config import Settings, setting
from talos.merges import MERGES
from talos.modes import MODES, FinetuneMode, SparseSettings, global_lowest, register_mode
from talos.task_vector import TaskVector


@dataclass
class ToyModel(Settings):
    model: str = setting("m", "model name")


@dataclass
class ToyData(Settings):
    train_dataset: str | None = setting(None, "task to fine-tune", hashed=False, kind=str)
    eval_datasets: list = setting(["A", "B"], "tasks", hashed=False, csv=True, kind=list)
    control_dataset: str = setting("C", "control", hashed=False)


@dataclass
class ToyTraining(StepSettings):
    lr: float = setting(1e-3, "learning rate", low=0.0, open_low=True)
    wd: float = setting(0.0, "weight decay", low=0.0)


def _check_task(name: str) -> None:
    if name not in ("A", "B", "C"):
        raise ValueError(f"unknown task {name!r}; valid choices: A, B, C")


TOY = Domain("toy", "toy scripts", ToyModel, ToyData, ToyTraining, validate=lambda cfg, need: None,
             check_task=_check_task, defaults={"calibration_batch_size": 8, "wandb_project": "proj"})
RUNS = RunPaths("toy")


def _parse(*argv: str, **kw):
    return parse(TOY, ["--device", "cpu", *argv], **kw)


def test_defaults_csv_and_typed_groups():
    cfg = _parse("--eval-datasets", "A,,B")
    assert cfg.eval_datasets == ["A", "B"] and cfg.control_dataset == "C" and cfg.precision == "fp32"
    assert cfg.sparsity == 0.9 and cfg.calibration_batch_size == 8 and cfg.wandb_project == "proj"
    assert isinstance(cfg.group("training"), ToyTraining) and cfg.group("training").lr == cfg.lr == 1e-3
    assert type(cfg.mode_settings()).__name__ == "CalibrationSettings"  # talos's own settings class
    with pytest.raises(AttributeError, match="no setting 'nope'"):
        cfg.nope  # noqa: B018  (no silent default for a misspelt setting)
    with pytest.raises(Exception, match="frozen"):
        cfg.lr = 1.0
    assert cfg.replace(lr=2.0).lr == 2.0 and cfg.lr == 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "0"], "--sparsity must be > 0.0 and < 1.0"),
    (["--sparsity", "1"], "--sparsity must be > 0.0 and < 1.0"),
    (["--sparsity", "nan"], "--sparsity must be a finite number"),
    (["--finetuning-mode", "nope"], "valid choices"),
    (["--merge", "nope"], "valid choices"),
    (["--eval-datasets", "A,Z"], "unknown task 'Z'"),
    (["--calibration-rounds", "0"], "--calibration-rounds must be >= 1"),
    (["--soft-mask", "1.5"], "--soft-mask must be >= 0.0 and <= 1.0"),
    (["--n-eval-points", "1"], "--n-eval-points must be >= 2"),
    (["--control-threshold", "0"], "--control-threshold"),
    (["--stop-after", "0"], "--stop-after must be >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--lr", "0"], "--lr must be > 0.0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--wd", "nan"], "--wd must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--lora-alpha", "inf"], "--lora-alpha must be a finite number"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be >= 1, got -5"),
    (["--dare-p", "1.5"], "--dare-p 1.5"),
    (["--tall-masks-lam", "-1"], "tall-masks"),
    (["--finetuning-mode", "imported"], "needs --import-source"),
    (["--ties-k", "5"], "--ties-k 5"),
])
def test_bad_values_exit_with_the_reason_before_writing(argv, message, capsys, tmp_path):
    save = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        _parse(*argv, "--save", str(save))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not save.exists()


def test_train_dataset_required_only_for_finetuning(capsys):
    _parse()
    with pytest.raises(SystemExit):
        _parse(need_train_dataset=True)
    assert "--train-dataset is required" in capsys.readouterr().err


def test_run_hash_holds_only_the_modes_own_settings_and_only_non_defaults():
    for name in MODES.names():
        mode = MODES.get(name)
        extra = ["--import-source", "someone"] if name == "imported" else []
        h = RUNS.finetune(_parse("--finetuning-mode", name, "--sparsity", "0.8", "--lora-rank", "4", "--lr", "0.5",
                                 *extra), "A").hparams
        assert ("sparsity" in h) == mode.sparse, name
        assert ("lr" in h) == (name != "imported"), name  # imported vectors: someone else's schedule
        assert ("lora_rank" in h) == (name in ("lora", "llora")), name
        assert h["mode"] == name and h["task"] == "A"
    default = RUNS.finetune(_parse(), "A").hparams
    # non-default only: the preset calibration batch size (8 vs None) and the resolved precision are entries
    assert default == {"mode": "talos", "task": "A", "precision": "fp32", "calibration_batch_size": 8}
    assert RUNS.finetune(_parse("--soft-mask", "0.1"), "A").hash == RUNS.finetune(_parse(), "A").hash
    assert RUNS.finetune(_parse("--soft-mask", "0.2"), "A").hparams["soft_mask"] == 0.2


def test_run_paths_hash_settings_and_name_the_producing_script(tmp_path):
    cfg = _parse("--save", str(tmp_path), "--finetuning-mode", "posthoc")
    with pytest.raises(FileNotFoundError, match=r"python toy/finetune.py --train-dataset A --finetuning-mode standard"):
        RUNS.task_vectors(cfg, ["A"])  # posthoc reads the standard vectors
    std = cfg.replace(finetuning_mode="standard")
    tv = TaskVector({"w": torch.arange(4.0)})
    run = RUNS.finetune(std, "A")
    run.dir.mkdir(parents=True)
    tv.save(run.task_vector)
    loaded = RUNS.task_vectors(cfg, ["A"])
    assert list(loaded) == ["A"] and torch.equal(loaded["A"]["w"], tv["w"])
    assert run.dir.is_relative_to(tmp_path / "toy")
    assert RUNS.finetune(std.replace(lr=2e-3), "A").hash != run.hash  # a fine-tuning flag changes the folder ...
    e1, e2 = RUNS.evaluation(std, "addition"), RUNS.evaluation(std.replace(lr=2e-3), "addition")
    assert e1.hash != e2.hash  # ... and the folders of the evaluations that read it
    ties = RUNS.evaluation(std.replace(merge="ties"), "addition")
    assert ties.hash != e1.hash and ties.hparams["merge_kwargs"]["k"] == 0.1
    assert RUNS.evaluation(std.replace(merge="ties"), "single_task").hash == RUNS.evaluation(std, "single_task").hash


# ----------------------------------------------------------------------------------------------------------
# A mode with a new setting and a merge with a new hyperparameter, registered from this file
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ToyQuantileSettings(SparseSettings):
    """A sparse mode with one new setting."""

    quantile_power: float = setting(1.0, "exponent on |θ0| before ranking", low=0.0, open_low=True)


class ToyQuantile(FinetuneMode):
    """Toy: keep the smallest |θ0|^p entries trainable."""

    name = "toy_quantile"
    settings = ToyQuantileSettings
    sparse = True

    def masks(self, ctx):
        s = self.settings_of(ctx)
        named = dict(ctx.model.named_parameters())
        return global_lowest({n: named[n].detach().abs().cpu() ** s.quantile_power for n in ctx.eligible},
                             1.0 - s.sparsity)


def merge_toy_scaled(vectors, *, toy_gain: float = 0.5):
    """Toy merge: toy_gain · Σ τ_t."""
    if not toy_gain > 0:
        raise ValueError(f"toy_gain must be > 0, got {toy_gain}")
    vs = list(vectors.values())
    return TaskVector({k: toy_gain * sum(v[k] for v in vs) for k in vs[0].keys()})


@pytest.fixture
def registered():
    register_mode(ToyQuantile)
    MERGES.register("toy_scaled")(merge_toy_scaled)
    yield
    MODES.unregister("toy_quantile")
    MERGES.unregister("toy_scaled")


def test_a_mode_and_a_merge_registered_outside_the_library_get_flag_help_config_and_hash(registered, tmp_path, capsys):
    from talos.app.jobs import start_finetune

    helptext = build_parser(TOY).format_help()
    assert "--quantile-power" in helptext and "exponent on |θ0| before ranking" in helptext
    assert "--toy-scaled-toy-gain" in helptext and "toy_scaled: toy_gain" in helptext
    cfg = _parse("--finetuning-mode", "toy_quantile", "--quantile-power", "2", "--merge", "toy_scaled",
                 "--toy-scaled-toy-gain", "0.25", "--save", str(tmp_path), "--train-dataset", "A")
    # config.json
    job = start_finetune(cfg, runs=RUNS)
    saved = json.loads(job.run.config.read_text())
    assert saved["settings"]["method"] == {"finetuning_mode": "toy_quantile", "sparsity": 0.9, "quantile_power": 2.0}
    assert saved["settings"]["merge"] == {"merge": "toy_scaled", "variant": "official", "toy_gain": 0.25}
    # hash entries: the mode's setting when not its default; the merge's in the evaluation folder
    assert job.run.hparams["quantile_power"] == 2.0
    assert "quantile_power" not in RUNS.finetune(cfg.replace(quantile_power=1.0), "A").hparams
    assert RUNS.evaluation(cfg, "addition").hparams["merge_kwargs"] == {"variant": "official", "toy_gain": 0.25}
    # and the merge runs through the library with its flag's value
    from talos.merges import merge

    out = merge("toy_scaled", {"a": TaskVector({"w": torch.ones(2)})}, **cfg.merge_hparams())
    assert torch.equal(out["w"], torch.full((2,), 0.25))
    with pytest.raises(SystemExit):
        _parse("--merge", "toy_scaled", "--toy-scaled-toy-gain", "-1")
    assert "toy_gain must be > 0" in capsys.readouterr().err


def test_resume_refuses_a_run_saved_under_other_settings(tmp_path):
    from talos.app.jobs import start_finetune

    cfg = _parse("--save", str(tmp_path), "--train-dataset", "A", "--finetuning-mode", "standard")
    job = start_finetune(cfg, runs=RUNS)
    from talos.stages import release_run_lock

    release_run_lock(job.run)
    saved = json.loads(job.run.config.read_text())
    assert saved["resolved"]["wd"] == 0.0 and saved["resolved"]["lr"] == 1e-3
    # a default that changed since the run started: same folder (defaults are not hashed), other value
    saved["resolved"]["wd"] = 0.5
    job.run.config.write_text(json.dumps(saved))
    job.run.checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match=r"wd: saved 0.5, now 0.0.*cannot be resumed"):
        start_finetune(cfg, runs=RUNS)
    del saved["resolved"]["wd"]  # a setting added since the run was made: resumes
    job.run.config.write_text(json.dumps(saved))
    release_run_lock(start_finetune(cfg, runs=RUNS).run)


# ----------------------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------------------
def _dev(device, precision=None):
    return types.SimpleNamespace(device=device, precision=precision)


def test_device_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        checks.resolve_device(_dev("cuda"))
    with pytest.raises(ValueError, match="CUDA is not available"):
        checks.resolve_device(_dev("cuda:1", "fp32"))
    with pytest.raises(ValueError, match="unknown --device"):
        checks.resolve_device(_dev("gpu"))


def test_default_device_never_falls_back_silently_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(checks, "nvidia_gpu_present", lambda: True)  # a GPU whose CUDA failed to load
    with pytest.raises(ValueError, match="pass --device cpu"):
        checks.resolve_device(_dev(None))
    a = _dev("cpu")  # the CPU on purpose
    checks.resolve_device(a)
    assert (a.device, a.precision) == ("cpu", "fp32")
    monkeypatch.setattr(checks, "nvidia_gpu_present", lambda: False)  # a CPU machine
    b = _dev(None)
    checks.resolve_device(b)
    assert (b.device, b.precision) == ("cpu", "fp32")


def test_scripts_print_device_and_precision_first(capsys):
    _parse()
    assert capsys.readouterr().out.splitlines()[0] == "device: cpu (cpu), precision: fp32"
