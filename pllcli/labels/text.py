"""Text normalisation, timestamps and durations for label sources."""
from __future__ import annotations

import datetime as _dt
import re
import unicodedata

from pllcli.errors import InputError, UsageError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_WORD_DIGIT = {w: str(i) for i, w in enumerate(DIGIT_WORDS)}
_APOSTROPHES = {"'", "\u2019", "\u2018", "`"}
NUMBER_MODES = ("words", "digits", "none")


def _strip_punct(s: str) -> str:
    out = []
    for ch in s:
        if ch in _APOSTROPHES:
            continue  # "can't" -> "cant"
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PSZC" else ch)  # punctuation, symbols, separators, control
    return "".join(out)


def normalize_text(text: str, numbers: str = "words") -> str:
    """Canonical form of a typed message: NFKC, casefold, punctuation -> space, one space
    between tokens, and (numbers="words") every all-digit token spelled digit by digit
    ("4 7" and "47" -> "four seven") or (numbers="digits") digit words written as digits
    ("four seven" -> "4 7"). "none" leaves numbers alone. "" means nothing is left."""
    s = unicodedata.normalize("NFKC", text).casefold()
    s = _strip_punct(s)
    toks = s.split()
    if numbers == "words":
        out = []
        for t in toks:
            if t.isdigit() and t.isascii():
                out.extend(DIGIT_WORDS[int(c)] for c in t)
            else:
                out.append(t)
        toks = out
    elif numbers == "digits":
        toks = [_WORD_DIGIT.get(t, t) for t in toks]
    elif numbers != "none":
        raise UsageError(f"--numbers must be one of {', '.join(NUMBER_MODES)}, got {numbers!r}")
    return " ".join(toks)


def parse_time(value: str, path: str, line: int, field: str = "time") -> float:
    """Epoch seconds (int/float) or ISO 8601 (naive = UTC) -> epoch seconds."""
    v = value.strip()
    try:
        x = float(v)
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError
        return x
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(v.replace("z", "Z"))
    except ValueError:
        raise InputError(f"unparseable timestamp {value!r} (use epoch seconds or ISO 8601)",
                         path, line=line, field=field) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def parse_duration(spec: str, option: str = "--window") -> float:
    """'30s', '1.5m', '500ms', '2h' or a bare number of seconds -> seconds (> 0): `pllcli.io.parse_duration`."""
    from pllcli.io import parse_duration as parse
    return parse(spec, option)


def natural_key(s: str):
    """Sort key putting '2' before '10' and keeping text order otherwise."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t != ""]
