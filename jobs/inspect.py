"""`recaption inspect OUT --html report.html`: a self-contained HTML contact sheet of a job's output.

One card per sampled clip: four of its sixteen sampled frames, re-decoded from the shard named in
OUT/_job.json, next to the key, the clip's span, both captions, the status, caption_flags and error. The page
loads nothing from anywhere (thumbnails are JPEG data: URIs, the style is inline) and runs no script; its
Content-Security-Policy forbids both, because captions are untrusted model output (they are also escaped).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import html
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from model.describe import evenly_spaced
from pipeline.frames import DecodeFailure, decord_reason, open_video, probe_video
from pipeline.manifest import StorageSpec
from pipeline.progress import JOB_FILE, read_shard_list
from pipeline.rows import COLUMNS, STATUSES
from pipeline.shards import REDACTED, ShardReader, ShardReadError, expand_shard_spec, shard_name
from pipeline.storage import StoreUnavailable
from pipeline.writing import OutputStore

DEFAULT_SAMPLE = 24
THUMBS_PER_CLIP = 4
SORTS = ("random", "score", "score-desc")
THUMB_WIDTH = 160
CSP_META = ('<meta http-equiv="Content-Security-Policy" '
            "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">")
# The row's columns (pipeline/rows.py) a card shows: all but the per-job constants and decode/token details.
CARD_COLUMNS = [c for c in COLUMNS if c not in {"url", "num_frames", "fps", "duration_s", "tokens_en", "tokens_zh",
                                                 "model", "lora_alpha", "prompt_version"}]


@dataclass
class Card:
    """One sampled row and what the report shows for its frames."""

    row: dict[str, Any]
    thumbs: list[tuple[int, bytes]] = field(default_factory=list)  # (frame index, JPEG)
    no_frames: str | None = None  # why there are no thumbnails


# ----------------------------------------------------------------------------------------------- rows


def data_files(store: OutputStore, shards: set[str] | None) -> dict[str, str]:
    """{shard: data file path} of the finished shards, optionally only those named."""
    files = {path.rsplit("/", 1)[1][: -len(".parquet")]: path
             for path in store.list_files(store.path("data"), ".parquet")}
    return {name: path for name, path in files.items() if shards is None or name in shards}


def shard_files(store: OutputStore, shards: set[str] | None) -> tuple[dict[str, list[str]], set[str]]:
    """{shard: the files holding its rows} and the names of the unfinished shards among them: a finished
    shard's data file; for one still running or interrupted, its committed chunks in the order the finalizer
    merges them (their rows are final once committed). Chunks left beside a data file are ignored: the data
    file holds their rows. Two listings: OUT/data and OUT/_progress (every depth)."""
    finished = data_files(store, None)
    files = {name: [path] for name, path in finished.items() if shards is None or name in shards}
    prefix = store.path("_progress") + "/"
    chunks: dict[str, list[str]] = {}
    for path in store.list_tree(store.path("_progress"), ".parquet"):  # sorted: the finalizer's order
        parts = path[len(prefix):].split("/")
        if len(parts) == 2 and parts[1].startswith("chunk-") and (shards is None or parts[0] in shards):
            chunks.setdefault(parts[0], []).append(path)
    unfinished = {name: paths for name, paths in chunks.items() if name not in finished}
    return {**files, **unfinished}, set(unfinished)


def read_columns(store: OutputStore, path: str, columns: list[str]) -> list[dict[str, Any]]:
    return store.read_table(path, columns=columns).to_pylist()


def read_shard_rows(store: OutputStore, name: str, paths: list[str],
                    read: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One shard's rows from its files (`shard_files`), each key once: the first file's row wins, as in the
    finalizer's merge (`dedupe_by_key`), so a retry's chunk that committed a key again is not counted twice."""
    if len(paths) == 1:
        return read(paths[0])
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        for path in paths:
            for row in read(path):
                if row["key"] not in seen:
                    seen.add(row["key"])
                    rows.append(row)
    except FileNotFoundError:  # the shard finished while it was read: its chunks are merged into its data file
        return read(store.data_path(name))
    return rows


