"""Scoring a generated answer against the reference response (task=causal_lm), as the
instruction-tuning benchmarks do: the answer is extracted from the text the model wrote, then
compared. Plain functions of strings.

- ``exact``: SQuAD's normalisation (lower case, no punctuation, no articles, single spaces), then
  equality.
- ``yes_no``: the first yes/no (or true/false) word (BoolQ).
- ``number``: the last number in the text, compared as a number (GSM8K's and ASDiv's convention:
  the final number is the answer; "9 apples" and "There are 9." agree).
- ``choice``: the first standalone answer letter A-J (MMLU, MedMCQA).
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_LETTER = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])")


def normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def yes_no(text: str) -> str | None:
    for word in normalise(text).split():
        if word in _YES_NO:
            return _YES_NO[word]
    return None


def number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def choice(text: str) -> str | None:
    found = _LETTER.search(text.strip())
    return found.group(1) if found else None


EXTRACT = {"exact": normalise, "yes_no": yes_no, "number": number, "choice": choice}


def extract_answer(kind: str, text: str) -> str | float | None:
    return EXTRACT[kind](text)


def is_correct(kind: str, prediction: str, reference: str) -> bool:
    """Whether the answer extracted from ``prediction`` equals the one in ``reference``."""
    want = extract_answer(kind, reference)
    return want is not None and extract_answer(kind, prediction) == want
