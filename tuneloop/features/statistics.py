"""The text-statistics features: one implementation for training, serving and monitoring.

The Feast on-demand feature view calls :func:`text_statistics` when it builds the training set, and
serving and the drift monitor call it on request texts, so the three cannot drift apart.
"""

from __future__ import annotations

import re

import pandas as pd

STATISTIC_COLUMNS: dict[str, str] = {
    "char_count": "int64",
    "word_count": "int64",
    "digit_share": "float64",
    "upper_share": "float64",
    "punct_share": "float64",
    "has_url": "int64",
    "has_phone_number": "int64",
    "mean_word_length": "float64",
}
"""The text-statistics feature columns, in order, with their dtypes."""

_URL = re.compile(
    r"(?i)(?:\bhttps?://|\bwww\.|\b[a-z0-9][a-z0-9-]*\.(?:com|net|org|info|biz|co\.uk|uk|io|ly)\b)"
)
_PHONE = re.compile(r"[0-9]{5,}")
_DIGIT = r"[0-9]"
_PUNCT = r"[^\w\s]"


def is_missing(value: object) -> bool:
    """Whether a cell is missing (``None``, ``NaN``, ``pd.NA``); strings and array-likes are values."""
    if value is None:
        return True
    if isinstance(value, str):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes are values, not missing scalars
        return False


def _as_text(value: object) -> str:
    if is_missing(value):
        return ""
    return value if isinstance(value, str) else str(value)


def text_statistics(texts: pd.Series) -> pd.DataFrame:
    """Text-statistics features of each text; the one implementation for training and serving.

    Missing values (``None``, ``NaN``, ``pd.NA``) count as the empty string; other non-strings are
    converted with ``str``. The result keeps the index of ``texts`` and has these columns:

    - ``char_count`` (int64): number of characters.
    - ``word_count`` (int64): number of whitespace-separated tokens.
    - ``digit_share`` (float64): share of characters that are ASCII digits 0-9.
    - ``upper_share`` (float64): share of characters that are uppercase letters.
    - ``punct_share`` (float64): share of characters that are punctuation or symbols (neither a
      letter, digit, underscore nor whitespace).
    - ``has_url`` (int64, 0/1): holds ``http(s)://``, ``www.`` or a domain with a common TLD.
    - ``has_phone_number`` (int64, 0/1): holds a run of 5 or more consecutive digits.
    - ``mean_word_length`` (float64): non-whitespace characters per token.

    Every share is 0.0 for the empty string, as is ``mean_word_length`` for a text without tokens.
    """
    if not isinstance(texts, pd.Series):
        texts = pd.Series(texts)
    text = pd.Series([_as_text(value) for value in texts], index=texts.index, dtype=object)
    chars = text.str.len().astype("int64")
    words = text.map(lambda t: len(t.split())).astype("int64")
    word_chars = text.map(lambda t: sum(len(w) for w in t.split())).astype("int64")
    digits = text.str.count(_DIGIT).astype("int64")
    uppers = text.map(lambda t: sum(1 for c in t if c.isupper())).astype("int64")
    puncts = text.str.count(_PUNCT).astype("int64")
    denominator = chars.where(chars > 0, 1).astype("float64")
    word_denominator = words.where(words > 0, 1).astype("float64")
    frame = pd.DataFrame(
        {
            "char_count": chars,
            "word_count": words,
            "digit_share": digits / denominator,
            "upper_share": uppers / denominator,
            "punct_share": puncts / denominator,
            "has_url": text.map(lambda t: int(_URL.search(t) is not None)),
            "has_phone_number": text.map(lambda t: int(_PHONE.search(t) is not None)),
            "mean_word_length": word_chars / word_denominator,
        },
        index=texts.index,
    )
    return frame.astype(STATISTIC_COLUMNS)
