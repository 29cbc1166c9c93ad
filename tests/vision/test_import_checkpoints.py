"""Checkpoint import (vision/checkpoints.py, vision/import_checkpoints.py) on tiny random models, offline.

Random tiny models stand in for the hub files: transformers CLIPModel/CLIPVisionModel saved with
``save_pretrained`` (FusionBench), an open_clip state dict with ``model.`` keys (TALL-masks) and a pickled module
(task_vectors), each written where the hub layout puts it under a ``--from`` folder.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from talos.runinfo import seed_everything
from talos.task_vector import TaskVector
from vision import eval_single_task, eval_task_addition, eval_task_negation, import_checkpoints
from vision.checkpoints import (convert_hf_clip, convert_open_clip, encoder_activation, hf_clip_to_open_clip,
                                hf_config_activation, hf_config_architecture)
from vision.synthetic import make_synthetic_datasets

transformers = pytest.importorskip("transformers")

MODEL = "talos-tiny-vit"  # built with QuickGELU (--activation quick_gelu), the activation of OpenAI CLIP
TASKS = ["SynthShapes", "SynthColors"]
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="quick_gelu")
TEXT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    loc = tmp_path_factory.mktemp("import_data")
    make_synthetic_datasets(loc, n_train=40, n_test=20)
    return loc


def our_clip(activation="quick_gelu", seed=0):
    """The CLIP the scripts build for ``--model MODEL --pretrained none --activation A --seed seed``."""
    from vision.models import load_clip

    seed_everything(seed)
    return load_clip(MODEL, "none", activation=activation)[0]


def visual_state(clip):
    return {f"visual.{k}": v.detach().clone() for k, v in clip.visual.state_dict().items()}


def to_hf(visual: dict, prefix: str = "") -> dict:
    """Independent inverse of the conversion (open_clip visual.* -> transformers CLIP vision keys)."""
    out = {}
    for k, v in visual.items():
        k = k.removeprefix("visual.")
        if k == "proj":
            out["visual_projection.weight"] = v.T.contiguous()
            continue
        if k.startswith("transformer.resblocks."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            layer = f"{prefix}encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}_proj.{kind}"] = part.clone()
                continue
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                if rest.startswith(a + "."):
                    out[layer + b + rest[len(a):]] = v
            continue
        name = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
                "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
                "ln_post.bias": "post_layernorm.bias"}[k]
        out[prefix + name] = v
    return out


def noise(visual: dict, seed: int, scale: float = 1e-2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in visual.items()}


def common(data, save, *extra):
    return ["--model", MODEL, "--pretrained", "none", "--activation", "quick_gelu", "--data-location", str(data),
            "--save", str(save),
            "--eval-datasets", ",".join(TASKS), "--control-dataset", "SynthControl", "--eval-batch-size", "64",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--n-eval-points", "3", *extra]


def assert_task_vector(run_dir, expected: dict, skip=("visual.proj",)):
    tv = TaskVector.load(run_dir / "task_vector.safetensors")
    for k, v in expected.items():
        if k in skip:
            assert not tv[k].any(), k  # the source never trained it
        else:
            torch.testing.assert_close(tv[k], v, atol=2e-6, rtol=0)
    return tv


# ------------------------------------------------------------------------------------------------- conversion
def test_transformers_clip_to_open_clip_gives_the_same_image_features():
    import open_clip

    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32))
    hf.eval()
    oc = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
                        quick_gelu=True).eval()
    assert encoder_activation(oc.visual) == "quick_gelu"
    conv = convert_hf_clip(hf.state_dict())
    assert set(conv.tensors) == {f"visual.{k}" for k in oc.visual.state_dict()}  # every encoder key, exactly
    assert "logit_scale" in conv.ignored and all(k.startswith(("text_", "logit")) for k in conv.ignored)
    oc.visual.load_state_dict({k.removeprefix("visual."): v for k, v in conv.tensors.items()}, strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x)
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
        torch.testing.assert_close(oc.encode_image(x), ref, atol=1e-5, rtol=0)
    # a CLIPVisionModel's keys, with and without the vision_model. prefix, map to the same tensors (no proj)
    vis = {k: v for k, v in hf.state_dict().items() if k.startswith("vision_model.")}
    bare = {k.removeprefix("vision_model."): v for k, v in vis.items()}
    a, b = hf_clip_to_open_clip(vis), hf_clip_to_open_clip(bare)
    assert set(a) == set(b) == set(conv.tensors) - {"visual.proj"}
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], conv.tensors[k]) for k in a)
    with pytest.raises(ValueError, match="vision_model.encoder.layers.0.extra.weight"):
        convert_hf_clip({**vis, "vision_model.encoder.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"layer 1 has only the \['k', 'q'\]"):
        convert_hf_clip({k: v for k, v in vis.items() if k != "vision_model.encoder.layers.1.self_attn.v_proj.bias"})


def test_config_fields_left_out_take_transformers_defaults():
    # recent transformers write only non-default fields: an openai/clip-vit-base-patch32-like config
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": {"model_type": "clip_vision_model"}}
    assert hf_config_activation(cfg) == "quick_gelu"
    assert hf_config_architecture(cfg) == {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                           "intermediate_size": 3072, "patch_size": 32, "image_size": 224}
    assert hf_config_activation({**VISION, "hidden_act": "gelu"}) == "gelu"


def test_open_clip_state_dicts_account_for_every_key():
    clip = our_clip()
    sd = {f"model.{k}": v for k, v in clip.state_dict().items()}
    conv = convert_open_clip({**sd, "model_name": "ViT-B-32"})
    assert set(conv.tensors) == set(visual_state(clip))
    assert "model_name" in conv.ignored and "model.token_embedding.weight" in conv.ignored
    with pytest.raises(ValueError, match="model.adapter.weight"):
        convert_open_clip({**sd, "model.adapter.weight": torch.zeros(2)})


# ------------------------------------------------------------------------------------------------- the sources
def write_fusionbench(root, theta0: dict, deltas: dict, *, vision=VISION, theta0_shift=0.0):
    """openai/clip-tiny (CLIPModel, save_pretrained) and tanganke/clip-tiny_<task> (CLIPVisionModel)."""
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=32)
    pre = transformers.CLIPModel(cfg)
    shifted = {k: v + theta0_shift for k, v in theta0.items()}
    missing, unexpected = pre.load_state_dict(to_hf(shifted, "vision_model."), strict=False)
    assert not unexpected and all(k.startswith(("text_", "logit")) for k in missing)
    pre.save_pretrained(root / "openai" / "clip-tiny")
    for i, (task, delta) in enumerate(deltas.items()):
        ft = {k: theta0[k] + delta[k] for k in theta0 if k != "visual.proj"}
        out = root / "tanganke" / f"clip-tiny_{task.lower()}"
        if i == 0:  # what transformers 5 writes: no vision_model. prefix
            m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
            assert not m.load_state_dict(to_hf(ft), strict=False).unexpected_keys
            m.save_pretrained(out)
        else:  # what FusionBench's files hold (transformers 4): vision_model. prefix, position_ids buffer
            out.mkdir(parents=True)
            sd = to_hf(ft, "vision_model.")
            sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
            save_file(sd, out / "model.safetensors")
            (out / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"], **vision}))


def fusionbench_flags(*extra):
    return ["--source", "fusionbench", "--source-model", "clip-tiny", "--tasks", ",".join(TASKS),
            *[f"--source-name={t}={t.lower()}" for t in TASKS], *extra]


def imported_runs(save):
    base = save / "vision" / MODEL / "imported"
    return {t: next((base / t).iterdir()) for t in TASKS} if base.exists() else {}


def test_fusionbench_import_then_protocols(data, tmp_path):
    theta0 = visual_state(our_clip())
    deltas = {t: noise(theta0, i) for i, t in enumerate(TASKS)}
    write_fusionbench(tmp_path / "hub", theta0, deltas)
    save = tmp_path / "runs"
    out = import_checkpoints.main(common(data, save, "--from", str(tmp_path / "hub"), *fusionbench_flags()))
    runs = imported_runs(save)
    assert {t: str(d) for t, d in runs.items()} == out
    for t in TASKS:
        assert_task_vector(runs[t], deltas[t])
        cfg = json.loads((runs[t] / "config.json").read_text())
        rec = cfg["import"]
        assert rec["source"] == "fusionbench" and rec["repo_id"] == f"tanganke/clip-tiny_{t.lower()}"
        assert rec["theta0"] == "ours" and rec["theta0_max_abs_diff"] == 0.0 and rec["activation"] == "quick_gelu"
        assert rec["taken_from_theta0"] == ["visual.proj"]
        assert {f["path"] for f in rec["files"]} == {"config.json", "model.safetensors"}
        assert all(len(f["sha256"]) == 64 for f in rec["files"] + rec["pretrained_files"])
        assert rec["pretrained_files"][0]["repo_id"] == "openai/clip-tiny"
        assert cfg["hparams"]["import_source"] == "fusionbench" and "lr" not in cfg["hparams"]
    # the evaluation scripts find the imported folders like any mode's
    flags = common(data, save, "--finetuning-mode", "imported", "--import-source", "fusionbench",
                   "--results-json", str(tmp_path / "results.json"))
    single = eval_single_task.main(flags)
    assert set(single["test"]["finetuned"]) == set(TASKS)
    add = eval_task_addition.main(flags)
    neg = eval_task_negation.main(flags)
    assert set(add["per_task"]) == set(TASKS) and 0 <= add["absolute"] <= 1
    assert set(neg["per_task"]) == set(TASKS)
    eval_task_addition.main(flags + ["--merge", "ties"])
    res = json.loads((tmp_path / "results.json").read_text())
    label = "imported:fusionbench"  # rows of a shared results.json, apart from other sources and modes
    assert set(res["single_task"][label]) == set(TASKS) and res["task_vector_density"][label]
    assert res["addition"][label]["absolute"] == add["absolute"] and res["negation"][label]["coef"] == neg["coef"]
    assert res["merges"][f"sum ({label})"] == res["addition"][label] and f"ties ({label})" in res["merges"]
    # a second import skips the completed runs; another source's vectors are elsewhere
    before = (runs[TASKS[0]] / "task_vector.safetensors").stat().st_mtime_ns
    import_checkpoints.main(common(data, save, "--from", str(tmp_path / "hub"), *fusionbench_flags()))
    assert (runs[TASKS[0]] / "task_vector.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileNotFoundError, match="import_checkpoints.py --source tall_masks"):
        eval_task_addition.main(common(data, save, "--finetuning-mode", "imported", "--import-source", "tall_masks"))


def test_tall_masks_state_dicts(data, tmp_path):
    clip = our_clip()
    theta0 = visual_state(clip)
    sd0 = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    folder = tmp_path / "hub" / "nik-dim" / "tall_masks" / "single_task" / "TINY-clip"  # hub names differ in case
    folder.mkdir(parents=True)
    torch.save(sd0, folder / "zeroshot.pt")
    deltas = {t: noise(theta0, 10 + i) for i, t in enumerate(TASKS)}
    for t in TASKS:
        (folder / f"{t}Val").mkdir()
        torch.save({**sd0, **{f"model.{k}": theta0[k] + deltas[t][k] for k in theta0}, "model_name": MODEL},
                   folder / f"{t}Val" / "nonlinear_finetuned.pt")
    save = tmp_path / "runs"
    import_checkpoints.main(common(data, save, "--from", str(tmp_path / "hub"), "--source", "tall_masks",
                                   "--source-model", "tiny-CLIP", "--tasks", ",".join(TASKS)))
    runs = imported_runs(save)
    for t in TASKS:
        assert_task_vector(runs[t], deltas[t], skip=())
        rec = json.loads((runs[t] / "config.json").read_text())["import"]
        assert rec["files"][0]["path"] == f"single_task/TINY-clip/{t}Val/nonlinear_finetuned.pt"
        assert "model_name" in rec["ignored_keys"]


def test_tall_masks_missing_layer_is_named(data, tmp_path):
    clip = our_clip()
    sd = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    folder = tmp_path / "hub" / "nik-dim" / "tall_masks" / "single_task" / "tiny"
    (folder / "SynthShapesVal").mkdir(parents=True)
    torch.save(sd, folder / "zeroshot.pt")
    torch.save({k: v for k, v in sd.items() if ".resblocks.1." not in k}, folder / "SynthShapesVal" /
               "nonlinear_finetuned.pt")
    save = tmp_path / "runs"
    with pytest.raises(ValueError, match=r"missing keys: visual\.transformer\.resblocks\.1\.attn\.in_proj_bias"):
        import_checkpoints.main(common(data, save, "--from", str(tmp_path / "hub"), "--source", "tall_masks",
                                       "--source-model", "tiny", "--tasks", "SynthShapes"))
    assert not save.exists()


def test_task_vectors_pickles_need_allow_pickle(data, tmp_path, capfd):
    from tests.vision.pickled_encoder import ImageEncoder

    clip = our_clip()
    theta0 = visual_state(clip)
    root = tmp_path / "drive" / "tiny"
    (root / "SynthShapes").mkdir(parents=True)
    torch.save(ImageEncoder(our_clip()), root / "zeroshot.pt")
    delta = noise(theta0, 20)
    with torch.no_grad():
        for n, p in clip.visual.named_parameters():
            p.add_(delta[f"visual.{n}"])
    torch.save(ImageEncoder(clip), root / "SynthShapes" / "finetuned.pt")
    save = tmp_path / "runs"
    flags = common(data, save, "--from", str(tmp_path / "drive"), "--source", "task_vectors", "--source-model", "tiny",
                   "--tasks", "SynthShapes")
    with pytest.raises(SystemExit) as e:
        import_checkpoints.main(flags)
    assert e.value.code == 2 and "--allow-pickle" in capfd.readouterr().err
    assert not save.exists()  # nothing written
    import_checkpoints.main(flags + ["--allow-pickle"])
    assert "WARNING: unpickling" in capfd.readouterr().err
    (d,) = (save / "vision" / MODEL / "imported" / "SynthShapes").iterdir()
    assert_task_vector(d, delta, skip=())
    rec = json.loads((d / "config.json").read_text())["import"]
    assert rec["source_info"]["class"] == "tests.vision.pickled_encoder.ImageEncoder"


def test_finetune_and_eval_flags(tmp_path, capsys):
    from vision import finetune
    from vision.args import parse_args

    base = ["--model", "talos-tiny-vit", "--pretrained", "none", "--device", "cpu", "--save", str(tmp_path)]
    with pytest.raises(SystemExit):
        finetune.main(base + ["--finetuning-mode", "imported", "--import-source", "fusionbench",
                              "--train-dataset", "SynthShapes"])
    assert "not trained by this script" in capsys.readouterr().err
    for bad, message in ((["--finetuning-mode", "imported"], "imported needs --import-source"),
                         (["--finetuning-mode", "standard", "--import-source", "tall_masks"],
                          "--import-source is required with, and only with")):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(base + ["--finetuning-mode", "imported", "--import-source", "nope"])
    assert "unknown --import-source 'nope'; valid choices: " in capsys.readouterr().err
    assert not (tmp_path / "vision").exists()


# ------------------------------------------------------------------------------------------------- refusals
def _refuses(data, tmp_path, message, *extra, write=None):
    theta0 = visual_state(our_clip())
    deltas = {t: noise(theta0, i) for i, t in enumerate(TASKS)}
    (write or write_fusionbench)(tmp_path / "hub", theta0, deltas)
    save = tmp_path / "runs"
    with pytest.raises(ValueError, match=message):
        import_checkpoints.main(common(data, save, "--from", str(tmp_path / "hub"), *fusionbench_flags(), *extra))
    assert not save.exists() or not (save / "vision" / MODEL / "imported").exists()  # nothing written


def test_refuses_a_wrong_activation(data, tmp_path):
    # QuickGELU checkpoints against our model built with GELU: the features would differ
    _refuses(data, tmp_path, "quick_gelu MLP activations, our model is built with gelu", "--activation", "gelu",
             write=lambda root, t0, d: write_fusionbench(root, visual_state(our_clip("gelu")),
                                                         {t: noise(t0, 0) for t in d}))


def test_refuses_a_mismatched_architecture(data, tmp_path):
    wide = {**VISION, "intermediate_size": 128}
    _refuses(data, tmp_path, r"architecture differs: intermediate_size 128 vs ours 256",
             write=lambda root, t0, d: write_fusionbench_raw(root, wide))


def write_fusionbench_raw(root, vision):
    """Random checkpoints of another shape (they cannot hold our θ0)."""
    torch.manual_seed(1)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=32)
                           ).save_pretrained(root / "openai" / "clip-tiny")
    for t in TASKS:
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(
            root / "tanganke" / f"clip-tiny_{t.lower()}")


def test_refuses_a_different_theta0_unless_asked(data, tmp_path):
    _refuses(data, tmp_path, r"differs from our θ0 .*largest \|difference\| 0.001 at visual\.",
             write=lambda root, t0, d: write_fusionbench(root, t0, d, theta0_shift=1e-3))
    save = tmp_path / "runs"
    import_checkpoints.main(common(data, save, "--from", str(tmp_path / "hub"), *fusionbench_flags(),
                                   "--use-source-theta0"))
    theta0 = visual_state(our_clip())
    runs = imported_runs(save)
    # τ = θ_ft − θ0_source = delta − shift (proj: not in the checkpoint, τ = 0)
    assert_task_vector(runs[TASKS[0]], {k: v - 1e-3 for k, v in noise(theta0, 0).items()})
    rec = json.loads((runs[TASKS[0]] / "config.json").read_text())["import"]
    assert rec["theta0"] == "source" and abs(rec["theta0_max_abs_diff"] - 1e-3) < 1e-6


def test_refuses_unknown_keys(data, tmp_path):
    def write(root, theta0, deltas):
        write_fusionbench(root, theta0, deltas)
        f = root / "tanganke" / "clip-tiny_synthcolors" / "model.safetensors"
        from safetensors.torch import load_file

        save_file({**load_file(f), "vision_model.adapter.weight": torch.zeros(3)}, f)

    _refuses(data, tmp_path, "unknown keys .*vision_model.adapter.weight", write=write)


def test_hub_downloads_go_through_huggingface_hub(data, tmp_path, monkeypatch):
    theta0 = visual_state(our_clip())
    deltas = {t: noise(theta0, i) for i, t in enumerate(TASKS)}
    hub = tmp_path / "hub"
    write_fusionbench(hub, theta0, deltas)
    calls = []

    def listing(repo_id, revision=None, **_):
        calls.append(("list", repo_id, revision))
        return [p.relative_to(hub / repo_id).as_posix() for p in (hub / repo_id).rglob("*") if p.is_file()]

    def download(repo_id, filename, revision=None, cache_dir=None, **_):
        calls.append(("get", repo_id, filename, revision, cache_dir))
        snapshot = tmp_path / "cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("c0ffee" * 7)[:40]
        dst = snapshot / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((hub / repo_id / filename).read_bytes())
        return str(dst)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", listing)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    save = tmp_path / "runs"
    import_checkpoints.main(common(data, save, *fusionbench_flags("--revision", "v1", "--hub-cache",
                                                                  str(tmp_path / "cache"))))
    assert ("get", "openai/clip-tiny", "model.safetensors", "v1", str(tmp_path / "cache")) in calls
    rec = json.loads((imported_runs(save)[TASKS[1]] / "config.json").read_text())["import"]
    assert rec["files"][0]["revision"] == "v1" and rec["files"][0]["resolved_revision"] == ("c0ffee" * 7)[:40]
