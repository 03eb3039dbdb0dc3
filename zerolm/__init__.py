"""zerolm: raw Chinese/English text to a served, evaluated chat model.

This package holds what every stage shares: the CLI (`zerolm ...`), config loading
(YAML + `--set` overrides into pydantic models), the stage-output protocol
(`_SUCCESS` with config hash) and the Ray connection helper. The stages themselves
live in the top-level packages `dataproc`, `train` and `serve`.
"""

__version__ = "0.1.0"
