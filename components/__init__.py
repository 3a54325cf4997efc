"""KFP components of tuneloop: one file per stage, each a thin `@dsl.component`.

Every component runs in the tuneloop image (``docker/``), which has the ``tuneloop`` package
installed, so component bodies import ``tuneloop.<stage>`` and never install packages.
``tuneloop compile --image`` rewrites the image reference at compile time.
"""

import os

TUNELOOP_IMAGE = os.environ.get("TUNELOOP_IMAGE", "ghcr.io/tuneloop/tuneloop:0.1.0")
"""The component image; set ``TUNELOOP_IMAGE`` (or ``tuneloop compile --image``) to override."""
