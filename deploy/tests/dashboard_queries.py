#!/usr/bin/env python3
"""List the PromQL queries of the fanout Grafana dashboard, with its variables substituted.

    dashboard_queries.py --namespace NS --service SVC --client REGEX --rate-interval 1m
        prints, as JSON on stdout, [{"panel": TITLE, "refId": "A", "expr": PROMQL}, ...] for every
        target of every panel (rows included), so a live test can run each one through
        Prometheus's HTTP API (/api/v1/query).

    dashboard_queries.py --check --namespace NS --service SVC --client REGEX [--rate-interval 1m]
        only verifies that every substituted query parses: it writes each one as a recording rule
        into a throwaway rule file in a temporary directory and runs `promtool check rules` on it.
        Exit status 0 if all parse, 1 if one does not (each failing query is named), 2 on a usage
        or dashboard error.

The dashboard may only use the variables $namespace, $service, $client (regex matchers),
$__rate_interval and $__interval; any other variable is an error. Values are substituted as
Grafana substitutes a single value into a Prometheus query: backslashes and double quotes are
escaped for the string literal, nothing else (so --client is a regex, e.g. 'cart|checkout' or '.*').
Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(HERE, "..", "helm", "fanout", "files", "fanout-dashboard.json")

# $name, ${name}, ${name:format}, [[name]]
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


class DashboardError(Exception):
    pass


def promql_string(value):
    """Escape a value for the inside of a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def targets(panels, out):
    """Every (panel title, target) of the panels, rows' nested panels included, in order."""
    for panel in panels:
        for target in panel.get("targets") or []:
            out.append((panel.get("title", ""), target))
        targets(panel.get("panels") or [], out)
    return out


def substitute(expr, values, where):
    def one(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise DashboardError(f"{where}: unknown variable ${name} in: {expr}")
        return values[name]

    return VARIABLE.sub(one, expr)


def queries(dashboard, values):
    out = []
    seen = set()
    for title, target in targets(dashboard.get("panels") or [], []):
        ref = target.get("refId", "")
        where = f"panel {title!r} refId {ref!r}"
        expr = target.get("expr")
        if not isinstance(expr, str) or not expr.strip():
            raise DashboardError(f"{where}: no expr")
        if (title, ref) in seen:
            raise DashboardError(f"{where}: duplicate refId in the panel")
        seen.add((title, ref))
        out.append({"panel": title, "refId": ref, "expr": substitute(expr, values, where)})
    if not out:
        raise DashboardError("the dashboard has no query")
    return out


def check_rules(exprs, promtool, tmp, name):
    """Run promtool check rules on a rule file of the exprs; returns (ok, output)."""
    path = os.path.join(tmp, name)
    rules = [{"record": f"fanout_dashboard_query:{i}", "expr": e} for i, e in enumerate(exprs)]
    with open(path, "w") as f:
        # JSON is YAML: no YAML library needed.
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=1)
    run = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    return run.returncode == 0, (run.stdout + run.stderr).strip()


def check(qs, promtool):
    exe = shutil.which(promtool)
    if exe is None:
        raise DashboardError(f"{promtool} not found (install Prometheus' promtool or pass --promtool)")
    for q in qs:
        if "$" in q["expr"]:
            raise DashboardError(f"panel {q['panel']!r} refId {q['refId']!r}: '$' left after substitution: {q['expr']}")
    with tempfile.TemporaryDirectory(prefix="fanout-dashboard-") as tmp:
        ok, output = check_rules([q["expr"] for q in qs], exe, tmp, "all.rules.yaml")
        if ok:
            print(f"ok: all {len(qs)} dashboard queries parse")
            return 0
        # Name every query that fails, one rule file each.
        failed = 0
        for i, q in enumerate(qs):
            ok, output = check_rules([q["expr"]], exe, tmp, f"q{i}.rules.yaml")
            if not ok:
                failed += 1
                print(f"FAIL: panel {q['panel']!r} refId {q['refId']}: {q['expr']}\n  {output}", file=sys.stderr)
        if failed == 0:
            print(f"promtool check rules failed on the whole set:\n{output}", file=sys.stderr)
        return 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", required=True, help="value of $namespace (a service namespace)")
    p.add_argument("--service", required=True, help="value of $service")
    p.add_argument("--client", required=True, help="value of $client, a regex of client pod names ('.*' for All)")
    p.add_argument("--rate-interval", default="1m", help="value of $__rate_interval (default: 1m)")
    p.add_argument("--interval", help="value of $__interval (default: the rate interval)")
    p.add_argument("--dashboard", default=DEFAULT_DASHBOARD, help="dashboard JSON (default: the chart's)")
    p.add_argument("--check", action="store_true", help="only verify that every query parses (promtool)")
    p.add_argument("--promtool", default="promtool", help="promtool binary (default: from PATH)")
    args = p.parse_args(argv)

    interval = args.interval or args.rate_interval
    for flag, d in (("--rate-interval", args.rate_interval), ("--interval", interval)):
        if not DURATION.match(d):
            p.error(f"{flag}: not a Prometheus duration: {d!r}")
    values = {
        "namespace": promql_string(args.namespace),
        "service": promql_string(args.service),
        "client": promql_string(args.client),
        "__rate_interval": args.rate_interval,
        "__interval": interval,
    }
    try:
        with open(args.dashboard) as f:
            dashboard = json.load(f)
        qs = queries(dashboard, values)
        if args.check:
            return check(qs, args.promtool)
    except (OSError, ValueError, DashboardError) as e:
        print(f"dashboard_queries: {e}", file=sys.stderr)
        return 2
    json.dump(qs, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
