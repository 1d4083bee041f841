"""Suite-wide settings: the tests never write to the user's own cache of weight hashes; gcsfs without its gRPC extension."""

from __future__ import annotations

import os
import tempfile

# Read by pipeline/model_identity.py (and inherited by the drivers and actors the tests start).
os.environ.setdefault("RECAPTION_CACHE_DIR", tempfile.mkdtemp(prefix="recaption-test-cache-"))

# gcsfs reads this at import: without it, its GCSFileSystem is ExtendedGcsFileSystem, whose per-bucket gRPC lookup
# waits out a 60 s timeout on the GCS emulator (tests/emulators.py). Set here, before any test module imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
