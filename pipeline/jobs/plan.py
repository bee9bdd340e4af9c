"""A resolved job (its request, version and folder) and the dry run's plan, which writes nothing.

What ``input`` says decides what a job does:

- ``input: {location: URL, text_column, id_column}``: a Parquet corpus (any fsspec URL) is
  embedded incrementally into a version of the job's output, then indexed and evaluated;
- ``input: {embeddings: URL}``: an existing output (a job folder, which follows its LATEST,
  a version folder, or any ``strata embed`` output): nothing is embedded; indexes and
  evaluations are made in that output, with its model and variants (index-only jobs);
- ``input: null``: no corpus; the job only evaluates the variants (a model comparison).

Output layout and versioning::

    {output}/{name}/
      LATEST               {"version": "v-…", …}: the last version whose whole job succeeded,
                           replaced atomically (write aside, then rename) only at the very end
      v-{hash}/            one folder per hash of the request's signature (model name, weights
                           digest, variants, max_length, dtype, normalize, format, text_column,
                           id_column: ``Request.signature``, the same dict the manifest keeps)
        version.json       the hashed settings, readable
        manifest.json, embeddings/   the corpus embeddings (pipeline.runner, incremental)
        indexes/           {variant}.faiss (+ .ids.parquet, .json), and _built.json: which
                           committed embedding files each index was built from
        eval-cache/        evaluation texts, embedded once by pipeline.evaluate (a strata output)
        eval/results.json  tidy rows, merged across runs
        report.md, heatmap_*.png
        job.json           the spec and summary of the last run into this version

The version is a content hash rather than a counter so that two machines (or a dry run and
the real run) name the same settings the same way without a shared counter to update, and
re-running an old spec finds its old version again instead of re-embedding everything. A
change of model or variants therefore lands in a new folder next to the old ones, which stay
complete and readable; a change of input shards, batch_tokens or resources does not (the
runner's incremental plan handles changed shards in place).

An index is rebuilt when the list of committed embedding files it was built from differs from
the manifest's (a shard embedded, changed or dropped — committed outputs get fresh folder
names), when its files are missing, or when its kind changed; otherwise it is left alone.
"""


from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import models
from ..index import index_status as _index_status
from ..request import EncodeSettings, ModelInfo, Request, Resources, device_type, resolve
from ..storage import Output, overlap_message, redact
from ..stores import check_bucket, filesystem, open_ranged
from ..stores import exists
from ..templates import SLOT, Template
from ..variants import Variant
from .checks import check_variants
from .messages import JobSpecError, Problem, one_line, short_list
from .spec import JobSpec
from .workspace import Workspace, join, local_path

LATEST = "LATEST"
VERSION_FILE = "version.json"
EVAL_CACHE = "eval-cache"
CHARS_PER_TOKEN_ESTIMATE = 4  # dry-run token estimate: uncompressed text bytes / 4


@dataclass
class Job:
    """A validated spec with everything resolved that the run and the dry run need."""

    spec: JobSpec
    variants: tuple[Variant, ...]
    n_layers: int | None
    model_ref: str
    weights_digest: str | None
    # The one resolution of model, variants and settings; None only for an input.embeddings
    # job without evaluations (it never runs the model, which need not be at hand).
    request: Request | None
    job_url: str | None = None  # {output}/{name}; None for input.embeddings jobs
    version: str | None = None
    version_url: str = ""
    version_key: dict = field(default_factory=dict)
    recipe: Any = None  # probe.Recipe: derived variants made with the probe's own pieces

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def derivations(self):
        """The spec's mixes and transforms, for the evaluations (learned mixes need their labels)."""
        from ..derive import Derivations
        from ..evaldata import load_beir, load_sts
        from ..transforms import parse_transforms
        from ..variants import parse_mixes

        v = self.spec.variants
        labels = None
        if v.mix_labels:
            p = Path(local_path(v.mix_labels))
            labels = load_beir(p, split="train") if p.is_dir() else load_sts(p)
        return Derivations(mixes=parse_mixes(v.mixes, self.n_layers), transforms=parse_transforms(v.transforms),
                           mix_labels=labels)


