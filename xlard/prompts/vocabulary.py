"""The nouns the prompt parser knows as objects.

COCO's 80 detection classes, GenEval's renamed copies of three of them, the
shapes world's nouns and common objects outside COCO. Colors, relations,
aspects and tags live in :mod:`xlard.vocab`.
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["COCO_CLASSES", "GENEVAL_OBJECT_NAMES", "SHAPE_NOUNS", "KNOWN_NOUNS"]

#: The 80 COCO detection classes (2017 names), in COCO's order.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# GenEval's object_names.txt renames three COCO classes (indices 64-66).
_GENEVAL_RENAMES: Mapping[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}

#: The 80 class names GenEval's prompts use (COCO's, with three renamed).
GENEVAL_OBJECT_NAMES: tuple[str, ...] = tuple(_GENEVAL_RENAMES.get(c, c) for c in COCO_CLASSES)

#: Nouns of the shapes world (the embedded default backbone's vocabulary).
SHAPE_NOUNS: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "rectangle", "hexagon", "pentagon",
    "octagon", "diamond", "heart", "cross", "ellipse", "oval", "crescent", "ring",
    "disk", "cube", "sphere", "cylinder", "cone", "pyramid", "shape",
)

# Common objects outside COCO, so generic prompts ("five penguins") parse with
# the right head noun; aliases of COCO names are kept as written, not mapped.
_COMMON_NOUNS: tuple[str, ...] = (
    "penguin", "lion", "tiger", "rabbit", "duck", "chicken", "pig", "monkey",
    "goose", "wolf", "fox", "deer", "fish", "owl", "butterfly", "squirrel",
    "man", "woman", "child", "boy", "girl", "baby", "people",
    "box", "ball", "balloon", "flower", "tree", "house", "lamp", "table", "shoe",
    "hat", "candle", "egg", "glass", "mug", "plate", "pencil", "pen", "key",
    "coin", "cookie", "lemon", "strawberry", "tomato", "potato", "leaf", "shelf",
    "guitar", "piano", "violin", "drum", "bell", "robot", "rocket", "bucket",
    "sofa", "television", "motorbike", "aeroplane", "doughnut", "cellphone",
    "hair dryer", "sports car", "soccer ball", "basketball", "football",
)

#: Every noun the parser knows as one entity (multi-word ones included).
KNOWN_NOUNS: tuple[str, ...] = tuple(
    dict.fromkeys(COCO_CLASSES + GENEVAL_OBJECT_NAMES + SHAPE_NOUNS + _COMMON_NOUNS)
)