"""`recaption inspect`: the HTML contact sheet, built from a real output and rendered in headless Chromium.

The output is made once per module without Ray (run_shard over two synthetic shards with the tiny
checkpoint), then one caption is replaced by markup, as a model could write it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import inspect as inspect_job
from tests.jobs.conftest import REPO, write_manifest

SHARDS = ("00000", "00001")
EVIL_EN = '<script>document.body.dataset.pwned = "en"</script> a man </dd></dl><h1>walks</h1>'
EVIL_ZH = '"><img src=x onerror="document.body.dataset.pwned=\'zh\'"> 一个男人 & <b>狗</b>'
PROBE = """<script>
window.addEventListener("load", () => {
  const cards = [...document.querySelectorAll("article.card")].map(card => ({
    key: card.dataset.key, status: card.dataset.status,
    imgs: [...card.querySelectorAll("img")].map(img => ({complete: img.complete, w: img.naturalWidth,
      h: img.naturalHeight, rect: [img.x, img.y, img.width, img.height]})),
    placeholder: card.querySelector(".placeholder")?.textContent ?? null,
    en: card.querySelector(".caption-en")?.textContent ?? null,
    zh: card.querySelector(".caption-zh")?.textContent ?? null,
  }));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({cards, scripts: document.scripts.length,
                                    pwned: document.body.dataset.pwned ?? null});
  document.body.appendChild(out);
});
</script>"""


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def job_output(tiny_checkpoint, shard_source, tmp_path_factory) -> Path:
    """OUT with two finished shards and a `_job.json`; one captioned row's captions are markup."""
    from pipeline.captioning import Captioner
    from pipeline.decode import DecodePool
    from pipeline.manifest import load_manifest
    from pipeline.progress import describe_job_model, ensure_job, job_identity
    from pipeline.shard_runner import ShardSettings, run_shard
    from pipeline.writing import OutputStore

    root = tmp_path_factory.mktemp("inspect")
    src, _ = shard_source
    (root / "shards").mkdir()
    for name in SHARDS:
        shutil.copy(src / f"{name}.tar", root / "shards" / f"{name}.tar")
    out = root / "out"
    m = load_manifest(write_manifest(root / "job.yaml", shards=f"{root}/shards/{{00000..00001}}.tar",
                                     output=out, model=tiny_checkpoint))
    captioner = Captioner.from_manifest(m)
    store = OutputStore(str(out))
    ensure_job(store, m, job_identity(m, describe_job_model(m)))
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        for name in SHARDS:
            run_shard(f"{root}/shards/{name}.tar", name, store=store, captioner=captioner, decode_pool=pool,
                      attempt=1, file_metadata={}, settings=ShardSettings.from_manifest(m))
    path = out / "data" / "00000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    evil = next(r for r in rows if r["frame_indices"])
    evil["caption_en"], evil["caption_zh"] = EVIL_EN, EVIL_ZH
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    return out


@pytest.fixture(scope="module")
def all_rows(job_output) -> list[dict]:
    return [r for name in SHARDS for r in pq.read_table(job_output / "data" / f"{name}.parquet").to_pylist()]


def evil_key(rows: list[dict]) -> str:
    return next(r["key"] for r in rows if r["caption_en"] == EVIL_EN)


def has_frames(row: dict) -> bool:
    return bool(row["frame_indices"])


# ----------------------------------------------------------------------------------------------- helpers