def read_selection_columns(store: OutputStore, path: str, scored: bool) -> list[dict[str, Any]]:
    """key, status and clip_score of a file's rows (clip_score read only when a score option asks for it;
    None in a file written before the column existed)."""
    if scored:
        try:
            return read_columns(store, path, ["key", "status", "clip_score"])
        except (KeyError, pa.ArrowInvalid):
            pass
    return [{**row, "clip_score": None} for row in read_columns(store, path, ["key", "status"])]


def score_matches(score: float | None, args: argparse.Namespace) -> bool:
    """Whether a row's clip_score passes --min-score/--max-score (and has a score when sorting by it)."""
    if args.sort == "random" and args.min_score is None and args.max_score is None:
        return True
    if score is None:
        return False
    return (args.min_score is None or score >= args.min_score) and (args.max_score is None or score <= args.max_score)


def sample_rank(seed: int, shard: str, key: str) -> int:
    """The row's place in the random sample of ``seed``: a hash, so the sample does not depend on the order
    the files are read in, and choosing it needs memory for the chosen rows only."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{shard}\0{key}".encode(), digest_size=8).digest(), "big")


@dataclass
class Chooser:
    """Which matching rows get a card, keeping only the ``n`` chosen so far (all when ``n`` is 0): a random
    sample by ``sample_rank``, or the ``n`` lowest (``sort="score"``) or highest (``"score-desc"``) clip
    scores. Its memory grows with ``n`` and one data file's rows, never with the output's row count."""

    n: int
    seed: int = 0
    sort: str = "random"
    kept: list[tuple[Any, str, str]] = field(default_factory=list)  # (rank, shard, key)

    def rank(self, shard: str, key: str, score: float | None) -> Any:
        if self.sort == "score":
            return (score, shard, key)
        if self.sort == "score-desc":
            return (-score, shard, key)
        return (sample_rank(self.seed, shard, key), shard, key)

    def offer(self, shard: str, rows: list[tuple[str, float | None]]) -> None:
        """One file's matching (key, clip_score) rows."""
        fresh = [(self.rank(shard, key, score), shard, key) for key, score in rows]
        self.kept = heapq.nsmallest(self.n, self.kept + fresh) if self.n else self.kept + fresh

    def chosen(self) -> list[tuple[str, str]]:
        """(shard, key) of the chosen rows: by score when sorting by it, else in (shard, key) order."""
        ordered = sorted(self.kept) if self.sort != "random" else sorted(self.kept, key=lambda t: t[1:])
        return [(shard, key) for _, shard, key in ordered]


def shard_urls(store: OutputStore, given: list[str] | None = None) -> dict[str, str]:
    """{shard name: URL}: the shard lists of the job record's manifest, updated by the latest run's list
    (`_shards.json`, which includes shards added by reruns with other --shards), then by the shards `given`
    (--shards: the output records URLs without their credentials, a signed shard is read from these)."""
    job = store.read_json(store.path(JOB_FILE)) or {}
    try:
        urls = {shard_name(url): url for url in expand_shard_spec(job["manifest"]["shards"])}
    except (KeyError, TypeError):
        urls = {}
    urls.update(read_shard_list(store) or {})
    urls.update({shard_name(url): url for url in expand_shard_spec(given or [])})
    return urls


# ----------------------------------------------------------------------------------------------- frames


def thumbnail_positions(n: int, k: int = THUMBS_PER_CLIP) -> list[int]:
    """``k`` evenly spaced positions in a list of ``n`` (first and last included): 16 → 0, 5, 10, 15."""
    return evenly_spaced(n, k)


def thumbnail_size(width: int, height: int, thumb_width: int = THUMB_WIDTH) -> tuple[int, int]:
    """(width, height) ``thumb_width`` wide, aspect kept, both even (JPEG's 4:2:0 chroma needs pairs)."""
    return thumb_width - thumb_width % 2, max(2, round(thumb_width * height / width / 2) * 2)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB image as JPEG bytes, with PyAV's MJPEG encoder (no image library needed)."""
    import av  # here: only the report needs an encoder

    codec = av.CodecContext.create("mjpeg", "w")
    codec.height, codec.width = rgb.shape[:2]
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


