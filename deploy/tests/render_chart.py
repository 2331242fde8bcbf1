#!/usr/bin/env python3
"""Render the fanout Helm chart offline and print every object as one JSON list.

What `helm template` would print, through the Helm SDK embedded in the PyPI package
helm-python-sdk (there is no helm binary on the development machines). The container test
(daemon/tests/container.rs) runs the DaemonSet it prints.

    render_chart.py [--values JSON] [--name RELEASE] [--namespace NS]
"""

import argparse
import json
import pathlib
import sys

import helm_python
import yaml

CHART = pathlib.Path(__file__).resolve().parents[1] / "helm" / "fanout"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--values", default="{}", help="values as a JSON object")
    ap.add_argument("--name", default="fanout")
    ap.add_argument("--namespace", default="fanout")
    args = ap.parse_args()
    values = json.loads(args.values)
    chart = helm_python.Chart.load(str(CHART))
    chart.validate_schema(values)
    rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    objects = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                objects.append(doc)
    json.dump(objects, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
