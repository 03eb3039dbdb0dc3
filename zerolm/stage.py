"""The stage-output protocol every stage follows (see DESIGN.md, "The flow").

A stage writes only its own output folder and writes `_SUCCESS` last, holding the
config hash. So:
  * same config, `_SUCCESS` present  -> the stage is a no-op;
  * no `_SUCCESS` (killed half-way)    -> the folder is ours (it has `_ZEROLM_STAGE`),
                                          the leftovers are removed and the stage restarts;
  * `_SUCCESS` from another config     -> refuse unless the user asked to overwrite;
  * a non-empty folder that is not ours -> refuse, never delete a user's files.
Readers of a stage's output call `require_done` so they never consume a half output.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from zerolm.errors import UserError

SUCCESS = "_SUCCESS"
OWNER = "_ZEROLM_STAGE"


@dataclass
class StageDir:
    path: Path
    stage: str
    config_hash: str

    @property
    def success_file(self) -> Path:
        return self.path / SUCCESS

    def done_info(self) -> dict | None:
        try:
            return json.loads(self.success_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # (path a file: begin() says so)
            return None

    def is_done(self) -> bool:
        info = self.done_info()
        return bool(info) and info.get("stage") == self.stage and info.get("config_hash") == self.config_hash

    def begin(self, *, overwrite: bool = False) -> bool:
        """Prepare the folder. Returns False when the same config already finished
        (caller should skip), True when the caller should (re)compute."""
        if self.is_done() and not overwrite:
            return False
        if self.path.exists():
            if not self.path.is_dir():
                raise UserError(f"output {self.path} exists and is not a folder")
            entries = [p for p in self.path.iterdir()]
            ours = (self.path / OWNER).exists()
            if entries and not ours:
                raise UserError(
                    f"output folder {self.path} is not empty and was not written by zerolm; "
                    "choose a new folder"
                )
            info = self.done_info()
            if info and not overwrite:
                raise UserError(
                    f"output {self.path} holds a finished '{info.get('stage')}' run with another "
                    "config; pass --overwrite to replace it or choose a new folder"
                )
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / OWNER).write_text(
            json.dumps({"stage": self.stage, "config_hash": self.config_hash, "started": time.time()}),
            encoding="utf-8",
        )
        return True

    def finish(self, inputs: list[dict] | None = None, **extra) -> None:
        """Write `_SUCCESS` last, atomically (write to a temp name, then rename). It holds
        the lineage: `inputs` (records from zerolm/lineage.py) and package versions."""
        from zerolm.lineage import versions

        info = {"stage": self.stage, "config_hash": self.config_hash, "finished": time.time(),
                "inputs": inputs or [], "versions": versions(), **extra}
        tmp = self.path / (SUCCESS + ".tmp")
        tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.success_file)


def require_done(path: str | Path, stage: str) -> dict:
    """For a stage that reads a previous stage's output: fail clearly on a missing or
    half-written folder. Returns the `_SUCCESS` info."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist (expected the output of '{stage}')")
    try:
        info = json.loads((path / SUCCESS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a finished '{stage}' output (no {SUCCESS}; was it interrupted?)")
    except json.JSONDecodeError:
        raise UserError(f"{path}/{SUCCESS} is corrupt")
    if info.get("stage") != stage:
        raise UserError(f"{path} is a '{info.get('stage')}' output, expected '{stage}'")
    return info


def write_json_atomic(path: str | Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