def decode_thumbnails(mp4: bytes, row: dict[str, Any]) -> list[tuple[int, bytes]] | str:
    """Four of the row's sampled frames as small JPEGs, as displayed (rotation applied, as the model saw them),
    or why they could not be decoded. The size is probed from the clip: rows written before rotation was
    honoured hold the coded size."""
    indices = row["frame_indices"]
    picked = [indices[i] for i in thumbnail_positions(len(indices))]
    probe = probe_video(mp4)
    if isinstance(probe, DecodeFailure):
        return f"frames could not be decoded: {probe.reason}"
    reader = open_video(mp4, probe, *thumbnail_size(probe.width, probe.height))
    if isinstance(reader, DecodeFailure):
        return f"frames could not be decoded: {reader.reason}"
    try:
        frames = reader.get_batch(picked).asnumpy()  # (4, height, width, 3) uint8
    except Exception as err:  # noqa: BLE001 - any decoder error becomes the card's note
        return f"frames could not be decoded: {decord_reason(err)}"
    return [(index, encode_jpeg(frame)) for index, frame in zip(picked, frames)]


def job_storage(store: OutputStore) -> StorageSpec | None:
    """Where the job's stores are (the recorded manifest's `storage:`: endpoints, region, project, account; no
    credentials), so shards are read from where the job read them; None when not recorded or unreadable."""
    from pipeline.manifest import ManifestError, manifest_from_dict

    job = store.read_json(store.path(JOB_FILE)) or {}
    try:
        return manifest_from_dict(job["manifest"]).storage
    except (KeyError, TypeError, ManifestError):
        return None


def fill_thumbnails(cards: list[Card], url: str | None, storage: StorageSpec | None = None) -> None:
    """Decode the thumbnails of one shard's cards, reading the shard once and only as far as needed."""
    wanted = {card.row["key"]: card for card in cards if card.row["frame_indices"]}
    if not wanted:
        return
    if url is None:
        for card in wanted.values():
            card.no_frames = "shard not readable: not in any run's shard list (_job.json, _shards.json)"
        return
    if REDACTED in url:
        for card in wanted.values():
            card.no_frames = (f"shard not readable: {url} is recorded without its credentials; give its URL "
                              "with --shards")
        return
    samples = iter(ShardReader(url, storage))
    try:
        for sample in samples:
            card = wanted.pop(sample.key, None)
            if card is not None:
                result = decode_thumbnails(sample.mp4, card.row) if sample.mp4 else "no mp4 in the shard"
                card.thumbs, card.no_frames = (result, None) if isinstance(result, list) else ([], result)
            if not wanted:
                break
    except ShardReadError as err:
        for card in wanted.values():
            card.no_frames = f"shard not readable: {err}"
        wanted.clear()
    finally:
        samples.close()
    for card in wanted.values():
        card.no_frames = "key not found in the shard"


