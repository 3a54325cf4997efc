"""Personal data in texts: the one place that finds it and masks it.

Every sink uses these functions, so training, serving, the prediction log, validation and reports
cannot disagree about what counts as personal data or how it is hidden:

- :class:`PiiScanner` finds spans (:meth:`~PiiScanner.find`) and replaces them
  (:meth:`~PiiScanner.mask`): a typed placeholder (``<PHONE>``) or, with a key, a keyed pseudonym
  (``<PHONE_1a2b3c4d5e6f>``: HMAC-SHA256 of the normalised value, so the same number written two ways
  maps to the same token and the token cannot be turned back into the number without the key).
- :func:`scanner` builds (and caches) the scanner of a ``privacy`` config section.
- :func:`text_policy` is what a sink applies to one text: ``mask``, ``pseudonymise``, ``drop_text``
  (None) or ``raw`` (unchanged).
- :func:`pii_summary` counts rows with personal data per type (the validation report's table).

What is found (``privacy.pii_types``):

==========  =======================================================================================
type        how
==========  =======================================================================================
``email``   ``local@domain.tld`` (plus-addressing, sub-domains, any case)
``phone``   ``phonenumbers``: numbers valid in one of ``privacy.phone_regions``, or with a +country
            code; spaces, dots, dashes and brackets in any national or international format
``card``    13-19 digits, optionally grouped by spaces or dashes, that pass the Luhn check
``iban``    country code, check digits and account (optionally in groups of four), mod-97 checked
``ip``      IPv4 and IPv6 addresses (validated by :mod:`ipaddress`)
``url``     ``http(s)://...`` and ``www....`` (off by default: URLs are rarely personal)
``person``  names, only with ``privacy.ner_model`` (a spaCy model, through Presidio's analyzer);
            without an NER model names are **not** detected
==========  =======================================================================================

When two findings overlap the earlier type in that table wins (a card number is never also a phone
number). Detection is rule-based: a number that is neither a valid phone number of the configured
regions nor passes a checksum is left alone, which keeps precision high on texts full of prices,
dates and codes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneloop.errors import ConfigError

if TYPE_CHECKING:
    from tuneloop.config import PrivacyConfig

PLACEHOLDERS = {
    "email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "iban": "<IBAN>", "ip": "<IP>", "url": "<URL>",
    "person": "<PERSON>",
}
"""The typed placeholder of each kind of personal data."""
PRIORITY = ("email", "url", "iban", "card", "ip", "phone", "person")
"""Detection order: an earlier type's span wins over an overlapping later one."""
SINK_MODES = ("mask", "pseudonymise", "drop_text", "raw")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                    r"(?:[a-z]{2,24}|[A-Z]{2,24})(?![\w-])")  # a top-level domain in one case: not "kiosk.Valid"
_URL = re.compile(r"(?i)\b(?:https?://|www\.)[^\s<>\"']+")
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"(?i)\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?i)(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_DIGITS = re.compile(r"\d")
_URL_TRAILING = ".,;:!?)]}'\""
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
"""IBAN length per country (the SWIFT IBAN registry); other country codes are not IBANs."""


@dataclass(frozen=True)
class PiiMatch:
    """One finding: its type, where it is (``text[start:end]``) and its normalised value (the pseudonym
    input: an E.164 phone number, a lower-case address, digits only...)."""

    type: str
    start: int
    end: int
    normalised: str


