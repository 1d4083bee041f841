import re
from pathlib import Path

import pytest

from pipeline.manifest import (
    ManifestError,
    fingerprint,
    load_manifest,
    manifest_from_dict,
    resolve_paths,
    split_shard_list,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"shards": "s/{00000..00001}.tar", "output": "out", "model": {"path": "ckpt"}}


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_shipped_manifests_load():
    demo = load_manifest(REPO / "manifests/demo.yaml")
    assert demo.model.lora_alpha == 4.0 and demo.languages == ["en", "zh"]
    real = load_manifest(REPO / "manifests/panda70m.yaml")
    assert real.shards[0].startswith("s3://") and "{00000..09999}" in real.shards[0]
    assert real.model.dtype == "bfloat16" and real.zh.mode == "translate"


def test_the_shipped_manifests_gs_variant_is_a_valid_manifest(tmp_path):
    """manifests/panda70m.yaml shows a gs:// variant in a comment: uncommented in place of the s3:// lines, it loads."""
    text = (REPO / "manifests/panda70m.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith(("shards: s3://", "output: s3://"))]
    lines = [line[4:] if line.startswith("#   ") and line[4:].split(":")[0] in ("shards", "output", "storage")
             else line for line in lines]
    m = load_manifest(write(tmp_path, "\n".join(lines) + "\n"))
    assert m.shards[0].startswith("gs://") and m.output.startswith("gs://") and m.storage.gcs.project == "my-project"


def test_defaults_and_single_shard_string():
    m = manifest_from_dict(MINIMAL)
    assert m.shards == ["s/{00000..00001}.tar"]
    assert (m.model.lora_alpha, m.zh.variant, m.chunk_size, m.max_attempts) == (4.0, "zh-Hans", 256, 3)


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("shards: a.tar\noutput: o\nmodel: {path: m}\nbatchsize: 3\n", "unknown field 'batchsize'"),
        ("shards: a.tar\noutput: o\nmodel: {path: m, alpha: 4}\n", "unknown field 'model.alpha'"),
        ("shards: a.tar\noutput: o\n", "missing required field 'model'"),
        ("shards: a.tar\noutput: o\nmodel: {path: m, lora_alpha: four}\n", "'model.lora_alpha' must be a number"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\ngeneration: {batch_size: 2.5}\n",
         "'generation.batch_size' must be an integer"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\ngeneration: {batch_size: 0}\n",
         "'generation.batch_size' must be > 0"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\nzh: {variant: zh-CN}\n", "'zh.variant' is 'zh-CN'"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\nzh: {mode: mt}\n", "'zh.mt_model' is required"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\nlanguages: [zh]\n", "'languages'"),
        ("shards: [a.tar, 3]\noutput: o\nmodel: {path: m}\n", "'shards[1]' must be a string"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\nmax_attempts: true\n", "'max_attempts' must be an integer"),
        ("shards: a.tar\n  bad: [indent\n", "not valid YAML"),
    ],
)
def test_bad_manifests_name_file_and_field(tmp_path, yaml_text, needle):
    p = write(tmp_path, yaml_text)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert str(p) in str(e.value)
    assert needle in str(e.value)


def test_yaml_tags_are_not_executed(tmp_path):
    p = write(tmp_path, "shards: !!python/object/apply:os.system ['echo pwned']\noutput: o\nmodel: {path: m}\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(p)


def test_fingerprint_tracks_what_changes_captions_only():
    m = manifest_from_dict(MINIMAL)
    base, _ = fingerprint(m, "tiny@abc", "v1")
    same = manifest_from_dict({**MINIMAL, "output": "elsewhere", "generation": {"batch_size": 32},
                               "resources": {"actors": 7}, "shards": "other.tar"})
    assert fingerprint(same, "tiny@abc", "v1")[0] == base
    # the engine's slot count, sync rhythm and CUDA graphs do not change captions: an output resumes with others
    engine = manifest_from_dict({**MINIMAL, "generation": {"slots": 64, "sync_every": 8, "cuda_graphs": False}})
    assert fingerprint(engine, "tiny@abc", "v1")[0] == base
    for changed in [
        manifest_from_dict({**MINIMAL, "model": {"path": "ckpt", "lora_alpha": 8}}),
        manifest_from_dict({**MINIMAL, "generation": {"max_new_tokens": 100}}),
        manifest_from_dict({**MINIMAL, "zh": {"variant": "zh-TW"}}),
        manifest_from_dict({**MINIMAL, "prompts": {"en": "Describe."}}),
    ]:
        assert fingerprint(changed, "tiny@abc", "v1")[0] != base
    assert fingerprint(m, "tiny@abd", "v1")[0] != base
    assert fingerprint(m, "tiny@abc", "v2")[0] != base


def test_resolve_paths_keeps_urls_and_absolutises_local(tmp_path):
    m = manifest_from_dict({**MINIMAL, "shards": ["s3://b/{00000..00002}.tar", "local/{0..1}.tar", "/abs/x.tar"]})
    r = resolve_paths(m, tmp_path)
    assert r.shards == ["s3://b/{00000..00002}.tar", f"{tmp_path.resolve()}/local/{{0..1}}.tar", "/abs/x.tar"]
    assert r.output == str(tmp_path.resolve() / "out") and r.model.path == str(tmp_path.resolve() / "ckpt")


def test_shards_string_is_a_comma_separated_list_as_the_flag_takes(tmp_path):
    text = "s3://b/{00000..00001}.tar, local/a.tar ,,/abs/b.tar"
    m = load_manifest(write(tmp_path, f"shards: '{text}'\noutput: o\nmodel: {{path: m}}\n"))
    assert m.shards == ["s3://b/{00000..00001}.tar", "local/a.tar", "/abs/b.tar"] == split_shard_list(text)
    listed = load_manifest(write(tmp_path, "shards: ['a,b.tar', c.tar]\noutput: o\nmodel: {path: m}\n"))
    assert listed.shards == ["a,b.tar", "c.tar"]  # a YAML list keeps each item whole: a path with a comma
    with pytest.raises(ManifestError, match="'shards' must name at least one shard"):
        load_manifest(write(tmp_path, "shards: ' , '\noutput: o\nmodel: {path: m}\n"))


def test_home_is_expanded_in_every_local_path(tmp_path, monkeypatch):
    from pipeline.writing import OutputStore

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    m = manifest_from_dict({"shards": "~/s/{0..1}.tar, s3://b/~x.tar", "output": "~/out", "model": {"path": "~/ckpt"},
                            "score": {"model": "~/clip"}, "zh": {"mode": "mt", "mt_model": "~/mt"}})
    r = resolve_paths(m, tmp_path / "cwd")
    assert r.shards == [f"{home}/s/{{0..1}}.tar", "s3://b/~x.tar"]
    assert (r.output, r.model.path, r.score.model, r.zh.mt_model) == tuple(
        str(home / name) for name in ("out", "ckpt", "clip", "mt"))
    assert OutputStore("~/out").root == str(home / "out")  # `recaption status ~/out`, `inspect` too


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("shards: a.tar\nmodel:\n  path: m\noutput: o\nmodel:\n  path: n\n",
         "duplicate key 'model' (line 5; first at line 2)"),
        ("shards: a.tar\noutput: o\nmodel:\n  path: m\n  dtype: float16\n  dtype: float32\n",
         "duplicate key 'model.dtype' (line 6; first at line 5)"),
        ("shards: a.tar\noutput: o\nmodel: {path: m, lora_alpha: 2, lora_alpha: 4}\n",
         "duplicate key 'model.lora_alpha' (line 3; first at line 3)"),
        ("shards: a.tar\noutput: o\noutput: p\nmodel: {path: m}\n", "duplicate key 'output' (line 3; first at line 2)"),
        ("shards: a.tar\noutput: o\nmodel: {path: m}\nprompts:\n  en: A\n  zh_direct: B\n  en: C\n",
         "duplicate key 'prompts.en' (line 7; first at line 5)"),
    ],
)
def test_duplicate_keys_are_refused_with_field_and_lines(tmp_path, yaml_text, needle):
    p = write(tmp_path, yaml_text)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert str(e.value) == f"{p}: {needle}"


