"""Every store the job reads shards from and writes its output to: one fsspec filesystem per URL.

Local paths and ``file://``, ``s3://`` (AWS or an S3-compatible endpoint), ``gs://`` / ``gcs://`` (Google Cloud
Storage), ``az://`` / ``abfs://`` / ``abfss://`` (Azure Blob) and ``hf://`` (the Hugging Face Hub, read-only:
shards only). ``http(s)://`` shards are read by pipeline/shards.py's own opener (see there why).

Why fsspec (and not obstore, or one SDK per cloud): it is the ecosystem's common interface — pyarrow, pandas,
``datasets`` and Ray Data read through it, so users already have it configured — each store's filesystem is kept
by that store's community (s3fs, gcsfs, adlfs, huggingface_hub's ``HfFileSystem``), each takes credentials from
its SDK's standard chain, and s3fs, gcsfs and adlfs all do the conditional create the output needs
(``pipe_file(..., mode="create")``: S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
``If-None-Match: *``). obstore has no Hugging Face store, and its GCS client reaches an emulator only through a
fake service-account file.

Credentials never pass through here: each library finds them (AWS_* / ~/.aws / instance role; Application
Default Credentials; AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_* / ``az login``; HF_TOKEN). What the
manifest's ``storage:`` section may set is where a store is (endpoint, region, project, account), and so are the
emulator variables each SDK reads: AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, an Azurite connection string.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import threading
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (pipeline.manifest imports pipeline.shards, which imports this)
    from pipeline.manifest import StorageSpec


@dataclass(frozen=True)
class Backend:
    protocol: str  # fsspec's name for it
    module: str  # the library that implements it
    extra: str  # pip install 'pllava-recaption[EXTRA]'
    writable: bool  # may hold the output
    title: str


S3 = Backend("s3", "s3fs", "s3", True, "S3")
GCS = Backend("gcs", "gcsfs", "gcs", True, "Google Cloud Storage")
AZURE = Backend("abfs", "adlfs", "azure", True, "Azure Blob Storage")
HF = Backend("hf", "huggingface_hub", "hf", False, "the Hugging Face Hub")
BACKENDS = {"s3": S3, "gs": GCS, "gcs": GCS, "az": AZURE, "abfs": AZURE, "abfss": AZURE, "hf": HF}
LOCAL_SCHEMES = ("", "file")


def scheme(url: str) -> str:
    """The URL's scheme in lower case; "" for a local path."""
    return urllib.parse.urlsplit(url).scheme.lower() if "://" in url else ""


def backend(url: str) -> Backend | None:
    """The object store `url` is on; None for local paths, file:// and http(s)://."""
    return BACKENDS.get(scheme(url))


def missing_library(url: str) -> str | None:
    """One line naming the extra to install when `url`'s store library is not installed; None when it is (or the
    URL needs none)."""
    b = backend(url)
    if b is None or importlib.util.find_spec(b.module) is not None:
        return None
    return (f"{scheme(url)}:// ({b.title}) needs the {b.module} library, which is not installed: "
            f"pip install 'pllava-recaption[{b.extra}]'")


def s3_endpoint(storage: StorageSpec | None = None) -> tuple[str | None, str | None]:
    """(endpoint URL as scheme://host[:port], region) for S3: the manifest's ``storage`` section, else
    AWS_ENDPOINT_URL and AWS_REGION / AWS_DEFAULT_REGION."""
    endpoint = (storage and storage.endpoint_url) or os.environ.get("AWS_ENDPOINT_URL")
    region = (storage and storage.region) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        # host[:port] only: a user:password@ in the URL must not reach a client's repr or its errors
        endpoint = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        region = region or "us-east-1"  # S3-compatible stores ignore it; spares the SDK a metadata lookup
    return endpoint, region


def _options(b: Backend, storage: StorageSpec | None) -> dict[str, Any]:
    """The filesystem's constructor arguments: where the store is, never who we are."""
    from pipeline.manifest import StorageSpec

    # No listings cache: the output is listed to learn which chunks are committed, which must be the truth now.
    # No instance cache: each store opened (an output store, a shard stream) gets a client made from the
    # environment as it is then (rotated credentials, another emulator), not one frozen under the same arguments.
    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    spec = storage or StorageSpec()
    if b is S3:
        endpoint, region = s3_endpoint(storage)
        options["endpoint_url"] = endpoint
        options["client_kwargs"] = {"region_name": region} if region else {}
        # One GET per whole-object read: with concurrency s3fs first HEADs the object for its size (status reads
        # a record per shard), and a missing object costs a HEAD and a LIST instead of one 404. Our objects are
        # records, chunks and data files, read whole; uploads past 100 MiB go in parts one after another.
        options["max_concurrency"] = 1
    elif b is GCS:
        # gcsfs reads STORAGE_EMULATOR_HOST itself; a manifest endpoint (a private mirror, an emulator) wins
        if spec.gcs.endpoint_url:
            options["endpoint_url"] = spec.gcs.endpoint_url
        elif os.environ.get("STORAGE_EMULATOR_HOST"):
            # as Google's own client does with an emulator: no credentials (else gcsfs first looks for Application
            # Default Credentials and the metadata server, and warns on every client it makes)
            options["token"] = "anon"
        if spec.gcs.project:
            options["project"] = spec.gcs.project
    elif b is AZURE:
        if spec.azure.account:
            options["account_name"] = spec.azure.account
    elif b is HF:
        options.pop("use_listings_cache")  # HfFileSystem lists no output; its caches are of a read-only repo
        if spec.hf.endpoint_url:
            options["endpoint"] = spec.hf.endpoint_url
    return options


