"""Metadata at scale (issue 16): what status, planning, a rerun and inspect cost on an output of many shards.

    python benchmarks/metadata.py [--code DIR] [--baseline DIR] [--shards 1000,10000] [--rows 10]
                                  [--s3-shards 1000] [--mem-shards 10,100] [--mem-rows 7000] [--quick]
                                  [--json PATH] [--work DIR]

Builds FINISHED outputs with the project's own store calls, as a real run leaves them: `_job.json`
(`ensure_job`), `_shards.json` (`write_shard_list`), and per shard `mark_running`, `OutputStore.commit_chunk`,
`finalize_shard` (with the job's file metadata) and `mark_done` with the data file's counts and the committed
rows' `Stats`; the lease taken and released around it. The shards are local empty tar files (one hard-linked
file: the driver's preflight only checks that they exist). Then, each in a fresh process:

- ``status``: `jobs.status.collect_status(store)` + `format_report` (`recaption status OUT`);
- ``plan``: `pipeline.progress.plan_shards(store, shards, retry_failed=False)` (the call alone);
- ``rerun``: `jobs.recaption.main([manifest])` with every shard done: it should plan, find everything done,
  log the summary and exit 0 without starting Ray; the benchmark checks `ray.is_initialized()` and the
  process's children afterwards, and records whether torch / transformers / ray got imported;
- ``inspect``: `jobs.inspect.main([OUT, "--html", X, "--sample", "24"])`;
- ``end of run``: the tail of a run that captioned something: the dataset card and the summary
  (`write_dataset_card` + `collect_status(store, names)`, in whichever form the code under test has).

on local outputs (``--shards``) and on S3 (``--s3-shards``: a moto server on 127.0.0.1, started as the tests
start it, the output under s3://bench/), where it also counts the S3 requests each operation made: moto's
server logs one line per HTTP request, counted before and after each process. And the peak RSS
(``ru_maxrss``) of an inspect process on outputs of ``--mem-shards`` shards × ``--mem-rows`` rows (realistic
keys, statuses and captions; the other columns small).

``--code DIR`` measures the checkout in DIR (default: this repository); ``--baseline DIR`` measures another
checkout too and prints ratios. The measuring runs in subprocesses with ``PYTHONPATH=DIR``, ``cwd=DIR`` and
``python -P`` (so this folder's ``pipeline.py`` shadows nothing), and each checkout builds its own outputs
with its own code (only functions both versions have), so its progress records are the ones it would write.

This file imports nothing of the project at the top: the orchestrating process only starts subprocesses.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
RESULT_ENV = "METADATA_BENCH_RESULT"
HEAVY = ("torch", "transformers", "ray")
OPS = ("status", "plan", "rerun", "inspect", "end of run")
S3_ACCESS_KEY = "AKIAMETADATABENCH7Q"
S3_SECRET = "metadata-bench-fake-secret"
S3_REGION = "us-east-1"
S3_BUCKET = "bench"

EN_SENTENCES = [
    "A man in a dark jacket walks along a crowded street while cars pass behind him.",
    "The camera slowly pans across a green valley with a river winding through it.",
    "A woman sits at a wooden table and cuts vegetables on a board in a bright kitchen.",
    "Two children play with a red ball on a sandy beach as waves roll in.",
    "A close-up shows hands typing on a laptop keyboard next to a cup of coffee.",
    "A white dog runs across a snowy field and jumps to catch a frisbee.",
    "The sun sets behind tall buildings and the sky turns orange and purple.",
    "A chef in a white uniform stirs a large pot of soup in a restaurant kitchen.",
    "A group of people dance on a stage under colourful flashing lights.",
    "An old car drives down a dusty road past rows of tall trees.",
    "A cyclist rides through a park on a narrow path lined with flowers.",
    "Rain falls on a window while blurred city lights glow in the background.",
    "A man explains something in front of a whiteboard covered with diagrams.",
    "A cat sleeps on a sofa next to a window with sunlight coming through.",
    "The video shows a timelapse of clouds moving quickly over a mountain range.",
    "A boat sails across calm blue water towards a small island.",
]
ZH_SENTENCES = [
    "一个穿着深色夹克的男人沿着拥挤的街道行走，身后有汽车驶过。",
    "镜头缓缓扫过一片绿色的山谷，一条河流蜿蜒穿过其中。",
    "一位女士坐在木桌旁，在明亮的厨房里切菜。",
    "两个孩子在沙滩上玩红色的球，海浪不断涌来。",
    "特写镜头显示双手在笔记本电脑键盘上打字，旁边放着一杯咖啡。",
    "一只白色的狗跑过雪地，跳起来接飞盘。",
    "太阳在高楼后面落下，天空变成橙色和紫色。",
    "一群人在彩色闪光灯下的舞台上跳舞。",
]
SOURCE_SENTENCES = ["a man walking in the city", "landscape of a valley", "cooking at home", "kids on the beach",
                    "typing on a laptop", "dog in the snow", "sunset over the city", "people dancing"]
ERRORS = {
    "error": "caption: RuntimeError: CUDA error: an illegal memory access was encountered",
    "decode_error": "decode: could not read the mp4 container (Invalid data found when processing input)",
    "source_failed": "source: HTTP Error 404: Not Found",
}


# ----------------------------------------------------------------------------------------------- rows


def status_of(i: int) -> str:
    """A fixed mix: 90% ok, 5% flagged, 2% error, 2% decode_error, 1% source_failed."""
    r = (i * 7919) % 100
    return ("ok" if r < 90 else "flagged" if r < 95 else "error" if r < 97 else "decode_error" if r < 99
            else "source_failed")


def make_rows(columns: tuple[str, ...], shard: str, url: str, n: int) -> list[dict[str, Any]]:
    """`n` synthetic rows of one shard with realistic key, status, captions and error; the other columns small
    and constant. Columns this code's schema has and this function does not know are None."""
    rows = []
    n_en, n_zh = len(EN_SENTENCES), len(ZH_SENTENCES)
    for i in range(n):
        key = f"{shard}{i:05d}"
        status = status_of(i)
        captioned = status in ("ok", "flagged")
        h = hash((shard, i)) & 0xFFFFFFFF
        en = " ".join(EN_SENTENCES[(h >> s) % n_en] for s in (0, 4, 8, 12)) + f" (clip {key})"
        zh = "".join(ZH_SENTENCES[(h >> s) % n_zh] for s in (0, 3, 6))
        decoded = status not in ("decode_error", "source_failed")
        row = dict.fromkeys(columns)
        row.update(
            key=key, shard=shard, video_id=f"vid{h % 100000:05d}", url=url,
            clip_start_s=float(i % 60), clip_end_s=float(i % 60) + 4.5,
            source_caption=SOURCE_SENTENCES[h % len(SOURCE_SENTENCES)],
            caption_en=en if captioned else None, caption_zh=zh if captioned else None,
            status=status, error=ERRORS.get(status),
            caption_flags=["repetition"] if status == "flagged" else [],
            frame_indices=list(range(2, 135, 9))[:16] if decoded else None,
            num_frames=135 if decoded else None, fps=29.97 if decoded else None,
            duration_s=4.5 if decoded else None, width=1280 if decoded else None, height=720 if decoded else None,
            tokens_en=len(en) // 4 if captioned else None, tokens_zh=len(zh) // 2 if captioned else None,
            model="pllava-tiny@000000000000", lora_alpha=4.0, prompt_version="bench",
            attempts=1 if captioned else None, first_flags=None,
            clip_score=0.25 + (h % 1000) / 10000 if captioned else None,
        )
        rows.append({c: row.get(c) for c in columns})
    return rows


