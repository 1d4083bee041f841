"""The GCS and Azure emulators (tests/emulators.py) through the real fsspec clients, gcsfs and adlfs: what each
supports (ranged reads, validators, listings, conditional create), what its errors look like, and how many
requests each call makes. One server of each kind for the module."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adlfs
import gcsfs
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from tests.emulators import (
    AZURITE_KEY,
    azure_request_kinds,
    azurite_server,
    gcs_request_kinds,
    gcs_server,
    settled,
)

DATA = b"0123456789abcdef"
_names = itertools.count()


@dataclass
class Store:
    name: str  # "gcs" or "azure"
    fs: Any  # gcsfs.GCSFileSystem or adlfs.AzureBlobFileSystem
    bucket: str  # a bucket / container the fixture created
    log: Path
    kinds: Callable[[Path], list[str]]
    endpoint: Any

    def prefix(self) -> str:
        """A fresh directory in the bucket, for one test."""
        return f"{self.bucket}/t{next(_names)}"

    def requests_during(self, call: Callable[[], Any]) -> list[str]:
        """The kinds of the requests `call` makes."""
        before = len(settled(self.kinds, self.log))
        call()
        return settled(self.kinds, self.log)[before:]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with gcs_server(tmp_path_factory.mktemp("gcs")) as endpoint:
        fs = gcsfs.GCSFileSystem(**endpoint.storage_options, use_listings_cache=False, skip_instance_cache=True)
        assert type(fs) is gcsfs.core.GCSFileSystem  # not the gRPC-probing ExtendedGcsFileSystem
        fs.mkdir("bkt")
        yield Store("gcs", fs, "bkt", endpoint.log, gcs_request_kinds, endpoint)


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    with azurite_server(tmp_path_factory.mktemp("azure")) as endpoint:
        fs = adlfs.AzureBlobFileSystem(**endpoint.storage_options, use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir("ctr")
        yield Store("azure", fs, "ctr", endpoint.log, azure_request_kinds, endpoint)


@pytest.fixture(scope="module", params=["gcs", "azure"])
def store(request):
    return request.getfixturevalue(request.param)


def validator(store: Store, info: dict) -> str:
    """What a writer compares to notice the object changed: GCS's generation, Azure's etag."""
    return str(info["generation"] if store.name == "gcs" else info["etag"])


def test_bucket_exists_and_round_trip(store):
    fs, d = store.fs, store.prefix()
    assert fs.exists(store.bucket)
    fs.pipe_file(f"{d}/a.bin", DATA)
    fs.pipe_file(f"{d}/sub/b.bin", DATA[:4])
    assert fs.cat_file(f"{d}/a.bin") == DATA
    assert fs.cat_file(f"{d}/a.bin", 3, 7) == DATA[3:7]
    assert fs.cat_file(f"{d}/a.bin", 10) == DATA[10:]
    info = fs.info(f"{d}/a.bin")
    assert (info["size"], info["type"]) == (len(DATA), "file")
    first = validator(store, info)
    assert first and "etag" in info
    fs.pipe_file(f"{d}/a.bin", DATA[::-1])
    assert validator(store, fs.info(f"{d}/a.bin")) != first  # a rewrite changes the validator

    listing = {e["name"]: e for e in fs.ls(d, detail=True)}
    assert {name: e["type"] for name, e in listing.items()} == {f"{d}/a.bin": "file", f"{d}/sub": "directory"}
    assert listing[f"{d}/a.bin"]["size"] == len(DATA)
    assert validator(store, listing[f"{d}/a.bin"]) == validator(store, fs.info(f"{d}/a.bin"))
    assert fs.find(d) == [f"{d}/a.bin", f"{d}/sub/b.bin"]

    fs.rm_file(f"{d}/a.bin")
    assert fs.find(d) == [f"{d}/sub/b.bin"]
    fs.rm(d, recursive=True)
    assert fs.find(d) == []


def test_gcs_validators(gcs):
    """GCS: a new generation on every write; the emulator's etag is the content's MD5 (real GCS's changes with the
    generation), so only the generation tells two writes of the same bytes apart."""
    path = f"{gcs.prefix()}/a.bin"
    gcs.fs.pipe_file(path, DATA)
    one = gcs.fs.info(path)
    gcs.fs.pipe_file(path, DATA)
    two = gcs.fs.info(path)
    assert one["generation"] != two["generation"]
    assert one["etag"] == two["etag"] == one["md5Hash"]


def test_missing_object_is_file_not_found(store):
    d = store.prefix()
    store.fs.pipe_file(f"{d}/there", b"x")
    for call in (store.fs.cat_file, store.fs.info):
        with pytest.raises(FileNotFoundError):
            call(f"{d}/missing")
    with pytest.raises(FileNotFoundError):
        store.fs.cat_file(f"{d}/missing", 0, 1)


def test_missing_bucket(store):
    """Reads of a missing bucket / container: FileNotFoundError. A write: FileNotFoundError from gcsfs, but
    azure.core.exceptions.ResourceNotFoundError (404, ContainerNotFound) from adlfs."""
    for call in (store.fs.cat_file, store.fs.info):
        with pytest.raises(FileNotFoundError):
            call("nosuchbucket/x")
    with pytest.raises(FileNotFoundError):
        store.fs.ls("nosuchbucket/d")
    if store.name == "gcs":
        with pytest.raises(FileNotFoundError, match="/upload/storage/v1/b/nosuchbucket/o"):
            store.fs.pipe_file("nosuchbucket/x", b"1")
    else:
        with pytest.raises(ResourceNotFoundError, match="The specified container does not exist") as e:
            store.fs.pipe_file("nosuchbucket/x", b"1")
        assert (e.value.status_code, e.value.error_code) == (404, "ContainerNotFound")


def test_create_refuses_an_existing_object(store, request):
    if store.name == "gcs":
        request.applymarker(pytest.mark.xfail(
            strict=True, raises=AssertionError,
            reason="gcp-storage-emulator ignores ifGenerationMatch=0 (gcsfs sends it): the create overwrites"))
    path = f"{store.prefix()}/a.bin"
    store.fs.pipe_file(path, DATA, mode="create")  # a new path: created
    try:
        store.fs.pipe_file(path, b"second", mode="create")
    except FileExistsError:
        pass
    else:
        raise AssertionError(f"mode='create' overwrote an existing object: {store.fs.cat_file(path)!r}")
    assert store.fs.cat_file(path) == DATA


def test_gcs_create_asks_for_generation_zero(gcs):
    """gcsfs asks for the precondition (so on real GCS a second create is a 412): the emulator is what ignores it."""
    path = f"{gcs.prefix()}/a.bin"
    before = len(gcs.log.read_bytes().splitlines())
    gcs.fs.pipe_file(path, DATA, mode="create")
    gcs.fs.pipe_file(path, DATA)
    uploads = [line for line in gcs.log.read_bytes().splitlines()[before:] if b"/upload/" in line]
    assert len(uploads) == 2
    assert b"ifGenerationMatch=0" in uploads[0] and b"ifGenerationMatch" not in uploads[1]


def test_azure_wrong_account_key(azure):
    """A wrong key: HttpResponseError 403 AuthorizationFailure from every call (not a FileNotFoundError). (The GCS
    emulator checks no credentials: there is no GCS counterpart.)"""
    path = f"{azure.prefix()}/a.bin"
    azure.fs.pipe_file(path, DATA)
    wrong = azure.endpoint.connection_string.replace(AZURITE_KEY, "A" * 86 + "==")
    fs = adlfs.AzureBlobFileSystem(connection_string=wrong, use_listings_cache=False, skip_instance_cache=True)
    for call in (lambda: fs.cat_file(path), lambda: fs.info(path), lambda: fs.ls(azure.bucket),
                 lambda: fs.pipe_file(path + ".2", b"1")):
        with pytest.raises(HttpResponseError, match="Server failed to authenticate the request") as e:
            call()
        assert type(e.value) is HttpResponseError
        assert (e.value.status_code, e.value.error_code) == (403, "AuthorizationFailure")


# The requests each call makes on three small objects d/0, d/1, d/2 (as the log shows them).
REQUESTS = {
    "gcs": {
        "cat_file": ["GET"],
        "cat_file range": ["GET"],
        "info": ["HEAD", "LIST"],  # the object's metadata, and (concurrently) whether it is also a directory
        "ls": ["LIST"],
        "find": ["LIST"],
        "pipe_file": ["PUT"],  # one multipart upload
        "rm_file": ["DELETE"],
    },
    "azure": {
        "cat_file": ["GET"],
        "cat_file range": ["GET"],
        "info": ["HEAD"],
        "ls": ["LIST", "LIST"],  # is it a directory (prefix "d", delimiter "/"), then its listing
        "find": ["HEAD", "LIST"],  # is the path itself a blob, then the listing
        "pipe_file": ["PUT"],  # one Put Blob
        "rm_file": ["DELETE"],
    },
}


def test_request_counts(store):
    d = store.prefix()
    for i in range(3):
        store.fs.pipe_file(f"{d}/{i}", DATA)
    seen = {
        "cat_file": store.requests_during(lambda: store.fs.cat_file(f"{d}/0")),
        "cat_file range": store.requests_during(lambda: store.fs.cat_file(f"{d}/0", 2, 5)),
        "info": store.requests_during(lambda: store.fs.info(f"{d}/0")),
        "ls": store.requests_during(lambda: store.fs.ls(d, detail=True)),
        "find": store.requests_during(lambda: store.fs.find(d)),
        "pipe_file": store.requests_during(lambda: store.fs.pipe_file(f"{d}/3", DATA)),
        "rm_file": store.requests_during(lambda: store.fs.rm_file(f"{d}/3")),
    }
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in REQUESTS[store.name].items()}
