"""Prompt templates of the NLP tasks: template 0 of the public prompt collection used by T0 (promptsource).

The official code picks, for each dataset, the first template (in the collection's file order) whose metadata
says ``original_task: true`` with ``Accuracy`` as its only metric, and scores its ``answer_choices`` by rank
classification. The ``promptsource`` package cannot be installed next to current ``datasets``, so the Jinja
source of those templates is written here and rendered the way promptsource does it: a plain Jinja
environment, ``|||`` separating prompt and target, every part stripped of surrounding whitespace, and
``|||`` inside string fields of the example protected during rendering.

Sources (bigscience-workshop/promptsource, ``promptsource/templates/<dataset>/<subset>/templates.yaml``):

============  ==========================  ====================================  =================================
task          dataset / subset            template id                           template name
============  ==========================  ====================================  =================================
qasc          qasc                        40ef67db-dff3-4e7b-b167-f7e54b400c74  qa_with_separated_facts_1
wiki_qa       wiki_qa                     148e8e91-4f38-4427-8806-8a407268cda9  Is This True?
quartz        quartz                      005b9776-2170-47f8-a5d2-03e83d0e55ae  use_info_from_question_paragraph
paws          paws / labeled_final        0be7cecd-b427-4ec9-9b0e-666d6dae0063  task_description-no-label
story_cloze   story_cloze / 2016          1a4946f9-a0e2-4fbb-aee8-b26ead2cf6b8  Answer Given options
winogrande    winogrande / winogrande_xl  0f23f058-5b4d-42a3-92d4-5d60688aa90c  does underscore refer to
wsc           super_glue / wsc.fixed      212fb8b1-8436-4f64-8f37-a9094fe029f4  does the pronoun refer to
rte           super_glue / rte            2b52a83c-0021-41fe-b44c-5aaa076d71a2  MNLI crowdsource
============  ==========================  ====================================  =================================
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

__all__ = ["PromptTemplate", "TEMPLATES", "get_template"]

_SEP = "|||"
# promptsource's placeholder for "|||" inside example strings (any string absent from real data works)
_PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"


@dataclass(frozen=True)
class PromptTemplate:
    """A promptsource-style template: ``jinja`` renders "prompt ||| target", ``answer_choices`` renders
    "choice 1 ||| choice 2 ||| ..."; both see the example's fields (the prompt also sees ``answer_choices``)."""

    name: str
    source: str  # dataset/subset, template id and name in the prompt collection
    jinja: str
    answer_choices: str

    @cached_property
    def _compiled(self) -> tuple[Any, Any]:
        from jinja2 import BaseLoader, Environment

        env = Environment(loader=BaseLoader())  # promptsource's environment: no autoescape, default filters
        return env.from_string(self.jinja), env.from_string(self.answer_choices)

    @staticmethod
    def _protect(row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.replace(_SEP, _PIPE_PROTECTOR) if isinstance(v, str) else v for k, v in row.items()}

    @staticmethod
    def _unprotect(s: str) -> str:
        return s.replace(_PIPE_PROTECTOR, _SEP)

    def choices(self, row: Mapping[str, Any]) -> list[str]:
        """The answer choices of ``row``, in order (label i is choice i)."""
        rendered = self._compiled[1].render(**self._protect(row))
        return [self._unprotect(c.strip()) for c in rendered.split(_SEP)]

    def apply(self, row: Mapping[str, Any]) -> tuple[str, str, list[str]]:
        """(prompt, target, choices) of ``row``; the target is the template's own rendering of the answer."""
        if "answer_choices" in row:
            raise ValueError("example rows must not have a field named 'answer_choices'")
        choices = self.choices(row)
        rendered = self._compiled[0].render(**self._protect(row), answer_choices=choices)
        parts = [self._unprotect(p.strip()) for p in rendered.split(_SEP)]
        if len(parts) != 2:
            raise ValueError(f"template {self.name!r} rendered {len(parts)} parts instead of prompt ||| target")
        return parts[0], parts[1], choices


