"""The shapes world: xlard's embedded default benchmark.

- :mod:`xlard.shapes.world`: seeded scenes of circles, squares, triangles and
  diamonds in GenEval's ten colors, with exact ground truth.
- :mod:`xlard.shapes.prompts`: GenEval-format prompt sets (six tags), train and
  held-out splits that share no prompt, ground-truth renders of a record, JSONL I/O.
- :mod:`xlard.shapes.evaluator`: the exact evaluator (pixel analysis + GenEval's rules).
- :mod:`xlard.shapes.rules`: the shared GenEval vocabulary and position rule.

Numpy, plus xlard.ops for connected components (imported on first use); reading
image files and the backbone need the ``method`` extra (Pillow, diffusers).

The evaluator's names are re-exported lazily (PEP 562): importing the world,
the prompts or the understanding model does not load the evaluator, so the
reward side can be checked not to touch it.
"""
import importlib

_EVALUATOR_NAMES = ("Detection", "EvaluatorConfig", "RecordResult", "detect_objects", "evaluate", "evaluate_folder",
                    "evaluate_record", "format_table", "load_images", "summarize", "write_results_jsonl")

from .prompts import (PromptConfig, enumerate_records, make_splits, read_jsonl, read_records, render_record,
                      sample_records, write_jsonl)
from .rules import GENEVAL_COLORS, RELATIONS, TAGS, relative_position, validate_record
from .world import (BACKGROUND, PALETTE, SHAPES, ObjectGroup, Relation, Scene, SceneObject, WorldConfig,
                    compose_scene, random_scene)

__all__ = [
    "Detection", "EvaluatorConfig", "RecordResult", "detect_objects", "evaluate", "evaluate_folder",
    "evaluate_record", "format_table", "load_images", "summarize", "write_results_jsonl",
    "PromptConfig", "enumerate_records", "make_splits", "read_jsonl", "read_records", "render_record",
    "sample_records", "write_jsonl",
    "GENEVAL_COLORS", "RELATIONS", "TAGS", "relative_position", "validate_record",
    "BACKGROUND", "PALETTE", "SHAPES", "ObjectGroup", "Relation", "Scene", "SceneObject", "WorldConfig",
    "compose_scene", "random_scene",
]


def __getattr__(name: str):
    if name in _EVALUATOR_NAMES:
        return getattr(importlib.import_module(".evaluator", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
