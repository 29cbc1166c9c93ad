"""NLP readers on fixture rows: template-0 prompts and choices, labels, the paper's splits and seeds, data errors.

The hub loader is replaced by fixture rows (never the network).
"""
from __future__ import annotations

import csv
import random

import pytest

import nlp.datasets as D
from nlp.datasets import TASKS, TaskDataError, get_examples, get_rows, split_val_test, to_example
from nlp.templates import TEMPLATES

ROWS = {
    "qasc": {"question": "What type of water formation is formed by clouds?",
             "choices": {"text": ["pearls", "streams", "shells", "diamonds", "rain", "beads", "cooled", "liquid"],
                         "label": ["A", "B", "C", "D", "E", "F", "G", "H"]},
             "answerKey": "F", "fact1": "beads of water are formed by water vapor condensing.",
             "fact2": "Clouds are made of water vapor.", "combinedfact": "Beads of water can be formed by clouds.",
             "id": "q0", "formatted_question": "x"},
    "wiki_qa": {"question_id": "Q1", "question": "how are glacier caves formed", "document_title": "Glacier cave",
                "answer": "A glacier cave is a cave formed within the ice of a glacier.", "label": 1},
    "quartz": {"id": "z0", "question": "If Mona is making a sound and she makes it softer, it will travel _____ .",
               "choices": {"text": ["farther", "less far"], "label": ["A", "B"]}, "answerKey": "B",
               "para": "Louder sounds travel farther.", "para_id": "p", "para_anno": {}, "question_anno": {}},
    "paws": {"id": 1, "sentence1": "In Paris, in October 1560, he secretly met the English ambassador.",
             "sentence2": "In October 1560, he secretly met with the English ambassador in Paris.", "label": 0},
    "story_cloze": {"story_id": "s0", "input_sentence_1": "Rick grew up in a troubled household.",
                    "input_sentence_2": "He never found good support in family, and turned to gangs.",
                    "input_sentence_3": "It wasn't long before Rick got shot in a robbery.",
                    "input_sentence_4": "The incident caused him to turn a new leaf.",
                    "sentence_quiz1": "He is happy now.", "sentence_quiz2": "He joined a gang.", "answer_right_ending": 1},
    "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                   "option1": "Sarah", "option2": "Maria", "answer": "1"},
    "wsc": {"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more truthful.",
            "span1_index": 0, "span2_index": 13, "span1_text": "Mark", "span2_text": "He", "idx": 0, "label": 1},
    "rte": {"premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
            "hypothesis": "Weapons of Mass Destruction Found in Iraq.", "idx": 0, "label": 1},
}