TEMPLATES: dict[str, PromptTemplate] = {
    "qasc": PromptTemplate(
        name="qa_with_separated_facts_1",
        source="qasc, 40ef67db-dff3-4e7b-b167-f7e54b400c74, qa_with_separated_facts_1",
        jinja=(
            "{{ fact1[0]|capitalize }}{{ fact1[1:]|trim|trim('.') }}, and {{fact2[0]|lower }}"
            "{{ fact2[1:]|trim|trim('.') }}. Given these facts, {{ question[0]|lower }}"
            "{{question[1:]|trim('?') }} among the following options:\n- {{answer_choices | join(\"\\n - \") }}"
            "\n\n||| \n\n{% for choice in choices.label %} {% if choice == answerKey %}"
            "{{ answer_choices[loop.index - 1] }}{% endif %}{% endfor %} "
        ),
        answer_choices='{{choices.text | join("|||")}}',
    ),
    "wiki_qa": PromptTemplate(
        name="Is This True?",
        source="wiki_qa, 148e8e91-4f38-4427-8806-8a407268cda9, Is This True?",
        jinja='Question: {{question}}?\nWould "{{answer}}" be a reasonable answer? |||\n{{ answer_choices[label] }}',
        answer_choices="No ||| Yes",
    ),
    "quartz": PromptTemplate(
        name="use_info_from_question_paragraph",
        source="quartz, 005b9776-2170-47f8-a5d2-03e83d0e55ae, use_info_from_question_paragraph",
        jinja=(
            "Use information from the paragraph to answer the question.\n\nQuestion:\n\n"
            "{% if '_____' in question %}\n"
            "{{ question | trim(\".?!\") | replace(\"_____\", answer_choices | join(\" or \")) }}{{ \"?\" }} \n"
            "{% else %}\n"
            "{{ question | trim(\".?!\") }} {{ answer_choices | join(\" or \") }}{{ \"?\" }} \n"
            "{% endif %}\n\nParagraph :\n\n{{ para }}\n|||\n{{answer_choices[choices.label.index(answerKey)]}}"
        ),
        answer_choices='{{choices.text | join("|||")}}',
    ),
    "paws": PromptTemplate(
        name="task_description-no-label",
        source="paws/labeled_final, 0be7cecd-b427-4ec9-9b0e-666d6dae0063, task_description-no-label",
        jinja=(
            "Determine if the following two sentences paraphrase each other or not.\n"
            "Sent 1: {{sentence1}}\nSent 2: {{sentence2}}\n||| \n{{answer_choices[label]}}"
        ),
        answer_choices="No ||| Yes",
    ),
    "story_cloze": PromptTemplate(
        name="Answer Given options",
        source="story_cloze/2016, 1a4946f9-a0e2-4fbb-aee8-b26ead2cf6b8, Answer Given options",
        jinja=(
            "{{input_sentence_1}} {{input_sentence_2}} {{input_sentence_3}} {{input_sentence_4}} What is a "
            "possible continuation for the story given the following options ? - {{answer_choices | join(\"\\n- \")}}"
            " ||| {{answer_choices[answer_right_ending -1]}}"
        ),
        answer_choices="{{sentence_quiz1}} ||| {{sentence_quiz2}}",
    ),
    "winogrande": PromptTemplate(
        name="does underscore refer to",
        source="winogrande/winogrande_xl, 0f23f058-5b4d-42a3-92d4-5d60688aa90c, does underscore refer to",
        jinja=(
            "{{ sentence }} In the previous sentence, does _ refer to {{ option1 }} or  {{ option2 }}? ||| "
            "{% if answer == '1' %} {{option1}} {% else %} {{ option2 }} {% endif %}"
        ),
        answer_choices="{{ option1 }} ||| {{ option2 }}",
    ),
    "wsc": PromptTemplate(
        name="does the pronoun refer to",
        source="super_glue/wsc.fixed, 212fb8b1-8436-4f64-8f37-a9094fe029f4, does the pronoun refer to",
        jinja=(
            '{{ text }} In the previous sentence, does the pronoun "{{ span2_text.lower() }}" refer to '
            "{{ span1_text }}? Yes or no? ||| {% if label != -1 %}{{ answer_choices[label] }}{% endif %}"
        ),
        answer_choices="No ||| Yes",
    ),
    "rte": PromptTemplate(
        name="MNLI crowdsource",
        source="super_glue/rte, 2b52a83c-0021-41fe-b44c-5aaa076d71a2, MNLI crowdsource",
        jinja=(
            "{{premise}} Using only the above description and what you know about the world, is "
            "\"{{hypothesis}}\" definitely correct? Yes or no? ||| {% if label != -1 %}{{ answer_choices[label] }}"
            "{% endif %}"
        ),
        answer_choices="Yes ||| No",
    ),
}


def get_template(name: str) -> PromptTemplate:
    """The template registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; valid: {', '.join(sorted(TEMPLATES))}") from None
