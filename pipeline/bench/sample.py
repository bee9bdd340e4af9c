"""The benchmark's texts: a seeded, shuffled mix of SciFact abstracts and distinct STS-B sentences.

Read through ``pipeline.evaldata`` (``load_beir`` for the SciFact corpus, ``load_sts`` for
the STS-B splits), then sampled exactly as the figures in ``BENCHMARKS.md`` were: documents
in corpus order, sentences de-duplicated in file order (train, dev, test; sentence1 then
sentence2 of each pair), one ``random.Random(seed)`` drawing the documents, then the
sentences, then shuffling the two together.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..evaldata import load_beir, load_sts

STSB_SPLITS = ("sts-train.csv", "sts-dev.csv", "sts-test.csv")


def sample_texts(data_dir: str | Path, docs: int, sentences: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``docs`` SciFact abstracts (``title + " " + text``) and ``sentences`` distinct STS-B sentences.

    Returns (texts, kinds) where kinds[i] is "doc" or "sentence". Input order is a fixed
    shuffle, as a real corpus would arrive: not sorted by length.
    """
    data_dir = Path(data_dir)
    corpus = data_dir / "scifact" / "corpus.jsonl"
    if not corpus.exists():
        raise FileNotFoundError(f"benchmark data not found: {corpus} (set --data or STRATA_DATA)")
    all_docs = [t for t in load_beir(data_dir / "scifact").doc_texts if t]
    distinct: dict[str, None] = {}
    for split in STSB_SPLITS:
        path = data_dir / "stsb" / split
        if not path.exists():
            continue
        sts = load_sts(path)
        for pair in zip(sts.sentence1, sts.sentence2):
            for s in pair:
                if s.strip():
                    distinct[s.strip()] = None
    sents = list(distinct)
    if docs > len(all_docs) or sentences > len(sents):
        raise ValueError(f"asked for {docs} documents and {sentences} sentences; the data has "
                         f"{len(all_docs)} and {len(sents)}")
    rng = random.Random(seed)
    picked = [(t, "doc") for t in rng.sample(all_docs, docs)] + [(t, "sentence") for t in rng.sample(sents, sentences)]
    rng.shuffle(picked)
    return [t for t, _ in picked], [k for _, k in picked]
