"""The `validate_data` component: the Great Expectations suite on the labelled data."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def validate_data(
    config_json: str,
    report: Output[HTML],
    result: Output[Artifact],
) -> NamedTuple("ValidationOutputs", rows=int, fingerprint=str):
    """Validate the labelled data with a Great Expectations suite built from the config.

    Every expectation is critical (schema, every label has a text, no empty text, text length
    bounds, labels from the known set, unique ids, enough rows, enough rows per class): one
    failure fails the step with a line per failed expectation. Writes the HTML report and the JSON
    result either way; returns the row count and the data fingerprint for lineage.
    """
    from collections import namedtuple

    from tuneloop import validation
    from tuneloop.config import TuneloopConfig

    summary = validation.run(TuneloopConfig.from_json(config_json), report.path, result.path)
    result.metadata["rows"] = summary.rows
    result.metadata["fingerprint"] = summary.fingerprint
    outputs = namedtuple("ValidationOutputs", ["rows", "fingerprint"])
    return outputs(summary.rows, summary.fingerprint)
