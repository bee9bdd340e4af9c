"""``strata bench``: what one forward pass for a whole layer x pooling grid buys, measured.

Four ways to embed the same texts with the same model and the same pooling code
(``pipeline.pooling.pool``), so only the pass structure differs:

- ``naive``: one full-model pass per variant (``AutoModel``, ``output_hidden_states=True``,
  fixed batches of 32 in input order, right padding by the tokenizer), pooling that variant;
- ``hf-single-pass``: the same batches, one full pass per batch, every variant pooled from
  the returned hidden states;
- ``strata-encoder``: ``pipeline.encoder.Encoder.encode`` (length-sorted token-budget
  batches, the pass truncated after the deepest requested block);
- ``strata-ray``: end to end through Ray Data with ``pipeline.runner.embed`` on Parquet
  shards.

Each mode runs in a fresh subprocess, so its peak RSS (``getrusage`` in the child) is its
own; model loading is timed apart from embedding. Every mode's embeddings are compared
with the untruncated model's (``hf-single-pass``) so the modes are known to compute the
same thing. A dense-matmul probe gives the attainable FLOP/s that the model FLOP/s of each
mode is set against.

Model FLOPs per token of a pass that runs ``L`` blocks on a batch padded to ``T`` tokens:
``2 x (parameters of L blocks) + 4 x L x T x hidden`` (attention scores and mixing, dense,
not causal-halved); the embedding lookup and LM head are not counted. "executed" FLOPs
use the padded shapes a mode really ran (and its real depth: the naive and hf modes always
run every block); "useful" FLOPs are the least work the grid needs (deepest requested
layer, each text's own length) and are the same for every mode of a grid.

Use ``--quick`` for a small sample (under 3 minutes on 2 CPU cores); the default run (64
abstracts + 192 sentences on CPU, 1024 + 3072 on CUDA; about 25 minutes on 2 CPU cores) is what
``BENCHMARKS.md`` records.

Modules: ``options`` (command line, settings, grids), ``sample`` (the texts), ``driver``
(the parent: one child process per mode, then the report), ``modes`` (what each child
runs), ``measure`` (clocks, memory, FLOPs, machine, comparisons and ratios), ``markdown``
(the tables), ``overhead`` (``--embed-vs-encoder``). The studies behind the documentation's tables
(families, quantised outputs, index recall and memory, ...) are scripts in ``studies/``, outside
this package.
"""

from .driver import main, run
from .options import add_arguments

__all__ = ["add_arguments", "run", "main"]
