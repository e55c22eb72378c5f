"""Which strings are storage URIs, and whether one is well formed: the one check the config (at start-up)
and ``storage.Store`` (for --output given to status/generate) share. No heavy imports: the config uses it.

A string that starts like a URI (``scheme:`` followed by '/', or ``s3:`` in any spelling) is a URI and
must be ``s3://bucket[/prefix]`` exactly: ``s3:/bucket/x`` (one slash) used to become a local folder named
``s3:``, and ``s3://`` with no bucket failed later with exit 1. Credentials in a URI are refused (they
come from the environment or a profile) and never repeated in the message.
"""
from __future__ import annotations

import re
from typing import Optional

from pipeline.redaction import redact_url

# S3's bucket naming rules (3-63 characters: lowercase letters, digits, '.', '-'; starts and ends alphanumeric)
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


_FORMS = {"s3": "s3://bucket/prefix", "hf": "hf://owner/name"}
_ALLOWED = {("s3",): "only local directories and s3://bucket/prefix are supported",
            ("s3", "hf"): "use a local path, s3://bucket/prefix or a Hugging Face dataset id (hf://owner/name)"}


def _shown(v: str) -> str:
    """v as a message may show it: credentials masked, also in a malformed URI ('s3:/key:secret@bucket')."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*:/*)[^/@]*@", r"\1***@", redact_url(v))


class BadUri(ValueError):
    """A malformed storage URI; the message names the fix (the config turns it into a config error)."""


def scheme_of(v: str) -> Optional[str]:
    """The URI scheme of v (lowercase) when v is written as a URI, else None (a local path).
    'C:' style drive letters and names like 'notes:v2' are paths: a scheme counts when '/' follows the
    colon, or when it is s3 (whatever follows)."""
    m = _SCHEME_RE.match(v)
    if not m:
        return None
    scheme = m.group(1).lower()
    if v[m.end():].startswith("/") or scheme in ("s3", "s3a", "s3n"):
        return scheme
    return None


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of a well-formed s3://bucket/prefix; BadUri for anything else."""
    shown = _shown(uri)
    if not uri.startswith("s3://"):
        raise BadUri(f"{shown!r} is not a valid S3 URI: write s3://bucket/prefix (lowercase 's3', two slashes)")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise BadUri(f"{shown!r} holds credentials: remove them from the URI; they come from the environment "
                     "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or storage.profile")
    if not bucket:
        raise BadUri(f"{shown!r} names no bucket: use s3://bucket/prefix")
    if not BUCKET_RE.match(bucket):
        raise BadUri(f"{shown!r}: {bucket!r} is not a valid S3 bucket name "
                     "(3-63 characters: lowercase letters, digits, '.', '-')")
    key = key.rstrip("/")
    if key and any(seg in ("", ".", "..") for seg in key.split("/")):
        raise BadUri(f"{shown!r}: the prefix has an empty, '.' or '..' part: write s3://bucket/a/b")
    return bucket, key


def check_location(v: str, what: str, schemes: tuple[str, ...] = ("s3",)) -> str:
    """v unchanged when it is a local path or a well-formed URI of one of ``schemes``; else BadUri naming
    ``what`` (the config key) and the fix. (hf:// ids are checked where they are allowed: config.)"""
    scheme = scheme_of(v)
    if scheme is None:
        return v
    if scheme not in schemes and not (scheme in ("s3a", "s3n") and "s3" in schemes):
        raise BadUri(f"{what} {_shown(v)!r}: {_ALLOWED.get(schemes, 'only local directories are supported')}")
    if scheme in ("s3", "s3a", "s3n"):
        try:
            split_s3(v)
        except BadUri as e:
            raise BadUri(f"{what} {e}") from None
    elif not v.startswith(f"{scheme}://") or len(v) == len(f"{scheme}://"):
        raise BadUri(f"{what} {_shown(v)!r} is not a valid URI: write {_FORMS.get(scheme, scheme + '://...')}")
    return v
