"""Personal data: detection and masking (tuneloop.privacy), and where it applies (validation, training
frame, prediction log)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import make_config, make_labelled_frame
from tuneloop import privacy
from tuneloop.config import PrivacyConfig
from tuneloop.errors import ConfigError

ALL_BUT_NAMES = ["email", "phone", "card", "iban", "ip", "url"]


@pytest.fixture(scope="module")
def scanner():
    return privacy.scanner(PrivacyConfig(pii_types=ALL_BUT_NAMES))


@pytest.mark.parametrize("text, masked", [
    ("mail JOHN.doe+spam@Example.co.uk now", "mail <EMAIL> now"),
    ("<anna_b@mail.example.org>", "<<EMAIL>>"),
    ("call (415) 555-2671 today", "call <PHONE> today"),
    ("ring +44 7911 123456!", "ring <PHONE>!"),
    ("tel 030 12345678 berlin", "tel <PHONE> berlin"),
    ("06 12 34 56 78", "<PHONE>"),
    ("+91 98765 43210 is mine", "<PHONE> is mine"),
    ("card 4111 1111 1111 1111 exp 12/27", "card <CARD> exp 12/27"),
    ("5500-0055-5555-5559", "<CARD>"),
    ("amex 378282246310005.", "amex <CARD>."),
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", "IBAN <IBAN> thanks"),
    ("pay to gb82west12345698765432", "pay to <IBAN>"),
    ("from 192.168.1.20 and 2001:db8::ff00:42:8329", "from <IP> and <IP>"),
    ("see https://example.com/a?b=1.", "see <URL>."),
])
def test_every_type_is_masked_in_several_formats(scanner, text, masked):
    assert scanner.mask(text) == masked


@pytest.mark.parametrize("text", [
    "price 12.50 on 2024-01-02, order 123456, meet at 12:30:45",
    "card 4111 1111 1111 1112 fails the Luhn check",
    "IBAN DE89 3704 0044 0532 0130 01 has a wrong checksum",
    "version 1.2.3.4000 and 999.1.1.1 are not addresses",
    "FREE entry 2 wkly comp text 87121, 2000 bonus",
    "0000 0000 0000 0000",
])
def test_look_alikes_are_left_alone(scanner, text):
    assert scanner.find(text) == []


def test_a_card_number_is_not_also_a_phone_number(scanner):
    assert [match.type for match in scanner.find("4111111111111111")] == ["card"]


def test_pseudonyms_are_keyed_stable_and_not_the_value():
    settings = PrivacyConfig(pseudonym_key_env="TEST_KEY")
    keyed = privacy.scanner(settings, key=b"secret-one")
    first = keyed.mask("call +1 415 555 2671", pseudonymise=True)
    second = keyed.mask("call (415) 555-2671", pseudonymise=True)  # same number, national format
    assert first == second and first.startswith("call <PHONE_") and "2671" not in first
    other_key = privacy.scanner(settings, key=b"secret-two").mask("call +1 415 555 2671", pseudonymise=True)
    assert other_key != first
    assert keyed.mask("mail a@b.io", pseudonymise=True) != keyed.mask("mail c@b.io", pseudonymise=True)


def test_pseudonymise_without_the_key_variable_is_one_line_error():
    settings = PrivacyConfig(prediction_log="pseudonymise", pseudonym_key_env="TUNELOOP_TEST_PSEUDONYM_KEY")
    with pytest.raises(ConfigError) as caught:
        privacy.text_policy(settings, "pseudonymise", environ={})
    message = str(caught.value)
    assert "TUNELOOP_TEST_PSEUDONYM_KEY is not set" in message and "\n" not in message
    policy = privacy.text_policy(settings, "pseudonymise", environ={"TUNELOOP_TEST_PSEUDONYM_KEY": "k"})
    assert policy("mail a@b.io").startswith("mail <EMAIL_")


def test_pseudonymise_without_a_key_variable_name_fails_at_load(tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, privacy={"prediction_log": "pseudonymise"})
    assert "privacy: Value error, prediction_log: pseudonymise needs pseudonym_key_env" in str(caught.value)


def test_unknown_pii_type_in_the_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, privacy={"pii_types": ["email", "passport"]})
    message = str(caught.value)
    assert "privacy.pii_types.1" in message and "'email'" in message and "\n" not in message
    assert caught.value.field == "privacy.pii_types.1"


def test_names_need_an_ner_model_and_unknown_regions_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="person needs ner_model"):
        make_config(tmp_path, privacy={"pii_types": ["person"]})
    with pytest.raises(ConfigError, match=r"unknown phone regions \['XX'\]"):
        make_config(tmp_path, privacy={"phone_regions": ["us", "XX"]})
    with pytest.raises(ConfigError, match="unknown type 'passport'"):
        privacy.PiiScanner(["passport"])


def test_phone_regions_decide_which_national_formats_count():
    german_national = "ruf an: 030 12345678"
    assert privacy.PiiScanner(["phone"], phone_regions=["US"]).find(german_national) == []
    assert [m.type for m in privacy.PiiScanner(["phone"], phone_regions=["DE"]).find(german_national)] == ["phone"]


def test_sink_modes():
    settings = PrivacyConfig()
    text = "call 415-555-2671"
    assert privacy.text_policy(settings, "mask")(text) == "call <PHONE>"
    assert privacy.text_policy(settings, "raw")(text) == text
    assert privacy.text_policy(settings, "drop_text")(text) is None
    with pytest.raises(ConfigError, match="unknown text mode"):
        privacy.text_policy(settings, "scramble")


def test_pii_summary_counts_rows_and_matches_per_type():
    texts = ["mail a@b.io or c@d.io", "call 415-555-2671", "nothing here", None, "a@b.io and 415-555-2671"]
    summary = privacy.pii_summary(texts, PrivacyConfig())
    assert summary["rows"] == 5 and summary["rows_with_pii"] == 3 and summary["row_share"] == pytest.approx(0.6)
    assert summary["types"]["email"] == {"rows": 2, "matches": 3}
    assert summary["types"]["phone"] == {"rows": 2, "matches": 2}
    assert summary["types"]["card"] == {"rows": 0, "matches": 0}
    assert summary["not_detected"] == ["person"]
    html = privacy.pii_table_html(summary)
    assert "3 of 5 rows" in html and "a@b.io" not in html


def test_training_frame_modes():
    frame = pd.DataFrame({"id": ["a", "b"], "text": ["call 415-555-2671 now", "plain text"], "text_length": [21, 10]})
    kept, changed = privacy.apply_to_training_frame(frame, "text", PrivacyConfig(training="keep"))
    assert kept is frame and changed == 0
    masked, changed = privacy.apply_to_training_frame(frame, "text", PrivacyConfig(training="mask"))
    assert masked["text"].tolist() == ["call <PHONE> now", "plain text"] and changed == 1
    assert masked["text_length"].tolist() == [21, 10]  # statistics stay those of the original text
    dropped, changed = privacy.apply_to_training_frame(frame, "text", PrivacyConfig(training="drop_rows"))
    assert dropped["id"].tolist() == ["b"] and changed == 1


def test_serving_masks_requests_only_for_models_trained_on_masked_text():
    record = privacy.text_privacy_record(PrivacyConfig(training="mask", phone_regions=["GB"]))
    masker = privacy.request_masker(json.loads(json.dumps(record)))
    assert masker("ring 07911 123456") == "ring <PHONE>"
    assert privacy.request_masker(privacy.text_privacy_record(PrivacyConfig())) is None
    assert privacy.request_masker(None) is None


# --------------------------------------------------------------------------------------------
# Validation: the PII table and the expectation


def _write(tmp_path, frame):
    frame[["id", "event_timestamp", "text"]].to_parquet(tmp_path / "texts.parquet", index=False)
    frame[["id", "event_timestamp", "label"]].to_parquet(tmp_path / "labels.parquet", index=False)


def _frame_with_pii(rows_with_pii: int) -> pd.DataFrame:
    frame = make_labelled_frame()
    for index in range(rows_with_pii):
        frame.loc[index, "text"] = f"{frame.loc[index, 'text']} mail me at person{index}@example.com"
    return frame


def test_validation_report_shows_the_pii_table_without_texts(tmp_path):
    from tuneloop import validation

    _write(tmp_path, _frame_with_pii(6))
    config = make_config(tmp_path)
    validation.run(config, tmp_path / "out" / "report.html", tmp_path / "out" / "result.json")
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["pii"]["types"]["email"] == {"rows": 6, "matches": 6}
    # The spam template "call 09061701461" (a valid GB number) is in every 12th row, row 0 also has an e-mail.
    assert result["pii"]["types"]["phone"] == {"rows": 10, "matches": 10}
    assert result["pii"]["rows_with_pii"] == 6 + 10 - 1
    report = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Personal data</h2>" in report and "<code>email</code></td><td>6</td>" in report
    assert "person0@example.com" not in report and "person0@example.com" not in json.dumps(result)


def test_max_pii_row_share_fails_validation_naming_the_share(tmp_path):
    from tuneloop import validation
    from tuneloop.errors import DataValidationError

    _write(tmp_path, _frame_with_pii(6))
    config = make_config(tmp_path, privacy={"max_pii_row_share": 0.01, "pii_types": ["email"]})
    with pytest.raises(DataValidationError) as caught:
        validation.run(config, tmp_path / "out" / "report.html", tmp_path / "out" / "result.json")
    assert caught.value.failures == ["5% of rows contain personal data (6 of 120); privacy.max_pii_row_share "
                                     "allows 1%"]
    config = make_config(tmp_path, privacy={"max_pii_row_share": 0.05, "pii_types": ["email"]})
    summary = validation.run(config, tmp_path / "out" / "report.html", tmp_path / "out" / "result.json")
    assert summary.success and summary.expectations == 9


# --------------------------------------------------------------------------------------------
# The prediction log and serving

PLANTED = [
    "call me on +44 7911 123456 or (415) 555-2671 tonight",
    "my mail is Jane.Roe+sms@example.org, card 4111 1111 1111 1111",
    "pay 5500-0055-5555-5559 to DE89370400440532013000 from 203.0.113.9",
    "nothing personal here",
]
SECRETS = ["7911 123456", "7911123456", "555-2671", "5552671", "Jane.Roe", "jane.roe", "example.org",
           "4111 1111 1111 1111", "4111111111111111", "5500-0055-5555-5559", "5500005555555559",
           "DE89370400440532013000", "203.0.113.9"]


@pytest.fixture(scope="module")
def compressed_dir(tiny_checkpoint, tmp_path_factory):
    from tests.conftest import export_tiny_model

    return export_tiny_model(tiny_checkpoint, tmp_path_factory.mktemp("privacy-model"))


def _serve_and_flush(config, compressed_dir, texts):
    from tuneloop.serving import ServingRuntime

    runtime = ServingRuntime(config, version="1", model_dir=compressed_dir)
    try:
        answers = runtime.predict(texts)
        assert runtime.flush()
    finally:
        runtime.close()
    return runtime, answers


def _log_bytes(uri) -> bytes:
    from pathlib import Path

    files = sorted(Path(uri).rglob("*.parquet"))
    assert files, f"no Parquet file under {uri}"
    return b"".join(path.read_bytes() for path in files)


def test_default_mode_never_writes_planted_pii_to_the_log_bytes(tmp_path, compressed_dir, monkeypatch):
    from tuneloop.prediction_log import (
        LOG_URI_ENV,
        prediction_log_uri,
        read_predictions,
    )

    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    config = make_config(tmp_path)
    assert config.privacy.prediction_log == "mask"
    _serve_and_flush(config, compressed_dir, PLANTED)
    uri = prediction_log_uri(config)
    raw = _log_bytes(uri)
    for secret in SECRETS:
        assert secret.encode() not in raw, secret
    logged = read_predictions(uri).sort_values("timestamp", kind="stable").reset_index(drop=True)
    assert logged["text"].tolist() == [
        "call me on <PHONE> or <PHONE> tonight", "my mail is <EMAIL>, card <CARD>", "pay <CARD> to <IBAN> from <IP>",
        "nothing personal here"]
    # statistics come from the served text, before masking
    assert logged.loc[0, "char_count"] == len(PLANTED[0]) and logged.loc[0, "has_phone_number"] == 1


def test_pseudonymise_and_drop_text_modes(tmp_path, compressed_dir, monkeypatch):
    from tuneloop.prediction_log import (
        LOG_URI_ENV,
        prediction_log_uri,
        read_predictions,
    )

    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    monkeypatch.setenv("TEST_PSEUDONYM_KEY", "k1")
    config = make_config(tmp_path / "p", privacy={"prediction_log": "pseudonymise",
                                                  "pseudonym_key_env": "TEST_PSEUDONYM_KEY"})
    _serve_and_flush(config, compressed_dir, ["ring +1 415 555 2671", "ring (415) 555-2671"])
    texts = read_predictions(prediction_log_uri(config))["text"].tolist()
    assert len(set(texts)) == 1 and texts[0].startswith("ring <PHONE_") and "2671" not in texts[0]

    config = make_config(tmp_path / "d", privacy={"prediction_log": "drop_text"})
    _serve_and_flush(config, compressed_dir, PLANTED[:2])
    logged = read_predictions(prediction_log_uri(config))
    assert logged["text"].isna().all() and (logged["char_count"] > 0).all()
    for secret in SECRETS:
        assert secret.encode() not in _log_bytes(prediction_log_uri(config))


def test_serving_refuses_to_start_pseudonymising_without_the_key(tmp_path, compressed_dir, monkeypatch):
    from tuneloop.serving import ServingRuntime

    monkeypatch.delenv("TEST_PSEUDONYM_KEY", raising=False)
    config = make_config(tmp_path, privacy={"prediction_log": "pseudonymise", "pseudonym_key_env": "TEST_PSEUDONYM_KEY"})
    with pytest.raises(ConfigError, match="TEST_PSEUDONYM_KEY is not set"):
        ServingRuntime(config, version="1", model_dir=compressed_dir)


def test_a_model_trained_on_masked_text_gets_masked_requests(tmp_path, compressed_dir, monkeypatch):
    import shutil

    from tuneloop.artifacts import read_metadata, write_metadata
    from tuneloop.prediction_log import LOG_URI_ENV

    monkeypatch.delenv(LOG_URI_ENV, raising=False)
    masked_model = tmp_path / "masked-model"
    shutil.copytree(compressed_dir, masked_model)
    metadata = read_metadata(masked_model)
    metadata[privacy.TEXT_PRIVACY_KEY] = privacy.text_privacy_record(PrivacyConfig(training="mask"))
    write_metadata(masked_model, metadata)
    config = make_config(tmp_path)
    runtime, answers = _serve_and_flush(config, masked_model, [PLANTED[0]])
    assert runtime.request_mask is not None
    expected = runtime.model.classifier.predict_proba([privacy.scanner(PrivacyConfig()).mask(PLANTED[0])])[0]
    assert answers[0].probabilities["spam"] == pytest.approx(float(expected[1]), abs=1e-6)
    plain, _ = _serve_and_flush(make_config(tmp_path / "plain"), compressed_dir, ["x"])
    assert plain.request_mask is None


# --------------------------------------------------------------------------------------------
# The training frame


def test_training_frame_excludes_erased_rows_masks_texts_and_records_the_mode(tmp_path, monkeypatch):
    from tuneloop import erasure, features

    monkeypatch.delenv("TUNELOOP_PREDICTION_LOG_DIR", raising=False)
    frame = _frame_with_pii(6)
    _write(tmp_path, frame)
    config = make_config(tmp_path, privacy={"training": "mask"})
    erasure.forget(config, ids=["m00001", "m00002"])
    # a restored backup brings the erased rows back: the training frame still leaves them out
    _write(tmp_path, frame)
    features.run(config, tmp_path / "dataset.parquet")
    dataset = pd.read_parquet(tmp_path / "dataset.parquet")
    assert len(dataset) == 118 and not {"m00001", "m00002"} & set(dataset["id"])
    row = dataset.set_index("id").loc["m00003"]
    assert row["text"].endswith("mail me at <EMAIL>") and "@" not in "".join(dataset["text"])
    assert row["char_count"] == len(frame.set_index("id").loc["m00003", "text"])  # statistics of the raw text
    assert dataset.attrs[privacy.TEXT_PRIVACY_KEY]["training"] == "mask"


# --------------------------------------------------------------------------------------------
# Drift reports


@pytest.mark.parametrize("mode, expected", [
    ("mask", "call <PHONE> or mail <EMAIL>"), ("drop_text", ""), ("raw", "call 415-555-2671 or mail a@b.io")])
def test_the_drift_reference_shows_texts_as_the_log_stores_them(tmp_path, mode, expected):
    from tuneloop.monitoring.reference import Reference, prepare_reference

    raw = "call 415-555-2671 or mail a@b.io"
    frame = pd.DataFrame({"id": ["a"], "text": [raw], "label": ["ham"]})
    config = make_config(tmp_path, privacy={"prediction_log": mode})
    prepared = prepare_reference(config, Reference(frame=frame, uri="memory://ref", predictions="labels",
                                                   rows_available=1), None)
    assert prepared["text"].tolist() == [expected]
    assert prepared["char_count"].tolist() == [len(raw)]  # statistics of the training text


def test_a_configured_ner_model_that_cannot_load_is_one_line_error():
    """Names need Presidio and an installed spaCy model; neither is downloaded at run time."""
    with pytest.raises(ConfigError) as caught:
        privacy.PiiScanner(["person"], ner_model="no_such_spacy_model")
    assert caught.value.field == "privacy.ner_model" and "\n" not in str(caught.value)


def test_drift_drivers_from_an_old_raw_log_show_masked_text():
    from tuneloop.config import PrivacyConfig
    from tuneloop.monitoring.check import _as_logged
    from types import SimpleNamespace

    config = SimpleNamespace(privacy=PrivacyConfig())
    shown = _as_logged(config, ["call me on +44 20 7123 4567 or mail jo@example.com"])
    assert "7123" not in shown[0] and "jo@example.com" not in shown[0]
    assert "<PHONE>" in shown[0] and "<EMAIL>" in shown[0]
