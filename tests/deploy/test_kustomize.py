"""The kustomizations: what each applies, the policy ConfigMap generated from a copy of
policy.yaml (and an edit reloaded in place), and the images set once."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from tests.support.dockerfile import (
    DOCKERFILE,
    final_stage,
)
from tests.support.manifests import (
    DEPLOYMENTS,
    EXT_AUTHZ,
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    POLICY_BASE,
    PROXY,
    ROOT,
    containers,
    each_deployment,
    kustomize,
    manifests,
    policy_configmap,
    proxy,
)

# Applied on their own (each needs its product's CRDs), not by the ext_authz kustomization.
MESH_FILES = (
    "envoy-gateway-security-policy.yaml",
    "istio-operator.yaml",
    "istio-values.yaml",
    "istio-authorization-policy.yaml",
)

# --- Kustomizations: what each applies, the generated policy, the images ----------------


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def generator_files(spec: dict) -> list[str]:
    """The files a kustomization's generators read (`[KEY=]PATH` entries)."""
    generators = [*spec.get("configMapGenerator", []), *spec.get("secretGenerator", [])]
    return [entry.rpartition("=")[2] for g in generators for entry in g.get("files", [])]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=("sidecar", "policy", "ext-authz"))
def test_kustomization_resources_exist_and_validate(directory: Path) -> None:
    spec = kustomization(directory)
    assert (spec["apiVersion"], spec["kind"]) == (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    )
    for entry in spec.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory}: resource {entry} does not exist"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{entry} has no kustomization.yaml"
            continue
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert documents, f"{entry} holds no resource"
        for document, version in itertools.product(documents, KUBERNETES_VERSIONS):
            kubernetes_validate.validate(document, version, strict=True)
    for entry in generator_files(spec):
        # kubectl refuses files outside the kustomization's directory.
        path = (directory / entry).resolve()
        assert path.is_file() and path.is_relative_to(directory.resolve()), entry


def test_every_manifest_is_applied_by_a_kustomization() -> None:
    # A file no kustomization lists is never applied (`kubectl apply -k` reads only what
    # kustomization.yaml names): only the mesh files are applied on their own.
    assert {p.parent for p in K8S.rglob("kustomization.yaml")} == set(KUSTOMIZATIONS)
    used = {EXT_AUTHZ / name for name in MESH_FILES}
    for directory in KUSTOMIZATIONS:
        spec = kustomization(directory)
        used.add(directory / "kustomization.yaml")
        used |= {directory / e for e in [*spec.get("resources", []), *generator_files(spec)]}
    resolved = {p.resolve() for p in used}
    unused = sorted(
        str(p.relative_to(ROOT))
        for p in K8S.rglob("*")
        if p.is_file() and p.resolve() not in resolved
    )
    assert not unused, f"no kustomization applies {unused}"


def test_policy_generator_reads_a_copy_of_the_repository_policy() -> None:
    configmap, key = policy_configmap(K8S)
    (generator,) = [
        g
        for g in kustomization(POLICY_BASE)["configMapGenerator"]
        if g["name"] == configmap["metadata"]["name"]
    ]
    (entry,) = generator["files"]
    name, _, path = entry.rpartition("=")
    assert (name or PurePosixPath(path).name) == key
    assert (POLICY_BASE / path).read_bytes() == (ROOT / "policy.yaml").read_bytes(), (
        "deploy/k8s/policy/policy.yaml differs from policy.yaml: cp policy.yaml deploy/k8s/policy/"
    )
    for where in DEPLOYMENTS:  # one generator and one copy, included by both deployments
        included = {(where / r).resolve() for r in kustomization(where)["resources"]}
        assert POLICY_BASE.resolve() in included, where


def test_policy_edit_is_reloaded_in_place(tmp_path: Path) -> None:
    # `kubectl apply -k` after a policy edit changes the ConfigMap in place (same name, new
    # data: the kubelet swaps the file into the mounted directory and the proxy reloads it)
    # and nothing else. With a name hash the Deployments would change too and roll their
    # pods, dropping their in-memory revocations, single-use records and rate limits.
    policy = (ROOT / "policy.yaml").read_text()
    edited = policy.replace("leeway: 30s", "leeway: 45s")
    assert edited != policy
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "k8s" / POLICY_BASE.relative_to(K8S) / "policy.yaml").write_text(edited)
    for where in DEPLOYMENTS:
        before = {(r["kind"], r["metadata"]["name"]): r for _, r in manifests(where)}
        rendered = kustomize(tmp_path / "k8s" / where.relative_to(K8S))
        after = {(r["kind"], r["metadata"]["name"]): r for r in rendered}
        assert after.keys() == before.keys(), "a resource was renamed"
        configmap, key = policy_configmap(where)
        name = ("ConfigMap", configmap["metadata"]["name"])
        assert after[name]["data"][key] == edited
        assert [k for k in before if before[k] != after[k]] == [name]


def dockerfile_image_names() -> dict[str, str]:
    """Build target -> image name, from the `docker build` lines in the Dockerfile."""
    commands = re.finditer(r"docker build (?:--target (\S+) )?-t (\S+) \.", DOCKERFILE.read_text())
    return {match[1] or final_stage(): match[2] for match in commands}


@each_deployment
def test_images_are_set_once_in_the_kustomization(where: Path) -> None:
    images = kustomization(where)["images"]
    names = [image["name"] for image in images]
    assert len(names) == len(set(names)), f"an image is set twice: {names}"
    built = dockerfile_image_names()
    documents = yaml.safe_load_all((where / "deployment.yaml").read_text())
    (deployment,) = [d for d in documents if d and d["kind"] == "Deployment"]
    written = {c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    rendered = {c["name"]: c["image"] for c in containers(where)}
    for container, image in written.items():
        # deployment.yaml names the image as the Dockerfile builds it, without tag or
        # digest; the kustomization's `images:` entry sets the registry name and version.
        assert ":" not in image and "@" not in image, f"{container}: {image}: set it in images:"
        assert image == built[final_stage() if container == PROXY else "example-backend"]
        (entry,) = [i for i in images if i["name"] == image]
        version = f"@{entry['digest']}" if "digest" in entry else f":{entry['newTag']}"
        assert rendered[container] == entry.get("newName", image) + version
    assert set(names) == set(written.values()), "an images: entry names no container's image"
    assert "images" not in kustomization(POLICY_BASE)


def test_both_deployments_run_the_same_authproxy_image() -> None:
    assert proxy(K8S)["image"] == proxy(EXT_AUTHZ)["image"]
