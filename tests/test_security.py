"""Untrusted models and careless configs: no remote code, no pickles, no leaked secrets, no escapes."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import models
from pipeline.runner import list_shards
from reference import embed
from pipeline.storage import redact, safe_name, shard_key


@pytest.mark.parametrize("url, secret", [
    ("s3://AKIAEXAMPLE:s3cr3tKey@bucket/corpus/", "s3cr3tKey"),
    ("https://host/data.parquet?X-Amz-Signature=deadbeef&part=1", "deadbeef"),
    ("gs://bucket/x?access_token=ya29.tok", "ya29.tok"),
    ("https://user:hunter2@host/path", "hunter2"),
])
def test_redact_removes_credentials(url, secret):
    clean = redact(url)
    assert secret not in clean and "***" in clean


def test_redact_hides_a_password_holding_an_unencoded_at_sign():
    assert redact("s3://AKIAEXAMPLE:p@ssw0rd@bucket/corpus/") == "s3://***@bucket/corpus/"
    assert redact("https://host/x?part=a@b") == "https://host/x?part=a@b"  # an "@" past the authority stays


# AWS's documented example secret key: like many real ones it holds "/", which ends a URL's authority
SLASH_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("text, clean", [
    (f"s3://AKIAIOSFODNN7EXAMPLE:{SLASH_SECRET}@bucket/corpus/", "s3://***@bucket/corpus/"),
    ("gcs://user:a/b+c@d@bucket/x.parquet", "gcs://***@bucket/x.parquet"),  # "/", "+" and "@" at once
    # as fsspec leaves it with the protocol stripped, inside an error message
    (f'Invalid bucket name "AKIAIOSFODNN7EXAMPLE:{SLASH_SECRET}@bucket": no such bucket',
     'Invalid bucket name "***@bucket": no such bucket'),
    (f"/tmp/AKIAIOSFODNN7EXAMPLE:{SLASH_SECRET}@bucket/x.parquet", "/tmp/***@bucket/x.parquet"),
    # a secret that starts with "/" or with digits (not a port after an access key), an empty user
    ("s3://AKIAIOSFODNN7EXAMPLE:/abc/def@bucket/x", "s3://***@bucket/x"),
    ("AKIAIOSFODNN7EXAMPLE:1234/abc@bucket/x", "***@bucket/x"),
    (f"s3://:{SLASH_SECRET}@bucket/x", "s3://***@bucket/x"),
    # the query string stays (its own secrets apart), as do the other URLs of a list
    (f"s3://AKIAIOSFODNN7EXAMPLE:{SLASH_SECRET}@bucket/x?versionId=1&token=t0k",
     "s3://***@bucket/x?versionId=1&token=***"),
    (f"s3://K:{SLASH_SECRET}@b/x,s3://c/d@e", "s3://***@b/x,s3://c/d@e"),
    (f"/data/x@y/AKIAIOSFODNN7EXAMPLE:{SLASH_SECRET}@bucket/x", "/data/x@y/***@bucket/x"),
    ("s3://KEYUSER:a,b/c@bucket/x", "s3://***@bucket/x"), ("url=K:PWsecret/x@b", "url=***@b"),
    ("https://user:a]b/c@host/p", "https://***@host/p"), ("123:Sx/y@b", "***@b"),
    # secrets without "/" that hold "?" or "#"
    ("https://user:pw?x@host/p", "https://***@host/p"), ("s3://K:ab#cd@b", "s3://***@b"),
    ("https://user:1#abc@host/p", "https://***@host/p"), ("postgresql://admin:8?Qx!pw@db:5432/x", "postgresql://***@db:5432/x"),
    # inside brackets that are not an IPv6 literal; digit users that are not a clock time
    (f"paths=[s3://AKIAIOSFODNN7EXAMPLE:{SLASH_SECRET}@bucket/x]", "paths=[s3://***@bucket/x]"),
    ("[user:hunter2@host/x]", "[***@host/x]"),
    ("123456789012:12abcDEF/ghi@bucket/x", "***@bucket/x"), ("7:41MTXxsS9O/2cpUg@bucket/x", "***@bucket/x"),
])
def test_redact_hides_a_secret_holding_a_slash(text, clean):
    assert redact(text) == clean


def test_redact_keeps_ports_and_at_signs_in_paths():
    for text in ("http://localhost:8080/a@b.parquet", "http://[::1]:8080/a@b", "served at localhost:8000/x@y",
                 "file:///tmp/x@y.parquet", "https://host/x?part=a@b", "http://[2001:db8::1]/a@b",
                 "[2001:db8::1]:8080/a@b", "C:/Users/me@corp/x.parquet", "at 12:30:45/foo@bar", "ray://head:10001",
                 "file:/tmp/a@b", "path:/data/x@y", "http://[fe80::1%eth0]:8080/a@b", "C:\\Users\\bob@corp\\x",
                 "s3://b/c@d,s3://e/f@g"):
        assert redact(text) == text


@pytest.mark.parametrize("line", ["a:b/" * 50_000, "@:/" * 70_000, "ab:" * 70_000 + "/@", "x:" + "/" * 200_000 + "@",
                                  "ab:" * 70_000, ":" * 200_000 + "@", "a:b@" * 50_000, "?" * 200_000, "?a" * 100_000,
                                  "a." * 100_000 + "@", "[:" * 100_000 + "@", "&" + "token" * 40_000, "?" + "key" * 66_000, "[" + ":" * 200_000 + "@",
                                  ",".join(f"s3://b/run=2024-01-01T12:30:45/part-{i}@x" for i in range(4_000))])
def test_redact_is_linear_on_long_lines(line):
    """Every log line and traceback passes through redaction: the regexes used before took 4 s on 60,000
    characters of "ab:", 6 s on 10,000 of "?" and a first regex for secrets holding "/" 86 s on 10,000
    of "a:b/"; every line here, 200,000 characters, takes at most about 0.3 s (the bound is 5 s)."""
    import time

    t0 = time.perf_counter()
    redact(line)
    assert time.perf_counter() - t0 < 5.0


def test_redact_keeps_harmless_urls():
    assert redact("s3://bucket/corpus/part-1.parquet") == "s3://bucket/corpus/part-1.parquet"
    assert redact("/local/path/x.parquet") == "/local/path/x.parquet"


def test_errors_do_not_leak_credentials(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        list_shards(f"file://{tmp_path}/missing?token=SUPERSECRET")
    assert "SUPERSECRET" not in str(e.value)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/../../b", "..", "L15.mean/../../x", "\x00evil"])
def test_names_cannot_escape_a_directory(name):
    for safe in (safe_name(name), shard_key(name)):
        assert "/" not in safe and "\x00" not in safe and safe not in ("", ".", "..") and not safe.startswith(".")


def test_remote_code_never_runs_without_opt_in(tmp_path):
    marker = tmp_path / "code-ran"
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "strata_evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.load(str(d))
    assert not marker.exists()


def test_pickle_only_model_refused_before_work_and_embedded_when_allowed(tmp_path, model_dir, ray_local):
    import shutil

    import torch
    from transformers import AutoModel

    d = tmp_path / "pickled"
    shutil.copytree(model_dir, d)
    torch.save(AutoModel.from_pretrained(model_dir).state_dict(), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"]}), tmp_path / "in.parquet")
    with pytest.raises(ValueError, match=r"only pickle-format weights \(pytorch_model.bin\)"):
        embed(str(tmp_path / "in.parquet"), str(tmp_path / "out"), model=str(d), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    # opting in reaches the Ray actors too, not only the driver
    summary = embed(str(tmp_path / "in.parquet"), str(tmp_path / "out"), model=str(d), progress=False,
                    allow_pickle=True)
    assert summary.rows == 2 and summary.shards_embedded == 1


def test_output_not_writable_fails_before_work(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in" / "a.parquet")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        embed(str(tmp_path / "in"), str(blocker / "out"), model="all-minilm-l6-v2", progress=False)


def test_unknown_model_named_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(models.ModelError, match="unknown model 'no-such-model'"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model="no-such-model", progress=False)


def test_bad_variant_specs_fail_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in" / "a.parquet")
    from pipeline.variants import SpecError

    with pytest.raises(SpecError, match="out of range"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model="all-minilm-l6-v2", layers="7", progress=False)
    with pytest.raises(SpecError, match="unknown pooling 'avg'"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model="all-minilm-l6-v2", poolings="avg", progress=False)
    assert not (tmp_path / "out" / "embeddings").exists()


def test_missing_id_column_lists_available_columns(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"doc": ["a"], "text": ["x"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(ValueError, match="id column 'id' not found.*available columns: doc, text"):
        embed(str(tmp_path / "in"), str(tmp_path / "out"), model="all-minilm-l6-v2", id_column="id", progress=False)