# --------------------------------------------------------------------------------------------
# Checks of single candidates


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum of payment card numbers."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """Whether ``candidate`` (spaces allowed) is an IBAN: a registry country, its length, mod-97 == 1."""
    compact = candidate.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


# --------------------------------------------------------------------------------------------
# Detectors, one per type: each yields matches in ``text``


def _emails(text: str) -> Iterable[PiiMatch]:
    if "@" not in text:
        return
    for found in _EMAIL.finditer(text):
        yield PiiMatch("email", found.start(), found.end(), found.group().lower())


def _urls(text: str) -> Iterable[PiiMatch]:
    for found in _URL.finditer(text):
        value = found.group().rstrip(_URL_TRAILING)
        yield PiiMatch("url", found.start(), found.start() + len(value), value)


def _ibans(text: str) -> Iterable[PiiMatch]:
    for found in _IBAN.finditer(text):
        value = found.group()
        # The pattern is greedy over trailing groups; the true IBAN may be a prefix of it.
        for end in range(len(value), 14, -1):
            if value[end - 1] != " " and iban_valid(value[:end]):
                yield PiiMatch("iban", found.start(), found.start() + end, value[:end].replace(" ", "").upper())
                break


def _cards(text: str) -> Iterable[PiiMatch]:
    for found in _CARD.finditer(text):
        match = _card_in(found.group(), found.start())
        if match is not None:
            yield match


def _card_in(candidate: str, offset: int) -> PiiMatch | None:
    """The card number in a run of digit groups: the whole run, else the longest run of whole groups
    that passes (a number glued to the digits before it, ``order 2 4111 1111 1111 1111``)."""
    groups = [(piece.start(), piece.end()) for piece in re.finditer(r"\d+", candidate)]
    for size in range(len(groups), 0, -1):
        for first in range(len(groups) - size + 1):
            start, end = groups[first][0], groups[first + size - 1][1]
            digits = re.sub(r"[ -]", "", candidate[start:end])
            if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits):
                return PiiMatch("card", offset + start, offset + end, digits)
    return None


def _ips(text: str) -> Iterable[PiiMatch]:
    if "." in text:
        for found in _IPV4.finditer(text):
            try:
                address = ipaddress.IPv4Address(found.group())
            except ValueError:
                continue
            yield PiiMatch("ip", found.start(), found.end(), str(address))
    if "::" in text or text.count(":") >= 3:
        for found in _IPV6.finditer(text):
            try:
                address = ipaddress.IPv6Address(found.group())
            except ValueError:
                continue
            yield PiiMatch("ip", found.start(), found.end(), address.compressed)


class _PhoneDetector:
    """Phone numbers through ``phonenumbers``: valid numbers of any configured region (a number with
    a +country code is found from any region)."""

    def __init__(self, regions: tuple[str, ...]) -> None:
        import phonenumbers

        self._phonenumbers = phonenumbers
        self.regions = regions

    def __call__(self, text: str) -> Iterable[PiiMatch]:
        if len(_DIGITS.findall(text)) < 6:
            return
        phonenumbers = self._phonenumbers
        seen: set[tuple[int, int]] = set()
        for region in self.regions:
            for found in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                if (found.start, found.end) in seen:
                    continue
                seen.add((found.start, found.end))
                normalised = phonenumbers.format_number(found.number, phonenumbers.PhoneNumberFormat.E164)
                yield PiiMatch("phone", found.start, found.end, normalised)


class _PersonDetector:
    """Person names through Presidio's analyzer with a spaCy model (``privacy.ner_model``)."""

    def __init__(self, model: str) -> None:
        try:
            from presidio_analyzer import AnalyzerEngine
            from presidio_analyzer.nlp_engine import NlpEngineProvider
        except ImportError as error:
            raise ConfigError(f"privacy.ner_model: person names need Presidio (pip install 'tuneloop[ner]'): "
                              f"{error}", field="privacy.ner_model") from error
        try:
            provider = NlpEngineProvider(nlp_configuration={
                "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]})
            self._analyzer = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])
        except (OSError, ValueError) as error:
            raise ConfigError(f"privacy.ner_model: cannot load the spaCy model {model!r} (install its package "
                              f"into the image; models are never downloaded at run time): {error}",
                              field="privacy.ner_model") from error

    def __call__(self, text: str) -> Iterable[PiiMatch]:
        for result in self._analyzer.analyze(text=text, entities=["PERSON"], language="en"):
            yield PiiMatch("person", result.start, result.end, text[result.start:result.end].casefold())


_SIMPLE_DETECTORS: dict[str, Callable[[str], Iterable[PiiMatch]]] = {
    "email": _emails, "url": _urls, "iban": _ibans, "card": _cards, "ip": _ips,
}