def version_id(key: dict) -> str:
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return "v-" + hashlib.sha256(blob).hexdigest()[:12]


def _resources(spec: JobSpec) -> Resources:
    r = spec.resources
    return Resources(actors=r.actors, gpus_per_actor=r.gpus_per_actor, ray_address=r.ray_address)


def resolve_job(spec: JobSpec) -> Job:
    """Resolve the request (model, digest, depth, variants), the version and its folder of a job."""
    try:
        if spec.mode == "existing":
            return _resolve_existing(spec)
        depth = models.depth(spec.model.spec, trust_remote_code=spec.model.trust_remote_code)
        check_variants(spec, depth)
        e = spec.embedding
        request = resolve(spec.model.spec, layers=spec.variants.layers, poolings=spec.variants.poolings,
                          max_length=e.max_length, dtype=e.dtype, normalize=e.normalize, batch_tokens=e.batch_tokens,
                          output_format=e.format, resources=_resources(spec), templates=spec.variants.templates,
                          append_eos=e.append_eos, trust_remote_code=spec.model.trust_remote_code,
                          allow_pickle=spec.model.allow_pickle)
    except Problem as p:
        raise JobSpecError(one_line(spec.source, p.loc, p.message)) from None
    except (models.ModelError, OSError) as e:
        raise JobSpecError(one_line(spec.source, "model.spec", str(e))) from None
    recipe = _recipe(spec, request)
    inp = spec.input
    key = request.signature(inp.text_column if inp else "text", inp.id_column if inp else None)
    if recipe is not None:  # other pieces, other vectors: another version
        key = {**key, "recipe": recipe.probe_sha256[:16]}
    job_url = join(local_path(spec.output), spec.name)
    version = version_id(key)
    return Job(spec=spec, variants=request.variants, n_layers=request.model.n_layers, model_ref=request.model.name,
               weights_digest=request.model.weights_digest, request=request, job_url=job_url, version=version,
               version_url=join(job_url, version), version_key=key, recipe=recipe)


def _recipe(spec: JobSpec, request: Request):
    """The spec's probe recipe, checked against the request: same weights, every source embedded."""
    if not spec.variants.recipe:
        return None
    from ..recipe import Recipe, RecipeError as ProbeError

    try:
        recipe = Recipe.load(local_path(spec.variants.recipe), top=spec.variants.recipe_top)
        recipe.check_model(request)
    except ProbeError as e:
        raise JobSpecError(one_line(spec.source, "variants.recipe", str(e))) from None
    missing = [s.name for s in recipe.sources() if s not in request.variants]
    if missing:
        raise JobSpecError(one_line(spec.source, "variants.recipe", f"the recipe needs {', '.join(missing)}, which "
                                    f"variants.layers/poolings/templates do not embed"))
    return recipe