_lock = threading.Lock()


def filesystem(url: str, storage: StorageSpec | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`: a local path, file:// or an object-store URL.

    A new client each call (see `_options`): callers keep it for the store's lifetime (an OutputStore, a shard's
    stream). Raises ``StoreUnavailable`` when the store's library is missing (one line naming the extra)."""
    import fsspec

    b = backend(url)
    if b is None:
        if scheme(url) not in LOCAL_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme(url)!r}")
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme(url) == "file" else url
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    problem = missing_library(url)
    if problem:
        raise StoreUnavailable(problem)
    options = _options(b, storage)
    if b is AZURE and logging.getLogger("azure").level == logging.NOTSET:
        # azure.core logs every request and response, headers and all, at INFO: dozens of lines per shard in the
        # job's log. Its warnings stay; a user who set the azure loggers' level keeps theirs.
        logging.getLogger("azure").setLevel(logging.WARNING)
    with _lock:  # an actor's shard threads may open stores at once: a library's first use (imports) one at a time
        if b is GCS and (options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")):
            # An emulator or a private endpoint: gcsfs's plain JSON-API client. What fsspec registers for gs://
            # may be gcsfs's ExtendedGcsFileSystem, which first asks the Storage Control gRPC API about each
            # bucket; an emulator does not serve it, and every call would wait out a 60 s gRPC timeout.
            from fsspec.config import apply_config
            from gcsfs.core import GCSFileSystem

            fs = GCSFileSystem(**apply_config(GCSFileSystem, options))  # FSSPEC_GCS_* as fsspec would apply them
            return fs, fs._strip_protocol(url).rstrip("/")
        fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/")


class StoreUnavailable(RuntimeError):
    """A URL whose store's library is not installed, or that the store cannot be used for (hf:// outputs)."""


# ----------------------------------------------------------------------------- telling storage faults


# What a store answers when it cannot take writes at all, whatever shard is writing: full, over quota,
# read-only, no permission, file too large for the file system.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
# Error codes of S3 (and S3-compatible stores: MinIO, Ceph), GCS and Azure that mean the same: refused,
# unknown bucket or container, over quota. Throttling and 5xx answers are not here: they pass, and a retry may
# succeed.
STORAGE_CODES = frozenset({
    # S3
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "NoSuchBucket", "InsufficientStorage", "QuotaExceeded",
    "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded",
    # Azure
    "AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch", "ContainerNotFound",
    "AccountIsDisabled", "InsufficientAccountPermissions", "InvalidAuthenticationInfo",
})
# HTTP statuses: 401/403 refused, 507 insufficient storage
STORAGE_STATUSES = frozenset({401, 403, 507})


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what caused it (fsspec libraries wrap the SDK's error: the code is on the cause)."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def http_status(error: BaseException) -> int | None:
    """The HTTP status a store answered with, wherever the client keeps it (botocore's response dict, azure's
    and gcsfs's error attributes, the response object huggingface_hub's errors carry), or None."""
    for e in _chain(error):
        status = _own_status(e)
        if status is not None:
            return status
    return None


def _own_status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    else:
        status = getattr(e, "status_code", None) or getattr(response, "status_code", None)
        if status is None and type(e).__name__ == "HttpError":
            status = getattr(e, "code", None)  # gcsfs's HttpError
    return status if isinstance(status, int) else None


def storage_fault(error: BaseException) -> str | None:
    """Why `error` is the store refusing for a reason no retry of a shard fixes (a short cause: "No space left
    on device (ENOSPC)", "AccessDenied: Access Denied", "HTTP 403: …"), or None when it is some other error.

    The store's own code is preferred to the library's translation of it (s3fs raises PermissionError("Access
    Denied") from botocore's ClientError, which holds the code)."""
    chain = _chain(error)
    for e in chain:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return f"{os.strerror(e.errno)} ({errno.errorcode[e.errno]})"
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            code = str((response.get("Error") or {}).get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in STORAGE_CODES or status in STORAGE_STATUSES:
                message = (response.get("Error") or {}).get("Message") or ""
                return f"{code or f'HTTP {status}'}: {message}".rstrip(": ")
            return None  # the store said what it was, and it is not a refusal (NoSuchKey, SlowDown, 412...)
        code = getattr(e, "error_code", None)  # azure.core's HttpResponseError
        status = _own_status(e)  # azure's, gcsfs's HttpError, huggingface_hub's HfHubHTTPError
        if (isinstance(code, str) and code in STORAGE_CODES) or (isinstance(status, int) and status in STORAGE_STATUSES):
            text = str(getattr(e, "message", None) or e).strip()
            label = code if isinstance(code, str) and code else f"HTTP {status}"
            return f"{label}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    for e in chain:
        if isinstance(e, PermissionError):  # a library's refusal without the store's code
            return f"permission denied: {e}".rstrip(": ")
    return None
