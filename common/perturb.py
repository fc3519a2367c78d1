"""Seeded noise of the kinds real-world text carries, for `fedtune evaluate --perturb`.

    typo   each word of two or more letters, with probability `rate`, gets one keyboard slip:
           two neighbouring letters swapped, a letter dropped, a letter doubled, or a letter
           replaced by a neighbour on a QWERTY keyboard
    case   each letter's case flips with probability `rate`
    punct  each punctuation mark is dropped with probability `rate`, and after each word a
           stray mark (, . ! ? ; :) is added with probability `rate`

The same (texts, kind, rate, seed) always give the same noisy texts. A few lines rather than an
augmentation library: nlpaug and TextAttack bring model downloads and heavy dependencies for
what are three character edits here.
"""

from __future__ import annotations

import random
import re

PERTURBATIONS = ("typo", "case", "punct")

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_WORD = re.compile(r"\S+")
_STRAY = ",.!?;:"
_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _neighbours(ch: str) -> str:
    """Keys next to `ch` on its own row and the rows above and below (QWERTY)."""
    for r, row in enumerate(_ROWS):
        c = row.find(ch)
        if c < 0:
            continue
        near = [
            _ROWS[r2][c2]
            for r2 in (r - 1, r, r + 1)
            if 0 <= r2 < len(_ROWS)
            for c2 in (c - 1, c, c + 1)
            if 0 <= c2 < len(_ROWS[r2]) and (r2, c2) != (r, c)
        ]
        return "".join(near)
    return ""


def _typo(word: str, rng: random.Random) -> str:
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 2:
        return word
    i = rng.choice(letters)
    edit = rng.randrange(4)
    if edit == 0 and i + 1 < len(word):  # swap with the next character
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == 1:  # drop
        return word[:i] + word[i + 1 :]
    if edit == 2:  # double
        return word[:i] + word[i] + word[i:]
    near = _neighbours(word[i].lower())
    if not near:
        return word[:i] + word[i + 1 :]
    slip = rng.choice(near)
    return word[:i] + (slip.upper() if word[i].isupper() else slip) + word[i + 1 :]


def perturb_text(text: str, kind: str, rate: float, rng: random.Random) -> str:
    if kind == "case":
        return "".join(ch.swapcase() if ch.isalpha() and rng.random() < rate else ch for ch in text)
    if kind == "typo":
        return _WORD.sub(lambda m: _typo(m.group(0), rng) if rng.random() < rate else m.group(0), text)
    if kind == "punct":
        kept = "".join(ch for ch in text if not (ch in _PUNCT and rng.random() < rate))
        return _WORD.sub(lambda m: m.group(0) + rng.choice(_STRAY) if rng.random() < rate else m.group(0), kept)
    raise ValueError(f"perturbation: expected one of {PERTURBATIONS}, got {kind!r}")


def perturb(texts: list[str], kind: str, rate: float, seed: int = 0) -> list[str]:
    """The texts with `kind` noise at `rate`, seeded."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation: expected one of {', '.join(PERTURBATIONS)}, got {kind!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturbation rate: expected a value in [0, 1], got {rate}")
    rng = random.Random(f"{seed}:{kind}:{rate}")
    return [perturb_text(t, kind, rate, rng) for t in texts]
