"""Suite-wide settings: the tests never write to the user's own cache of weight hashes."""

from __future__ import annotations

import os
import tempfile

# Read by pipeline/model_identity.py (and inherited by the drivers and actors the tests start).
os.environ.setdefault("RECAPTION_CACHE_DIR", tempfile.mkdtemp(prefix="recaption-test-cache-"))
