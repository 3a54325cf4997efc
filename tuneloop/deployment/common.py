"""The deployment stage's shared vocabulary: its constants, its error, and the records of what it did."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from tuneloop.errors import TuneloopError

logger = logging.getLogger("tuneloop.deployment")

STAGE = "deployment"
ANNOTATION = "tuneloop.dev/model-version"
DEFAULT_SMOKE_TEXT = "tuneloop smoke test"
SERVING_DIR_ENV = "TUNELOOP_SERVING_DIR"

DEPLOYED, UNCHANGED, FAILED = "deployed", "unchanged", "failed"


class DeploymentError(TuneloopError):
    """A rollout, smoke test or promotion failed; ``result`` says what was done and undone."""

    exit_code = 8

    def __init__(self, message: str, *, result: "DeployResult | None" = None, **context: Any) -> None:
        context.setdefault("stage", STAGE)
        super().__init__(message, **context)
        self.result = result


@dataclass
class SmokeCheck:
    """One smoke request: the text, the label expected (None: any) and what the server answered."""

    text: str
    expected_label: str | None
    label: str | None = None
    model_version: str | None = None
    passed: bool = False
    error: str | None = None


@dataclass
class DeployResult:
    """What a deploy, promote or rollback did.

    ``status`` is ``deployed`` (the version is live and champion), ``unchanged`` (it already was) or
    ``failed`` (then ``rolled_back`` says whether the cluster was returned to ``previous_version``).
    """

    version: str
    target: str
    status: str
    previous_version: str | None = None
    champion: str | None = None
    previous_champion: str | None = None
    bento: str | None = None
    rolled_back: bool = False
    smoke: list[SmokeCheck] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