def test_merge_keys_overridden_explicitly_are_not_duplicates(tmp_path):
    p = write(tmp_path, "shards: a.tar\noutput: o\nmodel: {path: m}\ngeneration: &g {max_new_tokens: 5}\n"
                        "zh:\n  <<: *g\n  max_new_tokens: 7\n")
    m = load_manifest(p)
    assert (m.generation.max_new_tokens, m.zh.max_new_tokens) == (5, 7)


@pytest.mark.parametrize("literal, shown", [(".nan", "nan"), (".NaN", "nan"), (".inf", "inf"), ("-.inf", "-inf"),
                                            ("1.0e+999", "inf")])
@pytest.mark.parametrize("field", ["model.lora_alpha", "generation.repetition_penalty", "decode.timeout_s",
                                   "resources.num_gpus_per_actor", "resources.num_cpus_per_actor",
                                   "shard_timeout_s"])
def test_non_finite_numbers_are_refused(tmp_path, literal, shown, field):
    section, _, key = field.rpartition(".")
    extra = f"{section}: {{{key}: {literal}}}\n" if section and section != "model" else ""
    model = f"{{path: m, {key}: {literal}}}" if section == "model" else "{path: m}"
    top = f"{key}: {literal}\n" if not section else ""
    p = write(tmp_path, f"shards: a.tar\noutput: o\nmodel: {model}\n{extra}{top}")
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert str(e.value) == f"{p}: field '{field}' must be a finite number, got {shown}"