# --------------------------------------------------------------------------------------------
# The scanner


class PiiScanner:
    """Finds and masks the configured kinds of personal data.

    Args:
        types: kinds to find (see the module table); ``person`` needs ``ner_model``.
        phone_regions: ISO regions whose national phone formats are recognised.
        ner_model: spaCy model for person names (through Presidio).
        key: the HMAC key of pseudonyms; None: :meth:`mask` can only write placeholders.

    Raises:
        ConfigError: an unknown type, or ``person`` without a usable NER model.
    """

    def __init__(self, types: Iterable[str], *, phone_regions: Iterable[str] = ("US",),
                 ner_model: str | None = None, key: bytes | None = None) -> None:
        types = list(dict.fromkeys(types))
        unknown = [kind for kind in types if kind not in PLACEHOLDERS]
        if unknown:
            raise ConfigError(f"privacy.pii_types: unknown type {unknown[0]!r}; known: {list(PLACEHOLDERS)}",
                              field="privacy.pii_types")
        if "person" in types and not ner_model:
            raise ConfigError("privacy.pii_types: person needs privacy.ner_model (a spaCy model); without one "
                              "names are not detected", field="privacy.pii_types")
        self.types = [kind for kind in PRIORITY if kind in types]
        self.key = key
        self._detectors: list[Callable[[str], Iterable[PiiMatch]]] = []
        for kind in self.types:
            if kind == "phone":
                self._detectors.append(_PhoneDetector(tuple(region.upper() for region in phone_regions)))
            elif kind == "person":
                self._detectors.append(_PersonDetector(str(ner_model)))
            else:
                self._detectors.append(_SIMPLE_DETECTORS[kind])

    def find(self, text: str) -> list[PiiMatch]:
        """Non-overlapping findings in ``text``, in reading order."""
        if not text:
            return []
        taken: list[PiiMatch] = []
        for detect in self._detectors:
            for match in detect(text):
                if all(match.end <= other.start or match.start >= other.end for other in taken):
                    taken.append(match)
        return sorted(taken, key=lambda match: match.start)

    def types_in(self, text: str) -> set[str]:
        """The kinds of personal data in ``text``."""
        return {match.type for match in self.find(text)}

    def mask(self, text: str, *, pseudonymise: bool = False) -> str:
        """``text`` with every finding replaced by its placeholder, or by its keyed pseudonym.

        Raises:
            ConfigError: ``pseudonymise`` without a key.
        """
        if pseudonymise and self.key is None:
            raise ConfigError("pseudonyms need a key: set privacy.pseudonym_key_env and that variable",
                              field="privacy.pseudonym_key_env")
        matches = self.find(text)
        if not matches:
            return text
        pieces, position = [], 0
        for match in matches:
            pieces.append(text[position:match.start])
            pieces.append(self.pseudonym(match) if pseudonymise else PLACEHOLDERS[match.type])
            position = match.end
        pieces.append(text[position:])
        return "".join(pieces)

    def pseudonym(self, match: PiiMatch) -> str:
        """``<TYPE_xxxxxxxxxxxx>``: the first 48 bits of HMAC-SHA256(key, type and normalised value)."""
        assert self.key is not None
        digest = hmac.new(self.key, f"{match.type}:{match.normalised}".encode(), hashlib.sha256).hexdigest()
        return f"{PLACEHOLDERS[match.type][:-1]}_{digest[:12]}>"


