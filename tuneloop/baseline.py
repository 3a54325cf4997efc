"""The simple baseline a first model must beat: TF-IDF features and logistic regression (scikit-learn).

It is trained on the same train rows the fine-tuned model saw (the same ``training.max_train_rows``
sample) and scored on the same test rows, so the gate compares the two pairwise. It exists only
inside the evaluate step: nothing of it is saved.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.errors import DataError

MAX_FEATURES = 200_000


def train_rows(train: pd.DataFrame, config: TuneloopConfig) -> pd.DataFrame:
    """The train rows ``finetune`` trains on (its ``training.max_train_rows`` sample)."""
    from tuneloop.training.finetune import _limit_rows  # the one rule for which rows are trained on

    return _limit_rows(train, config.training.max_train_rows, config.training.seed)


def fit_predict(train_texts: Sequence[str], train_labels: Sequence[str], test_texts: Sequence[str], *,
                seed: int = 0) -> list[str]:
    """Fit scikit-learn's plain text classifier, predict ``test_texts``.

    TF-IDF of words and word pairs and a logistic regression with scikit-learn's defaults: the
    baseline any text classifier is expected to beat, deliberately not tuned.

    Raises:
        DataError: the train rows hold fewer than two classes (nothing to learn a boundary from).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    classes = sorted(set(map(str, train_labels)))
    if len(classes) < 2:
        raise DataError(f"the baseline needs train rows of at least two classes, found {classes}", stage="evaluation")
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=MAX_FEATURES),
                          LogisticRegression(max_iter=1000, random_state=seed))
    model.fit([str(t) for t in train_texts], [str(y) for y in train_labels])
    return [str(label) for label in model.predict([str(t) for t in test_texts])]
