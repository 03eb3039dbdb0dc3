"""ray_cluster.yaml is a config `ray up` accepts and that installs this checkout:
it passes the JSON schema shipped inside the installed ray package and Ray's own
pre-launch checks, its groups carry the resources the docs promise, every node
installs the zerolm wheel that file_mounts uploads (no made-up URLs), and the local
side of file_mounts exists once the wheel is built.

Nothing here talks to a cloud; `ray up` itself needs credentials."""

from __future__ import annotations

import copy
import fnmatch
import json
import posixpath
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema  # a dependency of ray itself
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO

CONFIG = REPO / "ray_cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
WHEEL_GLOB = "zerolm-*.whl"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def schema() -> dict:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def setup_per_group(cfg: dict) -> dict[str, list[str]]:
    """The commands each group runs, merged as Ray merges them: the head runs
    setup_commands + head_setup_commands; a worker runs its node type's own
    worker_setup_commands if it has them (they replace the global lists), else
    setup_commands + worker_setup_commands."""
    full = prepare_config(copy.deepcopy(cfg))
    out = {}
    for name, node in full["available_node_types"].items():
        if name == full["head_node_type"]:
            out[name] = full["head_setup_commands"]
        else:
            out[name] = node.get("worker_setup_commands", full["worker_setup_commands"])
    return out


def test_config_passes_rays_schema_and_prelaunch_checks():
    cfg = load()
    jsonschema.validate(cfg, schema())
    # What `ray up` does before it contacts the cloud: fill defaults, validate again
    # (head_node_type among the node types, min_workers within max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_train"]["resources"].update(GPU="one"),
    lambda c: c["available_node_types"]["cpu_data"].update(min_replicas=0),  # a KubeRay spelling
    lambda c: c["available_node_types"]["head"].pop("node_config"),
    lambda c: c.update(setup_commands="pip install zerolm"),  # a string, not a list
], ids=["gpu-not-int", "unknown-key", "no-node-config", "commands-not-list"])
def test_a_broken_copy_fails_the_schema(mutate):
    cfg = load()
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema())


def test_a_head_type_that_is_not_a_node_type_fails_rays_checks():
    cfg = load()
    cfg["head_node_type"] = "ray_head"
    with pytest.raises(ValueError):
        validate_config(prepare_config(cfg))


def test_groups_and_their_resources():
    cfg = load()
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_data", "gpu_train"}
    assert cfg["head_node_type"] == "head"
    # The head schedules and serves the dashboard; data tasks and training never run there.
    assert types["head"]["resources"]["CPU"] == 0
    assert types["head"]["max_workers"] == 0
    data, gpu = types["cpu_data"], types["gpu_train"]
    assert data["min_workers"] == 0 < data["max_workers"]
    assert data["resources"].get("GPU", 0) == 0 and data["resources"]["CPU"] > 0
    assert data["resources"].get("data_node") == 1 and "train_node" not in data["resources"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > 0
    assert gpu["resources"].get("train_node") == 1 and "data_node" not in gpu["resources"]
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())


def test_every_group_installs_the_uploaded_wheel_with_the_right_torch():
    cfg = load()
    remote_dirs = [r for r, local in cfg["file_mounts"].items() if Path(local).name == "dist"]
    assert len(remote_dirs) == 1, cfg["file_mounts"]
    wheel = posixpath.join(remote_dirs[0], WHEEL_GLOB)
    for group, commands in setup_per_group(cfg).items():
        text = "\n".join(commands)
        assert "github.com/zerolm" not in text and "git+" not in text, (group, text)
        installs = [i for i, c in enumerate(commands) if c.startswith("pip install") and wheel in c]
        torch = [i for i, c in enumerate(commands) if "pip install" in c and " torch" in c]
        assert installs and torch and torch[0] < installs[0], (group, commands)
        cpu_torch = CPU_INDEX in commands[torch[0]]
        # CPU groups must not pull the CUDA build; the GPU group needs it.
        assert cpu_torch == (cfg["available_node_types"][group]["resources"].get("GPU", 0) == 0), (group, commands)


def build_wheel(out: Path, tmp: Path) -> Path:
    """This checkout's wheel, built from a copy of its sources (the repository gets
    no build/ or egg-info litter) by the backend pyproject.toml names, without
    isolation: what `python -m build --wheel` does, minus the download of a fresh
    setuptools."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in ("zerolm", "dataproc", "train", "serve"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out.mkdir()
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_file_mounts_local_paths_exist_once_the_wheel_is_built(tmp_path):
    cfg = load()
    dist = tmp_path / "dist"
    wheel = build_wheel(dist, tmp_path)
    for remote, local in cfg["file_mounts"].items():
        if local.rstrip("/") == "dist":
            # `ray up` runs from the repository root, where `python -m build` writes dist/.
            assert [p.name for p in dist.iterdir()] == [wheel.name]
            assert fnmatch.fnmatch(wheel.name, WHEEL_GLOB)
        else:
            assert (REPO / Path(local).expanduser()).exists(), (remote, local)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {"zerolm/cli.py", "dataproc/pipeline.py", "train/launch.py", "serve/__init__.py"} <= names
    assert "zerolm = zerolm.cli:main" in entry_points
