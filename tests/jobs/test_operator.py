"""What operators see: the `recaption` CLI, progress, Ray metrics, status ETA, the dataset card, and the
README's loading snippets run against a real job output."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from jobs.progress_report import ProgressReporter
from tests.jobs.conftest import REPO, VENV_BIN, read_output, run_job, wait_for, write_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job_output(ray_cluster, tiny_checkpoint, shard_source, tmp_path_factory):
    """One job on the test cluster with a shard that cannot be read (so a failure is recorded too), its
    captions scored by a tiny CLIP (score.model)."""
    from model.tiny_clip import build_tiny_clip

    src, planted = shard_source
    tmp = tmp_path_factory.mktemp("operator")
    shutil.copytree(src, tmp / "shards")
    (tmp / "shards/00002.tar").write_bytes(b"")  # a cut download: never `done`, fails with the reason
    out = tmp / "out"
    clip = build_tiny_clip(tmp / "tiny-clip", seed=0)
    manifest = write_manifest(tmp / "job.yaml", shards=f"{tmp}/shards/{{00000..00002}}.tar", output=out,
                              model=tiny_checkpoint, max_attempts=1, score={"model": str(clip)})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    proc = run_job([str(manifest), "--log-every", "0"], env)
    return out, planted, proc


def test_cli_help_names_every_flag():
    recaption = str(VENV_BIN / "recaption")
    top = subprocess.run([recaption, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0
    expected = {
        "run": ["MANIFEST", "--shards", "--output", "--model", "--retry-failed", "--actors", "--log-every",
                "--force"],
        "status": ["--json"],
        "inspect": ["--html", "--sample", "--status", "--sort", "--min-score", "--max-score"],
        "make-tiny-checkpoint": ["--seed", "--family", "--merged"],
        "make-synthetic-shards": ["--shards", "--clips-per-shard", "--failed", "--corrupt", "--seed"],
        "make-tiny-clip": ["--seed", "--image-size", "--patch-size"],
    }
    for sub, flags in expected.items():
        assert sub in top.stdout
        proc = subprocess.run([recaption, sub, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"recaption {sub}" in proc.stdout
        for flag in flags:
            assert flag.lower() in proc.stdout.lower(), f"{sub} --help does not name {flag}"
    bad = subprocess.run([recaption, "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown subcommand" in bad.stderr


def _help_entries(help_text: str) -> dict[str, str]:
    """{invocation: help} of each argument listed by argparse's --help (an entry's help may wrap or start
    on the line after a long invocation)."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if re.match(r"^\S.*:$", line):  # "positional arguments:", "options:"
            current = None
        elif re.match(r"^  \S", line):
            invocation, _, text = line.strip().partition("  ")
            current = invocation
            entries[current] = text.strip()
        elif current is not None and line.startswith("    ") and line.strip():
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


@pytest.mark.parametrize("module, flags", [
    ("model.tiny", ["--seed", "--family", "--merged", "--merge-alpha", "--head-dim", "--kv-heads"]),
    ("pipeline.synthetic", ["--shards", "--clips-per-shard", "--failed", "--corrupt", "--seed"]),
    ("model.tiny_clip", ["--seed", "--image-size", "--patch-size"]),
])
def test_builder_help_describes_every_flag(module, flags):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    usage, _, rest = proc.stdout.partition("\n\n")
    assert usage.startswith("usage:")
    description = rest.split("\n\n", 1)[0]
    assert description.strip() and not description.endswith(":"), f"{module} --help has no description"
    entries = _help_entries(proc.stdout)
    assert "OUTDIR" in entries and entries["OUTDIR"], f"{module} --help does not describe OUTDIR"
    options = {inv.split()[0].rstrip(","): text for inv, text in entries.items() if inv.startswith("-")}
    assert set(options) == {"-h", *flags}, f"{module} flags changed: update this test"
    for flag in flags:
        assert options[flag], f"{module} --help: {flag} has no help text"
        assert "(default: " in options[flag], f"{module} --help: {flag} does not give its default"


def test_cli_make_commands_produce_artefacts(tmp_path):
    recaption = str(VENV_BIN / "recaption")
    subprocess.run([recaption, "make-tiny-checkpoint", str(tmp_path / "ckpt"), "--seed", "3"], check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "ckpt/model.safetensors.index.json").is_file()
    subprocess.run([recaption, "make-synthetic-shards", str(tmp_path / "sh"), "--shards", "1",
                    "--clips-per-shard", "2"], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "sh/00000.tar").is_file()


def test_logs_per_shard_and_summary_lines(job_output):
    out, _, proc = job_output
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1  # the empty shard failed
    assert re.search(r"shard 00000 done \(attempt 1\): .*new rows in .* clips/s", log)
    assert re.search(r"shard 00000 start \(attempt 1\)", log)
    # one line per shard start and finish (the actors do not repeat them), and no colour codes in a log file
    assert len(re.findall(r"shard 00000 start", log)) == 1 and len(re.findall(r"shard 00000 done", log)) == 1
    assert "\x1b[" not in log and "Token authentication is enabled" not in log
    assert re.search(r"summary: shards \d+ done / \d+ failed / 3 total; \d+ clips", log)
    assert "failed shard 00002" in log


