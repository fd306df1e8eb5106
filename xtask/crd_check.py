"""Checks rendered Istio and Gateway API objects against their CRDs' schemas.

Usage: crd_check.py RENDERED.yaml [CRDS.yaml ...]

Every object whose API group is Istio's or the Gateway API's must have a CRD
(in the rendered set or in the extra files) that serves its version, and
must validate against that version's openAPIV3Schema. Prints one line per
object; exits 1 on any failure. Run by `cargo xtask chart`.
"""

import sys

import jsonschema
import yaml

CUSTOM_GROUPS = ("istio.io", "gateway.networking.k8s.io")


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def main(args):
    objects = docs(args[0])
    crds = {}
    for path in args:
        for d in docs(path):
            if d.get("kind") != "CustomResourceDefinition":
                continue
            spec = d["spec"]
            for v in spec["versions"]:
                if v.get("served"):
                    key = (spec["group"], v["name"], spec["names"]["kind"])
                    crds[key] = v["schema"]["openAPIV3Schema"]
    failed = 0
    checked = 0
    for d in objects:
        api = d.get("apiVersion", "")
        group, _, version = api.rpartition("/")
        if not group.endswith(CUSTOM_GROUPS):
            continue
        kind = d.get("kind")
        name = d.get("metadata", {}).get("name")
        schema = crds.get((group, version, kind))
        if schema is None:
            print(f"FAIL {kind}/{name}: no CRD serves {api} {kind}")
            failed += 1
            continue
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path)
        )
        checked += 1
        if errors:
            failed += 1
            for e in errors:
                where = ".".join(str(p) for p in e.path) or "(root)"
                print(f"FAIL {kind}/{name}: {where}: {e.message}")
        else:
            print(f"ok   {kind}/{name} against {group}/{version} {kind}")
    print(f"{checked} custom objects checked, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
