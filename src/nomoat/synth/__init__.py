"""Synthetic training data from a teacher model (`nomoat synth`): self-instruct tasks and answers, preference pairs.

A teacher is a local model answering through nomoat's engine or any OpenAI-compatible endpoint (`teacher`); the modes
are `instructions` (self-instruct from seed tasks, with length, refusal and near-duplicate filters) and `pairs`
(samples per prompt ranked by reward functions or by the teacher as judge). `synthesize` runs one, writing a JSONL file
that `nomoat train` reads and its provenance beside it, resumably (`output`).
"""

from nomoat.synth.instructions import InstructionSettings
from nomoat.synth.pairs import PairsSettings
from nomoat.synth.run import MODES, SynthResult, synthesize
from nomoat.synth.teacher import Ask, Failure, LocalTeacher, RemoteTeacher, TeacherError

__all__ = ["MODES", "Ask", "Failure", "InstructionSettings", "LocalTeacher", "PairsSettings", "RemoteTeacher",
           "SynthResult", "TeacherError", "synthesize"]