def pseudonym_key(privacy: PrivacyConfig, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The pseudonym key from ``$<privacy.pseudonym_key_env>``; None when no variable is configured.

    Raises:
        ConfigError: the variable is configured but unset or empty.
    """
    variable = privacy.pseudonym_key_env
    if not variable:
        return None
    value = (os.environ if environ is None else environ).get(variable, "")
    if not value.strip():
        raise ConfigError(f"privacy.pseudonym_key_env: the environment variable {variable} is not set; it must hold "
                          f"the pseudonym key (from a Secret)", field="privacy.pseudonym_key_env")
    return value.encode("utf-8")


def scanner(privacy: PrivacyConfig, *, key: bytes | None = None) -> PiiScanner:
    """The scanner of a ``privacy`` section (built once per settings and key, then shared)."""
    return _cached_scanner(tuple(privacy.pii_types), tuple(privacy.phone_regions), privacy.ner_model, key)


@functools.lru_cache(maxsize=8)
def _cached_scanner(types: tuple[str, ...], regions: tuple[str, ...], ner_model: str | None,
                    key: bytes | None) -> PiiScanner:
    return PiiScanner(types, phone_regions=regions, ner_model=ner_model, key=key)


def text_policy(privacy: PrivacyConfig, mode: str, *,
                environ: Mapping[str, str] | None = None) -> Callable[[str], str | None]:
    """What a sink stores of one text under ``mode``: masked, pseudonymised, None (dropped) or as is.

    Raises:
        ConfigError: an unknown mode, or ``pseudonymise`` while the key variable is unset (one line,
            at start-up rather than at the first request).
    """
    if mode not in SINK_MODES:
        raise ConfigError(f"privacy: unknown text mode {mode!r}; expected one of {list(SINK_MODES)}",
                          field="privacy.prediction_log")
    if mode == "raw":
        return _unchanged
    if mode == "drop_text":
        return _dropped
    if mode == "pseudonymise":
        key = pseudonym_key(privacy, environ)
        if key is None:
            raise ConfigError("privacy.prediction_log: pseudonymise needs privacy.pseudonym_key_env",
                              field="privacy.pseudonym_key_env")
        active = scanner(privacy, key=key)
        return functools.partial(active.mask, pseudonymise=True)
    return scanner(privacy).mask


def _unchanged(text: str) -> str:
    return text


def _dropped(text: str) -> None:
    return None


def log_text_policy(privacy: PrivacyConfig, environ: Mapping[str, str] | None = None):
    """The policy of the prediction log (``privacy.prediction_log``); None when texts are kept raw."""
    if privacy.prediction_log == "raw":
        return None
    return text_policy(privacy, privacy.prediction_log, environ=environ)


# --------------------------------------------------------------------------------------------
# Counting (validation) and frames (training)


def pii_summary(texts: Iterable[str | None], privacy: PrivacyConfig) -> dict:
    """Rows with personal data, per type and in total, as the validation report shows them.

    Returns ``{"rows", "rows_with_pii", "row_share", "types": {type: {"rows", "matches"}}, "detected",
    "not_detected"}`` where ``not_detected`` names what this configuration cannot see (names without
    an NER model).
    """
    active = scanner(privacy)
    per_type = {kind: {"rows": 0, "matches": 0} for kind in active.types}
    rows = with_pii = 0
    for text in texts:
        rows += 1
        if not isinstance(text, str) or not text:
            continue
        matches = active.find(text)
        if matches:
            with_pii += 1
        for kind in {match.type for match in matches}:
            per_type[kind]["rows"] += 1
        for match in matches:
            per_type[match.type]["matches"] += 1
    not_detected = [] if privacy.ner_model else ["person"]
    return {"rows": rows, "rows_with_pii": with_pii, "row_share": (with_pii / rows) if rows else 0.0,
            "types": per_type, "detected": list(active.types), "not_detected": not_detected}


def pii_table_html(summary: dict) -> str:
    """The PII counts of :func:`pii_summary` as an HTML section (counts only, never a text)."""
    import html

    body = "".join(
        f"<tr><td><code>{html.escape(kind)}</code></td><td>{counts['rows']}</td><td>{counts['matches']}</td></tr>"
        for kind, counts in summary["types"].items()
    )
    share = summary["row_share"] * 100
    missing = (f"<p>Not detected by this configuration: {html.escape(', '.join(summary['not_detected']))} "
               "(set privacy.ner_model for names).</p>") if summary.get("not_detected") else ""
    return (f"<h2>Personal data</h2><p>{summary['rows_with_pii']} of {summary['rows']} rows ({share:.2f}%) contain "
            f"personal data.</p><table><tr><th>type</th><th>rows</th><th>matches</th></tr>{body}</table>{missing}")


def apply_to_training_frame(frame, text_column: str, privacy: PrivacyConfig):
    """The training frame under ``privacy.training``: unchanged (``keep``), texts masked (``mask``), or
    the rows holding personal data removed (``drop_rows``). Returns ``(frame, rows_changed)``.

    Text statistics already in the frame stay those of the original text, as serving computes them
    before masking.
    """
    mode = privacy.training
    if mode == "keep" or frame.empty:
        return frame, 0
    active = scanner(privacy)
    texts = frame[text_column].astype(str)
    if mode == "mask":
        masked = texts.map(active.mask)
        changed = int((masked != texts).sum())
        return frame.assign(**{text_column: masked}), changed
    holds = texts.map(lambda text: bool(active.find(text)))
    return frame[~holds].reset_index(drop=True), int(holds.sum())


TEXT_PRIVACY_KEY = "tuneloop.text_privacy"
"""Key of the training frame's Parquet metadata and of the model's ``tuneloop.json`` entry that say how
its texts were treated, so serving applies the same function to requests."""


def text_privacy_record(privacy: PrivacyConfig) -> dict:
    """What a Dataset and a model record about their texts: the training mode and the scanner settings."""
    return {"training": privacy.training, "pii_types": list(privacy.pii_types),
            "phone_regions": list(privacy.phone_regions), "ner_model": privacy.ner_model}


def request_masker(record: Mapping | None) -> Callable[[str], str] | None:
    """The function serving applies to requests of a model whose ``tuneloop.json`` holds ``record``
    (:func:`text_privacy_record`): the training-time mask when training masked texts, else None."""
    if not record or record.get("training") != "mask":
        return None
    from tuneloop.config import PrivacyConfig

    settings = PrivacyConfig(pii_types=record["pii_types"], phone_regions=record["phone_regions"],
                             ner_model=record.get("ner_model"))
    return scanner(settings).mask


def serving_masker(model_dir, privacy: PrivacyConfig) -> Callable[[str], str] | None:
    """The mask serving applies to requests of the model in ``model_dir`` before predicting: the one its
    training frame used (``tuneloop.json`` :data:`TEXT_PRIVACY_KEY`; a model without that record is
    taken as trained under the config's ``privacy.training``), or None when it was trained on raw text."""
    from pathlib import Path

    from tuneloop.artifacts import METADATA_FILE, read_metadata

    metadata = read_metadata(model_dir) if (Path(model_dir) / METADATA_FILE).is_file() else {}
    record = metadata.get(TEXT_PRIVACY_KEY)
    return request_masker(record if record is not None else text_privacy_record(privacy))


def private_training_frame(frame, config):
    """The training frame as ``privacy`` wants it: erased ids and texts excluded (the erasure audit log),
    then ``privacy.training`` applied; the frame's ``attrs`` record :data:`TEXT_PRIVACY_KEY` (Parquet keeps
    them), which training copies into ``tuneloop.json`` so serving masks requests the same way."""
    from tuneloop.erasure import exclude_erased

    text_column = config.data.text_column
    frame, erased = exclude_erased(frame, config)
    if erased:
        print(f"[features] excluded {erased} rows erased by tuneloop forget", flush=True)
    frame, changed = apply_to_training_frame(frame, text_column, config.privacy)
    if changed:
        verb = "masked personal data in" if config.privacy.training == "mask" else "dropped"
        print(f"[features] privacy.training={config.privacy.training}: {verb} {changed} rows", flush=True)
    frame.attrs[TEXT_PRIVACY_KEY] = text_privacy_record(config.privacy)
    return frame


def texts_as_logged(frame, column: str, privacy: PrivacyConfig, environ: Mapping[str, str] | None = None):
    """``frame`` with ``column`` as the prediction log stores served texts (``privacy.prediction_log``;
    dropped texts become empty). The drift monitor compares its reference this way, so masking cannot look
    like drift, and its report shows no raw text unless the log mode is ``raw``."""
    policy = log_text_policy(privacy, environ)
    if policy is None:
        return frame
    return frame.assign(**{column: [policy(str(text)) or "" for text in frame[column]]})