# template-0 prompts of the rows above, as promptsource renders them (prompt, choices, label)
EXPECTED = {
    "qasc": ("Beads of water are formed by water vapor condensing, and clouds are made of water vapor. Given these "
             "facts, what type of water formation is formed by clouds among the following options:\n- pearls\n"
             " - streams\n - shells\n - diamonds\n - rain\n - beads\n - cooled\n - liquid",
             ("pearls", "streams", "shells", "diamonds", "rain", "beads", "cooled", "liquid"), 5),
    "wiki_qa": ('Question: how are glacier caves formed?\nWould "A glacier cave is a cave formed within the ice of a '
                'glacier." be a reasonable answer?', ("No", "Yes"), 1),
    "quartz": ("Use information from the paragraph to answer the question.\n\nQuestion:\n\n\nIf Mona is making a "
               "sound and she makes it softer, it will travel farther or less far ? \n\n\nParagraph :\n\n"
               "Louder sounds travel farther.", ("farther", "less far"), 1),
    "paws": ("Determine if the following two sentences paraphrase each other or not.\nSent 1: In Paris, in October "
             "1560, he secretly met the English ambassador.\nSent 2: In October 1560, he secretly met with the "
             "English ambassador in Paris.", ("No", "Yes"), 0),
    "story_cloze": ("Rick grew up in a troubled household. He never found good support in family, and turned to "
                    "gangs. It wasn't long before Rick got shot in a robbery. The incident caused him to turn a new "
                    "leaf. What is a possible continuation for the story given the following options ? - He is "
                    "happy now.\n- He joined a gang.", ("He is happy now.", "He joined a gang."), 0),
    "winogrande": ("Sarah was a much better surgeon than Maria so _ always got the harder cases. In the previous "
                   "sentence, does _ refer to Sarah or  Maria?", ("Sarah", "Maria"), 0),
    "wsc": ("Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
            'truthful. In the previous sentence, does the pronoun "he" refer to Mark? Yes or no?', ("No", "Yes"), 1),
    "rte": ('No Weapons of Mass Destruction Found in Iraq Yet. Using only the above description and what you know '
            'about the world, is "Weapons of Mass Destruction Found in Iraq." definitely correct? Yes or no?',
            ("Yes", "No"), 1),
}
PAPER_TASKS = ["qasc", "wiki_qa", "quartz", "paws", "story_cloze", "winogrande", "wsc", "rte"]
# first indices of random.Random(42).shuffle(list(range(40))): the official reader's validation split
SHUFFLED_40 = [9, 3, 10, 36, 25]


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_template0_prompt_choices_label(task):
    ex = to_example(TASKS.get(task), ROWS[task])
    assert (ex.prompt, ex.choices, ex.label) == EXPECTED[task]
    # the template's own target is the labelled choice (training target == rank-classification label)
    _, target, choices = TEMPLATES[TASKS.get(task).template].apply(ROWS[task])
    assert choices[ex.label] == target


def test_pipe_in_a_field_does_not_split_the_prompt():
    row = dict(ROWS["rte"], premise="a ||| b.")
    ex = to_example(TASKS.get("rte"), row)
    assert ex.prompt.startswith("a ||| b. Using only") and ex.choices == ("Yes", "No")


def _variant(task: str, i: int) -> dict:
    row = dict(ROWS[task])
    key = {"qasc": "question", "wiki_qa": "question", "quartz": "para", "paws": "sentence1",
           "winogrande": "sentence", "wsc": "text", "rte": "premise"}[task]
    row[key] = f"{row[key]} #{i}"
    return row


class FakeHub:
    """Stands in for nlp.datasets._load_hub_split: fixture rows per (repo, config, split), calls recorded."""

    def __init__(self, sizes: dict[str, int], fail_first: bool = False) -> None:
        self.sizes, self.fail_first, self.calls = sizes, fail_first, []

    def __call__(self, source, split, cache_dir=None):
        self.calls.append((source.repo, source.config, source.parquet_export, split))
        if self.fail_first and not source.parquet_export:
            raise RuntimeError("Dataset scripts are no longer supported, but found super_glue.py")
        task = {"allenai/qasc": "qasc", "microsoft/wiki_qa": "wiki_qa", "allenai/quartz": "quartz",
                "google-research-datasets/paws": "paws", "allenai/winogrande": "winogrande"}.get(source.repo)
        task = task or source.config.split(".")[0]  # aps/super_glue: wsc.fixed, rte
        return [_variant(task, i) | {"_split": split, "_i": i} for i in range(self.sizes[split])]


@pytest.mark.parametrize("task,source", [
    ("qasc", ("allenai/qasc", None)), ("winogrande", ("allenai/winogrande", "winogrande_xl")),
    ("wsc", ("aps/super_glue", "wsc.fixed")), ("rte", ("aps/super_glue", "rte")),
])
def test_val32_tasks_split_the_shuffled_validation_split(monkeypatch, task, source):
    hub = FakeHub({"train": 7, "validation": 40})
    monkeypatch.setattr(D, "_load_hub_split", hub)
    train, val, test = (get_rows(task, s, data_location=None) for s in ("train", "val", "test"))
    assert [r["_split"] for r in train] == ["train"] * 7
    assert len(val) == 32 and len(test) == 8
    assert {r["_split"] for r in val + test} == {"validation"}
    assert [r["_i"] for r in val[:5]] == SHUFFLED_40  # random.Random(42), as the official reader
    assert sorted(r["_i"] for r in val + test) == list(range(40))
    assert {c[:2] for c in hub.calls} == {source}
    assert len(get_examples(task, "val", data_location=None)) == 32


