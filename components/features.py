"""The `retrieve_features` component: the point-in-time training set from Feast, with splits."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def retrieve_features(
    config_json: str,
    dataset: Output[Dataset],
) -> NamedTuple("FeatureOutputs", train_rows=int, validation_rows=int, test_rows=int):
    """Join each label to the latest text known at its timestamp (Feast, point-in-time correct).

    Adds the shared text-statistics features and a train/validation/test split from a stable hash
    of the entity key, and writes the Dataset as one Parquet file. Fails when no label joins a
    text or a split is empty. In a cluster it only reads the Feast registry, set up beforehand by
    `tuneloop features apply`, and fails with one line naming that command when the registry lacks
    the definitions; an unreachable Postgres or object store raises ServiceUnavailableError, which
    KFP retries (the step writes nothing but its own Dataset, so a retry is safe).
    """
    from collections import namedtuple

    from tuneloop import features
    from tuneloop.config import TuneloopConfig

    summary = features.run(TuneloopConfig.from_json(config_json), dataset.path)
    dataset.metadata["feature_service"] = summary.feature_service
    dataset.metadata["rows"] = summary.total_rows
    outputs = namedtuple("FeatureOutputs", ["train_rows", "validation_rows", "test_rows"])
    return outputs(summary.rows["train"], summary.rows["validation"], summary.rows["test"])
