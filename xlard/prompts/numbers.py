"""Reading counts: which numbers the parser turns into an entity's count.

A count is a whole number from 0 to :data:`MAX_COUNT`, written in digits
("3", "12") or words ("three", "twenty-one", "twenty one", "a dozen", "two
dozen", "half a dozen", "a hundred"). Everything else that looks like a number
falls in one of these classes:

- not a count at all, left in the text as an ordinary word: ordinals ("2nd"),
  decades ("1990s"), compound adjectives ("5-year-old", "3-story") and
  measurements, i.e. a number followed by a unit ("a 3 meter tall giraffe",
  "a five story building", "a 2.5 liter bottle");
- a vague amount, count unknown (None), like "some": "dozens of", "hundreds
  of", "thousands of", "millions of";
- a number the parser cannot represent: negative ("-3"), not whole ("1.5",
  "1/2", "half a cake", "one and a half apples"), exponent or digit grouping ("1e3", "3,000"),
  suffixed ("10k"), or larger than :data:`MAX_COUNT` ("a million", "1000").
  :func:`xlard.prompts.parse` raises a ``ValueError`` naming the words; it
  never turns them into another number.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Protocol

from xlard.prompts.spec import quote_prompt

__all__ = ["MAX_COUNT", "UNIT_WORDS"]

#: The largest count the parser reads from a prompt. Count rewards judge
#: connected components of token maps a few dozen tokens wide, so larger
#: targets could not be checked; a larger number in a prompt is an error.
MAX_COUNT: int = 100

_ONES: Mapping[str, int] = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
    "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS: Mapping[str, int] = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}
_SCALES: Mapping[str, int] = {
    "dozen": 12, "hundred": 100, "thousand": 1_000, "million": 1_000_000,
    "billion": 1_000_000_000, "trillion": 1_000_000_000_000,
}

#: Words that make a preceding number a measurement, not a count.
UNIT_WORDS: frozenset[str] = frozenset({
    "inch", "inches", "foot", "feet", "ft", "meter", "meters", "metre", "metres",
    "cm", "mm", "km", "centimeter", "centimeters", "millimeter", "millimeters",
    "kilometer", "kilometers", "mile", "miles", "yard", "yards", "liter", "liters",
    "litre", "litres", "ml", "gallon", "gallons", "pound", "pounds", "lb", "lbs",
    "kg", "kilogram", "kilograms", "gram", "grams", "ounce", "ounces", "oz", "ton",
    "tons", "year", "years", "month", "months", "week", "weeks", "day", "days",
    "hour", "hours", "minute", "minutes", "second", "seconds", "story", "stories",
    "storey", "storeys", "floor", "floors", "percent", "%", "degree", "degrees",
    "o'clock", "am", "pm", "mph", "kph", "carat", "karat", "volt", "watt", "times",
})

# Words before "of" that make the amount vague ("dozens of birds").
_VAGUE_PLURAL_SCALES = ("dozens", "hundreds", "thousands", "millions", "billions", "tens", "scores")

# A number-like token: digits with any letters, digits, '/', '+' after them, and
# '.', ',' or '-' between word characters ("1.5", "3,000", "5-year-old"); a
# leading minus only at the start of a word ("-3", not "x-3").
NUMBER_PATTERN = r"(?:(?<![\w\-])-)?\d(?:[\w/+]|[.,\-](?=\w))*"

_INTEGER = re.compile(r"\d+")
# Number-like tokens that are ordinary words, not counts.
# ordinals, decades, "5-year-old", and image-resolution tags ("4k", "8k", "1080p": a prompt's style suffix, which
# was refused as a malformed count)
_NOT_A_COUNT = re.compile(r"\d+(?:st|nd|rd|th|s)|\d+-[^\W\d_].*|(?:2|4|5|8|16)k|\d{3,4}p")


class _Word(Protocol):
    text: str


#: Where a number's value stops growing while it is read: beyond any count, and a 4,301-digit number or "dozen"
#: x 4,000 became a huge int (Python's own "Exceeds the limit ... for integer string conversion", or seconds).
_BEYOND = 10 ** 15


def _error(phrase: str, prompt: str, why: str) -> ValueError:
    if len(phrase) > 60:
        phrase = phrase[:57] + "..."
    return ValueError(
        f"count {phrase!r} in prompt {quote_prompt(prompt)} {why}; write each count as a whole number "
        f"from 0 to {MAX_COUNT} in digits or words (or a vague word such as 'some'), "
        "or build the PromptSpec directly"
    )


def _small_number(words: Sequence[_Word], pos: int) -> tuple[int, int] | None:
    """(length, value) of a number below 100 in words or digits at ``pos``."""
    text = words[pos].text
    if _INTEGER.fullmatch(text):
        return 1, int(text) if len(text) <= 15 else _BEYOND
    if text in _ONES:
        return 1, _ONES[text]
    if text in _TENS:
        if pos + 1 < len(words) and words[pos + 1].text in _ONES and 0 < _ONES[words[pos + 1].text] < 10:
            return 2, _TENS[text] + _ONES[words[pos + 1].text]
        return 1, _TENS[text]
    tens, dash, ones = text.partition("-")
    if dash and tens in _TENS and ones in _ONES and 0 < _ONES[ones] < 10:
        return 1, _TENS[tens] + _ONES[ones]
    return None


def read_count(words: Sequence[_Word], pos: int, prompt: str) -> tuple[int, str, int | None] | None:
    """Read a number at ``words[pos]``.

    Args:
        words: the prompt's lower-cased words.
        pos: where to read.
        prompt: the prompt, for error messages.

    Returns:
        None when no number starts here (or a number-like word that is no
        count: an ordinal, a decade, a compound adjective); else
        ``(length, kind, value)`` with kind "number" (value: the count),
        "vague" (value None: "dozens of") or "measure" (value None: a number
        followed by a unit, which is an ordinary modifier, not a count).

    Raises:
        ValueError: a negative, fractional, malformed or too large number.
    """
    text = words[pos].text
    phrase = text
    length = 0
    value: int | None = None
    nxt = words[pos + 1].text if pos + 1 < len(words) else None
    if text in _VAGUE_PLURAL_SCALES and nxt == "of":
        return 2, "vague", None
    if any(unicodedata.category(ch) == "No" and not float(unicodedata.numeric(ch, 0)).is_integer() for ch in text):
        if nxt in UNIT_WORDS:  # "a ¼ pound burger", "a 1½ liter bottle": a measurement, as "2.5 liter"
            return 2, "measure", None
        raise _error(text, prompt, "is a fraction, not a whole count")  # "½ pizza" was read as no count at all
    if text[0].isdigit() or (text[0] == "-" and len(text) > 1 and text[1].isdigit()):
        if _NOT_A_COUNT.fullmatch(text):
            return None
        if not _INTEGER.fullmatch(text):
            if nxt in UNIT_WORDS:
                return 2, "measure", None
            if text.startswith("-"):
                raise _error(text, prompt, "is negative")
            raise _error(text, prompt, "is not a whole number the parser reads "
                                       "(a fraction, decimal, exponent, digit grouping or suffix)")
    if text == "half":
        if nxt in ("a", "an"):
            if pos + 2 < len(words) and words[pos + 2].text == "dozen":
                return 3, "number", 6
            raise _error(f"half {nxt}", prompt, "is a fraction, not a whole count")
        return None
    if text in ("a", "an"):
        if nxt not in _SCALES:
            return None
        length, value, phrase = 1, 1, f"{text} {nxt}"
    elif text in _SCALES:
        length, value = 0, 1
    else:
        small = _small_number(words, pos)
        if small is None:
            return None
        length, value = small
        phrase = " ".join(w.text for w in words[pos:pos + length])
    # Scale words multiply: "two dozen", "three hundred", "a hundred thousand".
    while pos + length < len(words) and words[pos + length].text in _SCALES:
        value = min(value * _SCALES[words[pos + length].text], _BEYOND)
        length += 1
        phrase = " ".join(w.text for w in words[pos:pos + length])
    # "one hundred and fifty", "a hundred one": the number goes on after hundred or more (it stopped at the scale
    # word, and the rest was read as another count: "one hundred and fifty dogs" was 50 dogs).
    last = words[pos + length - 1].text if length else text
    if _SCALES.get(last, 0) >= 100 and pos + length < len(words):
        k = pos + length + (1 if words[pos + length].text == "and" else 0)
        rest = _small_number(words, k) if k < len(words) else None
        if rest is not None:
            value += rest[1]
            length = k + rest[0] - pos
            phrase = " ".join(w.text for w in words[pos:pos + length])
    if pos + length < len(words) and words[pos + length].text in UNIT_WORDS:
        return length + 1, "measure", None
    # "one and a half apples": the whole number is not the count.
    if [w.text for w in words[pos + length:pos + length + 3]] in (["and", "a", "half"], ["and", "one", "half"]):
        raise _error(" ".join(w.text for w in words[pos:pos + length + 3]), prompt,
                     "is a fraction, not a whole count")
    if value > MAX_COUNT:
        raise _error(phrase, prompt, f"is {value if value < _BEYOND else 'beyond ' + format(_BEYOND, ',')}, more than "
                                     f"MAX_COUNT = {MAX_COUNT}, the largest count the parser reads")
    return length, "number", value