@pytest.mark.parametrize("task,source", [
    ("wiki_qa", ("microsoft/wiki_qa", None)), ("quartz", ("allenai/quartz", None)),
    ("paws", ("google-research-datasets/paws", "labeled_final")),
])
def test_own_split_tasks_use_their_validation_and_test_splits(monkeypatch, task, source):
    hub = FakeHub({"train": 5, "validation": 6, "test": 9})
    monkeypatch.setattr(D, "_load_hub_split", hub)
    sizes = {s: [r["_split"] for r in get_rows(task, s, data_location=None)] for s in ("train", "val", "test")}
    assert sizes == {"train": ["train"] * 5, "val": ["validation"] * 6, "test": ["test"] * 9}
    assert [r["_i"] for r in get_rows(task, "test", data_location=None)] == list(range(9))  # hub order kept
    assert {c[:2] for c in hub.calls} == {source}


def test_script_repos_fall_back_to_the_parquet_export(monkeypatch):
    hub = FakeHub({"train": 3, "validation": 40}, fail_first=True)
    monkeypatch.setattr(D, "_load_hub_split", hub)
    assert len(get_rows("winogrande", "train", data_location=None)) == 3
    assert [c[2] for c in hub.calls] == [False, True]  # the repo (script: refused), then refs/convert/parquet


def test_unloadable_task_fails_early_naming_sources_and_fix(monkeypatch, tmp_path):
    def offline(source, split, cache_dir=None):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(D, "_load_hub_split", offline)
    with pytest.raises(TaskDataError) as e:
        D.check_tasks(["qasc", "rte"], data_location=str(tmp_path))
    msg = str(e.value)
    assert "2 tasks cannot be loaded" in msg and "allenai/qasc" in msg and "refs/convert/parquet" in msg
    assert str(tmp_path / "qasc" / "train") in msg and "huggingface-cli download" in msg


def test_local_files_override_the_hub(monkeypatch, tmp_path):
    import json

    monkeypatch.setattr(D, "_load_hub_split", lambda *a, **k: pytest.fail("hub must not be used"))
    (tmp_path / "paws").mkdir()
    for split, n in (("train", 2), ("validation", 3), ("test", 4)):
        with open(tmp_path / "paws" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps(dict(ROWS["paws"], id=i)) + "\n")
    assert [len(get_examples("paws", s, data_location=str(tmp_path))) for s in ("train", "val", "test")] == [2, 3, 4]


STORY_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def _story_csv(path, n):
    r = ROWS["story_cloze"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STORY_HEADER)
        for i in range(n):
            w.writerow([f"s{i}", r["input_sentence_1"], r["input_sentence_2"], r["input_sentence_3"],
                        r["input_sentence_4"], r["sentence_quiz1"], r["sentence_quiz2"], 1 + i % 2])


def test_storycloze_reads_the_official_csvs_and_trains_on_validation(tmp_path):
    _story_csv(tmp_path / "cloze_test_val__spring2016 - cloze_test_ALL_val.csv", 6)
    _story_csv(tmp_path / "cloze_test_test__spring2016 - cloze_test_ALL_test.csv", 40)
    kw = {"data_location": None, "storycloze_dir": str(tmp_path)}
    train = get_examples("story_cloze", "train", **kw)
    assert len(train) == 6 and [e.label for e in train[:2]] == [0, 1]
    assert (train[0].prompt, train[0].choices) == EXPECTED["story_cloze"][:2]
    val, test = get_rows("story_cloze", "val", **kw), get_rows("story_cloze", "test", **kw)
    assert len(val) == 32 and len(test) == 8
    assert [int(r["story_id"][1:]) for r in val[:5]] == SHUFFLED_40


