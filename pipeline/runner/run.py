"""``embed``: Parquet shards -> Ray Data -> per-shard embedding parts, committed shard by shard.

Data flow (one Ray Data pipeline)::

    work units (shard, row range of row groups)  planned by the driver from Parquet footers
      -> read + tokenise   CPU tasks; every row keeps its shard and row number; bad rows are
                           marked with a reject reason, unreadable units with an error
      -> embed             actor pool around Encoder (one per GPU, or CPU actors that leave a
                           CPU free for the read tasks); ONE forward pass per batch
      -> write parts       into _staging/, returning small metadata rows: by the CPU actor
                           itself, or by write tasks after a GPU actor
    driver                 counts every (shard, row) exactly once; a shard whose rows are all
                           accounted for is moved into embeddings/ and recorded in the manifest

The manifest is the commit point: a crash loses only uncommitted shards, and re-running the
same command skips what is committed (resume), re-embeds new or changed shards and drops the
outputs of removed ones (incremental).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid

import numpy as np
import pyarrow as pa

from .. import quantize
from ..raystart import connect
from ..request import Request, signature_difference
from ..parts import read_part
from ..storage import EMBEDDINGS, MANIFEST, RETIRED, STAGING, Output, overlap_message, redact
from ..stores import exists, storage_options
from .commit import Committer, EmbedError, EmbedSummary, _commit, _Pending
from .shards import UNIT_ROWS, Shard, first_texts, inspect_shards, list_shards, plan, work_units
from .reuse import make_plan, reuse_salt
from .stages import DAMAGED_SOURCE, EMBED_BATCH_ROWS, MAX_CALLS_PER_ACTOR, EmbedActor, read_and_tokenize, write_parts

log = logging.getLogger(__name__)


def _resources(ray, actors: int | None, gpus_per_actor: float | None) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, torch threads): never take every CPU. A thread cap set
    in the driver's environment (``OMP_NUM_THREADS``, which Ray would otherwise replace in its workers)
    holds in the actors too: two busy processes of two threads each on two cores run at half speed."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    if gpus >= 1 and gpus_per_actor != 0:
        g = gpus_per_actor or 1.0
        n = actors or max(1, int(gpus // g))
        return n, 1.0, g, 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = min((n["Resources"].get("CPU", 1.0) for n in nodes), default=cpus)
    cpu_each = max(1.0, min(4.0, per_node - 1)) if per_node > 1 else 0.5
    n = actors or max(1, int((cpus - 1) // cpu_each)) if cpus > 1 else 1
    threads = max(1, int(per_node) // max(1, min(n, int(per_node // cpu_each) or 1)))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) > 0:
        threads = min(threads, int(cap))
    return n, cpu_each, 0.0, threads


def input_key(input: str) -> str:
    """How an output records its INPUT: a URL without a trailing slash, a local path absolute; redacted."""
    if "://" in input:
        return redact(input).rstrip("/")
    return redact(os.path.abspath(os.path.expanduser(input)))


def check_same_input(manifest: dict, input: str, output: str, replace_input: bool, kept: int) -> None:
    """Refuse another INPUT into an output whose committed shards it would drop or replace (``kept``:
    how many stay as they are), unless ``replace_input``; the same shards at a new place (a moved or
    copied input) are no loss. Then record the INPUT (``input_key``)."""
    here, was = input_key(input), manifest.get("input")
    comparable = isinstance(was, str) and ("://" in was or os.path.isabs(was))  # older outputs kept it as given
    committed = len(manifest.get("shards", []))
    if comparable and was != here and kept < committed:
        if not replace_input:
            raise ValueError(f"{redact(output)} holds the embeddings of INPUT {was}, not {here}: embedding this input "
                             f"into it would drop or replace {committed - kept} of its {committed} committed "
                             f"shard(s); use a new output location, or --replace-input to replace them")
        log.warning("%s: INPUT %s replaces %s (--replace-input); %d committed shard(s) dropped or replaced",
                    redact(output), here, was, committed - kept)
    manifest["input"] = here


def embed(request: Request, input: str, output: str, *, text_column: str = "text", id_column: str | None = None,
          force: bool = False, progress: bool = True, stall_timeout_s: float = 600.0,
          unit_rows: int = UNIT_ROWS, calibration_rows: int = quantize.DEFAULT_CALIBRATION_ROWS,
          int8_ranges: str | None = None, break_lock: bool = False, retain_replaced: bool = False,
          replace_input: bool = False) -> EmbedSummary:
    """Embed every row of the Parquet shards at ``input`` into ``output`` (see module doc).

    ``request`` (``pipeline.request.resolve``) fixes the model, the variants, the settings and
    the resources; nothing is resolved again here or in the actors.

    ``--dtype int8``: the ranges are those the output already has (resume, incremental), else
    those of ``int8_ranges`` (an earlier output, or its ranges file), else calibrated on the
    input's first ``calibration_rows`` texts, embedded here on the driver before Ray starts
    (``pipeline/quantize.py``).

    ``retain_replaced`` (jobs): the folders of replaced or dropped shards stay, listed in the
    manifest's ``retired``, for the published versions that still read them.

    An output records its INPUT (``input_key``); another INPUT that would drop or replace its committed
    shards is refused unless ``replace_input`` (``--replace-input``) says that is meant.
    """
    t_start = time.perf_counter()
    problem = overlap_message(input, output)
    if problem:
        raise ValueError(problem)
    if not os.path.isdir(request.model.path):
        raise ValueError(f"model {request.model.name!r} must be a local directory or a .gguf file for "
                         "distributed runs")
    fs, shards = list_shards(input, output)
    inspect_shards(fs, shards, text_column, id_column)  # column errors before any model loads
    out = Output(output)
    out.check_writable()
    out.check_is_strata_output()  # never write into (or sweep) someone else's folder
    run_id = uuid.uuid4().hex[:12]  # names this run's staging folder and committed folders
    with out.lock(break_lock=break_lock):  # one run per output
        manifest = out.read_manifest()
        earlier_runs = (manifest or {}).get("runs", [])
        out.sweep(manifest)  # only what earlier runs of Strata left (their run ids), before anything else
        if manifest is None and exists(out.fs, out.path(EMBEDDINGS)):
            orphans = sorted(out.fs.ls(out.path(EMBEDDINGS), detail=False))
            if orphans:  # the manifest was deleted: nothing is known to be committed
                log.warning("%s has no %s but %d folder(s) under %s/ (e.g. %s): every shard is embedded again; "
                            "those folders are not read and are left in place (remove them by hand)",
                            redact(output), MANIFEST, len(orphans), EMBEDDINGS, orphans[0].rsplit("/", 1)[-1])
        made_at = (manifest or {}).get("signature", {}).get("max_length")
        if request.max_length_capped_from and made_at == request.max_length_capped_from:
            # an output made at this max length before it was capped: its vectors and new ones must agree
            log.warning("%s was made with max length %d: kept for this output (new outputs get the cap)",
                        redact(output), made_at)
            request = request.uncapped()
        signature = request.signature(text_column, id_column)
        diff = signature_difference(manifest.get("signature", {}), signature) if manifest else []
        if diff:
            if not force:
                hint = ""
                if "max_length" in diff and request.max_length_source != "given":
                    hint = (f" (it was made with max length {manifest['signature'].get('max_length')}; without "
                            f"--max-length this model now gets its own {request.settings.max_length}, from "
                            f"{request.max_length_source}: pass --max-length to match)")
                raise ValueError(f"{redact(output)} holds embeddings made with a different {', '.join(diff)}{hint}; "
                                 "use a new output location, or --force to replace them")
            log.warning("replacing %s: settings changed and --force given", redact(output))
            for s in manifest.get("shards", []):
                out.remove(s["output"])
            manifest = None
        manifest = manifest or {"signature": signature,
                                "model": {"name": request.model.name, "weights_digest": request.model.weights_digest,
                                          "n_layers": request.model.n_layers},
                                "max_length": {"tokens": request.settings.max_length,
                                               "source": request.max_length_source},
                                "variants": request.manifest_variants(), "input": input_key(input), "shards": []}
        for entry in manifest["variants"]:
            q = quantize.manifest_entry(request.settings.dtype, request.model.dim)
            if q:
                entry["quantization"] = q
        manifest["runs"] = [run_id]  # earlier runs' leftovers are swept: only this run's can remain
        if retain_replaced:
            manifest["retain_replaced"] = True

        todo, keep, drop = plan(manifest, shards)
        check_same_input(manifest, input, output, replace_input, kept=len(keep))
        by_rel = {s.rel: s for s in shards}
        # A committed part damaged since: re-embed that shard, saying so. Sizes for every part; the
        # checksum (every byte read) for the parts the previous run committed, so a resume verifies
        # what the interrupted run wrote at a cost in proportion to that run's output, not the whole
        # output's (reads verify every part: Output.check_parts).
        damaged = set()
        for entry in list(keep):
            recent = any(entry["output"].endswith(f"-{r}") for r in earlier_runs if r)
            bad = out.damaged_parts(entry, checksums=recent)
            if bad:
                log.warning("re-embedding shard %s: committed part %s", entry["rel"], bad[0])
                keep.remove(entry)
                todo.append(by_rel[entry["rel"]])
                damaged.add(entry["rel"])
        # Every committed shard's vectors may be copied by rows with the same text (reuse.py): kept,
        # changed and dropped shards alike; each copied part is checked against its checksum as it is read.
        stored = [e for e in manifest.get("shards", []) if e["rel"] not in damaged]
        failed = {s.rel: s.error for s in todo if s.error}
        todo = [s for s in todo if s.error is None]
        for e in drop:
            out.retire(manifest, e["output"])
        # A changed (or now unreadable) shard keeps its old output until a new one is committed.
        dropped = {e["rel"] for e in drop}
        manifest["shards"] = [e for e in manifest["shards"] if e["rel"] not in dropped]
        manifest["failed"] = failed
        out.write_manifest(manifest)
        summary = EmbedSummary(output=redact(output), shards_total=len(shards), shards_skipped=len(keep),
                               shards_dropped=len(drop), shards_failed=dict(failed),
                               rows_dropped=sum(e.get("rows", 0) for e in drop))
        empty = [s for s in todo if s.rows == 0]
        todo = [s for s in todo if s.rows > 0]
        for s in empty:  # an empty shard is done at once: nothing to embed, nothing lost
            _commit(out, manifest, s, _Pending(s, np.zeros(0, dtype=bool)), run_id)
            summary.shards_embedded += 1
        ranges = None
        if todo and request.settings.dtype == "int8":
            ranges = _int8_ranges(request, out, manifest, fs, shards, text_column, calibration_rows, int8_ranges)
        if todo:
            _run_ray(request, out, manifest, todo, summary, fs=fs, text_column=text_column, id_column=id_column,
                     progress=progress, stall_timeout_s=stall_timeout_s, unit_rows=unit_rows, t_start=t_start,
                     ranges=ranges, run_id=run_id, stored=stored,
                     leaving={e["rel"] for e in drop} | {s.rel for s in todo})
            _forget_damaged_sources(out, manifest, summary)
        if id_column:
            summary.duplicate_ids, examples = _duplicate_ids(out, manifest)
            manifest["duplicate_ids"] = {"count": summary.duplicate_ids, "examples": examples}
            if summary.duplicate_ids:
                log.warning("%d duplicate id(s) in column %r (e.g. %s): every row is kept and embedded",
                            summary.duplicate_ids, id_column, ", ".join(examples))
        if (summary.shards_embedded or summary.shards_dropped) and manifest.get("derived"):
            # transforms fitted on the previous rows no longer describe this output
            log.warning("%s: %d derived variant(s) were fitted on the rows before this run and are dropped; "
                        "refit them with --transforms/--mixes", redact(output), len(manifest["derived"]))
            manifest.pop("derived")
        summary.seconds = time.perf_counter() - t_start
        manifest["last_run"] = {**summary.as_dict(), "run_id": run_id}
        out.free_retired(manifest)  # replaced and dropped shards' folders, once nothing copies from them
        out.write_manifest(manifest)
        # again at the end: a failed run's tasks that were still writing (a driver that lives on, as
        # in-process callers do) may have staged more since the first sweep
        out.sweep({"runs": earlier_runs, "shards": manifest["shards"], RETIRED: manifest.get(RETIRED, [])})
        out.remove_if_empty(STAGING)
        if summary.shards_failed:
            lines = "; ".join(f"{rel}: {msg}" for rel, msg in sorted(summary.shards_failed.items()))
            raise EmbedError(f"{len(summary.shards_failed)} shard(s) failed, the others are committed "
                             f"(re-run to retry): {lines}")
        return summary


def _forget_damaged_sources(out: Output, manifest: dict, summary: EmbedSummary) -> None:
    """A shard failed because a part it copied from no longer matches its checksum: that part's shard
    is taken out of the manifest (retired), so the next run embeds it again and nothing copies from it."""
    messages = [m for m in summary.shards_failed.values() if DAMAGED_SOURCE in m]
    if not messages:
        return
    bad = [e for e in manifest["shards"] if any(f"/{e['output']}/" in m for m in messages)]
    for e in bad:
        log.warning("committed part of shard %s does not match its checksum: it is embedded again on the next run",
                    e["rel"])
        out.retire(manifest, e["output"])
    manifest["shards"] = [e for e in manifest["shards"] if e not in bad]
    out.write_manifest(manifest)


def _int8_ranges(request: Request, out: Output, manifest: dict, fs, shards: list[Shard], text_column: str,
                 calibration_rows: int, source: str | None) -> dict[str, np.ndarray]:
    """The output's int8 ranges per variant name: kept, copied from ``source``, or calibrated here."""
    names = [v.name for v in request.variants]
    have = manifest.get("calibration")
    if have:  # committed shards were coded with these: every later shard must be too
        ranges, _ = quantize.read_ranges(out.url)
        ranges = quantize.ranges_for(ranges, names, request.model.dim, redact(out.url))
        if source:
            other, _ = quantize.read_ranges(source)
            if any(n not in other or not np.array_equal(other[n], ranges[n]) for n in names):
                raise quantize.QuantizationError(f"{redact(out.url)} already holds int8 codes made with other ranges "
                                                 f"than {redact(source)}'s; use a new output, or --force")
        return ranges
    if source:
        other, calibration = quantize.read_ranges(source)
        ranges = quantize.ranges_for(other, names, request.model.dim, redact(source))
        record = {"source": f"the ranges of {redact(source)}", "rows": calibration.get("rows"), "from": calibration}
    else:
        if calibration_rows < quantize.MIN_CALIBRATION_ROWS:
            raise quantize.QuantizationError(f"--calibration-rows {calibration_rows}: int8 calibration needs at least "
                                             f"{quantize.MIN_CALIBRATION_ROWS} rows")
        t0 = time.perf_counter()
        texts = first_texts(fs, shards, text_column, calibration_rows)
        if len(texts) < quantize.MIN_CALIBRATION_ROWS:
            raise quantize.QuantizationError(f"int8 calibration needs at least {quantize.MIN_CALIBRATION_ROWS} "
                                             f"non-empty texts; the input has {len(texts)}")
        from ..encoder import Encoder

        encoder = Encoder.from_request(quantize.float_request(request))  # in-process, before Ray starts
        vectors = encoder.encode(texts)
        del encoder
        ranges = {v.name: quantize.calibrate(vectors[v]) for v in request.variants}
        record = {"source": f"the first {len(texts)} non-empty texts of the input", "rows": len(texts),
                  "seconds": round(time.perf_counter() - t0, 3)}
        log.info("int8 ranges calibrated on %d texts in %.1fs", len(texts), record["seconds"])
    quantize.write_ranges(out, ranges, {v.name: v.column for v in request.variants}, record)
    manifest["calibration"] = {**record, "ranges": quantize.RANGES_FILE}
    out.write_manifest(manifest)  # the ranges are part of the output before any code is written with them
    return ranges


