"""Config sections of personal data: detection, masking, erasure, and DP-SGD training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import StrictModel


PII_TYPES = ("email", "phone", "card", "iban", "ip", "url", "person")
"""Every kind of personal data :mod:`tuneloop.privacy` can find (``person`` only with an NER model)."""


class ErasureConfig(StrictModel):
    """What ``tuneloop forget`` does with the version of the training sources it replaces."""

    retired_sources: Literal["delete", "archive"] = Field(
        "delete", description="delete: the old texts/labels files are removed once the new version is written; "
        "archive: moved under archive_uri (give that place a retention rule: it still holds the erased rows).",
    )
    archive_uri: str | None = Field(None, description="Folder or object-store prefix for archived sources.")

    @model_validator(mode="after")
    def _archive_has_place(self) -> "ErasureConfig":
        if self.retired_sources == "archive" and not self.archive_uri:
            raise ValueError("retired_sources: archive needs archive_uri")
        return self


class PrivacyConfig(StrictModel):
    """Personal data in texts (:mod:`tuneloop.privacy`): what is detected and what each sink does with it.

    ``pii_types`` lists what is found: e-mail addresses, phone numbers (``phonenumbers``, numbers valid
    in one of ``phone_regions`` or written with a +country code), Luhn-checked payment card numbers,
    IBANs (mod-97 checked), IPv4/IPv6 addresses, URLs, and person names (only with ``ner_model``, a
    spaCy model used through Presidio; without one, names are not detected). A mask is a typed
    placeholder (``<PHONE>``); a pseudonym is a keyed HMAC (``<PHONE_1a2b3c4d5e6f>``) whose key is read
    from the environment variable named by ``pseudonym_key_env`` (a Secret in a cluster).
    """

    pii_types: list[Literal["email", "phone", "card", "iban", "ip", "url", "person"]] = Field(
        ["email", "phone", "card", "iban", "ip"], min_length=1, description="Kinds of personal data to find.",
    )
    phone_regions: list[str] = Field(["US", "GB", "DE", "FR", "IN"], min_length=1,
                                     description="ISO regions whose national phone formats are recognised.")
    ner_model: str | None = Field(None, description="spaCy model (package name or path) for person names via "
                                  "Presidio (extra: tuneloop[ner]); unset: names are not detected.")
    pseudonym_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                          description="Env var holding the HMAC key of pseudonyms.")
    max_pii_row_share: float | None = Field(None, ge=0.0, le=1.0, description="Validation fails when a larger "
                                            "share of labelled rows contains personal data (unset: only counted).")
    training: Literal["keep", "mask", "drop_rows"] = Field(
        "keep", description="Training frame: keep texts, mask them (serving then masks requests too), or drop "
        "rows with personal data.",
    )
    prediction_log: Literal["mask", "pseudonymise", "drop_text", "raw"] = Field(
        "mask", description="What the prediction log stores of a served text (statistics come from the raw text).",
    )
    max_epsilon: float | None = Field(None, gt=0.0, description="The gate blesses only models trained with DP-SGD "
                                      "whose spent epsilon is at most this (unset: no privacy check).")
    erasure: ErasureConfig = ErasureConfig()

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, regions: list[str]) -> list[str]:
        import phonenumbers

        regions = [region.upper() for region in regions]
        unknown = [region for region in regions if region not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown phone regions {unknown}; use ISO 3166 codes such as US, GB, DE")
        return regions

    @model_validator(mode="after")
    def _modes_have_what_they_need(self) -> "PrivacyConfig":
        if "person" in self.pii_types and not self.ner_model:
            raise ValueError("pii_types: person needs ner_model (a spaCy model); without one names are not detected")
        if self.prediction_log == "pseudonymise" and not self.pseudonym_key_env:
            raise ValueError("prediction_log: pseudonymise needs pseudonym_key_env (the env var holding the key)")
        return self


class DifferentialPrivacyConfig(StrictModel):
    """DP-SGD fine-tuning with Opacus (``training.privacy``): per-example gradients clipped to
    ``max_grad_norm``, Gaussian noise sized so that training spends at most ``target_epsilon`` at
    ``delta`` (unset: 1 / (10 x training rows)). Works with ``method: full`` and ``lora``."""

    dp: bool = False
    target_epsilon: float = Field(8.0, gt=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