def test_storycloze_without_its_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(TaskDataError, match="--storycloze-dir.*rocstories"):
        get_rows("story_cloze", "train", data_location=None, storycloze_dir=None)
    with pytest.raises(TaskDataError, match="no validation file"):
        get_rows("story_cloze", "train", data_location=None, storycloze_dir=str(tmp_path))


def test_split_val_test_is_pythons_seeded_shuffle():
    rows = list(range(100))
    val, test = split_val_test(rows)
    expected = list(range(100))
    random.Random(42).shuffle(expected)
    assert val == expected[:32] and test == expected[32:]
    small_val, small_test = split_val_test(list(range(10)))
    assert len(small_val) == 5 and len(small_test) == 5  # fewer rows than 32: halved, as the official reader


def test_synthetic_tasks_use_the_readers_formats(synth):
    loc = str(synth[0])
    for task, n_val, n_test in (("synth_qa", 32, 8), ("synth_para", 20, 20), ("synth_coref", 32, 8),
                                ("synth_control", 32, 8)):
        assert len(get_examples(task, "val", data_location=loc)) == n_val
        assert len(get_examples(task, "test", data_location=loc)) == n_test
    ex = get_examples("synth_para", "train", data_location=loc)[0]
    assert ex.prompt.startswith("Determine if the following two sentences paraphrase") and ex.choices == ("No", "Yes")


def test_super_glue_loads_the_main_revision_before_the_parquet_export(monkeypatch):
    hub = FakeHub({"train": 3, "validation": 40})
    monkeypatch.setattr(D, "_load_hub_split", hub)
    D.clear_cache()
    get_rows("rte", "train", data_location=None)
    assert hub.calls == [("aps/super_glue", "rte", False, "train")]  # main worked: no export needed
    hub = FakeHub({"train": 3, "validation": 40}, fail_first=True)
    monkeypatch.setattr(D, "_load_hub_split", hub)
    D.clear_cache()
    get_rows("wsc", "train", data_location=None)
    assert [c[2] for c in hub.calls] == [False, True]


@pytest.mark.parametrize("layout", ["data/{split}-0000{i}-of-00002.parquet", "default/{split}/000{i}.parquet"])
def test_storycloze_accepts_a_sharded_parquet_copy(tmp_path, layout):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf_columns = ["story_id", "input_sentence_1", "input_sentence_2", "input_sentence_3", "input_sentence_4",
                  "sentence_quiz1", "sentence_quiz2", "answer_right_ending"]
    for split, n in (("validation", 4), ("test", 40)):
        for i in range(2):  # two shards, read in order
            rows = [[f"{split}-{i}-{k}", "a", "b", "c", "d", "e1", "e2", 1 + k % 2] for k in range(n // 2)]
            path = tmp_path / layout.format(split=split, i=i)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({c: [r[j] for r in rows] for j, c in enumerate(hf_columns)}), path)
    D.clear_cache()
    kw = {"data_location": None, "storycloze_dir": str(tmp_path)}
    train = get_rows("story_cloze", "train", **kw)
    assert [r["story_id"] for r in train] == ["validation-0-0", "validation-0-1", "validation-1-0", "validation-1-1"]
    assert len(get_rows("story_cloze", "val", **kw)) == 32 and len(get_rows("story_cloze", "test", **kw)) == 8
    assert [e.label for e in get_examples("story_cloze", "train", **kw)] == [0, 1, 0, 1]


def test_generated_task_names_its_generator_when_missing(tmp_path):
    """A plugin's task carries its own hint (TaskSpec.prepare_hint): the generator, not a hub download."""
    from talos.registry import load_plugins

    load_plugins(["nlp.synthetic"])
    with pytest.raises(TaskDataError) as info:
        D.check_tasks(["synth_qa"], data_location=str(tmp_path))
    assert f"generate it with: python -m nlp.synthetic --data-location {tmp_path}" in str(info.value)
    assert "huggingface-cli" not in str(info.value)
