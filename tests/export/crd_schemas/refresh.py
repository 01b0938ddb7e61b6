"""Refresh the CRD schemas in this folder from the projects' git repositories.

    python tests/export/crd_schemas/refresh.py KUEUE_GIT_DIR VOLCANO_GIT_DIR

Each argument is a clone (or bare git directory) of https://github.com/kubernetes-sigs/kueue and
https://github.com/volcano-sh/volcano that has the tags in SOURCES. For each CRD the `v1beta1`
version's `schema.openAPIV3Schema` is written, with its schema `description`s stripped (the field
names, types, enums, patterns, bounds, list types and CEL rules are kept), as compact JSON wrapped
with where it came from and the CRD's scope. Change a tag in SOURCES to move to another release."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
KUEUE = ("kueue", "kubernetes-sigs/kueue", "v0.13.10", "config/components/crd/bases/kueue.x-k8s.io_{}.yaml")
VOLCANO = ("volcano", "volcano-sh/volcano", "v1.9.1", "config/crd/volcano/bases/scheduling.volcano.sh_{}.yaml")
SOURCES = [  # (project, plural, version, kind)
    (KUEUE, "resourceflavors", "v1beta1", "ResourceFlavor"),
    (KUEUE, "clusterqueues", "v1beta1", "ClusterQueue"),
    (KUEUE, "localqueues", "v1beta1", "LocalQueue"),
    (KUEUE, "workloadpriorityclasses", "v1beta1", "WorkloadPriorityClass"),
    (VOLCANO, "queues", "v1beta1", "Queue"),
]
SUBSCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
SUBSCHEMAS = ("items", "additionalProperties", "not")


def strip_descriptions(schema: Any) -> Any:
    """The schema without its `description` annotations (a property named `description` is kept)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in SUBSCHEMA_MAPS:
            value = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in SUBSCHEMA_LISTS:
            value = [strip_descriptions(sub) for sub in value]
        elif key in SUBSCHEMAS:
            value = strip_descriptions(value)
        out[key] = value
    return out


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], capture_output=True, text=True, check=True).stdout


def main(kueue_git: str, volcano_git: str) -> None:
    dirs = {KUEUE: kueue_git, VOLCANO: volcano_git}
    for project, plural, version, kind in SOURCES:
        short, repository, tag, path_pattern = project
        git_dir, path = dirs[project], path_pattern.format(plural)
        commit = git(git_dir, "rev-parse", f"{tag}^{{commit}}").strip()
        crd = yaml.safe_load(git(git_dir, "show", f"{commit}:{path}"))
        assert crd["spec"]["names"]["kind"] == kind, (path, crd["spec"]["names"]["kind"])
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        group = crd["spec"]["group"]
        wrapped = {
            "apiVersion": f"{group}/{version}",
            "kind": kind,
            "scope": crd["spec"]["scope"],
            "source": {"repository": f"https://github.com/{repository}", "tag": tag, "commit": commit, "path": path},
            "openAPIV3Schema": strip_descriptions(served["schema"]["openAPIV3Schema"]),
        }
        name = f"{short}-{version}-{kind}.json"
        (HERE / name).write_text(json.dumps(wrapped, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{name}: {repository}@{tag} ({commit}) {path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
