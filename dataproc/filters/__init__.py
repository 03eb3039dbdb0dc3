"""Quality filters of the cleaning job and their registry.

REGISTRY maps a filter's config key to (config model, filter class), in the order the
filters run: cheapest first, so the expensive ones (repetition) see fewer documents.
`FiltersConfig` (the `filters:` section of the data config) is generated from it, so
adding a filter is one file, one line here, and one test.

Not in the registry: outlier.py (the mean ± k·σ rule needs corpus statistics from a
first pass, so the pipeline runs it separately) and the shared helpers charclass.py
(character classes), textstats.py (vectorised per-document statistics) and ngrams.py
(batch-wide duplicate detection). The default bad-word list is the package data file
badwords_default.txt.
"""

from __future__ import annotations

from pydantic import Field, create_model

from dataproc.base import Filter
from dataproc.filters.badwords import BadwordsConfig, BadwordsFilter
from dataproc.filters.length import LengthConfig, LengthFilter
from dataproc.filters.repetition import RepetitionConfig, RepetitionFilter
from dataproc.filters.script import ScriptConfig, ScriptFilter
from dataproc.filters.symbols import SymbolsConfig, SymbolsFilter
from zerolm.config import StrictModel

REGISTRY: dict[str, tuple[type[StrictModel], type[Filter]]] = {
    "length": (LengthConfig, LengthFilter),
    "script": (ScriptConfig, ScriptFilter),
    "symbols": (SymbolsConfig, SymbolsFilter),
    "badwords": (BadwordsConfig, BadwordsFilter),
    "repetition": (RepetitionConfig, RepetitionFilter),
}

FiltersConfig = create_model(
    "FiltersConfig",
    __base__=StrictModel,
    __doc__="One section per filter (see dataproc/filters/); each has `enabled`.",
    **{name: (cfg_cls, Field(default_factory=cfg_cls)) for name, (cfg_cls, _) in REGISTRY.items()},
)


def build_filters(cfg: FiltersConfig) -> list[Filter]:
    """The enabled filters, in registry order."""
    out = []
    for name, (_, filter_cls) in REGISTRY.items():
        sub = getattr(cfg, name)
        if sub.enabled:
            out.append(filter_cls(sub))
    return out


__all__ = ["REGISTRY", "FiltersConfig", "build_filters"]