def test_progress_bar_in_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    reporter = ProgressReporter(3, interactive=True, log_every_s=3600)
    reporter.shard_finished(rows=10)
    reporter.in_flight(4)
    reporter.shard_failed()
    reporter.close()
    text = err.getvalue()
    assert "2/3" in text and "clips=14" in text and "failed=1" in text and "clips_s=" in text
    snap = reporter.snapshot()
    assert snap["clips"] == 10 and snap["shards_done"] == 1 and snap["shards_failed"] == 1
    assert snap["eta_s"] is not None


def test_ray_metrics_are_exported(job_output, ray_cluster):
    def scrape():
        with urllib.request.urlopen(ray_cluster["metrics"], timeout=10) as r:
            text = r.read().decode()
        found = {
            "clips": re.search(r'^ray_recaption_clips(_total)?\{[^}]*status="(ok|flagged)"[^}]*\} ([0-9.e+]+)',
                               text, re.M),
            "tokens": re.search(r'^ray_recaption_generated_tokens(_total)?\{[^}]*language="zh"', text, re.M),
            "decode_wait": re.search(r"^ray_recaption_decode_wait_seconds(_total)?\{", text, re.M),
            "model": re.search(r"^ray_recaption_model_seconds(_total)?\{", text, re.M),
            "failures": re.search(r"^ray_recaption_shard_failures(_total)?\{", text, re.M),
        }
        return found if all(found.values()) else None

    found = wait_for(scrape, 60, "recaption metrics on the cluster's Prometheus endpoint", interval=1.0)
    assert float(found["clips"].group(3)) > 0


def test_status_reports_rate_and_eta(job_output):
    out, _, _ = job_output
    proc = subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    assert report["shards_by_state"] == {"done": 2, "failed": 1}
    assert report["throughput"]["clips_per_s"] > 0 and report["throughput"]["eta_s"] == 0.0
    text = subprocess.run([sys.executable, "-m", "jobs.status", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
    assert "clips/s" in text and "ETA" in text


def test_status_eta_while_running(tmp_path):
    from jobs.status import collect_status
    from pipeline.progress import write_state
    from pipeline.writing import OutputStore

    store = OutputStore(str(tmp_path))
    now = time.time()
    store.commit_chunk("a", [_row(f"k{i}") for i in range(50)], attempt=1)
    store.finalize_shard("a", {})
    write_state(store, "a", state="done", started_at=now - 100, rows={"ok": 50})
    write_state(store, "b", state="running", started_at=now - 10)
    write_state(store, "c", state="running", started_at=now - 5)
    report = collect_status(store, ["a", "b", "c", "d"])
    tp = report["throughput"]
    assert tp["clips_per_s"] == pytest.approx(0.5, rel=0.05)
    assert tp["eta_s"] == pytest.approx(300, rel=0.05)  # 3 shards left at 100 s per shard


def _row(key: str) -> dict:
    from pipeline.writing import COLUMNS

    return {**{c: None for c in COLUMNS}, "key": key, "status": "ok", "caption_flags": []}


def test_dataset_card_describes_the_job(job_output):
    out, _, _ = job_output
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:")
    assert "path: data/*.parquet" in card
    assert "LoRA inference alpha: 4.0" in card and "vicuna-v1/recaption-v1" in card
    table = read_output(out)
    assert f"Rows: {table.num_rows}." in card
    assert "| source_failed |" in card and "transformers" in card
    assert "`clip_score` is the cosine of the CLIP `tiny-clip` embeddings" in card
    rows = table.to_pylist()
    scored = [r for r in rows if r["caption_en"]]
    assert scored and all(-1 <= r["clip_score"] <= 1 for r in scored)  # scored in the actors, on Ray
    assert all(r["clip_score"] is None for r in rows if not r["caption_en"])


def test_readme_loading_snippets_run_against_a_real_output(job_output, ray_cluster, tmp_path):
    out, _, _ = job_output
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Output", 1)[1]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) >= 5
    names = {"pandas": False, "duckdb": False, "load_dataset(\"parquet\"": False, "ray.data": False}
    rows = read_output(out).num_rows
    for code in snippets:
        code = code.replace("build/demo/out", str(out))
        for name in names:
            names[name] |= name in code
        # ray.data connects to the (token-authenticated) test cluster, as it would to a user's cluster
        env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"snippet failed:\n{code}\n{proc.stderr[-3000:]}"
        if "load_dataset(\"parquet\"" in code:
            assert f"num_rows: {rows}" in proc.stdout
        if "dtype_backend" in code:  # the nullable-int snippet keeps tokens_en an int column
            assert "int32[pyarrow]" in proc.stdout or "Int32" in proc.stdout, proc.stdout
    assert all(names.values()), names
