"""Real GCS and Azure Blob servers for the tests, one process per test module that needs them (like
tests/moto_server.py): gcp-storage-emulator (the PyPI package, in the venv) and Azurite's blob service (npm,
installed by `make test` under .cache/azurite). Each writes one request line per HTTP request to its log, which
`gcs_request_kinds` / `azure_request_kinds` read back as request kinds for request counts.

gcsfs >= 2026 needs GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false in the environment BEFORE `import gcsfs` (tests/
conftest.py sets it): otherwise `gcsfs.GCSFileSystem` is ExtendedGcsFileSystem, which asks the Storage Control
gRPC API for each bucket's layout; the emulator does not speak gRPC, so every call waits out a 60 s timeout."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.moto_server import free_port, serving, settled  # noqa: F401  (settled: the tests import it from here too)

REPO = Path(__file__).resolve().parent.parent
AZURITE_BLOB = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"

# Azurite's one built-in account and its published key (the same in every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

# `"GET /path?query HTTP/1.1" 200` in both logs (Azurite's access log also carries the client and a timestamp).
REQUEST_LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE|PATCH) (\S+) HTTP/[\d.]+" (\d{3})')


@dataclass(frozen=True)
class GcsEndpoint:
    endpoint: str  # http://127.0.0.1:PORT
    log: Path  # the emulator's log: gcs_request_kinds(log)
    # For a process that reaches the emulator through fsspec ("gs://..." / "gcs://..."): its environment.
    env: dict[str, str] = field(default_factory=dict)
    # For GCSFileSystem(**storage_options) in this process (endpoint_url overrides STORAGE_EMULATOR_HOST).
    storage_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AzureEndpoint:
    endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1 (the BlobEndpoint)
    connection_string: str
    log: Path  # Azurite's access log: azure_request_kinds(log)
    debug_log: Path  # Azurite's --debug log (every request's handling, errors with their reasons)
    env: dict[str, str] = field(default_factory=dict)  # AZURE_STORAGE_CONNECTION_STRING, read by adlfs
    storage_options: dict[str, str] = field(default_factory=dict)  # AzureBlobFileSystem(**storage_options)


def _requests(log: Path) -> Iterator[tuple[str, str, str]]:
    """(method, path, query) of each request line in the log so far."""
    with log.open("rb") as f:
        for raw in f:
            m = REQUEST_LINE.search(raw.decode("utf-8", "replace"))
            if m:
                target = urlsplit(m.group(2))
                yield m.group(1), target.path, target.query


def gcs_request_kinds(log: Path) -> list[str]:
    """The requests in gcp-storage-emulator's log so far, in order, by kind: LIST (objects.list), GET (a media
    download, ranged or whole), HEAD (objects.get: the metadata, no body), PUT (an upload: the multipart POST,
    a resumable upload's POST and each of its PUTs, an XML-API PUT), DELETE, POST (a batch: gcsfs's
    multi-object delete), COPY (copyTo / rewriteTo / compose), PATCH (metadata), BUCKET (buckets.*)."""
    kinds = []
    for method, path, query in _requests(log):
        if path.startswith("/upload/"):
            kinds.append("PUT")
        elif path.startswith("/download/"):
            kinds.append("GET")
        elif path.startswith("/batch/"):
            kinds.append("POST")
        elif path == "/" or path == "/wipe":
            continue  # the emulator's own health check and wipe
        else:
            json_api = re.fullmatch(r"(?:/storage/v1)?/b(?:/([^/]+)(/o(?:/(.+))?)?)?", path)
            if json_api is None:  # the XML API: /BUCKET/OBJECT
                kinds.append(method)
            elif json_api.group(2) is None:  # /b, /b/BUCKET (and its acl, iam)
                kinds.append("BUCKET")
            elif json_api.group(3) is None:
                kinds.append("LIST" if method == "GET" else method)
            elif re.search(r"/(copyTo|rewriteTo)/|/compose$", path):
                kinds.append("COPY")
            elif method == "GET":
                kinds.append("GET" if "media" in parse_qs(query).get("alt", []) else "HEAD")
            else:
                kinds.append(method)
    return kinds


def azure_request_kinds(log: Path) -> list[str]:
    """The requests in Azurite's access log so far, in order, by kind: LIST (a container's blob listing), GET,
    HEAD (blob properties), PUT (a blob, a block, a block list, properties or metadata), DELETE, POST (a blob
    batch), BUCKET (the account's container listing; a container's creation, properties or deletion)."""
    kinds = []
    for method, path, query in _requests(log):
        q = parse_qs(query)
        container_level = path.strip("/").count("/") <= 1
        if "list" in q.get("comp", []):
            kinds.append("LIST" if "container" in q.get("restype", []) else "BUCKET")
        elif "batch" in q.get("comp", []):
            kinds.append("POST")
        elif container_level:
            kinds.append("BUCKET")
        else:
            kinds.append(method)
    return kinds


@contextlib.contextmanager
def gcs_server(log_dir: Path) -> Iterator[GcsEndpoint]:
    """Start gcp-storage-emulator (in memory) on a free loopback port, yield its GcsEndpoint, stop it.
    Clients: gcsfs.GCSFileSystem(**endpoint.storage_options), or a process started with endpoint.env."""
    if "gcsfs" in sys.modules:  # the class was chosen at import: too late to set the variable now
        from gcsfs.core import GCSFileSystem

        if sys.modules["gcsfs"].GCSFileSystem is not GCSFileSystem:
            pytest.fail("gcsfs was imported without GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (tests/conftest.py "
                        "sets it): its ExtendedGcsFileSystem waits out a 60 s gRPC timeout per call on the "
                        "emulator", pytrace=False)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / "gcs.log"
    argv = [str(Path(sys.executable).parent / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
            "--port", str(port), "--in-memory"]
    with serving(argv, port, log_path, "gcp-storage-emulator", env={**os.environ, "PYTHONUNBUFFERED": "1"}):
        yield GcsEndpoint(
            endpoint=endpoint,
            log=log_path,
            env={"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                 # fsspec's config from the environment: GCSFileSystem(token="anon"), no credential lookup
                 "FSSPEC_GCS_TOKEN": "anon"},
            storage_options={"token": "anon", "endpoint_url": endpoint},
        )


@contextlib.contextmanager
def azurite_server(log_dir: Path) -> Iterator[AzureEndpoint]:
    """Start Azurite's blob service (in memory) on a free loopback port, yield its AzureEndpoint, stop it.
    Clients: adlfs.AzureBlobFileSystem(**endpoint.storage_options), or a process started with endpoint.env."""
    if not AZURITE_BLOB.exists():
        pytest.fail(f"Azurite is not installed ({AZURITE_BLOB} is missing): `make test` installs it (npm)",
                    pytrace=False)
    port = free_port()
    blob_endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    connection_string = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                         f"BlobEndpoint={blob_endpoint};")
    log_path, debug_log = log_dir / "azurite.log", log_dir / "azurite-debug.log"
    argv = [str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
            "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--debug", str(debug_log)]
    with serving(argv, port, log_path, "azurite-blob", cwd=log_dir):
        yield AzureEndpoint(
            endpoint=blob_endpoint,
            connection_string=connection_string,
            log=log_path,
            debug_log=debug_log,
            env={"AZURE_STORAGE_CONNECTION_STRING": connection_string},
            storage_options={"connection_string": connection_string},
        )