def _resolve_existing(spec: JobSpec) -> Job:
    url = local_path(spec.input.embeddings)
    out = Output(url)
    manifest = out.read_manifest()
    if manifest is None:
        latest = out.read_json(LATEST)
        if latest is None:
            raise Problem("input.embeddings", f"no strata output at {redact(url)} (neither manifest.json nor "
                                              f"{LATEST} found)")
        url = join(url, latest["version"], *(("published", latest["published"]) if latest.get("published") else ()))
        manifest = Output(url).read_manifest()
        if manifest is None:
            raise Problem("input.embeddings", f"{LATEST} points to {redact(url)}, which has no manifest.json")
    sig = manifest.get("signature", {})
    variants = tuple(Variant.from_row(v) for v in manifest.get("variants", []))
    if not variants:
        raise Problem("input.embeddings", f"the manifest at {redact(url)} lists no variants")
    names = [v.name for v in variants]
    if spec.indexes and spec.indexes.variants:
        for i, name in enumerate(spec.indexes.variants):
            if name not in names:
                raise Problem(f"indexes.variants[{i}]", f"{name} is not in the existing output "
                                                        f"({short_list(names)})")
    ref = sig.get("model") or manifest.get("model", {}).get("name")
    request = None
    if spec.evaluations:  # evaluations embed their texts: the output's model and settings, exactly
        settings = EncodeSettings(max_length=sig.get("max_length", 512), dtype=sig.get("dtype", "float32"),
                                  normalize=sig.get("normalize", False), append_eos=sig.get("append_eos", False))
        templates = tuple(Template(n, t) for n, t in sig.get("templates", {"plain": SLOT}).items())
        base = resolve(ref, layers=str(variants[0].layer), poolings=variants[0].pooling,
                       trust_remote_code=spec.model.trust_remote_code, allow_pickle=spec.model.allow_pickle)
        model = ModelInfo(**{**base.model.__dict__, "weights_digest": sig.get("weights_digest")})
        request = Request(model=model, variants=variants, settings=settings.for_device(device_type()),
                          output_format=sig.get("format", "parquet"), resources=_resources(spec), templates=templates)
    n_layers = request.model.n_layers if request else (manifest.get("model", {}).get("n_layers")
                                                       or (models.depth(ref, load=False) if ref else None))
    return Job(spec=spec, variants=variants, n_layers=n_layers, model_ref=ref, weights_digest=sig.get("weights_digest"),
               request=request, version=url.rstrip("/").rsplit("/", 1)[-1], version_url=url)


def preflight(job: Job) -> None:
    """Problems that would otherwise surface only after the (expensive) embedding, or after a first
    write: an output that overlaps the input (resolved, so a symlink into INPUT counts) or whose
    bucket does not exist."""
    if job.job_url:
        check_bucket(*filesystem(job.job_url), job.job_url)
        if job.spec.mode == "corpus":
            problem = overlap_message(local_path(job.spec.input.location), job.job_url)
            if problem:
                raise JobSpecError(one_line(job.spec.source, "output", problem))
    for i, ev in enumerate(job.spec.evaluations):
        p = Path(local_path(ev.data))
        if ev.task == "sts" and not p.is_file():
            raise JobSpecError(one_line(job.spec.source, f"evaluations[{i}].data", f"{ev.data}: file not found "
                                        f"(relative paths resolve against {os.getcwd()})"))
        if ev.task == "retrieval" and not (p / "qrels" / f"{ev.split}.tsv").is_file():
            raise JobSpecError(one_line(job.spec.source, f"evaluations[{i}].data",
                                        f"{ev.data}: not a BEIR folder with qrels/{ev.split}.tsv "
                                        f"(relative paths resolve against {os.getcwd()})"))
        if ev.task not in ("sts", "retrieval"):  # read now: a bad file fails before any embedding
            try:
                eval_data(ev)
            except ValueError as e:
                raise JobSpecError(one_line(job.spec.source, f"evaluations[{i}].data", str(e))) from None


def eval_data(ev):
    """An evaluation's data as its evaluator scores it: STS pairs, a BEIR set (the spec's split and
    subset), or a task type's ``Prepared`` data (``pipeline.tasks``: classification, clustering, pairs,
    reranking) with the spec's protocol options."""
    if ev.task == "sts":
        from ..evaldata import load_sts

        return load_sts(local_path(ev.data))
    if ev.task == "retrieval":
        from ..evaluate import load_retrieval

        return load_retrieval(local_path(ev.data), split=ev.split, max_queries=ev.max_queries, max_docs=ev.max_docs)
    from ..tasks import prepare

    return prepare(ev.task, local_path(ev.data), **ev.model_dump(exclude={"task", "data"}, exclude_none=True))