def write_manifest(path: Path, *, shards: str, output: str, model: Path) -> Path:
    """The job's manifest, as the job tests write it (an `s3://` output stays a string)."""
    from tests.jobs.conftest import write_manifest as job_manifest

    return job_manifest(path, shards=shards, output=output, model=model, name="metadata-bench")


def local_outputs(runners: list[Any], work: Path, prefix: str, n: int, ckpt: Path) -> Iterator[tuple[Any, Path, Path]]:
    """For each checkout: an empty output folder for `n` local shards, and the manifest naming both."""
    shard_spec = make_shard_files(work / f"shards-{n}", n)
    for r in runners:
        out = work / f"{prefix}-{r.tag}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        yield r, out, write_manifest(work / f"manifest-{prefix}-{r.tag}-{n}.yaml", shards=shard_spec,
                                     output=str(out), model=ckpt)


def make_shard_files(folder: Path, n: int) -> str:
    """`n` local shard files (hard links of one empty tar) and the brace range naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / ".empty.tar"
    if not empty.exists():
        with tarfile.open(empty, "w"):
            pass
    width = 5
    for i in range(n):
        p = folder / f"{i:0{width}d}.tar"
        if not p.exists():
            os.link(empty, p)
    return str(folder / f"{{{0:0{width}d}..{n - 1:0{width}d}}}.tar")


# ----------------------------------------------------------------------------------------------- worker side
# Everything below up to the orchestrator runs in a subprocess whose imports come from the checkout measured.


def _heavy_modules() -> dict[str, bool]:
    return {name: name in sys.modules for name in HEAVY}


def _load(manifest: str) -> Any:
    from pipeline.manifest import load_manifest, resolve_paths

    return resolve_paths(load_manifest(manifest), os.getcwd())


def _shards(m: Any) -> list[tuple[str, str]]:
    from pipeline.preflight import check_shards
    from pipeline.shards import expand_shard_spec

    return check_shards(expand_shard_spec(m.shards), m.storage)


def w_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    from model.tiny import build_tiny_checkpoint

    return {"path": str(build_tiny_checkpoint(Path(spec["path"]), seed=0))}


def w_build(spec: dict[str, Any]) -> dict[str, Any]:
    """A finished output, through the store calls a real run makes (see the module's docstring)."""
    from pipeline.lease import acquire
    from pipeline.progress import (
        describe_job_model,
        ensure_job,
        job_identity,
        mark_done,
        mark_running,
        write_shard_list,
    )
    from pipeline.rows import COLUMNS
    from pipeline.stats import Stats
    from pipeline.writing import META_CONFIG, META_FINGERPRINT, OutputStore

    t0 = time.perf_counter()
    m = _load(spec["manifest"])
    store = OutputStore(m.output, m.storage)
    ident = job_identity(m, describe_job_model(m))
    shards = _shards(m)
    lease = acquire(store)
    try:
        ensure_job(store, m, ident)
        write_shard_list(store, shards)
        metadata = {
            META_CONFIG: json.dumps({"manifest": m.to_dict(), "fingerprint_parts": ident.parts}).encode(),
            META_FINGERPRINT: ident.fingerprint.encode(),
        }
        for name, url in shards:
            started = time.time()
            mark_running(store, name, url, 1, os.getpid())
            rows = make_rows(COLUMNS, name, url, spec["rows"])
            store.commit_chunk(name, rows, 1)
            stats = Stats()
            stats.add_rows(rows)
            stats.chunks = 1
            counts = store.finalize_shard(name, metadata)
            mark_done(store, name, dict(counts), None, time.time() - started, stats)
    finally:
        lease.release()
    return {"shards": len(shards), "seconds": time.perf_counter() - t0}


def w_status(spec: dict[str, Any]) -> dict[str, Any]:
    from jobs.status import collect_status, format_report
    from pipeline.writing import OutputStore

    t0 = time.perf_counter()
    report = collect_status(OutputStore(spec["output"]))
    text = format_report(report)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "check": report["shards_by_state"], "report_lines": text.count("\n") + 1}