def chromium() -> str:
    """The Chromium binary; skipped outside CI when it is missing, a failure in CI."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "headless Chromium is needed to render the report: run `apt-get install -y chromium`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(page: Path, profile: Path, *args: str) -> str:
    """Load ``page`` from file:// in headless Chromium, loopback only, and return its stdout."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-default-apps", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--window-size=1280,2000", "--virtual-time-budget=5000", *args, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def probe_page(report: Path) -> Path:
    """A copy of the report that writes what the browser made of it into the DOM (the CSP would block it)."""
    text = report.read_text(encoding="utf-8")
    assert inspect_job.CSP_META in text
    probe = report.with_name(report.stem + "-probe.html")
    probe.write_text(text.replace(inspect_job.CSP_META, "").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    return probe


def rendered(report: Path, tmp_path: Path) -> dict:
    """What Chromium rendered: every card's images (loaded size, position), placeholder and captions."""
    dom = run_chromium(probe_page(report), tmp_path / "profile", "--dump-dom")
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, f"the probe did not run; DOM starts with: {dom[:500]}"
    return json.loads(unescape(match.group(1)))


class Cards(HTMLParser):
    """The cards of a report as written (no browser): key, status, images, placeholder text."""

    def __init__(self, text: str):
        super().__init__()
        self.cards: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self._in_placeholder = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "article":
            self.cards.append({"key": attrs["data-key"], "status": attrs["data-status"], "imgs": [],
                               "placeholder": None})
        elif tag == "img" and self.cards:
            self.cards[-1]["imgs"].append(attrs["src"])
        elif tag == "div" and attrs.get("class") == "placeholder":
            self._in_placeholder = True

    def handle_data(self, data):
        if self._in_placeholder:
            self.cards[-1]["placeholder"] = data
            self._in_placeholder = False


def report_cards(path: Path) -> list[dict]:
    return Cards(path.read_text(encoding="utf-8")).cards


def inspect(out: Path, html: Path, *args: str) -> Path:
    assert inspect_job.main([str(out), "--html", str(html), *args]) == 0
    return html


# ----------------------------------------------------------------------------------------------- tests


def test_contact_sheet_renders_every_card_with_four_decoded_frames(job_output, all_rows, tmp_path):
    report = inspect(job_output, tmp_path / "report.html", "--sample", "0")
    page = rendered(report, tmp_path)
    cards = {c["key"]: c for c in page["cards"]}
    assert len(page["cards"]) == len(all_rows) and set(cards) == {r["key"] for r in all_rows}
    assert {r["status"] for r in all_rows} >= {"source_failed", "decode_error"}
    for row in all_rows:
        card = cards[row["key"]]
        assert card["status"] == row["status"]
        if has_frames(row):
            assert len(card["imgs"]) == 4, card
            for img in card["imgs"]:
                assert img["complete"] and img["w"] == inspect_job.THUMB_WIDTH and img["h"] > 0, card
            assert card["placeholder"] is None
        else:
            assert card["imgs"] == [] and row["status"] in card["placeholder"], card

    # The pixels: the first thumbnail's box in a screenshot is an image, not an empty box.
    import av

    shot = tmp_path / "shot.png"
    run_chromium(probe_page(report), tmp_path / "profile", f"--screenshot={shot}")
    with av.open(str(shot)) as container:
        pixels = next(container.decode(video=0)).to_ndarray(format="rgb24")
    first = next(c for c in page["cards"] if c["imgs"])
    x, y, w, h = (int(v) for v in first["imgs"][0]["rect"])
    assert w > 50 and h > 20 and y + h <= pixels.shape[0], first
    box = pixels[y:y + h, x:x + w].reshape(-1, 3)
    assert len(np.unique(box, axis=0)) > 20 and box.std() > 10, "the thumbnail area of the screenshot is flat"


def test_report_is_self_contained(job_output, tmp_path):
    report = inspect(job_output, tmp_path / "report.html", "--sample", "0")
    parser = Cards(report.read_text(encoding="utf-8"))
    tags = {tag for tag, _ in parser.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed"}
    for tag, attrs in parser.tags:
        for name, value in attrs.items():
            if name in ("src", "href"):
                assert value.startswith("data:image/jpeg;base64,"), (tag, name, value[:80])
    assert "url(" not in report.read_text(encoding="utf-8")
    assert all(len(card["imgs"]) in (0, 4) for card in parser.cards)


def test_captions_are_escaped(job_output, all_rows, tmp_path):
    report = inspect(job_output, tmp_path / "report.html", "--sample", "0")
    text = report.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    page = rendered(report, tmp_path)
    assert page["pwned"] is None and page["scripts"] == 1  # only the probe's own script
    card = next(c for c in page["cards"] if c["key"] == evil_key(all_rows))
    assert card["en"] == EVIL_EN and card["zh"] == EVIL_ZH  # shown as text, character for character
    assert len(card["imgs"]) == 4
    assert len(page["cards"]) == len(all_rows)  # the markup closed no card early


def test_status_filter(job_output, all_rows, tmp_path):
    wanted = {"source_failed", "decode_error"}
    repeated = report_cards(inspect(job_output, tmp_path / "a.html", "--status", "source_failed",
                                    "--status", "decode_error"))
    comma = report_cards(inspect(job_output, tmp_path / "b.html", "--status", "decode_error,source_failed"))
    assert repeated == comma
    assert sorted(c["key"] for c in repeated) == sorted(r["key"] for r in all_rows if r["status"] in wanted)
    assert all(c["imgs"] == [] and c["status"] in c["placeholder"] for c in repeated)
    header = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert "status in decode_error,source_failed" in header
    for status in {r["status"] for r in all_rows}:
        assert f"{status}={sum(r['status'] == status for r in all_rows)}" in header  # counts of all rows

    only = report_cards(inspect(job_output, tmp_path / "c.html", "--shard", "00001", "--status", "flagged,ok"))
    assert {c["key"] for c in only} == {r["key"] for r in all_rows
                                        if r["shard"] == "00001" and r["status"] in ("ok", "flagged")}


def test_sample_size_is_deterministic(job_output, all_rows, tmp_path):
    keys = {r["key"] for r in all_rows}
    assert len(keys) > 5
    default = report_cards(inspect(job_output, tmp_path / "default.html"))
    assert len(default) == min(inspect_job.DEFAULT_SAMPLE, len(keys))
    samples = []
    for seed in range(4):
        first = [c["key"] for c in report_cards(inspect(job_output, tmp_path / "a.html", "--sample", "3",
                                                        "--seed", str(seed)))]
        again = [c["key"] for c in report_cards(inspect(job_output, tmp_path / "b.html", "--sample", "3",
                                                        "--seed", str(seed)))]
        assert first == again and len(first) == 3 and set(first) <= keys
        samples.append(first)
    assert len({tuple(s) for s in samples}) > 1, "the seed does not change the sample"


def test_each_shard_is_opened_once(job_output, all_rows, tmp_path, monkeypatch):
    opened: list[str] = []

    class CountingReader(inspect_job.ShardReader):
        def __iter__(self):
            opened.append(self.shard)
            yield from super().__iter__()

    monkeypatch.setattr(inspect_job, "ShardReader", CountingReader)
    inspect(job_output, tmp_path / "report.html", "--sample", "0")
    assert sorted(opened) == sorted({r["shard"] for r in all_rows if has_frames(r)})


def test_missing_shard_is_a_card_note(job_output, all_rows, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(job_output, out)
    job = json.loads((out / "_job.json").read_text())
    job["manifest"]["shards"] = [str(Path(job["manifest"]["shards"][0]).parent / "00000.tar"),
                                 str(tmp_path / "gone" / "00001.tar")]
    (out / "_job.json").write_text(json.dumps(job))
    cards = {c["key"]: c for c in report_cards(inspect(out, tmp_path / "report.html", "--sample", "0"))}
    assert "shard not readable" in capsys.readouterr().out
    for row in all_rows:
        card = cards[row["key"]]
        if not has_frames(row):
            assert card["placeholder"] and card["imgs"] == []
        elif row["shard"] == "00001":
            assert card["imgs"] == [] and card["placeholder"].startswith("shard not readable"), card
        else:
            assert len(card["imgs"]) == 4


def test_thumbnail_positions():
    assert inspect_job.thumbnail_positions(16) == [0, 5, 10, 15]
    assert inspect_job.thumbnail_positions(3) == [0, 1, 2]
    assert inspect_job.thumbnail_size(1920, 1080) == (160, 90)
    assert inspect_job.thumbnail_size(64, 96) == (160, 240)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_thumbnails_show_rotated_clips_as_displayed(rotation):
    """The contact sheet's frames are the model's: turned as displayed, not stretched, even for a row written
    before rotation was honoured (it holds the coded size)."""
    import io

    import av
    import torch

    from pipeline.frames import sample_frame_indices
    from tests.pipeline.test_rotation import CODED, N_FRAMES, displayed_frames, mean_abs_diff, rotated_clip

    mp4 = rotated_clip(rotation)
    indices = sample_frame_indices(N_FRAMES)
    thumbs = inspect_job.decode_thumbnails(mp4, {"frame_indices": indices, "width": CODED[0], "height": CODED[1]})
    assert isinstance(thumbs, list) and [i for i, _ in thumbs] == [indices[p] for p in (0, 5, 10, 15)], thumbs
    shown = np.stack([next(av.open(io.BytesIO(jpeg)).decode(video=0)).to_ndarray(format="rgb24")
                      for _, jpeg in thumbs])
    displayed = CODED[::-1] if rotation in (90, 270) else CODED
    assert shown.shape[1:3] == inspect_job.thumbnail_size(*displayed)[::-1]

    def thumbnails(turn):
        x = torch.from_numpy(displayed_frames(mp4, turn)[[i for i, _ in thumbs]]).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=shown.shape[1:3], mode="bicubic", antialias=True)
        return x.clamp(0, 255).permute(0, 2, 3, 1).numpy()

    assert mean_abs_diff(shown, thumbnails(rotation)) < 6  # swscale vs torch, and JPEG
    assert mean_abs_diff(shown, thumbnails((rotation + 180) % 360)) > 15


def test_command_line(job_output, tmp_path):
    report = tmp_path / "cli.html"
    proc = subprocess.run([sys.executable, "-m", "jobs.inspect", str(job_output), "--html", str(report),
                           "--sample", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {report}: 2 cards" in proc.stdout and len(report_cards(report)) == 2

    assert inspect_job.main([str(tmp_path / "nothing"), "--html", str(tmp_path / "x.html")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        inspect_job.main([str(job_output), "--html", str(tmp_path / "x.html"), "--status", "okay"])
    assert exit_info.value.code == 2


def test_sort_and_filter_by_clip_score(job_output, all_rows, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(job_output, out)
    scores = {}
    for name in SHARDS:
        path = out / "data" / f"{name}.parquet"
        table = pq.read_table(path)
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            if row["status"] in ("ok", "flagged"):
                row["clip_score"] = scores[row["key"]] = round(0.05 * ((i * 7 + len(name)) % 11) - 0.1, 3)
        pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    assert len(scores) >= 4

    def keys(*args: str) -> list[str]:
        return [c["key"] for c in report_cards(inspect(out, tmp_path / "r.html", *args))]

    shard_of = {r["key"]: r["shard"] for r in all_rows}
    ascending = sorted(scores, key=lambda k: (scores[k], shard_of[k], k))
    assert keys("--sort", "score", "--sample", "3") == ascending[:3]  # the worst first, only scored rows
    assert keys("--sort", "score-desc", "--sample", "2") == sorted(scores, key=lambda k: (-scores[k], shard_of[k],
                                                                                          k))[:2]
    assert keys("--sort", "score", "--sample", "0") == ascending
    header = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "rows without a clip_score left out" in header and "lowest clip scores first" in header
    low = keys("--max-score", "0", "--sample", "0")
    assert sorted(low) == sorted(k for k, v in scores.items() if v <= 0) and low
    band = keys("--min-score", "0.1", "--max-score", "0.2", "--sort", "score", "--sample", "0")
    assert band == [k for k in ascending if 0.1 <= scores[k] <= 0.2] and band
    # an output without scores: a score filter matches nothing
    assert all(r["clip_score"] is None for r in all_rows)
    assert report_cards(inspect(job_output, tmp_path / "none.html", "--min-score", "-1")) == []


def test_unfinished_shards_show_their_committed_rows(job_output, all_rows, tmp_path, capsys):
    """A shard still running (or interrupted) has no data file yet: its committed chunks are its rows, each key
    once and from the first commit, as the finalizer merges them; a finished shard's leftover chunk adds nothing."""
    from pipeline.writing import OutputStore

    out = tmp_path / "out"
    shutil.copytree(job_output, out)
    store = OutputStore(str(out))
    running = pq.read_table(out / "data" / "00001.parquet").to_pylist()
    (out / "data" / "00001.parquet").unlink()
    half = len(running) // 2
    store.commit_chunk("00001", running[:half], attempt=1)
    # attempt 2 committed the first key again (its actor died before the record said so): the first row counts
    store.commit_chunk("00001", [{**running[0], "caption_en": "a later attempt's caption"}, *running[half:]],
                       attempt=2)
    # killed between the data file and the removal of its chunks: those rows are in the data file already
    store.commit_chunk("00000", pq.read_table(out / "data" / "00000.parquet").to_pylist()[:2], attempt=1)

    report = inspect(out, tmp_path / "report.html", "--sample", "0")
    printed = capsys.readouterr().out
    cards = report_cards(report)
    assert sorted(c["key"] for c in cards) == sorted(r["key"] for r in all_rows)
    text = report.read_text(encoding="utf-8")
    assert "a later attempt&#x27;s caption" not in text and "a later attempt" not in text
    for status in {r["status"] for r in all_rows}:
        assert f"{status}={sum(r['status'] == status for r in all_rows)}" in text
    note = f"{len(running)} of them committed by 1 unfinished shard)"
    assert f"({len(all_rows)} rows; {note}" in text and f"({len(all_rows)} rows in 2 shards; {note}" in printed
    for card in cards:  # the running shard's clips are re-decoded from the shard like any other
        row = next(r for r in all_rows if r["key"] == card["key"])
        assert len(card["imgs"]) == (4 if has_frames(row) else 0), card

    only = report_cards(inspect(out, tmp_path / "only.html", "--shard", "00001", "--sample", "0"))
    assert sorted(c["key"] for c in only) == sorted(r["key"] for r in running)
    # what the finalizer will write is what inspect showed
    store.finalize_shard("00001", {})
    merged = pq.read_table(out / "data" / "00001.parquet").to_pylist()
    assert sorted(r["key"] for r in merged) == sorted(c["key"] for c in only)
    assert "a later attempt's caption" not in {r["caption_en"] for r in merged}


def test_shards_are_read_where_the_job_read_them(tmp_path):
    """The recorded manifest's storage section (an S3 endpoint, a GCS project; never credentials) is what
    inspect reads the shards with; an output without a readable record falls back to the environment."""
    from jobs.inspect import job_storage
    from pipeline.manifest import manifest_from_dict
    from pipeline.writing import OutputStore

    store = OutputStore(str(tmp_path / "out"))
    assert job_storage(store) is None
    m = manifest_from_dict({"shards": "gs://b/{00000..00001}.tar", "output": "gs://b/out", "model": {"path": "/m"},
                            "storage": {"endpoint_url": "http://minio:9000", "gcs": {"project": "proj"}}})
    store.write_json(store.path("_job.json"), {"fingerprint": "f", "manifest": m.to_dict()})
    assert job_storage(store) == m.storage
    store.write_json(store.path("_job.json"), {"manifest": {"shards": 3}})
    assert job_storage(store) is None
