"""`recaption estimate MANIFEST`: what the job will cost, measured on a sample of its clips before it runs.

One actor with the job's own resources (a GPU, on a GPU cluster) runs the real path - decode, the engine,
both languages, the guards and repairs - on `--sample` clips spread over the shard list (pipeline/estimate.py)
and writes nothing into the output. Printed: clips/s per actor, mean tokens per clip in each language, the
share of rows by status and flag, the number of clips in the job (counted from local shards' tar headers, or
extrapolated for remote shards, and it says which), and the projected GPU-hours, wall time with the job's
actor count and, with `--gpu-hour-price`, the cost.

    python -m jobs.estimate manifests/demo.yaml --sample 32 --gpu-hour-price 2.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from jobs.recaption import (
    EXIT_OK,
    EXIT_USAGE,
    SetupFailure,
    actor_count,
    apply_overrides,
    check_cluster,
    check_device_setting,
    configure_logging,
    connect_ray,
    positive_int,
)
from pipeline.estimate import count_clips, pick_shards, project
from pipeline.manifest import ManifestError, load_manifest, resolve_paths
from pipeline.model_identity import checkpoint_files, model_identity
from pipeline.preflight import SetupError, check_engine, check_shards
from pipeline.settings import ActorSettings
from pipeline.shards import ShardReadError, expand_shard_spec

DEFAULT_SAMPLE = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recaption estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="YAML job spec (see manifests/)")
    p.add_argument("--sample", type=positive_int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"clips to caption for the measurement (default {DEFAULT_SAMPLE})")
    p.add_argument("--gpu-hour-price", type=float, metavar="P", help="price of one GPU-hour, for the cost line")
    p.add_argument("--shards", help="override the manifest's shards")
    p.add_argument("--model", help="override model.path")
    p.add_argument("--actors", type=positive_int, help="override resources.actors (the wall-time projection)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(output=None)
    return p


def estimate(m: Any, sample: int, gpu_hour_price: float | None) -> dict[str, Any]:
    checkpoint_files(m.model.path)
    shards = check_shards(expand_shard_spec(m.shards), m.storage)
    check_device_setting(m)
    check_engine(m.generation)
    size = count_clips(shards, m.storage)
    picks = pick_shards(shards, sample)
    ray = connect_ray()
    from jobs.actor import ShardCaptioner

    resources = ray.cluster_resources()
    check_cluster(m, resources)
    n_actors, num_gpus, num_cpus = actor_count(m, resources, len(shards))
    actor = ShardCaptioner.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0).remote(
        ActorSettings.from_manifest(m, model_identity=model_identity(m.model.path).digest), {})
    try:
        info = ray.get(actor.ready.remote())
        if info.get("error"):
            raise SetupFailure(f"the actor could not load the model ({m.model.path}): {info['error']}")
        measured = ray.get(actor.estimate.remote(picks))
    finally:
        ray.kill(actor, no_restart=True)
    return {
        "manifest": m.source,
        "sample": {"clips": measured["clips"], "shards": len(picks), "of_shards": len(shards)},
        "measured": measured,
        "actor": {"num_gpus": num_gpus, "num_cpus": num_cpus, "device": measured["device"]},
        "job": {"clips": size.keys, "how": size.how, "shards": len(shards), "actors": n_actors,
                "cluster_gpus": resources.get("GPU", 0.0)},
        "projection": project(measured["clips_per_s"], size.keys, num_gpus, n_actors, gpu_hour_price),
        "gpu_hour_price": gpu_hour_price,
    }


def format_estimate(e: dict[str, Any]) -> str:
    me, job, pr, actor = e["measured"], e["job"], e["projection"], e["actor"]
    lines = [
        f"measured on {me['clips']} clips from {e['sample']['shards']} of {e['sample']['of_shards']} shards, one "
        f"actor on {actor['device']} (num_gpus={actor['num_gpus']:g}, {me['slots']} engine slots), warm-up excluded:",
        f"  throughput   {me['clips_per_s']:.3f} clips/s per actor ({me['clips']} clips in {me['seconds']:.1f} s)",
        f"  tokens/clip  en {me['tokens_en_per_clip']:.1f}, zh {me['tokens_zh_per_clip']:.1f}; repairs "
        f"{me['repair_tokens_per_clip']:.1f} more ({me['repairs']} repair attempts)",
        "  rows         " + ", ".join(f"{k} {v:.0%}" for k, v in me["status_share"].items()),
        "  flags        " + (", ".join(f"{k} {v:.0%}" for k, v in me["flag_share"].items()) or "none"),
        f"the job: {job['clips']:,} clips in {job['shards']:,} shards ({job['how']})",
    ]
    if pr["actor_hours"] is None:
        lines.append("projection: no clip was captioned in the sample; nothing to project")
        return "\n".join(lines)
    if actor["num_gpus"] > 0:
        lines.append(f"projection: {pr['gpu_hours']:,.1f} GPU-hours; {pr['wall_hours']:,.2f} h wall with the job's "
                     f"{pr['actors']:g} actors ({job['cluster_gpus']:g} GPUs in the cluster)")
    else:
        lines.append(f"projection: {pr['actor_hours']:,.1f} actor-hours on CPUs (no GPU in this cluster); "
                     f"{pr['wall_hours']:,.2f} h wall with the job's {pr['actors']:g} actors")
    if pr["cost"] is not None:
        lines.append(f"cost: {pr['cost']:,.2f} at {e['gpu_hour_price']:g} per GPU-hour")
    lines.append("the sample is small: the rate and shares carry sampling noise (more with --sample N)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        m = resolve_paths(apply_overrides(load_manifest(args.manifest), args), os.getcwd())
        if args.gpu_hour_price is not None and args.gpu_hour_price < 0:
            raise ManifestError("--gpu-hour-price must be >= 0")
        result = estimate(m, args.sample, args.gpu_hour_price)
    except (ManifestError, ShardReadError, SetupError, SetupFailure, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result, indent=1) if args.json else format_estimate(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
