"""The offline demo: two procedurally generated image-caption worlds, a toy CLIP pre-trained on both, and
the TaLoS pipeline (fine-tuning modes, addition, negation, merges, figures) on a laptop CPU.

    bash launch_scripts/demo.sh out/demo                                   # disjoint world, ~5 min
    bash launch_scripts/demo.sh out/demo-overlapping --world overlapping   # shared-scene world

Modules: ``domains`` (the disjoint world's seven image domains), ``world`` (the overlapping world's scenes,
both worlds' task registry, task image folders), ``tasks`` (the dataset plugin the scripts load with
``--plugins vision.demo.tasks``), ``pretrain`` (the toy CLIP's contrastive pre-training), ``run`` (the
pipeline driver), ``figures``.
"""
from pathlib import Path

#: The committed checkpoint of ``talos-toy-clip`` (see toy_clip.json for the command that produced it).
CHECKPOINT = Path(__file__).resolve().parent / "toy_clip.safetensors"
MODEL = "talos-toy-clip"