def index_targets(job: Job) -> list[Variant]:
    if job.spec.indexes is None:
        return []
    if job.spec.indexes.variants:
        return [Variant.parse(n) for n in job.spec.indexes.variants]
    return job.recipe.variants if job.recipe is not None else list(job.variants)


def index_status(job: Job, manifest: dict | None, url: str | None = None) -> tuple[list[Variant], list[Variant]]:
    """(indexes to (re)build, indexes up to date) of the folder the job indexes (``url``: its published
    version; default the version folder)."""
    targets = index_targets(job)
    if not targets:
        return [], []
    return _index_status(url or job.version_url, manifest or {}, targets, job.spec.indexes.kind)


def _text_bytes(fs, path: str, column: str) -> int:
    import pyarrow.parquet as pq

    with open_ranged(fs, path) as f:
        meta = pq.ParquetFile(f).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names:
        return 0
    j = names.index(column)
    return sum(meta.row_group(i).column(j).total_uncompressed_size for i in range(meta.num_row_groups))


def plan_job(job: Job) -> dict:
    """What ``run_job`` would do; reads the input's footers and the existing manifest, writes nothing."""
    from ..runner import inspect_shards, list_shards, plan

    spec = job.spec
    plan_d: dict[str, Any] = {"job": spec.name, "spec": spec.source, "mode": spec.mode, "model": job.model_ref,
                              "weights_digest": job.weights_digest, "n_layers": job.n_layers,
                              "variants": job.variant_names, "version": job.version,
                              "version_path": redact(job.version_url), "dry_run": True}
    out = Output(job.version_url)
    if job.job_url:
        latest = Output(job.job_url).read_json(LATEST)
        plan_d["latest"] = latest["version"] if latest else None
        plan_d["version_exists"] = exists(out.fs, out.path(VERSION_FILE))
    manifest = out.read_manifest()
    if spec.mode == "corpus":
        fs, shards = list_shards(local_path(spec.input.location))
        inspect_shards(fs, shards, spec.input.text_column, spec.input.id_column)
        todo, keep, drop = plan(manifest, shards)
        known = {e["rel"] for e in (manifest or {}).get("shards", [])}
        unreadable = [s for s in todo if s.error]
        todo = [s for s in todo if not s.error]
        text_bytes = sum(_text_bytes(fs, s.path, spec.input.text_column) for s in todo)
        plan_d["shards"] = {
            "total": len(shards),
            "embed": [{"shard": s.rel, "rows": s.rows, "why": "changed" if s.rel in known else "new"} for s in todo],
            "skip": [e["rel"] for e in keep], "drop": [e["rel"] for e in drop],
            "unreadable": {s.rel: s.error for s in unreadable},
        }
        plan_d["rows_to_embed"] = sum(s.rows for s in todo)
        if job.request is not None:  # the whole output's size once embedded (docs/scale.md)
            from ..sizing import projection

            total_rows = sum(s.rows for s in shards if not s.error)
            plan_d["projected_bytes"] = {"rows": total_rows, **projection(job.request, total_rows)}
        plan_d["estimated_tokens"] = text_bytes // CHARS_PER_TOKEN_ESTIMATE
    if spec.indexes is not None:
        if plan_d.get("shards", {}).get("embed") or plan_d.get("shards", {}).get("drop"):
            # every index covers every shard: any embedded or dropped shard touches all of them
            plan_d["indexes"] = {"build": [v.name for v in index_targets(job)], "up_to_date": []}
        else:
            url = job.version_url
            if job.job_url:  # a versioned job indexes its published version (versions.py)
                from . import versions

                latest = Output(job.job_url).read_json(LATEST)
                published = versions.current(out, latest, job.version) or versions.latest_of_series(out)
                url = versions.published_url(job.version_url, published) if published else None
            if url is None:  # a new version will be published: every index is built for it
                plan_d["indexes"] = {"build": [v.name for v in index_targets(job)], "up_to_date": []}
            else:
                stale, fresh = index_status(job, Output(url).read_manifest(), url)
                plan_d["indexes"] = {"build": [v.name for v in stale], "up_to_date": [v.name for v in fresh]}
    plan_d["evaluations"] = _eval_plan(job)
    plan_d["report"] = spec.wants_report
    return plan_d