def w_plan(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.progress import plan_shards
    from pipeline.writing import OutputStore

    m = _load(spec["manifest"])
    shards = _shards(m)
    store = OutputStore(m.output, m.storage)
    t0 = time.perf_counter()
    plan = plan_shards(store, shards, False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "check": {"done": len(plan.done), "to_run": len(plan.to_run),
                                          "failed": len(plan.failed_skipped)}}


def w_rerun(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import psutil

    import jobs.recaption as recaption

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    # as recaption.configure_logging sets it up (its basicConfig is a no-op once a handler is there)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(Keep())
    before = _heavy_modules()
    t0 = time.perf_counter()
    rc = recaption.main([spec["manifest"]])
    seconds = time.perf_counter() - t0
    ray = sys.modules.get("ray")
    summary = next((line for line in lines if line.startswith("summary:")), None)
    return {
        "seconds": seconds, "rc": rc, "heavy_at_import": before,
        "ray_initialized": bool(ray is not None and ray.is_initialized()),
        "children": [p.name() for p in psutil.Process().children(recursive=True)],
        "actors_line": next((line for line in lines if "ShardCaptioner actors" in line), None),
        "summary": summary[:300] if summary else None,
        "check": {"rc": rc, "summary": bool(summary)},
    }


def w_inspect(spec: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import io

    import jobs.inspect as inspect_job

    rss_before = _rss_mib()
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = inspect_job.main([spec["output"], "--html", spec["html"], "--sample", str(spec.get("sample", 24))])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rc": rc, "rss_before_mib": rss_before, "printed": out.getvalue().strip()[:300],
            "check": {"rc": rc}}


def w_end_of_run(spec: dict[str, Any]) -> dict[str, Any]:
    """The tail of `_dispatch` after shards ran: the dataset card and the summary's `collect_status`, in the
    form the code under test has (with `report=` when its card takes the status report)."""
    import inspect as pyinspect

    from jobs.recaption import prompt_texts, score_model
    from jobs.status import collect_status
    from pipeline.dataset_card import write_dataset_card
    from pipeline.progress import JOB_FILE, describe_job_model
    from pipeline.writing import OutputStore

    m = _load(spec["manifest"])
    model = describe_job_model(m)
    names = [name for name, _ in _shards(m)]
    store = OutputStore(m.output, m.storage)
    t0 = time.perf_counter()
    job = store.read_json(store.path(JOB_FILE))
    kwargs = {"description": model, "score": score_model(m), "score_frames": m.score.frames}
    if "report" in pyinspect.signature(write_dataset_card).parameters:
        report = collect_status(store, names, card=True)
        write_dataset_card(store, job, prompt_texts(m, model), report=report, **kwargs)
        form = "collect_status(card=True) + card(report=)"
    else:
        write_dataset_card(store, job, prompt_texts(m, model), **kwargs)
        report = collect_status(store, names)
        form = "card (reads data files) + collect_status"
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "form": form, "check": report["shards_by_state"]}


WORKERS = {"checkpoint": w_checkpoint, "build": w_build, "status": w_status, "plan": w_plan, "rerun": w_rerun,
           "inspect": w_inspect, "end of run": w_end_of_run}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_main(spec: dict[str, Any]) -> None:
    import resource

    result = WORKERS[spec["op"]](spec)
    result["heavy"] = _heavy_modules()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    module = next(sys.modules[m] for m in ("pipeline", "model", "jobs") if m in sys.modules)
    result["code_file"] = module.__file__
    Path(os.environ[RESULT_ENV]).write_text(json.dumps(result, default=str))


# ----------------------------------------------------------------------------------------------- orchestrator


class Runner:
    """Runs worker ops for one checkout in fresh subprocesses; counts S3 requests in moto's log around each."""

    def __init__(self, label: str, tag: str, code: Path, work: Path, rows: int, timeout_s: float):
        self.label, self.tag, self.code, self.work, self.timeout_s = label, tag, code, work, timeout_s
        self.rows = rows  # rows per shard of the outputs measured
        self.moto_log: Path | None = None
        self.s3_env: dict[str, str] = {}

    def env(self, s3: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "PYTHON"))}
        env.update(PYTHONPATH=str(self.code), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
        if s3:
            env.update(self.s3_env)
        return env

    def run(self, op: str, s3: bool = False, **spec: Any) -> dict[str, Any]:
        fd, result_path = tempfile.mkstemp(prefix="result-", suffix=".json", dir=self.work)
        os.close(fd)
        env = self.env(s3)
        env[RESULT_ENV] = result_path
        before = count_requests(self.moto_log) if s3 and self.moto_log else None
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-P", str(HERE), "--worker", json.dumps({"op": op, **spec})],
                              cwd=self.code, env=env, capture_output=True, text=True, timeout=self.timeout_s)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"[{self.label}] {op} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-5000:]}")
        result = json.loads(Path(result_path).read_text())
        os.unlink(result_path)
        result["process_s"] = wall
        if not str(result.get("code_file") or "").startswith(str(self.code)):
            raise RuntimeError(f"[{self.label}] {op} imported {result.get('code_file')}, not code from {self.code}")
        if before is not None:
            result["requests"] = count_requests(self.moto_log, settle=True) - before
            result["requests_by_method"] = requests_by_method(self.moto_log, before)
        return result


