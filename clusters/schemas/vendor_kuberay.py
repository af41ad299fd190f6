"""Vendor the KubeRay CRD schemas that tests/test_clusters.py validates the manifests against.

    python clusters/schemas/vendor_kuberay.py CRD_DIR TAG COMMIT > clusters/schemas/kuberay-TAG.json

CRD_DIR holds ray.io_rayclusters.yaml and ray.io_rayjobs.yaml from a KubeRay release
(ray-operator/config/crd/bases/ at TAG). Takes the `ray.io/v1` openAPIV3Schema of each, drops the
`description` texts, and stores the pod template once: the CRDs repeat the same 62 kB
PodTemplateSpec for the head, every worker group and the RayJob submitter, and a RayJob's
`rayClusterSpec` is a RayCluster's `spec` word for word. The script checks that the repeated
parts are identical before it replaces them with `$ref`s, so the result validates exactly what
the CRDs do (apart from `x-kubernetes-*` extensions and CEL rules, which only the API server runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def v1_schema(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def without_descriptions(schema):
    """Drop the `description` keyword, never a property that happens to be called so."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: without_descriptions(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = without_descriptions(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [without_descriptions(sub) for sub in value]
        else:
            out[key] = value
    return out


def replace(parent: dict, key: str, expected: dict, ref: str) -> None:
    if parent[key] != expected:
        raise SystemExit(f"{key}: differs from the shared definition; vendor it separately")
    parent[key] = {"$ref": ref}


def vendor(crd_dir: Path, tag: str, commit: str) -> dict:
    cluster = without_descriptions(v1_schema(crd_dir / "ray.io_rayclusters.yaml"))
    job = without_descriptions(v1_schema(crd_dir / "ray.io_rayjobs.yaml"))
    cluster_spec = cluster["properties"]["spec"]
    groups = cluster_spec["properties"]
    pod_template = groups["headGroupSpec"]["properties"]["template"]
    replace(groups["headGroupSpec"]["properties"], "template", pod_template, "#/$defs/PodTemplateSpec")
    replace(groups["workerGroupSpecs"]["items"]["properties"], "template", pod_template, "#/$defs/PodTemplateSpec")
    cluster["properties"]["spec"] = {"$ref": "#/$defs/RayClusterSpec"}
    job_spec = job["properties"]["spec"]["properties"]
    job_cluster_spec = job_spec["rayClusterSpec"]
    job_groups = job_cluster_spec["properties"]
    replace(job_groups["headGroupSpec"]["properties"], "template", pod_template, "#/$defs/PodTemplateSpec")
    replace(job_groups["workerGroupSpecs"]["items"]["properties"], "template", pod_template, "#/$defs/PodTemplateSpec")
    replace(job_spec, "rayClusterSpec", cluster_spec, "#/$defs/RayClusterSpec")
    replace(job_spec, "submitterPodTemplate", pod_template, "#/$defs/PodTemplateSpec")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"ray.io/v1 openAPIV3Schema of RayCluster and RayJob from ray-project/kuberay {tag} "
            f"(commit {commit}), ray-operator/config/crd/bases/ray.io_rayclusters.yaml and "
            "ray.io_rayjobs.yaml; descriptions removed, repeated parts as $refs "
            "(clusters/schemas/vendor_kuberay.py)"
        ),
        "kuberay": {"tag": tag, "commit": commit},
        "$defs": {
            "RayCluster": cluster,
            "RayJob": job,
            "RayClusterSpec": cluster_spec,
            "PodTemplateSpec": pod_template,
        },
    }


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    crd_dir, tag, commit = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    json.dump(vendor(crd_dir, tag, commit), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