def _eval_plan(job: Job) -> list[dict]:
    """Per evaluation: its texts, how many the evaluation cache lacks, and their estimated tokens."""
    from ..evaluate import text_id, texts_of

    ws = Workspace(job.version_url, job.spec.name, job.version or "")
    cache = Output(str(ws.dir / EVAL_CACHE))
    cached: set[str] = set()
    if cache.read_manifest():
        cached = set(cache.read_table(["id"]).column("id").to_pylist())
    out = []
    for ev in job.spec.evaluations:
        unique = {text_id(t): t for t in texts_of(eval_data(ev))}
        missing = [t for i, t in unique.items() if i not in cached]
        out.append({**ev.model_dump(), "texts": len(unique), "to_embed": len(missing),
                    "estimated_tokens": sum(len(t.encode()) for t in missing) // CHARS_PER_TOKEN_ESTIMATE})
    return out


def print_plan(p: dict, say) -> None:
    say(f"job {p['job']} ({p['spec']}): DRY RUN, nothing is embedded or written")
    say(f"  model: {p['model']} ({p['weights_digest'] or 'digest unknown'}, {p['n_layers'] or '?'} layers)")
    say(f"  variants ({len(p['variants'])}): {short_list(p['variants'], 12)}")
    if p["mode"] == "existing":
        say(f"  existing output: {p['version_path']} (nothing to embed)")
    else:
        if p.get("version_exists"):
            state = "existing version" + (", the current LATEST" if p.get("latest") == p["version"] else "")
        else:
            state = "NEW version" + (f"; LATEST is {p['latest']} and stays until this job succeeds"
                                     if p.get("latest") else "")
        say(f"  version: {p['version']} at {p['version_path']} ({state})")
    if "shards" in p:
        s = p["shards"]
        say(f"  input: {s['total']} shard(s): embed {len(s['embed'])}, skip {len(s['skip'])}, drop {len(s['drop'])}"
            + (f", unreadable {len(s['unreadable'])}" if s["unreadable"] else ""))
        for e in s["embed"]:
            say(f"    embed {e['shard']} ({e['rows']:,} rows, {e['why']})")
        for rel in s["drop"]:
            say(f"    drop  {rel} (no longer in the input)")
        for rel, err in s["unreadable"].items():
            say(f"    unreadable {rel}: {err}")
        say(f"  estimated tokens to embed: ~{p['estimated_tokens']:,} (an estimate: uncompressed text bytes / "
            f"{CHARS_PER_TOKEN_ESTIMATE}) in {p['rows_to_embed']:,} rows")
        if p.get("projected_bytes"):
            from ..sizing import human

            b = p["projected_bytes"]
            say(f"  projected output: {b['rows']:,} rows x {len(p['variants'])} variant(s) = {human(b['total'])} "
                f"({human(b['ids'])} of it ids; docs/scale.md)")
    if "indexes" in p:
        ix = p["indexes"]
        say(f"  indexes to (re)build: {short_list(ix['build']) or 'none'}; up to date: "
            f"{short_list(ix['up_to_date']) or 'none'}")
    for ev in p["evaluations"]:
        say(f"  evaluate: {ev['task']} on {ev['data']}: {ev['texts']:,} unique texts, {ev['to_embed']:,} not in "
            f"{EVAL_CACHE}/ yet (~{ev['estimated_tokens']:,} tokens, estimated)")
    if p["report"]:
        say(f"  report: {p['version_path']}/report.md")
    if p["mode"] != "existing":
        say(f"  then {LATEST} -> {p['version']}")


