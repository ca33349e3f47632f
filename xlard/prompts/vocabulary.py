"""The nouns the prompt parser knows, as objects and as non-objects.

Objects: COCO's 80 detection classes, GenEval's renamed copies of three of
them, the shapes world's nouns and common objects outside COCO. Non-objects:
scene and time nouns ("snow", "field", "night"), arrangement nouns ("line",
"row") and collective nouns ("flock", "pile"), which the parser reads as
settings, arrangements and vague amounts instead of counted objects. Colors, relations,
aspects and tags live in :mod:`xlard.vocab`.
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "COCO_CLASSES", "GENEVAL_OBJECT_NAMES", "SHAPE_NOUNS", "KNOWN_NOUNS",
    "SCENE_NOUNS", "ARRANGEMENT_NOUNS", "COLLECTIVE_NOUNS",
]

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
# ---------------------------------------------------------------------------
# Words that name no counted object
# ---------------------------------------------------------------------------

#: Nouns of scenes, surfaces, backgrounds, weather and times of day. After a
#: preposition ("on snow", "in a field", "at night", "against a white wall")
#: they set the scene and are not counted objects.
SCENE_NOUNS: frozenset[str] = frozenset({
    # ground, surfaces, materials
    "snow", "grass", "sand", "dirt", "mud", "ice", "ground", "floor", "carpet", "rug",
    "lawn", "pavement", "asphalt", "gravel", "soil", "moss", "hay", "straw", "leaves",
    "concrete", "tiles", "wall", "walls", "ceiling", "surface", "countertop", "counter",
    "tablecloth", "blanket", "sheet",
    # water and landscapes
    "water", "sea", "ocean", "lake", "river", "pond", "stream", "waves", "shore",
    "beach", "coast", "desert", "dune", "dunes", "field", "fields", "meadow", "meadows",
    "forest", "woods", "jungle", "garden", "park", "orchard", "farm", "farmland",
    "valley", "hill", "hills", "hillside", "mountain", "mountains", "mountainside",
    "cliff", "canyon", "cave", "island", "prairie", "savanna", "savannah", "swamp",
    "tundra", "glacier", "landscape", "countryside", "wilderness", "horizon",
    # places
    "street", "streets", "road", "roads", "sidewalk", "alley", "highway", "path",
    "city", "town", "village", "downtown", "plaza", "market", "marketplace",
    "room", "kitchen", "bedroom", "bathroom", "hallway", "office", "classroom",
    "library", "studio", "restaurant", "cafe", "shop", "store", "station", "airport",
    "harbor", "harbour", "port", "dock", "pier", "courtyard", "backyard", "yard",
    "playground", "stadium", "arena", "museum", "gallery", "church", "temple",
    "warehouse", "factory", "attic", "basement", "corridor", "hall", "interior",
    "lobby", "rooftop", "balcony", "porch", "patio", "garage", "stage",
    # sky, weather, light
    "sky", "skies", "clouds", "fog", "mist", "haze", "rain", "rainstorm", "storm",
    "snowfall", "snowstorm", "blizzard", "wind", "sunlight", "sunshine", "moonlight",
    "starlight", "shade", "shadow", "shadows", "darkness", "light", "twilight",
    "space", "outer space", "atmosphere",
    # times
    "night", "nighttime", "day", "daytime", "daylight", "morning", "afternoon",
    "evening", "noon", "midnight", "dawn", "dusk", "sunset", "sunrise", "winter",
    "summer", "autumn", "fall", "spring",
    # backgrounds and settings
    "background", "backdrop", "foreground", "distance", "setting", "scene",
    "environment", "style", "air", "midair", "mid-air",
})

#: Nouns of arrangements: after "in"/"into"/"forming" ("in a line", "in two
#: rows", "forming a circle") they say how objects stand, not what is there.
ARRANGEMENT_NOUNS: frozenset[str] = frozenset({
    "line", "lines", "row", "rows", "column", "columns", "circle", "circles", "ring",
    "semicircle", "semi-circle", "square", "triangle", "grid", "pile", "piles",
    "stack", "stacks", "heap", "cluster", "clusters", "group", "groups", "pair",
    "pairs", "formation", "queue", "file", "spiral", "arc", "pattern", "cross",
    "diagonal", "zigzag", "chain", "bunch", "huddle", "cluster", "v-shape", "v",
    "half-circle", "star", "pyramid", "tower",
})

#: Collective nouns: "a flock of birds", "a row of houses", "a pile of books"
#: say "some birds" (count unknown), not "one".
COLLECTIVE_NOUNS: frozenset[str] = frozenset({
    "line", "row", "column", "circle", "ring", "pile", "stack", "heap", "cluster",
    "group", "bunch", "crowd", "herd", "flock", "pack", "swarm", "school", "pod",
    "colony", "troop", "bouquet", "handful", "lot", "collection", "array", "series",
    "variety", "assortment", "number", "set", "team", "family", "fleet", "army",
    "litter", "gaggle", "parade", "range", "cascade", "sea", "field", "forest",
    "mountain", "stream", "string", "cloud",
})
