"""``python -m pipeline.bench``: the benchmark, or (``--child SPEC``) one of its modes."""

from .driver import main

raise SystemExit(main())
