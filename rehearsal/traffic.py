"""Traffic for the rehearsal's serving replicas, and an independent count of the prediction log."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

CAMPAIGN_TEMPLATES = (
    "Your parcel could not be delivered. Reschedule at http://{domain}.top/{code} before {digits} expires",
    "BANK ALERT: unusual sign-in on your account. Verify now at https://secure-{domain}.co/{code} ref {digits}",
    "Congratulations, you were selected for a {amount} GBP reward. Claim: http://{domain}.win/{code}",
    "Final notice: your toll balance is overdue. Pay {amount} at {domain}-pay.com/{code} or call {phone}",
)
"""A smishing campaign the training data has never seen (the drift the monitor must notice)."""


def campaign_texts(rows: int, seed: int = 7) -> list[str]:
    """``rows`` campaign messages, deterministic for a seed."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = []
    for _ in range(rows):
        template = rng.choice(CAMPAIGN_TEMPLATES)
        texts.append(template.format(
            domain="".join(rng.choice(letters) for _ in range(rng.randint(5, 9))),
            code="".join(rng.choice(letters) for _ in range(6)) + str(rng.randint(100, 999)),
            digits="".join(str(rng.randint(0, 9)) for _ in range(rng.randint(10, 12))),
            phone="0" + "".join(str(rng.randint(0, 9)) for _ in range(10)),
            amount=rng.randint(100, 2000),
        ))
    return texts


@dataclass
class Reply:
    status: int
    body: object


def post(url: str, payload: dict, api_key: str, *, timeout: float = 60) -> Reply:
    """POST JSON with the serving API key; any HTTP answer is a Reply, a dead socket is status 0."""
    from tuneloop.serving import API_KEY_HEADER

    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", API_KEY_HEADER: api_key})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, json.loads(response.read() or b"null"))
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return Reply(error.code, json.loads(body or b"null"))
        except ValueError:
            return Reply(error.code, body.decode(errors="replace"))
    except (OSError, urllib.error.URLError) as error:
        return Reply(0, str(error))


def wait_ready(base_url: str, alive, timeout: float = 300) -> bool:
    """Poll ``/readyz`` until 200, or until ``alive()`` is false or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=3) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    return False


def logged_request_ids(store, uri: str) -> set[str]:
    """Every ``request_id`` in the prediction log at ``uri`` (an ``s3://`` prefix), read file by file
    with pyarrow straight from the object store: an independent count, not the product's reader.
    Only files with a ``predicted_label`` column count (prediction records, not feedback)."""
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=store.endpoint, key=store.env["AWS_ACCESS_KEY_ID"],
                           secret=store.env["AWS_SECRET_ACCESS_KEY"], client_kwargs={"region_name": "us-east-1"})
    fs.invalidate_cache()
    prefix = uri.removeprefix("s3://")
    ids: set[str] = set()
    for path in fs.find(prefix):
        if not path.endswith(".parquet"):
            continue
        schema = pq.read_schema(fs.open(path, "rb"))
        if "request_id" in schema.names and "predicted_label" in schema.names:
            with fs.open(path, "rb") as handle:
                ids.update(pq.read_table(handle, columns=["request_id"]).column("request_id").to_pylist())
    return ids
