"""Answer metrics: exact match and token F1 (SQuAD normalisation, as LongBench uses), and RULER's string
matching (fraction of the expected strings that appear in the output)."""
from __future__ import annotations

import math
import re
import statistics
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


def mean_ci95(scores: list[float]) -> tuple[float, float, float]:
    """Mean and 95% interval: Wilson's score interval for 0/1 scores (Wilson 1927), else normal, in [0, 1]."""
    if not scores:
        raise ValueError("mean_ci95: no scores (an empty list has no mean)")
    n, z = len(scores), 1.96
    m = sum(scores) / n
    if all(x in (0, 1) for x in scores):
        # Wilson rather than p +- z*sqrt(p(1-p)/n): the latter collapses to width 0 at 0/n and n/n.
        centre = (m + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n))
        return m, max(0.0, centre - half), min(1.0, centre + half)
    if n == 1:
        return m, 0.0, 1.0  # one graded score says nothing about its spread
    half = z * statistics.stdev(scores) / math.sqrt(n)
    return m, max(0.0, m - half), min(1.0, m + half)


METRICS = {"exact_match": exact_match, "f1": f1, "string_match_all": string_match_all,
           "first_number_match": first_number_match}
