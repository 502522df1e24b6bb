"""Answer metrics: exact match and token F1 (SQuAD normalisation, as LongBench uses), and RULER's string
matching (fraction of the expected strings that appear in the output)."""
from __future__ import annotations

import re
import string
from collections import Counter


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    """Best token-overlap F1 between the prediction and any reference answer."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for answer in answers:
        ref = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of the expected strings found in the prediction (case-insensitive), as RULER scores."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def first_number_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the first number in the prediction equals the expected number."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group(0) in answers)


METRICS = {"exact_match": exact_match, "f1": f1, "string_match_all": string_match_all,
           "first_number_match": first_number_match}
