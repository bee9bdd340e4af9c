"""``python studies/families.py``: the best embedding a model gives without training, per family.

The measurement behind docs/findings.md's families table. Every choice is made on one split and
scored on another, and every fitted piece is fitted on labels that neither choose nor score, or on
unlabelled texts; nothing is scored on what it was fitted or chosen on:

- STS-B: variants chosen on **dev**, scored on **test**. Learned mixes are fitted on a seeded
  sample of **train** pairs (labels), drawn from those that share no pair with dev or test (STS-B
  repeats a few); transforms on the same train **sentences** (no labels).
  Templates: plain, prompteol, echo (each a forward pass of its own).
- SciFact: the **train** queries are cut in two by a seeded draw (``--mix-share`` of them, default
  half; a train query also asked in test is on neither side): learned mixes are fitted on the
  first part's qrels (``train-fit``), every family's variant is chosen on the other part
  (``train-select``), and scored on the **test** queries, over the
  whole corpus (documents cut at 256 tokens). Transforms are fitted on the corpus documents (no
  labels). Templates are applied to the queries only, documents stay plain (``QUERY~plain``):
  symmetric templates over 5,183 documents would cost a full corpus pass each on this CPU.

Families: the best raw cell, the best with post-processing, the best uniform mix, the best
learned mix, and the best per template; each against the ``L{N}.last`` default. The "oracle"
column (the best on test itself) is shown only to say how much the choice leaves behind.

Writes ``{out}/families.json`` (every row, the choices) and ``{out}/families.md`` (the tables), and
prints the tables. Only the public API: the evaluators, ``report.best_variants`` for the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: this checkout's pipeline, not another installed one
    sys.path.insert(0, str(ROOT))

from pipeline.bench.measure import git_commit, write_study  # noqa: E402
from pipeline.derive import Derivations  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402
from pipeline.evaldata import BeirData, StsData, default_data_dir, load_beir, load_sts  # noqa: E402
from pipeline.evaluate import evaluate_retrieval, evaluate_sts  # noqa: E402
from pipeline.metrics import retrieval_scores  # noqa: E402
from pipeline.report import best_variants, family_rules, main_metric, md_cell, validate_rows  # noqa: E402
from pipeline.request import resolve  # noqa: E402
from pipeline.transforms import parse_transforms  # noqa: E402
from pipeline.variants import Variant, parse_mixes  # noqa: E402

POOLINGS = "last,mean,wmean,mean_nosink,wmean_nosink"
TRANSFORMS = "none,center,abtt1,abtt3,whiten128,whiten256"
MIXES = "all,50%:100%,learned:all"
QUERY_INSTRUCTION = ("Instruct: Given a scientific claim, retrieve documents that support or refute the claim\n"
                     "Query: {text}")


class Memo:
    """An encoder that embeds each text once (train texts serve both the fits and every split)."""

    def __init__(self, encoder: Encoder):
        self.encoder, self.index, self.chunks = encoder, {}, []

    def encode(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.index]
        if new:
            t0 = time.perf_counter()
            res = self.encoder.encode(new)
            base = sum(len(next(iter(c.values()))) for c in self.chunks)
            self.index.update({t: base + i for i, t in enumerate(new)})
            self.chunks.append(dict(res.items()))
            print(f"    embedded {len(new):,} texts, {res.stats.tokens:,} tokens in {time.perf_counter() - t0:.0f}s",
                  flush=True)
        rows = np.array([self.index[t] for t in texts])
        out = {}
        for v in self.chunks[0]:
            full = np.concatenate([c[v] for c in self.chunks]) if len(self.chunks) > 1 else self.chunks[0][v]
            out[v] = full[rows]
        if len(self.chunks) > 1:  # keep one array per variant
            self.chunks = [{v: np.concatenate([c[v] for c in self.chunks]) for v in self.chunks[0]}]
        return out


def encoder_for(model: str, template: str, max_length: int) -> Memo:
    request = resolve(model, layers="all", poolings=POOLINGS, templates=[template], max_length=max_length,
                      digest=False)
    return Memo(Encoder.from_request(request))


def best(rows: list[dict]) -> dict:
    """The best of rows of one dataset and split (``report.best_variants``: ties to the shallower layer,
    then fewer fitted pieces, then the pooling listed first)."""
    (b,) = best_variants(rows).values()
    return b


def choose(select_rows: list[dict], score_rows: list[dict], n_layers: int) -> list[dict]:
    """Per family: the variant best on the selection split, and its score on the scoring split."""
    select_rows, score_rows = validate_rows(select_rows), validate_rows(score_rows)
    metric = main_metric(select_rows[0]["task"])
    sel = [r for r in select_rows if r["metric"] == metric and np.isfinite(r["score"])]
    test = {Variant.from_row(r): r for r in score_rows if r["metric"] == metric}
    default = test.get(Variant(n_layers, "last"))
    raw_pick = None
    out = []
    for label, member in family_rules(sel):
        cands = [r for r in sel if member(r)]
        if not cands:
            continue
        pick = best(cands)
        v = Variant.parse(pick["variant"])
        scored = test[v]
        oracle = best([test[Variant.from_row(r)] for r in cands])
        if label == "best raw cell":
            raw_pick = scored["score"]
        out.append({"family": label, "variant": v.name, "select_score": pick["score"], "test_score": scored["score"],
                    "vs_default": scored["score"] - default["score"] if default else None,
                    "vs_raw": None if raw_pick is None else scored["score"] - raw_pick,
                    "oracle_variant": oracle["variant"], "oracle_score": oracle["score"],
                    "fitted_on": pick.get("fitted_on") or "nothing fitted"})
    return [{"default": Variant(n_layers, "last").name, "default_test": default["score"] if default else None}, *out]


def sts_splits(data: Path, train_pairs: int, seed: int = 0) -> tuple[StsData, StsData, StsData, dict]:
    """(dev, test, train): train a seeded sample of ``train_pairs`` of the train pairs that share no pair
    (either order) with dev or test; and the counts."""
    dev, test, train_all = (load_sts(data / "stsb" / f"sts-{s}.csv") for s in ("dev", "test", "train"))
    evaluated = {frozenset(p) for split in (dev, test) for p in zip(split.sentence1, split.sentence2)}
    pool = [i for i, p in enumerate(zip(train_all.sentence1, train_all.sentence2)) if frozenset(p) not in evaluated]
    keep = np.sort(np.random.default_rng(seed).choice(pool, size=min(train_pairs, len(pool)), replace=False))
    train = StsData("stsb", [train_all.sentence1[i] for i in keep], [train_all.sentence2[i] for i in keep],
                    train_all.scores[keep], split="train")
    return dev, test, train, {"sampled": len(keep), "pool": len(pool), "train": len(train_all)}


def run_sts(model: str, data: Path, train_pairs: int, max_length: int, transforms: str) -> dict:
    dev, test, train, counts = sts_splits(data, train_pairs)
    print(f"  STS-B: {counts['sampled']:,} train pairs fit the learned mixes and transforms, drawn from the "
          f"{counts['pool']:,} of {counts['train']:,} that share no pair with dev or test", flush=True)
    fit_texts = tuple(dict.fromkeys(train.sentence1 + train.sentence2))
    rows_dev, rows_test = [], []
    n_layers = None
    for template in ("plain", "prompteol", "echo"):
        print(f"  STS-B, template {template}", flush=True)
        enc = encoder_for(model, template, max_length)
        n_layers = enc.encoder.n_layers
        d = Derivations(mixes=parse_mixes(MIXES, n_layers), transforms=parse_transforms(transforms),
                        mix_labels=train, fit_texts=fit_texts,
                        fit_source=f"STS-B train sentences (of {len(train):,} pairs)")
        if template != "plain":  # mixes and transforms on the plain grid only (each template is its own pass)
            d = Derivations()
        rows_dev += evaluate_sts(enc, dev, d)
        rows_test += evaluate_sts(enc, test, d)
        del enc
    return {"n_layers": n_layers, "train_pairs": counts,
            "dev": rows_dev, "test": rows_test, "families": choose(rows_dev, rows_test, n_layers)}


def query_rows(data: BeirData, qvec: dict, dvec: dict, template: str, doc_rows: np.ndarray) -> list[dict]:
    """Rows of ``QUERY~plain`` variants: queries under a template against the plain documents."""
    rows = []
    for v, q in qvec.items():
        scores = retrieval_scores(q, dvec[Variant(v.layer, v.pooling)][doc_rows], data.query_ids, data.doc_ids,
                                  data.qrels)
        name = Variant(v.layer, v.pooling, f"{template}~plain")
        rows += [{"task": "retrieval", "dataset": data.name, "split": data.split, "metric": m, **name.row_fields,
                  "score": float(s)} for m, s in scores.items()]
    return rows


def split_queries(data: BeirData, share: float, seed: int = 0, exclude: set[str] = frozenset()
                  ) -> tuple[BeirData, BeirData]:
    """The judged queries cut in two by a seeded draw over their distinct texts (a text asked twice
    falls on one side): (``{split}-fit``, ``{split}-select``); the corpus is the same for both.
    Queries whose text is in ``exclude`` (asked in the scored split too) are on neither side."""
    texts = [t for t in dict.fromkeys(data.query_texts) if t not in exclude]
    n_fit = int(round(share * len(texts)))
    if not 0 < n_fit < len(texts):
        raise SystemExit(f"--mix-share {share}: {len(texts)} distinct {data.split} queries leave one side empty")
    fit_texts = {texts[i] for i in np.random.default_rng(seed).choice(len(texts), size=n_fit, replace=False)}

    def side(keep: bool, name: str) -> BeirData:
        ids = [q for q, t in zip(data.query_ids, data.query_texts) if t not in exclude and (t in fit_texts) == keep]
        text = dict(zip(data.query_ids, data.query_texts))
        return BeirData(name=data.name, doc_ids=data.doc_ids, doc_texts=data.doc_texts, query_ids=ids,
                        query_texts=[text[q] for q in ids], qrels={q: data.qrels[q] for q in ids},
                        split=f"{data.split}-{name}", subset_note=data.subset_note)

    return side(True, "fit"), side(False, "select")


def scifact_splits(data: Path, mix_share: float) -> tuple[BeirData, BeirData, BeirData, int]:
    """(train-fit, train-select, test) and how many train queries were left out (asked in test too)."""
    train, test = load_beir(data / "scifact", split="train"), load_beir(data / "scifact", split="test")
    fit, select = split_queries(train, mix_share, exclude=set(test.query_texts))
    return fit, select, test, len(train.query_ids) - len(fit.query_ids) - len(select.query_ids)


def run_scifact(model: str, data: Path, max_length: int, transforms: str, mix_share: float) -> dict:
    fit, select, test, shared = scifact_splits(data, mix_share)
    print(f"  SciFact: {len(fit.query_ids)} train queries fit the learned mixes, {len(select.query_ids)} choose "
          f"({shared} asked in test too: left out), {len(test.query_ids)} test queries score; "
          f"{len(test.doc_ids):,} documents", flush=True)
    print("  SciFact, plain documents and queries", flush=True)
    enc = encoder_for(model, "plain", max_length)
    n_layers = enc.encoder.n_layers
    d = Derivations(mixes=parse_mixes(MIXES, n_layers), transforms=parse_transforms(transforms), mix_labels=fit)
    rows_select = evaluate_retrieval(enc, select, d)
    rows_test = evaluate_retrieval(enc, test, d)
    docs = enc.encode(test.doc_texts)
    doc_rows = np.arange(len(test.doc_texts))
    for template in ("prompteol", "echo", QUERY_INSTRUCTION):
        print(f"  SciFact, query template {template.splitlines()[0][:40]}", flush=True)
        qenc = encoder_for(model, template, max_length)
        name = next(iter(qenc.encoder.templates))
        for split, rows in ((select, rows_select), (test, rows_test)):
            rows += query_rows(split, qenc.encode(split.query_texts), docs, name, doc_rows)
    return {"n_layers": n_layers, "queries": {"fit": len(fit.query_ids), "select": len(select.query_ids),
                                              "left_out": shared, "test": len(test.query_ids)},
            "documents": len(test.doc_ids), "max_length": max_length,
            "select": rows_select, "test": rows_test, "families": choose(rows_select, rows_test, n_layers)}


def to_markdown(result: dict) -> str:
    lines = []
    for key in ("stsb", "scifact"):
        if key not in result:
            continue
        if key == "stsb":
            t = result[key]["train_pairs"]
            title = (f"STS-B (Spearman x100; chosen on dev, scored on test; mixes and transforms fitted on "
                     f"{t['sampled']:,} train pairs of the {t['pool']:,} sharing no pair with dev or test)")
            sel = "dev"
        else:
            q = result[key]["queries"]
            title = (f"SciFact (nDCG@10 x100; learned mixes fitted on {q['fit']} train queries, chosen on the other "
                     f"{q['select']} ({q['left_out']} asked in test too: left out), scored on the {q['test']} test "
                     "queries)")
            sel = "train-select"
        head, *fams = result[key]["families"]
        default = "–" if head["default_test"] is None else f"{head['default_test']:.2f}"
        lines += [f"### {title}", "", f"Default `{head['default']}` on test: {default}.", "",
                  f"| family | chosen on {sel} | {sel} | test | vs default | vs best raw cell | best on test (oracle) "
                  "| fitted on |", "|---|---|---:|---:|---:|---:|---|---|"]
        for f in fams:
            raw = "–" if f["vs_raw"] is None else f"{f['vs_raw']:+.2f}"
            dflt = "–" if f["vs_default"] is None else f"{f['vs_default']:+.2f}"
            lines.append(f"| {f['family']} | `{md_cell(f['variant'])}` | {f['select_score']:.2f} | "
                         f"{f['test_score']:.2f} | {dflt} | {raw} | `{md_cell(f['oracle_variant'])}` "
                         f"{f['oracle_score']:.2f} | {f['fitted_on']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python studies/families.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(default_data_dir()), help="folder with stsb/ and scifact/")
    p.add_argument("--out", default="bench-families", help="writes families.json and families.md here")
    p.add_argument("--train-pairs", type=int, default=2000, help="STS-B train pairs for learned mixes and fits")
    p.add_argument("--mix-share", type=float, default=0.5,
                   help="SciFact: share of the train queries that fit the learned mixes; the rest choose")
    p.add_argument("--only", choices=["stsb", "scifact"], default=None)
    p.add_argument("--transforms", default=TRANSFORMS)
    p.add_argument("--sts-max-length", type=int, default=128)
    p.add_argument("--scifact-max-length", type=int, default=256)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "poolings": POOLINGS, "transforms": args.transforms, "mixes": MIXES,
              "commit": git_commit(__file__) or "-", "argv": sys.argv[1:] if argv is None else list(argv)}
    t0 = time.perf_counter()
    if args.only in (None, "stsb"):
        result["stsb"] = run_sts(args.model, Path(args.data), args.train_pairs, args.sts_max_length, args.transforms)
        result["stsb"]["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "families.json").write_text(json.dumps(result, indent=1))
    if args.only in (None, "scifact"):
        t1 = time.perf_counter()
        result["scifact"] = run_scifact(args.model, Path(args.data), args.scifact_max_length, args.transforms,
                                        args.mix_share)
        result["scifact"]["seconds"] = round(time.perf_counter() - t1, 1)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    written = write_study(out, "families", result, to_markdown(result))
    print(f"{result['seconds']:.0f}s; commit {result['commit']}; written: {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
