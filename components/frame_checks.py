"""The `validate_frame` component: the checks of the point-in-time frame that `finetune` receives."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def validate_frame(
    config_json: str,
    dataset: Input[Dataset],
    report: Output[HTML],
    result: Output[Artifact],
) -> NamedTuple("FrameCheckOutputs", rows=int, fingerprint=str, near_duplicate_share=float):
    """Validate the trained frame (the Dataset `retrieve_features` wrote), not only the raw sources.

    Runs the Great Expectations suite on it, fails when more than
    ``validation.max_near_duplicate_share`` of validation and test rows near-duplicate a train row
    (normalised text, MinHash), and reports relabelled ids and texts. Writes the HTML report and the
    JSON result either way; returns the frame's fingerprint, the lineage the registry records.
    """
    from collections import namedtuple

    from tuneloop import frame_checks
    from tuneloop.config import TuneloopConfig

    summary = frame_checks.run(TuneloopConfig.from_json(config_json), dataset.path, report.path, result.path)
    result.metadata["fingerprint"] = summary.fingerprint
    result.metadata["near_duplicate_share"] = summary.near_duplicate_share
    outputs = namedtuple("FrameCheckOutputs", ["rows", "fingerprint", "near_duplicate_share"])
    return outputs(summary.rows, summary.fingerprint, summary.near_duplicate_share)
