"""``python studies/tasks_grid.py``: the source's claim beyond STS and retrieval, on three task types.

For each model (SmolLM2-135M and Gemma-3-270M by default), the full grid (every layer x the five
poolings, plain template) scored with MTEB's protocols (``pipeline/tasks/``):

- classification: Banking77 (accuracy, a logistic regression on 8 training texts per label x 10);
- clustering: MasakhaNEWS headlines (5 sets), and Banking77's test set clustered by intent (V-measure);
- pairs: MRPC train (``max_ap``).

Per task: the default ``L{N}.last``, the best cell (the top of the grid on the scored data itself: an
upper bound, not a result), and a choice made on one split and scored on another:

- Banking77 classification: chosen on a dev split cut from **train** by a seeded draw (20%; the classifier
  samples the other 80%), scored on **test** (the classifier samples all of train, as MTEB does);
- MasakhaNEWS: chosen on sets 0, 2, 4, scored on sets 1 and 3;
- Banking77 by intent: chosen on a seeded sample of 3,080 **train** texts clustered by intent, scored on
  **test**;
- MRPC: the pairs cut in two by a seeded draw of whole groups (pairs sharing a sentence stay on one side):
  chosen on one half, scored on the other.

Nothing is fitted on labels but the classifiers (on training texts only) and k-means sees no label. Every
text is embedded once per model (one pass gives every layer x pooling); the seconds spent embedding and
scoring are recorded per task (the issue's speed split: scoring at most half the embedding).

Writes ``{out}/tasks_grid.json`` (every score, the choices, timings, commit) and ``{out}/tasks_grid.md``
(the tables), heatmaps under ``{out}/tasks/{model}/``, and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.bench.measure import git_commit, write_study  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402
from pipeline.evaldata import default_data_dir  # noqa: E402
from pipeline.evaluate import evaluate_prepared  # noqa: E402
from pipeline.probe import encode_with_progress, fold_ids  # noqa: E402
from pipeline.report import write_report  # noqa: E402
from pipeline.request import resolve  # noqa: E402
from pipeline.tasks import MAIN_METRIC, classification, clustering, pairs  # noqa: E402
from pipeline.tasks.records import subset  # noqa: E402
from pipeline.variants import Variant  # noqa: E402

POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"
MODELS = ("smollm2-135m", "gemma3-270m")


class Memo:
    """An encoder over vectors embedded once: ``encode(texts)`` gathers their rows."""

    def __init__(self, texts: list[str], vectors: dict[Variant, np.ndarray]):
        self.row = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def encode(self, texts):
        take = np.fromiter((self.row[t] for t in texts), dtype=np.int64, count=len(texts))
        return {v: m[take] for v, m in self.vectors.items()}


def _scores(task: str, enc, prepared) -> tuple[dict[str, float], list[dict], float]:
    t0 = time.perf_counter()
    rows = evaluate_prepared(task, enc, prepared)
    main = {Variant.from_row(r).name: r["score"] for r in rows if r["metric"] == MAIN_METRIC[task]}
    return main, rows, time.perf_counter() - t0


def build_cases(data_dir: Path, limit: int | None, seed: int = 0) -> list[dict]:
    """Every (task, scored data, selection data) of the study, loaded and cut."""
    rng = np.random.default_rng(seed)
    bank = classification.load(data_dir / "banking77")
    if limit:
        bank = classification.ClassificationData(bank.name, bank.train_texts[:limit * 4], bank.train_labels[:limit * 4],
                                                 bank.test_texts[:limit], bank.test_labels[:limit], bank.classes)
    dev = np.zeros(len(bank.train_texts), dtype=bool)
    dev[rng.choice(len(dev), size=len(dev) // 5, replace=False)] = True
    bank_dev = classification.ClassificationData(
        "banking77-dev", [t for t, d in zip(bank.train_texts, dev) if not d], bank.train_labels[~dev],
        [t for t, d in zip(bank.train_texts, dev) if d], bank.train_labels[dev], bank.classes, split="dev")
    news = clustering.load(data_dir / "masakhanews-clustering")
    if limit:
        news = subset(news, np.arange(min(len(news), limit * 2)), news.name)
    intents_test = clustering.ClusteringData("banking77-intents", bank.test_texts, bank.test_labels,
                                             np.zeros(len(bank.test_texts), dtype=np.int64))
    pick = np.sort(rng.choice(len(bank.train_texts), size=min(len(bank.test_texts), len(bank.train_texts)),
                              replace=False))
    intents_train = clustering.ClusteringData("banking77-intents", [bank.train_texts[i] for i in pick],
                                              bank.train_labels[pick], np.zeros(len(pick), dtype=np.int64), "train")
    mrpc = pairs.load(data_dir / "mrpc" / "train.jsonl")
    if limit:
        mrpc = subset(mrpc, np.arange(limit), mrpc.name)
    items = pairs.Items(mrpc)
    half = fold_ids(items.groups, 2, seed)  # pairs sharing a sentence: one group
    even, odd = np.isin(news.sets, [0, 2, 4]), np.isin(news.sets, [1, 3])
    return [
        {"task": "classification", "label": "Banking77", "scored": classification.Prepared(bank),
         "select": classification.Prepared(bank_dev), "select_on": "a 20% dev split of train",
         "score_on": "test (classifier samples from all of train)"},
        {"task": "clustering", "label": "MasakhaNEWS", "scored": clustering.Prepared(news),
         "select": clustering.Prepared(subset(news, np.flatnonzero(even), news.name)),
         "held": clustering.Prepared(subset(news, np.flatnonzero(odd), news.name)),
         "select_on": "sets 0, 2, 4", "score_on": "sets 1, 3"},
        {"task": "clustering", "label": "Banking77 by intent", "scored": clustering.Prepared(intents_test),
         "select": clustering.Prepared(intents_train), "select_on": f"{len(pick):,} train texts",
         "score_on": "test"},
        {"task": "pairs", "label": "MRPC", "scored": pairs.Prepared(mrpc),
         "select": pairs.Prepared(subset(mrpc, np.flatnonzero(half == 0), "mrpc-a")),
         "held": pairs.Prepared(subset(mrpc, np.flatnonzero(half == 1), "mrpc-b")),
         "select_on": "half A of the pairs (whole groups)", "score_on": "half B"},
    ]


def run_model(model: str, cases: list[dict], out: Path, max_length: int, say) -> dict:
    request = resolve(model, layers="all", poolings=POOLINGS, max_length=max_length)
    n = request.model.n_layers
    default = Variant(n, "last").name
    texts = list(dict.fromkeys(t for c in cases for k in ("scored", "select", "held") if k in c for t in c[k].texts))
    encoder = Encoder.from_request(request)
    t0 = time.perf_counter()
    vectors = encode_with_progress(encoder, texts, f"{model}: {len(texts):,} texts")
    embed_s = time.perf_counter() - t0
    tokens = dict(zip(texts, sum(np.asarray([len(i) for i in t.ids]) for t in encoder.tokenize_templates(texts).values())))
    per_token = embed_s / sum(tokens.values())  # a task's share of the pass: its texts' share of the tokens
    memo = Memo(texts, vectors)
    del encoder
    results, all_rows = [], []
    for c in cases:
        scored, rows, score_s = _scores(c["task"], memo, c["scored"])
        select, _, select_s = _scores(c["task"], memo, c["select"])
        chosen = max(select, key=lambda v: (select[v], -Variant.parse(v).layer))
        held = _scores(c["task"], memo, c["held"])[0] if "held" in c else scored
        best = max(scored, key=lambda v: (scored[v], -Variant.parse(v).layer))
        share = per_token * sum(int(tokens[t]) for t in c["scored"].texts)
        all_rows += [{**r, "dataset": c["label"].lower().replace(" ", "-")} for r in rows]
        results.append({
            "task": c["task"], "data": c["label"], "metric": MAIN_METRIC[c["task"]], "default": default,
            "default_score": scored[default], "best": best, "best_score": scored[best],
            "chosen": chosen, "chosen_on": c["select_on"], "scored_on": c["score_on"],
            "chosen_score": held[chosen], "default_held": held[default],
            "texts": len(c["scored"].texts), "embed_s": round(share, 1),
            "score_s": round(score_s, 1), "select_score_s": round(select_s, 1)})
        say(f"  {c['label']}: default {default} {scored[default]:.2f}, best {best} {scored[best]:.2f}; chosen on "
            f"{c['select_on']}: {chosen}, on {c['score_on']} {held[chosen]:.2f} (default {held[default]:.2f}); "
            f"scoring {score_s:.1f}s vs embedding ~{share:.1f}s")
    folder = out / "tasks" / Path(model).name
    write_report(all_rows, folder, n_layers=n)
    return {"model": model, "n_layers": n, "max_length": max_length, "texts": len(texts),
            "embed_s": round(embed_s, 1), "results": results}


def markdown(report: dict) -> str:
    lines = []
    for m in report["models"]:
        lines += [f"### {m['model']} ({m['n_layers']} layers, {m['texts']:,} texts embedded once in "
                  f"{m['embed_s']:.0f} s)", "",
                  "| task | data | metric | default | best cell (upper bound) | chosen on → scored on | chosen | "
                  "default there |", "|---|---|---|---:|---|---|---|---:|"]
        for r in m["results"]:
            lines.append(f"| {r['task']} | {r['data']} | {r['metric']} | {r['default_score']:.2f} | `{r['best']}` "
                         f"{r['best_score']:.2f} | {r['chosen_on']} → {r['scored_on']} | `{r['chosen']}` "
                         f"{r['chosen_score']:.2f} | {r['default_held']:.2f} |")
        lines += ["", "| data | texts | embedding (s, its share of the pass by tokens) | scoring the grid (s) | scoring / embedding |",
                  "|---|---:|---:|---:|---:|"]
        for r in m["results"]:
            lines.append(f"| {r['data']} | {r['texts']:,} | {r['embed_s']:.1f} | {r['score_s']:.1f} | "
                         f"{r['score_s'] / max(r['embed_s'], 1e-9):.2f} |")
        lines.append("")
    lines.append(f"`python studies/tasks_grid.py` at commit {report['git_commit']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python studies/tasks_grid.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None, help=f"repeatable (default: {', '.join(MODELS)})")
    ap.add_argument("--data", type=Path, default=None, help="the evaluation data folder (default: ../shared/data)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="smoke runs: cut every dataset")
    args = ap.parse_args(argv)
    cases = build_cases(args.data or default_data_dir(), args.limit)
    report = {"models": [run_model(m, cases, args.out, args.max_length, print) for m in (args.model or MODELS)]}
    report["git_commit"] = git_commit()
    write_study(args.out, "tasks_grid", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
