"""Checks the driver makes before any actor starts: a setup mistake fails once, fast, with one line.

Shards: globs in local paths are expanded (sorted) and refused when they match nothing; globs in URLs are
refused (no listing of remote stores here: use a brace range); a missing local shard or a directory is
refused; the first remote shard must answer; each store's library must be installed. Two shards may not share a name (they would share an output
file). `generation.engine: vllm` needs vLLM installed.
"""

from __future__ import annotations

import glob
import os
import urllib.parse
import urllib.request
from collections import Counter

from pipeline.engine_choice import VLLM, vllm_missing_message, vllm_version
from pipeline.manifest import GenerationSpec, StorageSpec
from pipeline.shards import ShardReadError, open_shard_stream, safe_url, shard_name
from pipeline.storage import missing_library, scheme

_GLOB_CHARS = ("*", "?", "[")
_SHOW = 5


class SetupError(RuntimeError):
    """The job cannot run as configured; the message is one line naming the field or flag to fix."""


def _local_path(url: str) -> str | None:
    scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
    if scheme == "":
        return url
    if scheme == "file":
        return urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    return None


def _shown(items: list[str]) -> str:
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def check_shards(urls: list[str], storage: StorageSpec | None = None) -> list[tuple[str, str]]:
    """(name, url) of each shard after glob expansion; raises SetupError for the mistakes above."""
    if not urls:
        raise SetupError("shards: the shard list is empty")
    expanded: list[str] = []
    for url in urls:
        path = _local_path(url)
        # In a URL only `*` in the path counts: `?` starts a (presigned) query and `[` an IPv6 host.
        is_glob = any(c in path for c in _GLOB_CHARS) if path is not None else "*" in urllib.parse.urlsplit(url).path
        if not is_glob:
            expanded.append(url)
        elif path is None:
            raise SetupError(f"shards: {safe_url(url)!r} is a glob; remote shards cannot be listed here, name them with a "
                             f"brace range such as s3://bucket/shards/{{00000..09999}}.tar")
        else:
            matches = sorted(glob.glob(path))
            if not matches:
                raise SetupError(f"shards: the glob {url!r} matches no file; check the path, or name the shards "
                                 f"with a brace range such as shards/{{00000..00099}}.tar")
            expanded.extend(matches)
    missing, directories, remote = [], [], []
    for url in expanded:
        path = _local_path(url)
        if path is None:
            remote.append(url)
        elif os.path.isdir(path):
            directories.append(url)
        elif not os.path.isfile(path):
            missing.append(url)
    if directories:
        raise SetupError(f"shards: {_shown(directories)} is a directory; name the .tar files in it "
                         f"(e.g. {directories[0].rstrip('/')}/{{00000..00099}}.tar)")
    if missing:
        raise SetupError(f"shards: {len(missing)} of {len(expanded)} local shards do not exist: {_shown(missing)}")
    if remote:
        try:
            open_shard_stream(remote[0], storage).close()
        except ShardReadError as e:
            raise SetupError(f"shards: the first remote shard does not answer: {e}") from None
    names = [shard_name(u) for u in expanded]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise SetupError(f"shards: {_shown(dupes)} appear twice (or two shard URLs share a name)")
    return list(zip(names, expanded))


def check_stores(shard_urls: list[str], output: str) -> None:
    """Each store the job uses has its library installed (the driver's environment is the actors' in a `ray job
    submit`): else one line naming the extra to install, before any work."""
    first_of_scheme = {scheme(output): output}
    for url in shard_urls:
        first_of_scheme.setdefault(scheme(url), url)
    for field_name, url in (("output", output), *(("shards", u) for u in first_of_scheme.values() if u != output)):
        problem = missing_library(url)
        if problem:
            raise SetupError(f"{field_name}: {problem}")


def check_engine(generation: GenerationSpec) -> None:
    """`generation.engine: vllm` where vLLM is not installed (the driver's environment is the actors' in a
    `ray job submit`, runtime_env included): one line naming the install, before any work."""
    if generation.engine == VLLM and vllm_version() is None:
        raise SetupError(vllm_missing_message())


def check_unique_keys(shards: list[tuple[str, str]], storage: StorageSpec | None = None) -> None:
    """`duplicate_keys: refuse`: read every shard's samples once and refuse the job, naming the keys and the
    shards, when a key appears in more than one shard. Costs one read of every shard before any work (the
    default `keep_first` costs nothing here: the second shard to reach a key writes a `duplicate` row)."""
    from pipeline.key_claims import describe_duplicates, find_duplicate_keys
    from pipeline.shards import ShardReader

    def keys_of(name: str, url: str) -> list[str]:
        try:
            return [s.key for s in ShardReader(url, storage=storage)]
        except ShardReadError as e:
            raise SetupError(f"duplicate_keys: refuse: cannot read shard {name}: {e}") from None

    dupes = find_duplicate_keys(shards, keys_of)
    if dupes:
        raise SetupError(f"duplicate_keys: refuse: {describe_duplicates(dupes)}; remove the repeated samples or "
                         f"set duplicate_keys: keep_first")