# ----------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; background: #f4f4f4; color: #222; }
header { margin-bottom: 16px; }
header h1 { font-size: 20px; margin: 0 0 6px; }
header p { margin: 2px 0; }
code { background: #e6e6e6; padding: 0 3px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #ccc; border-left: 6px solid #999; border-radius: 4px; padding: 8px; }
.card.ok { border-left-color: #2e7d32; } .card.flagged { border-left-color: #f9a825; }
.card.source_failed, .card.decode_error, .card.error { border-left-color: #c62828; }
.thumbs { display: grid; grid-template-columns: repeat(4, 1fr); gap: 4px; margin-bottom: 6px; }
figure { margin: 0; }
figure img { display: block; width: 100%; height: 100px; object-fit: contain; background: #111; }
figcaption { font-size: 11px; color: #666; text-align: center; }
.placeholder { height: 100px; display: flex; align-items: center; justify-content: center; text-align: center;
  background: repeating-linear-gradient(45deg, #eee, #eee 8px, #ddd 8px, #ddd 16px); color: #555;
  margin-bottom: 6px; padding: 0 8px; }
.meta { font-size: 12px; color: #555; margin-bottom: 4px; }
.key { font-weight: 600; color: #222; }
.status, .flag { display: inline-block; border-radius: 3px; padding: 0 5px; font-size: 12px; }
.status { background: #333; color: #fff; } .flag { background: #fff3c4; border: 1px solid #e0c060; }
.attempts, .score { display: inline-block; font-size: 12px; color: #555; margin-left: 4px; }
dl { margin: 0; display: grid; grid-template-columns: 56px 1fr; gap: 2px 8px; }
dt { color: #777; font-size: 12px; } dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
dd.error { color: #b71c1c; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _span(row: dict[str, Any]) -> str:
    start, end = row["clip_start_s"], row["clip_end_s"]
    if start is None or end is None:
        return "no clip span"
    return f"{start:.3f}–{end:.3f} s"


def render_card(card: Card) -> str:
    row = card.row
    status = row["status"] or "unknown"
    if card.thumbs:
        figures = "".join(
            f'<figure><img alt="frame {index}" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
            f"<figcaption>frame {index}</figcaption></figure>" for index, jpeg in card.thumbs)
        frames = f'<div class="thumbs">{figures}</div>'
    else:
        frames = f'<div class="placeholder">{_e(card.no_frames or f"no frames ({status})")}</div>'
    flags = "".join(f' <span class="flag">{_e(flag)}</span>' for flag in row["caption_flags"] or [])
    if (row.get("attempts") or 1) > 1:  # the repair pass ran: how many attempts, and what the first one had
        first = ", ".join(row.get("first_flags") or []) or "no flags"
        flags += f' <span class="attempts">{int(row["attempts"])} attempts (first: {_e(first)})</span>'
    if row.get("clip_score") is not None:
        flags += f' <span class="score">clip score {float(row["clip_score"]):.3f}</span>'
    fields = [("en", "caption-en", row["caption_en"], ' lang="en"'),
              ("zh", "caption-zh", row["caption_zh"], ' lang="zh"'),
              ("source", "source-caption", row["source_caption"], ""),
              ("error", "error", row["error"], "")]
    details = "".join(f'<dt>{label}</dt><dd class="{cls}"{lang}>{_e(text)}</dd>'
                      for label, cls, text, lang in fields if text is not None)
    return (f'<article class="card {_e(status)}" data-key="{_e(row["key"])}" data-status="{_e(status)}">'
            f"{frames}"
            f'<div class="meta"><span class="key">{_e(row["key"])}</span> · shard {_e(row["shard"])} · '
            f'{_e(_span(row))} <span class="status">{_e(status)}</span>{flags}</div>'
            f"<dl>{details}</dl></article>")


def render_report(output: str, counts: Counter, filters: str, matching: int, cards: list[Card],
                  in_progress: str = "") -> str:
    by_status = ", ".join(f"{_e(s)}={counts[s]}" for s in [*STATUSES, *sorted(set(counts) - set(STATUSES))]
                          if counts[s]) or "no rows"
    body = "".join(render_card(card) for card in cards) or "<p>No rows match the filter.</p>"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{CSP_META}'
        f"<title>recaption inspect: {_e(output)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>Contact sheet of <code>{_e(output)}</code></h1>"
        f"<p>rows by status: {by_status} ({sum(counts.values())} rows{_e(in_progress)})</p>"
        f"<p>filter: {_e(filters)}; {matching} rows match, {len(cards)} shown</p>"
        f'<p>generated {_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))}</p></header>'
        f'<main class="cards">{body}</main></body></html>\n'
    )


# ----------------------------------------------------------------------------------------------- CLI


def _names(values: list[str] | None) -> set[str] | None:
    """Repeated and comma-separated values as one set; None when the option was not given."""
    if not values:
        return None
    return {name.strip() for value in values for name in value.split(",") if name.strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recaption inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the job's output: a directory, or an s3://, gs://, az:// URL")
    p.add_argument("--html", required=True, type=Path, help="where to write the report")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"clips to show, a deterministic random sample (default {DEFAULT_SAMPLE}; 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help=f"only rows with this status; repeatable or comma-separated ({', '.join(STATUSES)})")
    p.add_argument("--shard", action="append", metavar="NAME", help="only these shards; repeatable or comma-separated")
    p.add_argument("--sort", choices=SORTS, default="random",
                   help="random: a sample (default); score: the lowest clip_score first (the captions least like "
                        "their clips); score-desc: the highest first. Sorting leaves out rows without a score")
    p.add_argument("--shards", metavar="SPEC",
                   help="where to read the shards' frames, as `recaption run --shards` takes them (comma-separated, "
                        "brace ranges); needed for signed URLs, which the output records without their credentials")
    p.add_argument("--min-score", type=float, metavar="X", help="only rows with clip_score >= X")
    p.add_argument("--max-score", type=float, metavar="X", help="only rows with clip_score <= X")
    args = p.parse_args(argv)
    args.html = args.html.expanduser()
    statuses, shards = _names(args.status), _names(args.shard)
    if args.sample < 0:
        p.error("--sample must be >= 0")
    if statuses and statuses - set(STATUSES):
        p.error(f"unknown status {sorted(statuses - set(STATUSES))}; statuses are {', '.join(STATUSES)}")

    try:
        store = OutputStore(args.output)
    except (StoreUnavailable, ValueError) as e:  # a store library not installed, an hf:// or unknown scheme
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not store.exists(store.path(JOB_FILE)) and not store.exists(store.path("data")):
        print(f"error: {args.output} is not a job output (no {JOB_FILE})", file=sys.stderr)
        return 2
    files, unfinished = shard_files(store, shards)
    counts: Counter = Counter()
    chooser = Chooser(args.sample, args.seed, args.sort)
    scored = args.sort != "random" or args.min_score is not None or args.max_score is not None
    matching = unfinished_rows = 0
    for name, paths in files.items():
        rows = read_shard_rows(store, name, paths, lambda path: read_selection_columns(store, path, scored))
        counts.update(row["status"] for row in rows)
        unfinished_rows += len(rows) if name in unfinished else 0
        picked = [(row["key"], row["clip_score"]) for row in rows
                  if (statuses is None or row["status"] in statuses) and score_matches(row["clip_score"], args)]
        matching += len(picked)
        chooser.offer(name, picked)
    chosen = chooser.chosen()

    urls = shard_urls(store, [s.strip() for s in args.shards.split(",") if s.strip()] if args.shards else None)
    cards: dict[tuple[str, str], Card] = {}
    storage = job_storage(store)
    for name in sorted({shard for shard, _ in chosen}):
        keys = {key for shard, key in chosen if shard == name}
        shard_cards = [Card(row) for row in read_shard_rows(store, name, files[name],
                                                            lambda path: read_columns(store, path, CARD_COLUMNS))
                       if row["key"] in keys]
        fill_thumbnails(shard_cards, urls.get(name), storage)
        cards.update(((name, card.row["key"]), card) for card in shard_cards)
    shown = [cards[pair] for pair in chosen if pair in cards]

    filters = "; ".join(part for part in (
        f"status in {','.join(sorted(statuses))}" if statuses else "",
        f"shard in {','.join(sorted(shards))}" if shards else "",
        f"clip_score >= {args.min_score:g}" if args.min_score is not None else "",
        f"clip_score <= {args.max_score:g}" if args.max_score is not None else "",
        "rows without a clip_score left out" if scored else "",
    ) if part) or "none"
    if args.sort == "random":
        filters += f"; sample {args.sample or 'all'}, seed {args.seed}"
    else:
        order = "lowest" if args.sort == "score" else "highest"
        filters += f"; the {args.sample or 'all'} {order} clip scores first"
    args.html.parent.mkdir(parents=True, exist_ok=True)
    in_progress = (f"; {unfinished_rows} of them committed by {len(unfinished)} unfinished "
                   f"shard{'s' if len(unfinished) > 1 else ''}" if unfinished else "")
    args.html.write_text(render_report(args.output, counts, filters, matching, shown, in_progress),
                         encoding="utf-8")
    unreadable = sum(1 for card in shown if card.no_frames and card.no_frames.startswith("shard not readable"))
    print(f"wrote {args.html}: {len(shown)} cards of {matching} matching rows "
          f"({sum(counts.values())} rows in {len(files)} shards{in_progress})"
          + (f"; {unreadable} cards without frames: shard not readable" if unreadable else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