def _duplicate_ids(out: Output, manifest: dict) -> tuple[int, list[str]]:
    """Rows whose id appears more than once across all committed shards (ids column only)."""
    import pyarrow.compute as pc

    files = out.embedding_files(manifest)
    if not files:
        return 0, []
    ids = pa.chunked_array([read_part(out.fs, f, ["id"]).column("id") for f in files])
    counts = pc.value_counts(ids).flatten()
    dup = pc.filter(counts[0], pc.greater(counts[1], 1))
    extra = int(pc.sum(pc.subtract(pc.filter(counts[1], pc.greater(counts[1], 1)), 1)).as_py() or 0)
    return extra, [str(x) for x in dup[:5].to_pylist()]


def _run_ray(request: Request, out: Output, manifest: dict, todo: list[Shard], summary: EmbedSummary, *, fs,
             text_column: str, id_column: str | None, progress: bool, stall_timeout_s: float, unit_rows: int,
             t_start: float, ranges: dict[str, np.ndarray] | None = None, run_id: str | None = None,
             stored: list[dict] | None = None, leaving: set[str] | None = None) -> None:
    """Embed ``todo`` on Ray Data. ``stored``: the output's committed shards before this run, whose
    parts' vectors rows with the same text copy (``reuse.py``); a second pass copies the run's
    own duplicate texts from the parts the first wrote. ``leaving``: the shards (``rel``) of ``stored``
    this run replaces or removes, whose rows no new row takes up are counted as dropped."""
    t0 = time.perf_counter()
    res = request.resources
    ray = connect(res.ray_address)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = stall_timeout_s
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray's high-memory notice repeats every 30 s for any model-sized actor: noise, not news.
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    n_actors, cpus, gpus, threads = _resources(ray, res.actors, res.gpus_per_actor)
    summary.startup_seconds = time.perf_counter() - t0
    log.info("embedding %d shards with %d actor(s) (%.1f CPU, %.1f GPU each)", len(todo), n_actors, cpus, gpus)

    run_id = run_id or uuid.uuid4().hex[:12]
    units = work_units(todo, unit_rows)
    salt = reuse_salt(manifest["signature"])
    sources = {out.fs.unstrip_protocol(out.path(e["output"], f)): (e.get("parts") or {}).get(f, {}).get("crc32", "")
               for e in stored or [] for f in e["files"]}
    going = {out.fs.unstrip_protocol(out.path(e["output"], f)) for e in stored or [] if e["rel"] in (leaving or ())
             for f in e["files"]}
    plan_kw = dict(fs=fs, text_column=text_column, id_column=id_column, salt=salt, storage=storage_options(), ray=ray)
    plan_root = out.fs.unstrip_protocol(out.path(STAGING, run_id, "plan"))
    t_plan = time.perf_counter()
    first = make_plan(units, list(sources), f"{plan_root}/1", dedup=True,
                      stored_rows=sum(e.get("rows_written", 0) for e in stored or []),
                      leaving={i for i, url in enumerate(sources) if url in going}, **plan_kw)
    summary.plan_seconds = time.perf_counter() - t_plan
    summary.rows_deduplicated = first.deferred
    summary.rows_dropped = first.dropped
    log.info("plan: %d row(s) copied from %d stored part(s), %d duplicate(s) of this run's texts deferred",
             first.copied, len(first.sources), first.deferred)
    for u in units:
        u["planned"] = u["unit"] in first.units
    committer = Committer(out, manifest, todo, summary, run_id)
    args = dict(request=request, out=out, fs=fs, text_column=text_column, id_column=id_column, salt=salt,
                committer=committer, n_actors=n_actors, cpus=cpus, gpus=gpus, threads=threads, ranges=ranges,
                run_id=run_id, todo=todo, progress=progress, t_start=t_start, stall_timeout_s=stall_timeout_s)
    _pass(ray, units, first.url, False, {s: sources[s] for s in first.sources}, **args)
    if first.deferred:  # the run's own duplicates, copied from the parts the first pass wrote
        written = committer.parts()
        committer.hold = True  # staged parts stay where the plan found them until the pass ends
        again = [dict(u) for u in units if u["unit"] in first.deferring]
        second = make_plan(again, list(written), f"{plan_root}/2", dedup=False, only=first.url, **plan_kw)
        for u in again:
            u["planned"] = u["unit"] in second.units
        _pass(ray, again, second.url, True, {s: written[s] for s in second.sources}, **args)
        committer.release()
    committer.finish()
    out.remove(f"{STAGING}/{run_id}")
    out.remove_if_empty(STAGING)


