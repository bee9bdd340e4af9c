"""Prompt templates: text around the input, tokenised apart from it so the text's span is exact.

A template is text with one or two ``{text}`` slots (two: echo embeddings, whose second copy
is pooled). ``plain`` (``{text}``) is today's behaviour, bit for bit: the tokenizer sees the
text alone, with its usual special tokens. Any other template is tokenised in pieces,

    [specials before] prefix [text] middle [text] suffix [specials after] [eos]

with each piece tokenised on its own (the text never merges with the prompt's words), so the
last copy of the text is a known token span. A piece's trailing whitespace is tokenised with the
text after it, as in the whole string (``"Query: {text}"`` gives ``Query:`` then ``Ġhello``, not a
lone ``Ġ`` then ``hello``); whitespace that stays tokens of its own is prompt, outside the span.
Every pooling except ``last`` pools that span only
(the prompt is left out, as llm2vec and sentence-transformers' ``include_prompt=False`` do),
and ``last`` reads the last token of the whole sequence (what PromptEOL reads). Truncation
cuts the text, never the template, and is counted.

Built-ins: ``plain``; ``prompteol`` (Jiang et al. 2023); ``echo`` (Springer et al. 2024, the
paper's wording). A user template is any string with ``{text}``; it is named ``t_`` and the
first 8 hex digits of its sha256 (``t_1a2b3c4d``), and its full text is recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .variants import SpecError

SLOT = "{text}"
BUILTIN = {
    "plain": SLOT,
    "prompteol": 'This sentence : "{text}" means in one word:"',
    "echo": "Rewrite the sentence: {text}\nRewritten sentence: {text}",
}
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# A text longer than this many characters per token of its budget is cut before tokenising,
# so a multi-megabyte document costs bounded memory; it is counted as truncated.
CHARS_PER_TOKEN_GUARD = 64


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    def __post_init__(self):
        n = self.text.count(SLOT)
        if n not in (1, 2):
            raise SpecError(f"template {self.name!r} has {n} {SLOT} slots: a template holds the text once, "
                            f"or twice (echo)")

    @property
    def is_plain(self) -> bool:
        return self.text == SLOT

    @property
    def text_takes_whitespace(self) -> bool:
        """Whether a piece before a slot ends in whitespace, which is tokenised with the text (so
        outputs of this template made before that rule read differently; see the signature)."""
        return any(p != p.rstrip() for p in self.pieces[:-1])

    @property
    def pieces(self) -> list[str]:
        """The template's text around the slots: 2 pieces for one slot, 3 for two."""
        return self.text.split(SLOT)


# How the text after a piece's trailing whitespace is tokenised, recorded where vectors are kept
# (an output's signature, a probe's settings): before 2026-12 the whitespace was a piece of its own.
TOKENS_RULE = "whitespace-with-text"


def check_tokens_rule(named: dict[str, str], used: Iterable[str], recorded: str | None, where: str) -> None:
    """Refuse to embed new texts against vectors ``where`` made under the older rule with any of the
    ``used`` templates (``named``: name -> text, as recorded there): they would be tokenised
    differently and not match."""
    old = [t for t in dict.fromkeys(used) if t in named and Template(t, named[t]).text_takes_whitespace]
    if old and recorded != TOKENS_RULE:
        raise SpecError(f"{where} was embedded under template {', '.join(old)} before a piece's trailing whitespace "
                        f"was tokenised with the text (2026-12): new vectors would not match its own; embed it again")


def parse_template(spec: str) -> Template:
    """A built-in name, or a template string with one or two ``{text}`` slots."""
    spec = spec.strip() if spec.strip() in BUILTIN else spec
    if spec in BUILTIN:
        return Template(spec, BUILTIN[spec])
    if SLOT not in spec:
        if _NAME.fullmatch(spec):
            raise SpecError(f"unknown template {spec!r}: use a built-in ({', '.join(BUILTIN)}) or a template "
                            f"string with a {SLOT} slot")
        raise SpecError(f"template {spec!r} has no {SLOT} slot: the text goes where {SLOT} stands")
    if spec == SLOT:
        return Template("plain", SLOT)
    return Template("t_" + hashlib.sha256(spec.encode()).hexdigest()[:8], spec)


