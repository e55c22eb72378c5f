"""The one fingerprint helper: what identifies settings, inputs or data is hashed the same way everywhere.

    fingerprint(value, length=None) -> hex sha256 of `value` as JSON (keys sorted; non-JSON values as str)

Fingerprints are stored (training reports, checkpoints, prepare's markers, the eval matrix) and compared
with the stored ones on the next run: changing the encoding here retrains and re-prepares everything.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional


def fingerprint(value: Any, length: Optional[int] = None) -> str:
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest
