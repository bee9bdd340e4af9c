"""``python -m pipeline.bench.families``: the best embedding a model gives without training, per family.

The measurement behind the README's families table. Every choice is made on one split and
scored on another, and every fitted piece is fitted on a third or on unlabelled texts:

- STS-B: variants chosen on **dev**, scored on **test**. Learned mixes are fitted on a seeded
  sample of **train** pairs (labels); transforms on the same train **sentences** (no labels).
  Templates: plain, prompteol, echo (each a forward pass of its own).
- SciFact: variants chosen on the **train** queries, scored on the **test** queries, over the
  whole corpus (documents cut at 256 tokens). Learned mixes are fitted on the train qrels;
  transforms on the corpus documents (no labels). Templates are applied to the queries only,
  documents stay plain (``QUERY~plain``): symmetric templates over 5,183 documents would cost a
  full corpus pass each on this CPU.

Families: the best raw cell, the best with post-processing, the best uniform mix, the best
learned mix, and the best per template; each against the ``L{N}.last`` default. The "oracle"
column (the best on test itself) is shown only to say how much the dev choice leaves behind.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..derive import Derivations
from ..encoder import Encoder
from ..evaldata import BeirData, StsData, default_data_dir, load_beir, load_sts
from ..evaluate import evaluate_retrieval, evaluate_sts
from ..metrics import retrieval_scores
from ..report import _best, family_rules, main_metric, md_cell, validate_rows
from ..request import resolve
from ..transforms import parse_transforms
from ..variants import Variant, parse_mixes

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


def _encoder(model: str, template: str, max_length: int) -> Memo:
    request = resolve(model, layers="all", poolings=POOLINGS, templates=[template], max_length=max_length,
                      digest=False)
    return Memo(Encoder.from_request(request))


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
        pick = _best(cands)
        v = Variant.from_row(pick)
        scored = test[v]
        oracle = _best([test[Variant.from_row(r)] for r in cands])
        if label == "best raw cell":
            raw_pick = scored["score"]
        out.append({"family": label, "variant": v.name, "select_score": pick["score"], "test_score": scored["score"],
                    "vs_default": scored["score"] - default["score"] if default else None,
                    "vs_raw": None if raw_pick is None else scored["score"] - raw_pick,
                    "oracle_variant": Variant.from_row(oracle).name, "oracle_score": oracle["score"],
                    "fitted_on": pick.get("fitted_on") or "nothing fitted"})
    return [{"default": Variant(n_layers, "last").name, "default_test": default["score"] if default else None}, *out]


def run_sts(model: str, data: Path, train_pairs: int, max_length: int, transforms: str) -> dict:
    dev, test, train_all = (load_sts(data / "stsb" / f"sts-{s}.csv") for s in ("dev", "test", "train"))
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(train_all), size=min(train_pairs, len(train_all)), replace=False))
    train = StsData("stsb", [train_all.sentence1[i] for i in keep], [train_all.sentence2[i] for i in keep],
                    train_all.scores[keep], split="train")
    fit_texts = tuple(dict.fromkeys(train.sentence1 + train.sentence2))
    rows_dev, rows_test = [], []
    n_layers = None
    for template in ("plain", "prompteol", "echo"):
        print(f"  STS-B, template {template}", flush=True)
        enc = _encoder(model, template, max_length)
        n_layers = enc.encoder.n_layers
        d = Derivations(mixes=parse_mixes(MIXES, n_layers), transforms=parse_transforms(transforms),
                        mix_labels=train, fit_texts=fit_texts,
                        fit_source=f"STS-B train sentences (of {len(train):,} pairs)")
        if template != "plain":  # mixes and transforms on the plain grid only (each template is its own pass)
            d = Derivations()
        rows_dev += evaluate_sts(enc, dev, d)
        rows_test += evaluate_sts(enc, test, d)
        del enc
    return {"n_layers": n_layers, "dev": rows_dev, "test": rows_test,
            "families": choose(rows_dev, rows_test, n_layers)}


def _query_rows(data: BeirData, qvec: dict, dvec: dict, template: str, doc_rows: np.ndarray) -> list[dict]:
    rows = []
    for v, q in qvec.items():
        scores = retrieval_scores(q, dvec[Variant(v.layer, v.pooling)][doc_rows], data.query_ids, data.doc_ids,
                                  data.qrels)
        name = Variant(v.layer, v.pooling, f"{template}~plain")
        rows += [{"task": "retrieval", "dataset": data.name, "split": data.split, "metric": m, **name.row_fields,
                  "score": float(s)} for m, s in scores.items()]
    return rows


def run_scifact(model: str, data: Path, max_length: int, transforms: str) -> dict:
    train, test = load_beir(data / "scifact", split="train"), load_beir(data / "scifact", split="test")
    print("  SciFact, plain documents and queries", flush=True)
    enc = _encoder(model, "plain", max_length)
    n_layers = enc.encoder.n_layers
    d = Derivations(mixes=parse_mixes(MIXES, n_layers), transforms=parse_transforms(transforms), mix_labels=train)
    rows_train = evaluate_retrieval(enc, train, d)
    rows_test = evaluate_retrieval(enc, test, d)
    docs = enc.encode(train.doc_texts)
    doc_rows = np.arange(len(train.doc_texts))
    for template in ("prompteol", "echo", QUERY_INSTRUCTION):
        print(f"  SciFact, query template {template.splitlines()[0][:40]}", flush=True)
        qenc = _encoder(model, template, max_length)
        name = next(iter(qenc.encoder.templates))
        for split, rows in ((train, rows_train), (test, rows_test)):
            rows += _query_rows(split, qenc.encode(split.query_texts), docs, name, doc_rows)
    return {"n_layers": n_layers, "train": rows_train, "test": rows_test,
            "families": choose(rows_train, rows_test, n_layers)}


def to_markdown(result: dict) -> str:
    lines = []
    for title, key, sel in (("STS-B (Spearman x100; chosen on dev, scored on test)", "stsb", "dev"),
                            ("SciFact (nDCG@10 x100; chosen on train queries, scored on test)", "scifact", "train")):
        if key not in result:
            continue
        head, *fams = result[key]["families"]
        lines += [f"### {title}", "", f"Default `{head['default']}` on test: {head['default_test']:.2f}.", "",
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
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.families", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(default_data_dir()))
    p.add_argument("--out", default="bench-families")
    p.add_argument("--train-pairs", type=int, default=2000, help="STS-B train pairs for learned mixes and fits")
    p.add_argument("--only", choices=["stsb", "scifact"], default=None)
    p.add_argument("--transforms", default=TRANSFORMS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "poolings": POOLINGS, "transforms": args.transforms, "mixes": MIXES}
    t0 = time.perf_counter()
    if args.only in (None, "stsb"):
        result["stsb"] = run_sts(args.model, Path(args.data), args.train_pairs, 128, args.transforms)
        (out / "families.json").write_text(json.dumps(result, indent=1))
    if args.only in (None, "scifact"):
        result["scifact"] = run_scifact(args.model, Path(args.data), 256, args.transforms)
    result["seconds"] = time.perf_counter() - t0
    (out / "families.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (out / "families.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
