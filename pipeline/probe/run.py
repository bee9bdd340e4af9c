"""Running the probe: the sample embedded once per template, scored, chosen; its output written
(``probe.json``, ``pieces/``, ``job.yaml``: the corpus job, ``report.md``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .. import stats
from ..evaldata import BeirData
from ..recipe import CONTRACT, Recipe, write_probe_json
from ..standard import serving
from ..storage import safe_name
from ..templates import TOKENS_RULE
from ..variants import Variant
from .agreement import signal_agreement, signal_table
from .choice import choice_dict, choose
from .defaults import (DEFAULT_DOCS, DEFAULT_ITEMS, FOLDS, MIXES, POOLINGS, SIGNAL_TEXTS, TEMPLATES, TRANSFORMS,
                       ProbeError)
from .pieces import refit
from .report import write_probe_report
from .sample import Budget, check_labels, sample_labels, sample_size
from .scoring import ranked, score_variants
from .tasks import make_task


def encode_with_progress(encoder, texts: list[str], label: str, *, progress: bool = True) -> dict[Variant, np.ndarray]:
    """``encoder.encode(texts)`` in up to 20 chunks, with a progress bar counting tokens (tqdm, on
    stderr; none when ``progress`` is off or stderr is not a terminal)."""
    toks = encoder.tokenize_templates(texts)
    per_text = sum(np.asarray([len(i) for i in t.ids]) for t in toks.values())
    chunks = max(1, min(20, len(texts) // 64))
    bounds = np.linspace(0, len(texts), chunks + 1).astype(int)
    parts: list[dict] = []
    with tqdm(total=int(per_text.sum()), desc=f"  {label}", unit="tok", unit_scale=True, file=sys.stderr,
              disable=None if progress else True) as bar:  # None: off unless stderr is a terminal
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b <= a:
                continue
            res = encoder.encode(texts[a:b])
            parts.append(dict(res.items()))
            bar.set_postfix_str(f"{b:,}/{len(texts):,} texts", refresh=False)
            bar.update(int(per_text[a:b].sum()))
    return {v: np.concatenate([p[v] for p in parts]) for v in parts[0]}


def run_probe(model: str, labels, output: str | Path, *, budget: Budget | None = None, corpus: str | None = None,
              text_column: str = "text", templates: Sequence[str] = TEMPLATES, poolings: str = POOLINGS,
              transforms: Sequence[str] = TRANSFORMS, mixes: str = MIXES, max_length: int = 128,
              max_docs: int | None = DEFAULT_DOCS, folds: int = FOLDS, resamples: int = stats.RESAMPLES,
              top: int = 3, seed: int = 0, say=print, progress: bool = True) -> dict:
    """The probe (the package doc). ``labels``: StsData or BeirData, already loaded. ``progress``:
    progress bars while embedding (on a terminal)."""
    from ..encoder import Encoder
    from ..request import resolve

    t0 = time.perf_counter()
    out = Path(output)
    budget = budget or Budget(items=DEFAULT_ITEMS)
    check_labels(labels, folds)
    request = resolve(model, layers="all", poolings=poolings, templates=list(templates), max_length=max_length)
    encoder = Encoder.from_request(request)
    n_layers = request.model.n_layers
    items = sample_size(budget, labels, encoder, say, max_docs)
    data = sample_labels(labels, items, max_docs, seed)
    check_labels(data, folds)
    task = make_task(data)
    from ..tasks import get

    unit = get(task.kind).unit
    say(f"probe {request.model.name} on {data.name}/{data.split}: {task.n:,} labelled {unit}, {len(task.texts):,} "
        f"texts, {len(request.templates)} template(s) x {n_layers + 1} layers x {len(poolings.split(','))} poolings")
    vectors = encode_with_progress(encoder, task.texts, "embedding the sample", progress=progress)
    t_embed = time.perf_counter() - t0
    fit_vectors, fit_source, signal_vectors, corpus_note = None, "", vectors, None
    if corpus:
        from ..evaldata import read_texts

        texts = list(dict.fromkeys(t for t in read_texts(corpus, text_column) if t.strip()))
        rng = np.random.default_rng(seed)
        texts = [texts[i] for i in np.sort(rng.choice(len(texts), size=min(len(texts), SIGNAL_TEXTS),
                                                        replace=False))]
        if len(texts) < 3:
            raise ProbeError(f"--corpus {corpus}: {len(texts)} non-empty text(s); at least 3 are needed")
        fit_vectors = encode_with_progress(encoder, texts, "embedding the corpus sample", progress=progress)
        fit_source = f"{len(texts)} texts sampled from {corpus}"
        signal_vectors, corpus_note = fit_vectors, fit_source
    say("scoring")
    scored = score_variants(task, vectors, n_layers=n_layers, mixes=mixes, transforms=transforms, folds=folds,
                            resamples=resamples, seed=seed, fit_vectors=fit_vectors, fit_source=fit_source, say=say)
    choice = choose(scored, n_layers)
    say("label-free signals")
    table = signal_table(signal_vectors, seed)
    agreement = signal_agreement(table, scored)
    best_first = ranked(scored)
    picks = [choice.chosen] + [s for s in best_first if s is not choice.chosen][: max(0, top - 1)]
    out.mkdir(parents=True, exist_ok=True)
    recipe = [refit(s.variant, task, vectors, out, fit_vectors, fit_source) for s in picks]
    result = {
        "contract": CONTRACT,
        "model": {"name": request.model.name, "path": request.model.path, "weights_digest":
                  request.model.weights_digest, "n_layers": n_layers, "dim": request.model.dim},
        "settings": {"max_length": max_length, "append_eos": request.settings.append_eos,
                     "templates": request.template_texts(), "template_tokens": TOKENS_RULE,
                     "poolings": poolings.split(","),
                     "transforms": list(transforms), "mixes": mixes, "folds": folds, "resamples": resamples,
                     "seed": seed, "level": stats.LEVEL},
        "labels": {"task": task.kind, "metric": task.metric, "data": data.name, "split": data.split,
                   "items": task.n, "of": len(labels.qrels) if isinstance(labels, BeirData) else len(labels),
                   "texts": len(task.texts), "subset": getattr(data, "subset_note", None)},
        "corpus": corpus_note,
        "chosen": choice_dict(choice),
        "signals": {"on": corpus_note or f"the {len(task.texts)} sample texts, labels unused", "agreement": agreement},
        "recipe": recipe,
        "seconds": {"embed": round(t_embed, 1), "total": round(time.perf_counter() - t0, 1)},
        "ranked": [s.row() for s in best_first],
    }
    for row in result["ranked"]:  # what `strata export` can write for each: standard modules, or Strata's
        row["serving"] = serving(row["variant"], n_layers=n_layers, templates=result["settings"]["templates"],
                                 append_eos=request.settings.append_eos)
    write_probe_json(out / "probe.json", result)
    (out / "job.yaml").write_text(job_yaml(result, out / "probe.json", text_column))
    write_probe_report(result, scored, choice, out)
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    write_probe_json(out / "probe.json", result)
    return result


def job_yaml(result: dict, probe_path: Path, text_column: str) -> str:
    """A ``strata run`` spec embedding the recipe's variants over a corpus."""
    r = Recipe.load(probe_path, top=1)
    templates = r.template_specs()
    lines = [
        f"# Written by strata probe: the chosen variant {result['chosen']['variant']} of {result['model']['name']}",
        f"# (score {result['chosen']['score']:.2f} on the probe sample). Set input.location to the corpus, then",
        f"# probed on the {result['labels']['task']} task: {result['labels']['data']}/{result['labels']['split']} "
        f"({result['labels']['metric']}, {result['labels']['items']} labelled items)",
        "#   strata run job.yaml --dry-run && strata run job.yaml",
        f"name: {safe_name(Path(result['model']['name']).name).lower()}-probe-winner",
        "input:",
        "  location: CORPUS_URL  # the Parquet corpus to embed (any fsspec URL)",
        f"  text_column: {text_column}",
        f"model: {json.dumps(result['model']['name'])}",
        "variants:",
        f"  layers: [{', '.join(map(str, r.layers()))}]",
        f"  poolings: [{', '.join(r.poolings())}]",
        f"  templates: {json.dumps(templates)}",
        f"  recipe: {json.dumps(str(probe_path.resolve()))}  # mix weights and fitted transform, as probed",
        "embedding:",
        f"  max_length: {result['settings']['max_length']}",
        "output: out/jobs",
        "indexes:",
        "  variants: all",
    ]
    return "\n".join(lines) + "\n"
