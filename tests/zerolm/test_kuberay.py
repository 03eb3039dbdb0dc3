"""kuberay/ holds manifests KubeRay accepts and that match ray_cluster.yaml: the
fields the RayCluster/RayJob CRDs require, both worker groups with their resources
as Ray's KubeRay autoscaler reads them, the shared volume on every pod, a RayJob
whose cluster is the same as raycluster.yaml's and whose entrypoint is a zerolm
command the CLI accepts, and an image built from this checkout.

No KubeRay CRD schema ships in any installed package, so the required fields are
checked here by hand; what the autoscaler makes of the groups is checked with Ray's
own converter (the code the in-tree autoscaler runs)."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from tests.conftest import REPO

KUBERAY = REPO / "kuberay"
GROUPS = {"cpu-data", "gpu-train"}
CLAIM = "zerolm-data"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RayCluster / RayJob names
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # pod names KubeRay derives from groupName


def docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / name).read_text(encoding="utf-8")))


def raycluster() -> dict:
    return next(d for d in docs("raycluster.yaml") if d["kind"] == "RayCluster")


def rayjob() -> dict:
    (job,) = docs("rayjob.yaml")
    return job


def check_pod(template: dict, where: str) -> None:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    claims = {v["name"] for v in spec.get("volumes", [])
              if v.get("persistentVolumeClaim", {}).get("claimName") == CLAIM}
    # Ray's container is the first one: it is where stages read and write /data.
    mounts = {m["name"] for m in containers[0].get("volumeMounts", []) if m["mountPath"] == "/data"}
    assert claims & mounts, f"{where}: no {CLAIM} volume mounted at /data"


def check_cluster_spec(spec: dict) -> None:
    """What KubeRay requires of a RayCluster spec (and of a RayJob's rayClusterSpec)."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0"
    check_pod(head["template"], "head")
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == GROUPS and len(groups) == len(GROUPS)
    for g in groups:
        name = g["groupName"]
        assert DNS1123.match(name), name
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert isinstance(g["rayStartParams"], dict), name
        check_pod(g["template"], name)
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        # The CRD types rayStartParams as map[string]string: a bare 0 is rejected.
        assert all(isinstance(v, str) for v in params.values()), params


def autoscaler_view(cr: dict) -> dict:
    """Node types as KubeRay's in-tree autoscaler derives them (it validates them
    against Ray's autoscaler schema on the way)."""
    cr = copy.deepcopy(cr)
    cr["metadata"].setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def test_kinds_and_names():
    pvc, cluster = docs("raycluster.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == CLAIM and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for doc in (cluster, job):
        assert DNS1035.match(doc["metadata"]["name"]), doc["metadata"]["name"]


def test_raycluster_has_the_fields_kuberay_requires():
    check_cluster_spec(raycluster()["spec"])


@pytest.mark.parametrize("mutate", [
    lambda s: s["workerGroupSpecs"][0].update(replicas=40),  # above maxReplicas
    lambda s: s["workerGroupSpecs"][1].update(groupName="gpu_train"),
    lambda s: s["workerGroupSpecs"][0].pop("rayStartParams"),
    lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
    lambda s: s["workerGroupSpecs"][1]["template"]["spec"].pop("volumes"),
    lambda s: s.update(enableInTreeAutoscaling=False),
], ids=["replicas-above-max", "underscore-group", "no-start-params", "int-param", "no-image", "no-volume",
        "no-autoscaler"])
def test_a_broken_copy_fails(mutate):
    spec = copy.deepcopy(raycluster()["spec"])
    mutate(spec)
    with pytest.raises((AssertionError, KeyError)):
        check_cluster_spec(spec)


def test_autoscaler_sees_the_groups_of_ray_cluster_yaml():
    types = autoscaler_view(raycluster())
    assert types["headgroup"]["resources"]["CPU"] == 0
    data, gpu = types["cpu-data"], types["gpu-train"]
    assert data["min_workers"] == 0 and data["resources"]["CPU"] > 0 and "GPU" not in data["resources"]
    assert gpu["resources"]["GPU"] == 1
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text(encoding="utf-8"))
    vm_types = config["available_node_types"]
    for name in GROUPS:
        vm = vm_types[name.replace("-", "_")]["resources"]
        custom = {k: v for k, v in types[name]["resources"].items() if k not in ("CPU", "GPU", "memory")}
        assert custom == {k: v for k, v in vm.items() if k not in ("CPU", "GPU")}, name
        assert ("GPU" in types[name]["resources"]) == (vm.get("GPU", 0) > 0), name


def test_a_malformed_custom_resource_param_is_refused_by_the_autoscaler():
    cr = raycluster()
    cr["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '{"data_node": 1}'  # no outer quotes
    with pytest.raises(Exception):
        autoscaler_view(cr)


def test_rayjob_runs_a_zerolm_stage_on_the_same_cluster():
    spec = rayjob()["spec"]
    assert spec["entrypoint"].startswith("zerolm ")
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == raycluster()["spec"]


def test_rayjob_entrypoint_is_a_command_zerolm_accepts(monkeypatch):
    """The entrypoint through the real CLI up to where the job would start."""
    import dataproc.pipeline
    from zerolm.cli import main

    seen = {}

    def fake_run_data(cfg, overwrite=False):
        seen["cfg"] = cfg
        return {"rows_out": 1}

    monkeypatch.setattr(dataproc.pipeline, "run_data", fake_run_data)
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert main(argv[1:]) == 0
    cfg = seen["cfg"]
    assert cfg.output == "/data/clean"
    assert cfg.exact_dedup.num_partitions > 0 and cfg.near_dedup.num_partitions > 0
    assert "/data/raw/**" in repr(cfg.model_dump())  # one glob for zerolm, not the shell's expansion


def test_images_are_built_from_this_checkout_on_the_clusters_ray():
    dockerfile = (KUBERAY / "Dockerfile").read_text(encoding="utf-8")
    version = raycluster()["spec"]["rayVersion"]
    assert f"ARG BASE=rayproject/ray:{version}-py311-cpu" in dockerfile
    assert "--index-url ${TORCH_INDEX}" in dockerfile and "whl/cpu" in dockerfile
    assert "pip install --no-cache-dir /tmp/dist/zerolm-*.whl" in dockerfile
    assert "source=dist" in dockerfile
    vm = yaml.safe_load((REPO / "ray_cluster.yaml").read_text(encoding="utf-8"))
    assert vm["docker"]["image"] == f"rayproject/ray:{version}-py311-cpu"
    assert vm["available_node_types"]["gpu_train"]["docker"]["worker_image"] == f"rayproject/ray:{version}-py311-gpu"
    # Clusters run the Ray this project is tested on; after a Ray upgrade, move the
    # image tags and rayVersion along with it.
    assert version == ray.__version__, f"cluster images use Ray {version}, tests run Ray {ray.__version__}"