def test_huge_integer_for_a_float_field_is_refused():
    with pytest.raises(ManifestError, match="'model.lora_alpha' must be a finite number"):
        manifest_from_dict({**MINIMAL, "model": {"path": "m", "lora_alpha": 10**400}})


def test_nothing_non_finite_reaches_fingerprint_or_to_dict():
    import dataclasses

    m = manifest_from_dict(MINIMAL)
    for broken, field in [
        (m.replace(model=dataclasses.replace(m.model, lora_alpha=float("nan"))), "model.lora_alpha"),
        (m.replace(shard_timeout_s=float("inf")), "shard_timeout_s"),
        (m.replace(generation=dataclasses.replace(m.generation, repetition_penalty=float("-inf"))),
         "generation.repetition_penalty"),
    ]:
        with pytest.raises(ManifestError, match=f"field '{field}' must be a finite number"):
            broken.to_dict()
        with pytest.raises(ManifestError, match=f"field '{field}' must be a finite number"):
            fingerprint(broken, "sha256:0123456789abcdef", "v1")
    assert fingerprint(m, "sha256:0123456789abcdef", "v1")[0]  # finite: fine


def test_retry_policy_is_gathered_in_one_place():
    from pipeline.retry import RetryPolicy

    m = manifest_from_dict({**MINIMAL, "max_attempts": 5, "shard_timeout_s": 100,
                            "retry": {"stream_retries": 2, "watchdog_factor": 2.0, "watchdog_margin_s": 30}})
    policy = RetryPolicy.from_manifest(m)
    assert policy.watchdog_s == 230 and policy.stream_retries == 2 and policy.max_attempts == 5
    assert not policy.is_final(4) and policy.is_final(5)
    default = RetryPolicy.from_manifest(manifest_from_dict(MINIMAL))
    assert default.watchdog_s == 1.5 * 7200 + 60  # the driver's watchdog as before
    with pytest.raises(ManifestError, match="retry.watchdog_factor"):
        manifest_from_dict({**MINIMAL, "retry": {"watchdog_factor": 0}})
    assert fingerprint(m, "tiny@abc", "v1")[0] == fingerprint(manifest_from_dict(MINIMAL), "tiny@abc", "v1")[0]


@pytest.mark.parametrize("changes, needle", [
    ({"output": "hf://datasets/org/name/out"}, "field 'output' is on the Hugging Face Hub"),
    ({"output": "ftp://host/out"}, "field 'output' has the scheme ftp://"),
    ({"storage": {"gcs": {"endpoint_url": "http://user:pw@127.0.0.1:9023"}}}, "field 'storage.gcs.endpoint_url' must not contain a user"),
    ({"storage": {"azure": {"account": "DefaultEndpointsProtocol=https;AccountKey=abc"}}}, "field 'storage.azure.account'"),
    ({"storage": {"gcs": {"projct": "p"}}}, "projct"),
])
def test_storage_settings_are_checked(changes, needle):
    with pytest.raises(ManifestError, match=re.escape(needle)) as err:
        manifest_from_dict({**MINIMAL, **changes})
    assert "\n" not in str(err.value)


def test_storage_sections_for_each_store():
    m = manifest_from_dict({**MINIMAL, "output": "gs://bucket/out", "storage": {
        "gcs": {"project": "my-project", "endpoint_url": "http://127.0.0.1:9023"}, "azure": {"account": "acct"},
        "hf": {"endpoint_url": "https://hf-mirror.example.com"}}})
    assert (m.storage.gcs.project, m.storage.azure.account, m.storage.hf.endpoint_url) == (
        "my-project", "acct", "https://hf-mirror.example.com")
    for output in ("az://container/out", "abfss://c@acct.dfs.core.windows.net/out", "s3://b/out", "file:///tmp/out"):
        assert manifest_from_dict({**MINIMAL, "output": output}).output == output
