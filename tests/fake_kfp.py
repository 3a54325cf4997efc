"""The loopback fake KFP API server lives in :mod:`rehearsal.fake_kfp` (the rehearsal uses it too)."""

from rehearsal.fake_kfp import *  # noqa: F401,F403
from rehearsal.fake_kfp import FakeKFP  # noqa: F401
