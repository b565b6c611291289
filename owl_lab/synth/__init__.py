"""Procedural lab worlds: seeded scenes, questions and answers, and the word-level tokenizers.

>>> from owl_lab.synth import Mixture, eval_set
>>> ex = Mixture({"color": 1, "add": 1}, seed=0).example(0)   # Example(task, text, answer, images)
"""

from owl_lab.synth.data import ALL_TASKS, IMAGE_TASKS, TEXT_TASKS, Mixture, eval_set, generate
from owl_lab.synth.distractor import PAPER_N, circular_eval, paper_prompt
from owl_lab.synth.multi import distractor_eval, multi_prompt
from owl_lab.synth.shapes import Obj, Scene, caption, render, sample_scene
from owl_lab.synth.tasks import Example
from owl_lab.synth.tokenizer import build_tokenizer

__all__ = [
    "ALL_TASKS",
    "IMAGE_TASKS",
    "TEXT_TASKS",
    "Mixture",
    "eval_set",
    "generate",
    "distractor_eval",
    "multi_prompt",
    "circular_eval",
    "paper_prompt",
    "PAPER_N",
    "Obj",
    "Scene",
    "caption",
    "render",
    "sample_scene",
    "Example",
    "build_tokenizer",
]
