"""Curriculum buckets as training sources, and how mixture stages weight them.

With `pack --set curriculum.buckets=B`, every source's training documents are split
by a score into B buckets written as sources "<source>@b0" .. "<source>@b<B-1>"
(bucket 0 first in curriculum order: easiest, or best). Validation stays per source.

A mixture stage keeps naming sources; its optional `buckets: [m0, .., mB-1]` says how
a source's weight is shared among its buckets: in proportion to tokens x m_k.
"Easy first" is a first stage with buckets [1, 0, 0, 0]; "high quality in the
annealing stage" a last stage with buckets [1, 0, 0, 0] on a corpus bucketed by
quality_score (best first). Without `buckets` a source's weight is shared by tokens,
which is exactly the unbucketed behaviour.
"""

from __future__ import annotations

import re

from zerolm.errors import UserError

SEP = "@b"
_BUCKET = re.compile(r"^(.+)@b(\d+)$")


def bucket_name(source: str, k: int) -> str:
    return f"{source}{SEP}{k}"


def split_bucket(name: str) -> tuple[str, int | None]:
    """"wiki@b2" -> ("wiki", 2); "wiki" -> ("wiki", None)."""
    m = _BUCKET.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def base_source(name: str) -> str:
    return split_bucket(name)[0]


def bucketed_weights(weights: dict, multipliers: list, tokens_by_source: dict[str, int], any_key: str,
                     stage_name) -> dict[str, float]:
    """Unnormalized weight of every training source (bucket) of one mixture stage."""
    groups: dict[str, list[str]] = {}
    for s in tokens_by_source:
        groups.setdefault(base_source(s), []).append(s)
    if multipliers and not any(split_bucket(s)[1] is not None for s in tokens_by_source):
        raise UserError(f"mixture stage {stage_name!r} weights curriculum buckets, but the tokens were packed "
                        "without them (pack with curriculum.buckets > 1)")
    raw = {}
    for base, members in groups.items():
        if not weights:
            w = float(sum(tokens_by_source[s] for s in members))
        else:
            w = float(weights.get(base, weights.get(any_key, 0.0)))
        share = {}
        for s in members:
            k = split_bucket(s)[1]
            if multipliers and k is not None and k >= len(multipliers):
                raise UserError(f"mixture stage {stage_name!r} gives {len(multipliers)} bucket weights, but the "
                                f"tokens have bucket {k} ({s})")
            m = 1.0 if not multipliers or k is None else float(multipliers[k])
            share[s] = tokens_by_source[s] * m
        total = sum(share.values())
        for s in members:
            raw[s] = w * share[s] / total if total > 0 else 0.0
    return raw