def parse_templates(spec: str | Sequence[str] | None) -> tuple[Template, ...]:
    """A comma-separated list of built-in names, or a list of names and template strings.

    A template string may contain commas, so on the command line only built-in names are split
    on commas; give a template string on its own (``--templates 'Query: {text}'``) or as a list.
    """
    if spec is None:
        return (Template("plain", SLOT),)
    if isinstance(spec, str):
        items = [p.strip() for p in spec.split(",")] if SLOT not in spec else [spec]
    else:
        items = list(spec)
    items = [i for i in items if i.strip()]
    if not items:
        raise SpecError(f"empty template list: name at least one ({', '.join(BUILTIN)} or a string with {SLOT})")
    out = list(dict.fromkeys(parse_template(i) for i in items))
    return tuple(out)


@dataclass
class Tokenized:
    """Token ids per text under one template, the [start, stop) span of the (last copy of the) text,
    and whether the text was truncated."""

    ids: list[list[int]]
    spans: np.ndarray  # (n, 2) int64
    truncated: np.ndarray  # (n,) bool


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [BOS] | [], [CLS] | [SEP])."""
    with_sp = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(with_sp) - len(bare) + 1):
        if with_sp[i:i + len(bare)] == bare:
            return list(with_sp[:i]), list(with_sp[i + len(bare):])
    return [], []


def clean_text(text: str) -> str:
    """Replace invalid surrogates (which tokenizers refuse) instead of failing the batch."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def tokenize_plain(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per text, truncated at ``max_length``, and whether each text was truncated.

    Texts longer than ``max_length * CHARS_PER_TOKEN_GUARD`` characters are cut first (and
    counted as truncated), so a giant document costs bounded memory.
    """
    limit = max_length * CHARS_PER_TOKEN_GUARD
    cut = np.array([len(t) > limit for t in texts], dtype=bool)
    clipped = [clean_text(t[:limit]) for t in texts]
    enc = tokenizer(clipped, truncation=True, max_length=max_length, return_overflowing_tokens=True,
                    return_attention_mask=False, split_special_tokens=True)  # corpus text is text
    mapping = enc.get("overflow_to_sample_mapping")
    if mapping is None:  # slow tokenizers: no overflow information
        return [list(x) for x in enc["input_ids"]], cut
    ids: list[list[int] | None] = [None] * len(texts)
    truncated = cut.copy()
    for chunk, row in zip(enc["input_ids"], mapping):
        if ids[row] is None:
            ids[row] = list(chunk)
        else:
            truncated[row] = True  # a second chunk: the text did not fit
    return ids, truncated


def text_budget(template: Template, tokenizer, max_length: int, append_eos: bool = False) -> int:
    """Tokens left for each copy of the text once the template (and special tokens) are placed."""
    return (max_length - fixed_tokens(template, tokenizer, append_eos)) // (len(template.pieces) - 1)


def fixed_tokens(template: Template, tokenizer, append_eos: bool = False) -> int:
    """Tokens the template and the special tokens take, whatever the text (whitespace that goes with
    the text counts here too, for the tokens it takes where it does not merge)."""
    before, after = _specials(tokenizer)
    fixed = len(before) + len(after) + int(append_eos and tokenizer.eos_token_id is not None)
    pieces, lead = _split(template)
    return fixed + sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces + lead)


def _split(template: Template) -> tuple[list[str], list[str]]:
    """The pieces as tokenised, and the whitespace each slot's text is tokenised with.

    A piece's trailing whitespace goes with the text after it, as in the whole string:
    ``"Query: {text}"`` tokenises as ``"Query:"`` and ``" hello"``, so the text reads ``Ġhello``
    (``▁hello``), not a lone ``Ġ`` then ``hello``; ``"...:\n\n{text}"`` gives ``Ċ Ċ hello``, as the
    whole string does, not ``ĊĊ`` then ``hello``.
    """
    pieces, lead = [], []
    for k, piece in enumerate(template.pieces):
        if k < len(template.pieces) - 1:
            body = piece.rstrip()
            pieces.append(body)
            lead.append(piece[len(body):])
        else:
            pieces.append(piece)
    return pieces, lead


def check_fits(template: Template, tokenizer, max_length: int, append_eos: bool = False) -> int:
    """The text budget, or a one-line error when the template leaves no room for any text."""
    budget = text_budget(template, tokenizer, max_length, append_eos)
    if budget < 1:
        raise SpecError(f"template {template.name!r} takes {fixed_tokens(template, tokenizer, append_eos)} of "
                        f"max_length {max_length} tokens and leaves no room for the text: shorten it or raise "
                        f"max_length")
    return budget


def tokenize(tokenizer, texts: Sequence[str], max_length: int, template: Template | None = None,
             append_eos: bool = False) -> Tokenized:
    """Tokenise texts under a template (see the module doc); ``plain`` is the tokenizer's own call."""
    template = template or Template("plain", SLOT)
    if template.is_plain and not append_eos:
        ids, truncated = tokenize_plain(tokenizer, texts, max_length)
        spans = np.array([[0, len(x)] for x in ids], dtype=np.int64).reshape(-1, 2)
        return Tokenized(ids, spans, truncated)
    budget = check_fits(template, tokenizer, max_length, append_eos)
    before, after = _specials(tokenizer)
    texts_of_pieces, lead = _split(template)
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts_of_pieces]
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    limit = budget * CHARS_PER_TOKEN_GUARD
    clipped = [clean_text(t[:limit]) for t in texts]
    # the text is tokenised as text (markup such as "<|im_end|>" in it is not a control token);
    # the template's pieces above may use special tokens on purpose. One tokenisation per
    # distinct leading whitespace (echo's two slots may differ).
    copies = {ws: tokenizer([ws + t for t in clipped], add_special_tokens=False, split_special_tokens=True)["input_ids"]
              if clipped else [] for ws in dict.fromkeys(lead)}
    blank_run = _blank_run(tokenizer)
    ws_tokens = {ws: len(tokenizer(ws, add_special_tokens=False)["input_ids"]) for ws in lead}  # in fixed_tokens
    ids, spans, truncated = [], np.zeros((len(texts), 2), dtype=np.int64), np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        row = list(before) + list(pieces[0])
        for ws, piece in zip(lead, pieces[1:]):
            tok = copies[ws][i]
            # the piece's whitespace, where it stays tokens of its own ("Ċ", or "Ġ" before a digit), is prompt
            own = blank_run(tok, len((ws + _leading_space(clipped[i])).encode("utf-8"))) if ws else 0
            keep = min(own, ws_tokens[ws]) + budget  # whitespace beyond the piece's own tokens: text budget
            truncated[i] |= len(tok) > keep or len(text) > limit
            tok = list(tok[:keep])
            spans[i] = (len(row) + min(own, len(tok)), len(row) + len(tok))
            row += tok + list(piece)
        ids.append(row + list(after) + eos)
    return Tokenized(ids, spans, truncated)


def _leading_space(text: str) -> str:
    return text[:len(text) - len(text.lstrip())]


def _blank_run(tokenizer):
    """How many leading tokens of a sequence decode, together, to whitespace only, looking at no
    more than ``most`` tokens (a byte-level tokenizer spells U+00A0 as two tokens that decode to it
    only together). Cached per prefix."""
    cache: dict[tuple, bool] = {}

    def blank(prefix: tuple) -> bool:
        if prefix not in cache:
            cache[prefix] = not tokenizer.decode(list(prefix)).strip()
        return cache[prefix]

    def run(tok: Sequence[int], most: int) -> int:
        return max((k for k in range(1, min(most, len(tok)) + 1) if blank(tuple(tok[:k]))), default=0)

    return run
