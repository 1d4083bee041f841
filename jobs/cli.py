"""`recaption`: one command for operators.

    recaption run MANIFEST [...]              run or resume a job (same as python -m jobs.recaption)
    recaption estimate MANIFEST [...]         clips/s, tokens, GPU-hours and cost, measured on a sample
    recaption status OUT [--json]             per-shard state, rows by status, throughput and ETA
    recaption inspect OUT --html FILE [...]   HTML contact sheet of sampled clips
    recaption make-tiny-checkpoint OUTDIR     tiny random PLLaVA in the released layout (tests, demo)
    recaption make-synthetic-shards OUTDIR    Panda-70M-style webdataset shards with real H.264 clips
    recaption make-tiny-clip OUTDIR           tiny random CLIP in the Hugging Face layout (score.model tests)

`recaption SUBCOMMAND --help` lists each subcommand's flags. The module entry points
(`python -m jobs.recaption`, ...) stay the ones to use with `ray job submit`.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "run": ("jobs.recaption", "run or resume a re-captioning job"),
    "estimate": ("jobs.estimate", "measure a sample of clips: clips/s, tokens, GPU-hours and cost"),
    "status": ("jobs.status", "per-shard state, rows by status, throughput and ETA"),
    "inspect": ("jobs.inspect", "HTML contact sheet of sampled clips with their captions"),
    "make-tiny-checkpoint": ("model.tiny", "write a tiny random PLLaVA in the released checkpoint layout"),
    "make-synthetic-shards": ("pipeline.synthetic", "write Panda-70M-style webdataset shards"),
    "make-tiny-clip": ("model.tiny_clip", "write a tiny random CLIP in the Hugging Face layout (score.model)"),
}


def usage() -> str:
    lines = ["usage: recaption SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<24}{text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`recaption SUBCOMMAND --help` for a subcommand's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"recaption: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sys.argv[0] = f"recaption {name}"  # argparse's prog for the modules that take it from argv[0]
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
