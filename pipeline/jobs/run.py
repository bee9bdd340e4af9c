"""``strata run``: a resolved job executed, embed (incremental) -> index -> evaluate -> report -> LATEST.

Each stage works in the job's version folder (``plan.py`` documents its layout); LATEST
moves only once every stage has succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import hide_secrets, redact_text
from ..storage import Output, redact, utc_now
from .load import load_spec
from .messages import short_list
from .plan import (EVAL_CACHE, LATEST, VERSION_FILE, Job, eval_data, index_status, plan_job, preflight, print_plan,
                   resolve_job)
from . import versions
from .workspace import Workspace, join, local_path

JOB_FILE = "job.json"


def build_indexes(job: Job, url: str, variants: list, manifest: dict, say, previous: str | None = None) -> list[dict]:
    """Build the job's stale indexes in ``url`` (its published version, or an existing output); on an
    object store the parts are read in ranged reads and each index is uploaded
    (``pipeline.index.build_indexes``): no copy of the embeddings on local disk. ``previous``: the
    version LATEST named, whose indexes are updated (rows of dropped files deleted, new ones added)
    where the update keeps its promise, else rebuilt (``pipeline/index/update.py``)."""
    from ..index import build_indexes as build

    done = []

    def built(v, params, seconds):
        up = params.get("update")
        how = (f"updated from the previous version: {up['deleted']:,} deleted, {up['added']:,} added" if up
               else f"built ({params.get('rebuilt')})")
        done.append({"variant": v.name, "kind": params["kind"], "rows": params["rows"], "seconds": round(seconds, 3),
                     "update": up, "rebuilt": None if up else params.get("rebuilt")})
        say(f"  index {v.name}: {params['kind']}, {params['rows']:,} vectors, {how}")

    build(url, variants, job.spec.indexes.kind, manifest=manifest, on_built=built, rescore=job.spec.indexes.rescore,
          previous=previous)
    return done


def run_evaluations(job: Job, ws: Workspace, progress: bool, say) -> list[dict]:
    from ..evaluate import RayEncoder, evaluate_prepared, evaluate_retrieval, evaluate_sts, texts_of
    from ..quantize import Quantized, is_quantized
    from ..report import merge_results

    # The Ray pipeline with a cache in the version folder: a re-run embeds no text twice.
    encoder = RayEncoder(job.request, ws.dir / EVAL_CACHE, progress=progress)
    derivations = job.derivations()
    dtype = job.request.settings.dtype
    # a quantised job is scored as its indexes answer: documents quantised, its rescore multiplier
    quantized = Quantized(dtype, rescore=job.spec.indexes.rescore if job.spec.indexes else 0,
                          calibration_rows=job.spec.embedding.calibration_rows) if is_quantized(dtype) else None
    loaded = [eval_data(ev) for ev in job.spec.evaluations]
    # every evaluation's texts in one run of the pipeline: the model is loaded once, not once per evaluation
    encoder.prefetch([t for data in loaded for t in texts_of(data)])
    rows: list[dict] = []
    for ev, data in zip(job.spec.evaluations, loaded):
        t0 = time.perf_counter()
        if ev.task == "sts":
            got = evaluate_sts(encoder, data, derivations, save_dir=ws.dir, quantized=quantized)
        elif ev.task != "retrieval":
            got = evaluate_prepared(ev.task, encoder, data, derivations, save_dir=ws.dir, quantized=quantized)
        else:
            names = {t.text: t.name for t in job.request.templates} | {t.name: t.name for t in job.request.templates}
            got = evaluate_retrieval(encoder, data, derivations, query_template=names.get(ev.query_template),
                                     doc_template=names.get(ev.doc_template), save_dir=ws.dir, quantized=quantized)
        rows += got
        say(f"  eval {ev.task} {ev.data}: {len(got)} rows in {time.perf_counter() - t0:.1f}s")
    ws.fetch("eval/results.json", refresh=True)  # merge with what earlier runs wrote
    merged = merge_results(ws.dir, rows)  # rows of earlier runs stay unless replaced by the same key
    ws.push("eval/results.json")
    return merged


def _best_lines(rows: list[dict], n_layers: int | None) -> list[str]:
    from ..report import best_variants

    lines = []
    for label, b in best_variants(rows, n_layers).items():
        gain = "" if b["gain"] is None else f" (default {b['default']} {b['default_score']:.2f}, {b['gain']:+.2f})"
        lines.append(f"  best on {label}: {b['variant']} {b['metric']} = {b['score']:.2f}{gain}")
    return lines


def run_job(spec_path: str | os.PathLike, dry_run: bool = False, *, progress: bool = True,
            stream: TextIO | None = None, yes: bool = True, break_lock: bool = False) -> dict:
    """Run a job spec: embed (incremental) -> index -> evaluate -> report -> LATEST; returns a summary.

    With ``dry_run`` nothing is embedded or written: the plan is printed and returned.
    """
    stream = stream or sys.stdout

    def say(line: str) -> None:
        print(redact_text(line), file=stream, flush=True)

    spec = load_spec(spec_path)
    job = resolve_job(spec)
    preflight(job)
    if dry_run:
        p = plan_job(job)
        print_plan(p, say)
        return p
    if spec.mode == "corpus" and job.request is not None:  # --yes above 100 GB, before anything is written
        from ..sizing import check_size, input_rows

        check_size(job.request, input_rows(local_path(spec.input.location)), yes, spec.embedding.max_output_size)

    t0 = time.perf_counter()
    summary: dict[str, Any] = {"job": spec.name, "spec": spec.source, "mode": spec.mode, "model": job.model_ref,
                               "variants": job.variant_names, "version": job.version,
                               "version_path": redact(job.version_url), "embed": None,
                               "indexes": {"built": [], "up_to_date": []}, "evaluations": 0, "report": None}
    ws = Workspace(job.version_url, spec.name, job.version)
    latest = Output(job.job_url).read_json(LATEST) if job.job_url else None
    if job.job_url:
        summary["new_version"] = not ws.exists(VERSION_FILE)
        summary["previous_latest"] = latest["version"] if latest else None
        say(f"job {spec.name}: version {job.version} at {redact(job.version_url)}"
            + (" (new)" if summary["new_version"] else ""))
        if summary["new_version"]:
            ws.out.write_json(VERSION_FILE, {"version": job.version, "key": job.version_key, "job": spec.name,
                                               "created_at": utc_now()})
    else:
        say(f"job {spec.name}: existing output {redact(job.version_url)}")

    if spec.mode == "corpus":
        from ..runner import embed

        es = embed(job.request, local_path(spec.input.location), job.version_url, text_column=spec.input.text_column,
                   id_column=spec.input.id_column, progress=progress,
                   calibration_rows=spec.embedding.calibration_rows, break_lock=break_lock,
                   retain_replaced=job.job_url is not None)
        summary["embed"] = es.as_dict()
        say(f"  embed: {es.line()}")
        if spec.variants.mixes or set(spec.variants.transforms) != {"none"}:
            from ..derive import add_to_output

            derived = add_to_output(job.version_url, spec.variants.mixes, spec.variants.transforms,
                                    request=job.request, mix_labels=job.derivations().mix_labels)
            say(f"  derived: {len(derived)} variant(s), transforms fitted on the corpus rows")
        if job.recipe is not None:
            from ..derive import add_recipe

            made = add_recipe(job.version_url, job.recipe)
            say(f"  from the probe recipe: {', '.join(made)}")

    # Readers follow LATEST to a published version (versions.py): the one LATEST names if it still
    # holds what the series commits, else a new one, published (and indexed) before LATEST moves.
    index_url, published = job.version_url, None
    if job.job_url and spec.mode == "corpus":  # an evaluation-only job has no corpus to publish
        published = versions.current(ws.out, latest, job.version) or versions.latest_of_series(ws.out)
        summary["published_new"] = published is None
        if published is None:
            published = versions.publish(ws.out)
            say(f"  published version {published}")
        index_url = versions.published_url(job.version_url, published)
        summary["published"] = published
    if spec.indexes is not None:
        manifest = Output(index_url).read_manifest() or {}
        stale, fresh = index_status(job, manifest, index_url)
        previous = None  # the version readers had: its indexes are updated, not rebuilt
        if published and latest and latest.get("version") == job.version and latest.get("published") not in (None, published):
            previous = versions.published_url(job.version_url, latest["published"])
        summary["indexes"] = {"built": build_indexes(job, index_url, stale, manifest, say, previous) if stale else [],
                              "up_to_date": [v.name for v in fresh]}
        if fresh:
            say(f"  indexes up to date: {short_list([v.name for v in fresh])}")

    if spec.evaluations:
        rows = run_evaluations(job, ws, progress, say)
        summary["evaluations"] = len(rows)
        for line in _best_lines(rows, job.n_layers):
            say(line)
        if spec.wants_report:
            from ..report import write_report

            paths = write_report(rows, ws.dir, job.n_layers)
            ws.push("eval/results.json", "report.md", *(f"{Path(h).name}" for h in paths["heatmaps"]))
            summary["report"] = redact(join(job.version_url, "report.md"))
            say(f"  report: {summary['report']}")

    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["completed_at"] = utc_now()
    record = {"spec": dict(spec.model_dump(mode="json"), storage=hide_secrets(spec.storage)), "summary": summary}
    ws.out.write_json(JOB_FILE, record)
    if job.job_url:  # the pointer moves only once everything above has succeeded: one atomic write
        if published:
            Output(index_url).write_json(JOB_FILE, record)
        Output(job.job_url).write_json(LATEST, {"version": job.version, "published": published,
                                                  "path": redact(index_url), "job": spec.name, "spec": spec.source,
                                                  "model": job.model_ref, "weights_digest": job.weights_digest,
                                                  "variants": job.variant_names,
                                                  "completed_at": summary["completed_at"]})
        summary["latest"] = job.version
        say(f"  {LATEST} -> {job.version}" + (f"/{versions.PUBLISHED}/{published}" if published else ""))
        if published:
            with ws.out.lock():  # the series' retired folders are in its manifest
                r = spec.retention
                summary["retention"] = versions.collect(ws.out, r.keep, r.days, protect=published)
        if published and (summary["retention"]["removed"] or summary["retention"]["freed_folders"]):
            say(f"  retention: {len(summary['retention']['removed'])} version(s) removed, "
                f"{summary['retention']['freed_folders']} shard folder(s) no version reads freed")
    say(f"job {spec.name} done in {summary['seconds']:.1f}s")
    return summary


def read_latest(job_dir: str) -> dict | None:
    """The LATEST record of a job folder ``{output}/{name}`` (None before the first complete run)."""
    return Output(local_path(job_dir)).read_json(LATEST)


# --------------------------------------------------------------------------- CLI glue
def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``strata run``; wire with ``p.set_defaults(func=cmd_run)``."""
    parser.add_argument("job", metavar="JOB.yaml", help="job spec (see jobs/); relative paths inside it resolve "
                                                        "against the current directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (shards to embed/skip/drop, estimated tokens, variants, indexes and "
                             "evaluations to run, the version) without embedding or writing anything")
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line at the end")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line while embedding")
    parser.add_argument("--yes", action="store_true", help="go on when the projected output is above 100 GB "
                                                           "(--dry-run prints it; docs/scale.md)")
    parser.add_argument("--break-lock", action="store_true",
                        help="take over the version folder's lock now (its holder is known to be dead, e.g. a crashed "
                             "pod); without it a lock not renewed for 5 min is taken over by the next run")
    return parser


def cmd_run(args) -> int:
    summary = run_job(args.job, dry_run=args.dry_run, progress=not args.quiet, yes=args.yes,
                      break_lock=args.break_lock)
    if args.json:
        print(redact_text(json.dumps(summary, default=str)))
    return 0