def _pass(ray, units: list[dict], plan_url: str, only_planned: bool, sources: dict[str, str], *, request: Request,
          out: Output, fs, text_column: str, id_column: str | None, salt: bytes, committer: Committer, n_actors: int,
          cpus: float, gpus: float, threads: int, ranges, run_id: str, todo: list[Shard], progress: bool,
          t_start: float, stall_timeout_s: float) -> None:
    """One pass of the pipeline over ``units`` under a plan: read + tokenise -> embed -> write parts,
    the metadata fed to the committer. ``sources``: the parts the plan copies from, with their CRC-32."""
    from ray.data import ActorPoolStrategy

    summary = committer.summary
    t0 = time.perf_counter()
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # Fractional CPUs: different resources keep Ray from fusing these tasks into the actor, so
    # reading and tokenising overlap the forward passes instead of running in series with them.
    ds = ds.map_batches(read_and_tokenize, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs=dict(fs=fs, request=request, text_column=text_column, id_column=id_column,
                                       salt=salt, plan=plan_url, only_planned=only_planned,
                                       storage=storage_options()))
    # Blocks of EMBED_BATCH_ROWS rows: each actor task is then one call, and its metadata streams
    # to the driver as it is made (a whole read unit in one task would reach it only at its end).
    ds = ds.repartition(target_num_rows_per_block=EMBED_BATCH_ROWS)
    write = dict(output_url=out.url, run_id=run_id, keys=[s.key for s in todo], storage=storage_options(),
                 columns=[v.column for v in request.variants], fmt=request.output_format)
    embed_args = dict(batch_size=EMBED_BATCH_ROWS, batch_format="pyarrow", num_cpus=cpus, num_gpus=gpus or None)
    actor = dict(request=request, threads=threads, ranges=ranges, storage=storage_options(), sources=sources)
    if gpus:
        # A GPU makes vectors faster than one CPU thread writes them (a wide grid's block is ~90 MB):
        # write tasks spread the writing over the node's CPUs.
        ds = ds.map_batches(EmbedActor, compute=ActorPoolStrategy(size=n_actors), **embed_args,
                            fn_constructor_kwargs=dict(actor, write=None))
        ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow", num_cpus=0.5, fn_kwargs=write)
    else:
        # On CPUs the model is the bottleneck and shares the cores with everything else: the actor
        # writes each block's parts itself, so the vectors never cross the object store. Two calls
        # at a time (EmbedActor keeps every torch call on one thread) overlap one block's writing
        # with the next block's forward passes.
        pool = ActorPoolStrategy(size=n_actors, enable_true_multi_threading=True,
                                 max_concurrent_calls_per_actor=MAX_CALLS_PER_ACTOR)
        ds = ds.map_batches(EmbedActor, compute=pool, **embed_args, fn_constructor_kwargs=dict(actor, write=write))
    before = summary.shards_embedded  # empty shards committed already: not among ``todo``
    total_rows = sum(s.rows for s in todo)
    last_print, first_batch, first_tokens = 0.0, None, 0
    try:
        # prefetch_batches=0: with Ray's default of 1 the iterator holds each metadata block
        # back until the next one exists, so every commit would wait for one more actor call.
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for m in batch.to_pylist():
                committer.feed(m)
            now = time.perf_counter()
            if first_batch is None:  # steady state starts once the first batch is through
                first_batch, first_tokens = now, summary.tokens
            if progress and now - last_print > 2.0:
                last_print = now
                rate = summary.tokens / (now - t_start)
                print(f"\r[strata] {summary.shards_embedded - before}/{len(todo)} shards committed, "
                      f"{committer.rows_seen:,}/{total_rows:,} rows, {rate:,.0f} tok/s",
                      end="", file=sys.stderr, flush=True)
    except Exception as e:
        if "ExecutionTimeoutError" in type(e).__name__ or "no progress" in str(e).lower():
            raise EmbedError(f"the pipeline made no progress for {stall_timeout_s:.0f}s and was stopped "
                             "(too few free CPUs for the read/write tasks, or a hung actor?); "
                             f"{summary.shards_embedded} shard(s) were committed, re-run to resume") from None
        raise
    finally:
        if progress and last_print:
            print(file=sys.stderr)
    end = time.perf_counter()
    # Steady state: the rate after the first output. Only meaningful when outputs streamed
    # over most of the run; when they arrive in a burst at the end it is left at 0 (unknown).
    if first_batch is not None and summary.tokens > first_tokens and end - first_batch >= 0.5 * (end - t0):
        summary.steady_seconds = (end - first_batch) * summary.tokens / (summary.tokens - first_tokens)


def read_embeddings(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed row of an output directory, in shard and row order."""
    return Output(output).read_table(columns)