def count_requests(log: Path | None, settle: bool = False) -> int:
    """Request lines in moto's log so far (with `settle`, once the count has stopped moving)."""
    from tests.moto_server import request_kinds, settled_requests

    if log is None:
        return 0
    return len(settled_requests(log) if settle else request_kinds(log))


def requests_by_method(log: Path, skip: int) -> dict[str, int]:
    """Requests after the first `skip`, by kind (tests/moto_server.py::request_kinds)."""
    from tests.moto_server import request_kinds

    return dict(collections.Counter(request_kinds(log)[skip:]))


def git_describe(code: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def measure_output(r: Runner, *, where: str, n: int, manifest: Path, output: str, html: Path,
                   s3: bool) -> list[dict[str, Any]]:
    built = r.run("build", s3=s3, manifest=str(manifest), rows=r.rows)
    print(f"  [{r.label}] built {where} {n} shards in {built['seconds']:.1f}s"
          + (f" ({built['requests']} S3 requests)" if s3 else ""), flush=True)
    results = []
    for op in OPS:
        res = r.run(op, s3=s3, manifest=str(manifest), output=output, html=str(html))
        res.update(code=r.label, where=where, shards=n, op=op)
        _check(res, n)
        results.append(res)
        extra = f", {res['requests']} S3 requests" if s3 else ""
        print(f"  [{r.label}] {where} {n:>6} {op:<10} {res['seconds']:8.2f}s (process {res['process_s']:.2f}s"
              f"{extra})", flush=True)
    return results


def _check(res: dict[str, Any], n: int) -> None:
    """What each op must have found: every shard done, exit 0, no Ray started by the rerun."""
    check = res.get("check") or {}
    problems = []
    if res["op"] in ("status", "end of run") and check.get("done") != n:
        problems.append(f"shards_by_state {check}")
    if res["op"] == "plan" and (check.get("done") != n or check.get("to_run")):
        problems.append(f"plan {check}")
    if res["op"] in ("rerun", "inspect") and check.get("rc") != 0:
        problems.append(f"exit {check.get('rc')}")
    if res["op"] == "rerun" and not check.get("summary"):
        problems.append("no summary line")
    if res["op"] == "rerun" and (res.get("ray_initialized") or res.get("actors_line")):
        problems.append(f"Ray started (ray.is_initialized={res.get('ray_initialized')}, {res.get('actors_line')})")
    res["problems"] = problems
    if problems:
        print(f"  !! {res['code']} {res['where']} {n} {res['op']}: {'; '.join(problems)}", flush=True)


def measure_memory(r: Runner, n: int, rows: int, manifest: Path, output: str, html: Path) -> dict[str, Any]:
    built = r.run("build", manifest=str(manifest), rows=rows)
    res = r.run("inspect", output=output, html=str(html))
    res.update(code=r.label, where="local", shards=n, rows=rows, op="inspect memory", build_s=built["seconds"])
    res["check"] = res.get("check") or {}
    res["problems"] = [] if res.get("rc") == 0 else [f"exit {res.get('rc')}"]
    print(f"  [{r.label}] inspect {n} x {rows} rows: peak RSS {res['peak_rss_mib']:.0f} MiB "
          f"(after imports {res['rss_before_mib']:.0f}), {res['seconds']:.2f}s (build {built['seconds']:.1f}s)",
          flush=True)
    return res


def _imports(res: dict[str, Any]) -> str:
    heavy = [name for name, on in (res.get("heavy") or {}).items() if on]
    return ", ".join(heavy) or "none"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt_req(res: dict[str, Any]) -> tuple[str, str, str]:
    if "requests" not in res:
        return "-", "-", "-"
    by = " ".join(f"{k}={v}" for k, v in sorted(res["requests_by_method"].items()))
    return str(res["requests"]), f"{res['requests'] / res['shards']:.2f}", by


def tables(results: list[dict[str, Any]], labels: list[str]) -> str:
    out = []
    for label in labels:
        rows = []
        for res in (r for r in results if r["code"] == label and r["op"] != "inspect memory"):
            req, per, by = _fmt_req(res)
            rows.append([res["where"], res["shards"], res["op"], f"{res['seconds']:.3f}", f"{res['process_s']:.2f}",
                         req, per, by, f"{res['peak_rss_mib']:.0f}", _imports(res),
                         "; ".join(res["problems"]) or "ok"])
        if rows:
            out.append(f"\n{label}:\n")
            out.append(markdown_table(["store", "shards", "operation", "call s", "process s", "S3 requests",
                                       "requests/shard", "by kind", "peak RSS MiB", "torch/transformers/ray imported",
                                       "check"], rows))
    mem = [r for r in results if r["op"] == "inspect memory"]
    if mem:
        out.append("\ninspect memory (peak RSS of the inspect process, ru_maxrss):\n")
        out.append(markdown_table(
            ["code", "shards x rows", "peak RSS MiB", "RSS after imports MiB", "growth MiB", "inspect s"],
            [[r["code"], f"{r['shards']} x {r['rows']}", f"{r['peak_rss_mib']:.0f}", f"{r['rss_before_mib']:.0f}",
              f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}", f"{r['seconds']:.2f}"] for r in mem]))
    if len(labels) == 2:
        code, base = labels
        rows = []
        for res in (r for r in results if r["code"] == base):
            other = next((r for r in results if r["code"] == code and r["where"] == res["where"]
                          and r["shards"] == res["shards"] and r["op"] == res["op"]
                          and r.get("rows") == res.get("rows")), None)
            if other is None:
                continue
            if res["op"] == "inspect memory":
                rows.append([res["where"], f"{res['shards']} x {res['rows']}", "inspect peak RSS MiB",
                             f"{res['peak_rss_mib']:.0f}", f"{other['peak_rss_mib']:.0f}",
                             f"{res['peak_rss_mib'] / other['peak_rss_mib']:.2f}x", "-", "-", "-"])
                continue
            speed = res["seconds"] / other["seconds"] if other["seconds"] > 0 else float("inf")
            rb, rc = res.get("requests"), other.get("requests")
            rows.append([res["where"], res["shards"], res["op"], f"{res['seconds']:.3f}", f"{other['seconds']:.3f}",
                         f"{speed:.1f}x", "-" if rb is None else rb, "-" if rc is None else rc,
                         "-" if rb is None or not rc else f"{rb / rc:.1f}x"])
        out.append(f"\ncode = {code}, baseline = {base}; ratio = baseline / code (> 1: the code is faster, makes "
                   "fewer S3 requests, uses less memory):\n")
        out.append(markdown_table(["store", "shards", "operation", "baseline s", "code s", "ratio",
                                   "baseline S3 requests", "code S3 requests", "ratio"], rows))
    return "\n".join(out)


def parse_sizes(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip() and int(t) > 0]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))  # this repository's test helpers (manifests, the moto server, request counts)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", type=Path, default=REPO, help="checkout to measure (default: this repository)")
    p.add_argument("--baseline", type=Path, help="another checkout to measure the same way, for ratios")
    p.add_argument("--shards", default="1000,10000", help="local output sizes, comma-separated (default %(default)s)")
    p.add_argument("--rows", type=int, default=10, help="rows per shard of those outputs (default %(default)s)")
    p.add_argument("--s3-shards", default="1000", help="S3 output sizes (moto on 127.0.0.1); 0: none")
    p.add_argument("--mem-shards", default="10,100", help="inspect memory: output sizes (default %(default)s)")
    p.add_argument("--mem-rows", type=int, default=7000, help="inspect memory: rows per shard (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, under a minute a checkout: --shards 200 --s3-shards 50 --mem-shards 2,10 "
                        "--mem-rows 1000")
    p.add_argument("--work", type=Path, help="keep the outputs in this folder (default: a temporary folder, removed)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one subprocess may take (default %(default)s)")
    p.add_argument("--json", type=Path, help="also write every result here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.quick:
        args.shards, args.s3_shards, args.mem_shards, args.mem_rows = "200", "50", "2,10", 1000
    sizes, s3_sizes, mem_sizes = parse_sizes(args.shards), parse_sizes(args.s3_shards), parse_sizes(args.mem_shards)
    checkouts = [("code", args.code.resolve())] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    labels = [f"{name} ({git_describe(path)})" for name, path in checkouts]
    print(f"date {date.today()}  python {platform.python_version()}  {platform.platform()}  "
          f"cpus {len(os.sched_getaffinity(0))}")
    print("command: python benchmarks/metadata.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for label, (_, path) in zip(labels, checkouts):
        print(f"{label}: {path}")
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="metadata-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runners = [Runner(label, name, path, work, args.rows, args.timeout)
               for label, (name, path) in zip(labels, checkouts)]
    results: list[dict[str, Any]] = []
    try:
        ckpt = work / "tiny-pllava"
        if not (ckpt / "config.json").exists():
            runners[0].run("checkpoint", path=str(ckpt))
        for n in sizes:
            for r, out, manifest in local_outputs(runners, work, "out", n, ckpt):
                results += measure_output(r, where="local", n=n, manifest=manifest, output=str(out),
                                          html=work / f"inspect-{r.tag}-{n}.html", s3=False)
        if s3_sizes:
            results += measure_s3(runners, work, s3_sizes, ckpt)
        for n in mem_sizes:
            for r, out, manifest in local_outputs(runners, work, "mem", n, ckpt):
                results.append(measure_memory(r, n, args.mem_rows, manifest, str(out),
                                              work / f"inspect-mem-{r.tag}-{n}.html"))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(tables(results, labels))
    rerun = [r for r in results if r["op"] == "rerun"]
    for res in rerun:
        print(f"rerun {res['code']} {res['where']} {res['shards']}: exit {res['rc']}, ray.is_initialized "
              f"{res['ray_initialized']}, children {res['children'] or 'none'}, imported at module import: "
              f"{', '.join(k for k, v in res['heavy_at_import'].items() if v) or 'none'}, after: {_imports(res)}")
    if args.json:
        args.json.write_text(json.dumps({"labels": labels, "results": results}, indent=2, default=str))
    return 1 if any(r["problems"] for r in results) else 0


def measure_s3(runners: list[Runner], work: Path, sizes: list[int], ckpt: Path) -> list[dict[str, Any]]:
    """The same operations on an output under s3://bench/ on a moto server on 127.0.0.1 (tests/moto_server.py)."""
    import boto3

    from tests.moto_server import moto_server

    results = []
    log_dir = work / "moto"
    log_dir.mkdir(exist_ok=True)
    with moto_server(log_dir) as port:
        endpoint = f"http://127.0.0.1:{port}"
        s3_env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": S3_REGION,
                  "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                  "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_ENDPOINT_URL": endpoint}
        boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION, aws_access_key_id=S3_ACCESS_KEY,
                     aws_secret_access_key=S3_SECRET).create_bucket(Bucket=S3_BUCKET)
        for n in sizes:
            shard_spec = make_shard_files(work / f"shards-{n}", n)
            for r in runners:
                r.moto_log, r.s3_env = log_dir / "moto.log", s3_env
                out = f"s3://{S3_BUCKET}/out-{r.tag}-{n}"
                manifest = write_manifest(work / f"manifest-s3-{r.tag}-{n}.yaml", shards=shard_spec,
                                          output=out, model=ckpt)
                results += measure_output(r, where="s3", n=n, manifest=manifest, output=out,
                                          html=work / f"inspect-s3-{r.tag}-{n}.html", s3=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
