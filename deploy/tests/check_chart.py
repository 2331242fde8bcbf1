#!/usr/bin/env python3
"""Offline checks of fanout's Helm chart (deploy/helm/fanout) and kustomize base
(deploy/kustomize/base). No cluster and no network.

    python3 deploy/tests/check_chart.py [--allow-missing-files]

1. `helm lint --strict` (through helm-python-sdk) for several Kubernetes versions, with default
   values and with every optional feature on.
2. Renders with the defaults, with every optional feature on, and with overrides, and asserts the
   deployment contract: no privileged container; capabilities drop ALL and add exactly the
   contract's list, each with a comment saying why; hostNetwork on, hostPID off; a read-only root
   filesystem; every hostPath mounted read-only; NODE_NAME from spec.nodeName; ClusterRole rules
   exactly the contract's; no template uses .Capabilities; the values schema rejects bad values and
   accepts good ones; the PrometheusRule embeds files/fanout.rules.yaml untemplated, with the
   runbook base URL replaced; the dashboard ConfigMap carries files/fanout-dashboard.json;
   seccomp is explicitly Unconfined and the AppArmor annotation
   (container.apparmor.security.beta.kubernetes.io/fanout) says unconfined by default, with a
   comment saying why next to each, and appArmorProfile "" omits the annotation; the ServiceMonitor
   and PodMonitor endpoints set honorLabels: true.
3. `kubernetes-validate --strict` on every rendered core object for the oldest supported
   Kubernetes (1.25), a middle one and the newest the package knows. prometheus-operator kinds
   (ServiceMonitor, PodMonitor, PrometheusRule) have no schema there; they are skipped there and
   checked against a structural schema here.
4. `kubectl kustomize deploy/kustomize/base`: validated the same way, and every object equal to
   the chart's default render (release "fanout", namespace "fanout", namespace.create=true) once
   the labels only Helm sets are dropped; the DaemonSet pod template and the RBAC rules are
   reported on their own.
5. deploy/README.md: lists what deploy/ holds, and its plain Prometheus scrape config (the one
   ```yaml block with `job_name: fanout`) is valid: honor_labels true, kubernetes_sd role pod, its
   relabelling (simulated here) keeps only fanout pods' metrics port and sets node; then
   `promtool check config` on it with rule_files set to deploy/prometheus/fanout.rules.yaml (which
   also loads the rules). A promtool built without Kubernetes discovery (Debian's) cannot parse
   kubernetes_sd_configs: that block is then checked against a schema, promtool checks the rest
   with static_configs in its place, and a warning says so.
6. README.md: the one `helm install` command of its Install section (in a ```sh block, `\`
   continuations allowed) is parsed (release name, chart path, --namespace, every --set, with
   Helm's own --set parser) and rendered with exactly those values, name and namespace: the
   DaemonSet's image must be the --set image.repository plus the default tag (the chart's
   appVersion). Every inline `--set ...` snippet of the README renders on top of it (each
   `X.enabled=true` giving its object, `extraArgs` reaching the container's args). With
   --create-namespace the section must say how to label that namespace privileged. Every alert's
   runbook_url in files/fanout.rules.yaml is the default base + `#runbook-<alert lowercased>` and
   that anchor is a heading of README.md (GitHub slugs); every `### Runbook:` heading is an alert;
   every in-page anchor and relative link of README.md resolves.
7. A summary; the exit status is 1 on any failure.

files/fanout.rules.yaml and files/fanout-dashboard.json must exist (they are written separately);
--allow-missing-files turns their absence into a warning, for work in progress.

Needs: helm-python-sdk (module helm_python), kubernetes-validate, PyYAML (also a dependency of
kubernetes-validate), jsonschema (a dependency of kubernetes-validate), kubectl on PATH, and promtool (PATH,
/usr/bin/promtool, or $PROMTOOL).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterable

try:
    import helm_python
    import jsonschema
    import yaml
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version
except ImportError as err:  # pragma: no cover - environment problem
    sys.exit(
        f"check_chart: missing Python package ({err}). "
        "Install: pip install helm-python-sdk kubernetes-validate pyyaml"
    )

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "fanout"
KUSTOMIZE_BASE = ROOT / "deploy" / "kustomize" / "base"
RULES_FILE = CHART / "files" / "fanout.rules.yaml"
DASHBOARD_FILE = CHART / "files" / "fanout-dashboard.json"
DEPLOY_README = ROOT / "deploy" / "README.md"
README = ROOT / "README.md"
PLAIN_RULES_FILE = ROOT / "deploy" / "prometheus" / "fanout.rules.yaml"  # symlink to RULES_FILE

RELEASE = "fanout"
NAMESPACE = "fanout"
DEFAULT_RUNBOOK_BASE = "https://github.com/fanout-dev/fanout/blob/main/README.md"
OLDEST_KUBE = "1.25.0"

# --- The deployment contract (CONTRACT.md) ---------------------------------------------------

CONTRACT_ARGS = ["run", "--kube", "--listen=0.0.0.0:{port}", "--proc-root=/host/proc"]
CONTRACT_CAPS = ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"]
CONTRACT_CAP_REASONS = {
    "BPF": "load programs and create maps",
    "PERFMON": "attach tracepoints and read kernel memory from tracing programs",
    "NET_ADMIN": "load and attach the cgroup_skb HTTP/2 request scanner, query conntrack over netlink",
    "SYS_PTRACE": "read other processes' /proc/<pid>/ns/net and fd links (startup recovery of every "
    "pod network namespace, owners of recovered connections), and /proc/1/root as a fallback to "
    "find the host cgroup2",
    "DAC_READ_SEARCH": "list /proc/<pid>/fd of processes of other users (owners of recovered "
    "connections of non-root pods)",
}
# hostPath -> (mountPath, type)
CONTRACT_HOST_PATHS = {
    "/proc": ("/host/proc", "Directory"),
    "/sys/fs/cgroup": ("/host/sys/fs/cgroup", "Directory"),
    "/sys/kernel/tracing": ("/sys/kernel/tracing", "Directory"),
}
CONTRACT_RULES = [
    {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
    # BalanceRegressed Events on client pods (kube-runtime's Recorder creates events.k8s.io/v1).
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
]
CONTRACT_RESOURCES = {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}
# Explicitly Unconfined (not unset: kubelet --seccomp-default would make an unset profile
# RuntimeDefault, whose bpf(2)/perf_event_open(2) rules need CAP_SYS_ADMIN before containerd 1.6.9).
DEFAULT_SECCOMP = {"type": "Unconfined"}
# AppArmor through the pod annotation (the securityContext field only exists from Kubernetes 1.30).
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/fanout"
DEFAULT_APPARMOR = "unconfined"

STANDARD_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

# prometheus-operator's Duration pattern (monitoring.coreos.com/v1 CRDs).
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"


# --- Reporting -------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.passed = 0
        self.section = ""
        self.sections: list[tuple[str, int, int]] = []
        self._start = (0, 0)

    def begin(self, name: str) -> None:
        self.end()
        self.section = name
        self._start = (self.passed, len(self.failures))
        print(f"== {name}", flush=True)

    def end(self) -> None:
        if self.section:
            self.sections.append(
                (self.section, self.passed - self._start[0], len(self.failures) - self._start[1])
            )
            self.section = ""

    def check(self, cond: Any, what: str) -> bool:
        if cond:
            self.passed += 1
            return True
        self.fail(what)
        return False

    def fail(self, what: str) -> None:
        msg = f"[{self.section}] {what}"
        self.failures.append(msg)
        print(f"   FAIL {what}", flush=True)

    def warn(self, what: str) -> None:
        self.warnings.append(f"[{self.section}] {what}")
        print(f"   WARN {what}", flush=True)

    def info(self, what: str) -> None:
        print(f"   {what}", flush=True)

    def equal(self, got: Any, want: Any, what: str) -> bool:
        if got == want:
            self.passed += 1
            return True
        lines = list(diff(want, got))
        detail = "\n        ".join(lines[:25]) + ("\n        ..." if len(lines) > 25 else "")
        self.fail(f"{what}: differs (want -> got)\n        {detail}")
        return False


R = Report()


def diff(want: Any, got: Any, path: str = "") -> Iterable[str]:
    """Human-readable differences between two YAML-like values."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in got:
                yield f"{sub}: missing (want {json.dumps(want[key])[:200]})"
            elif key not in want:
                yield f"{sub}: unexpected {json.dumps(got[key])[:200]}"
            else:
                yield from diff(want[key], got[key], sub)
    elif isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (w, g) in enumerate(zip(want, got)):
            yield from diff(w, g, f"{path}[{i}]")
    elif want != got:
        yield f"{path or '<root>'}: want {json.dumps(want)[:200]}, got {json.dumps(got)[:200]}"


# --- Helpers ---------------------------------------------------------------------------------


def kube_versions() -> list[str]:
    """Oldest supported (1.25), a middle one and the newest version kubernetes-validate knows."""
    known = sorted({v for v in all_versions() if Version(v) >= Version(OLDEST_KUBE)}, key=Version)
    if OLDEST_KUBE not in known:
        raise SystemExit(f"check_chart: kubernetes-validate has no schemas for {OLDEST_KUBE}")
    picked = [known[0], known[len(known) // 2], known[-1]]
    return sorted(set(picked), key=Version)


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(values: dict | None, name: str = RELEASE, namespace: str = NAMESPACE,
           chart_path: Path = CHART) -> dict[str, Any]:
    """Render the chart; returns {"objects": [...], "texts": {template: text}, "notes": str}."""
    with helm_python.Chart.load(chart_path) as chart:
        out = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    objects, texts, notes = [], {}, ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        texts[path] = text
        for doc in load_docs(text):
            doc.setdefault("__source", path)
            objects.append(doc)
    return {"objects": objects, "texts": texts, "notes": notes}


def strip_source(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    obj.pop("__source", None)
    return obj


def find(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict], kind: str, ctx: str) -> dict | None:
    found = find(objects, kind)
    if R.check(len(found) == 1, f"{ctx}: exactly one {kind} (found {len(found)})"):
        return found[0]
    return None


def walk(node: Any, path: str = "") -> Iterable[tuple[str, Any, Any]]:
    """Yield (path, key, value) for every mapping entry in a document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def comment_block_before(lines: list[str], idx: int) -> str:
    """The contiguous YAML comment lines directly above lines[idx], joined."""
    out = []
    i = idx - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        out.append(lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(reversed(out))


def norm_ws(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().rstrip(".")


def normalize_rules(rules: list[dict]) -> list[dict]:
    return sorted(
        (
            {k: sorted(v) if isinstance(v, list) else v for k, v in rule.items()}
            for rule in rules
        ),
        key=lambda r: json.dumps(r, sort_keys=True),
    )


def drop_helm_only(obj: dict) -> dict:
    obj = strip_source(obj)
    for meta in (obj.get("metadata"), obj.get("spec", {}).get("template", {}).get("metadata")):
        if isinstance(meta, dict) and isinstance(meta.get("labels"), dict):
            for label in HELM_ONLY_LABELS:
                meta["labels"].pop(label, None)
    return obj


# --- Contract invariants ---------------------------------------------------------------------


def check_no_privileged(objects: list[dict], ctx: str) -> None:
    bad = [f"{o['kind']}/{o['metadata']['name']}{p}" for o in objects
           for p, k, v in walk(o) if k == "privileged" and v is True]
    R.check(not bad, f"{ctx}: no `privileged: true` anywhere (found at {bad})")
    bad = [f"{o['kind']}/{o['metadata']['name']}{p}" for o in objects
           for p, k, v in walk(o) if k == "add" and isinstance(v, list) and "SYS_ADMIN" in v]
    R.check(not bad, f"{ctx}: no CAP_SYS_ADMIN by default (found at {bad})")


def check_daemonset(ds: dict, ctx: str, *, port: int = 9990, caps: list[str] = CONTRACT_CAPS,
                    extra_args: list[str] | None = None, log_level: str = "info",
                    service_account: str = RELEASE, defaults: bool = True,
                    apparmor: str | None = DEFAULT_APPARMOR) -> None:
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    annotations = spec["template"]["metadata"].get("annotations") or {}
    if apparmor:
        R.check(annotations.get(APPARMOR_ANNOTATION) == apparmor,
                f"{ctx}: pod annotation {APPARMOR_ANNOTATION}: {apparmor} (got {annotations.get(APPARMOR_ANNOTATION)!r})")
    else:
        R.check(APPARMOR_ANNOTATION not in annotations, f"{ctx}: no AppArmor annotation")
    R.check(not [k for k in annotations if k.startswith("container.apparmor.security.beta.kubernetes.io/")
                 and k != APPARMOR_ANNOTATION],
            f"{ctx}: no AppArmor annotation for another container name")
    R.check("appArmorProfile" not in (pod.get("securityContext") or {}) and not any(
        "appArmorProfile" in (c.get("securityContext") or {}) for c in pod.get("containers", [])),
        f"{ctx}: no securityContext.appArmorProfile field (Kubernetes 1.30+ only)")
    R.check(ds.get("apiVersion") == "apps/v1", f"{ctx}: DaemonSet apiVersion apps/v1")
    R.check(pod.get("hostNetwork") is True, f"{ctx}: hostNetwork is true")
    R.check(pod.get("hostPID") in (None, False), f"{ctx}: hostPID absent or false")
    R.check(pod.get("hostIPC") in (None, False), f"{ctx}: hostIPC absent or false")
    R.check(pod.get("dnsPolicy") == "ClusterFirstWithHostNet", f"{ctx}: dnsPolicy ClusterFirstWithHostNet")
    R.check(pod.get("automountServiceAccountToken") is True, f"{ctx}: automountServiceAccountToken true")
    R.check(pod.get("serviceAccountName") == service_account,
            f"{ctx}: serviceAccountName {service_account!r} (got {pod.get('serviceAccountName')!r})")
    R.check(spec.get("updateStrategy", {}).get("type") == "RollingUpdate", f"{ctx}: RollingUpdate strategy")
    R.check("maxUnavailable" in spec.get("updateStrategy", {}).get("rollingUpdate", {}),
            f"{ctx}: rollingUpdate.maxUnavailable set")
    selector = spec["selector"]["matchLabels"]
    template_labels = spec["template"]["metadata"]["labels"]
    R.check(all(template_labels.get(k) == v for k, v in selector.items()),
            f"{ctx}: the pod template's labels match the selector")
    R.check(pod.get("nodeSelector", {}).get("kubernetes.io/os") == "linux",
            f"{ctx}: nodeSelector kubernetes.io/os: linux")

    if defaults:
        R.equal(spec["updateStrategy"], {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                f"{ctx}: updateStrategy")
        R.equal(pod.get("tolerations"), [{"operator": "Exists"}], f"{ctx}: tolerations")
        R.check(pod.get("priorityClassName") == "system-node-critical",
                f"{ctx}: priorityClassName system-node-critical")
        R.check(pod.get("terminationGracePeriodSeconds") == 30, f"{ctx}: terminationGracePeriodSeconds 30")

    containers = pod.get("containers", [])
    R.check(len(containers) == 1, f"{ctx}: one container")
    R.check(not pod.get("initContainers"), f"{ctx}: no init containers")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    host_volumes = {n: v for n, v in volumes.items() if "hostPath" in v}
    R.equal({v["hostPath"]["path"]: v["hostPath"].get("type") for v in host_volumes.values()},
            {p: t for p, (_, t) in CONTRACT_HOST_PATHS.items()}, f"{ctx}: hostPath volumes and types")

    for c in containers:
        cctx = f"{ctx}: container {c.get('name')}"
        R.check(c.get("name") == "fanout", f"{cctx}: named fanout (the AppArmor annotation names it)")
        sc = c.get("securityContext", {})
        R.check(isinstance(sc.get("seccompProfile"), dict) and sc["seccompProfile"].get("type"),
                f"{cctx}: seccompProfile set explicitly (an unset one becomes RuntimeDefault with --seccomp-default)")
        R.check(sc.get("privileged") in (None, False), f"{cctx}: not privileged")
        R.check(sc.get("allowPrivilegeEscalation") is False, f"{cctx}: allowPrivilegeEscalation false")
        R.check(sc.get("readOnlyRootFilesystem") is True, f"{cctx}: readOnlyRootFilesystem true")
        R.check(sc.get("runAsUser") == 0, f"{cctx}: runAsUser 0")
        R.check(sc.get("runAsNonRoot") in (None, False), f"{cctx}: runAsNonRoot not true")
        R.equal(sc.get("capabilities", {}).get("drop"), ["ALL"], f"{cctx}: capabilities.drop")
        R.equal(sc.get("capabilities", {}).get("add"), caps, f"{cctx}: capabilities.add")
        if defaults:
            R.equal(sc.get("seccompProfile"), DEFAULT_SECCOMP, f"{cctx}: seccompProfile explicitly Unconfined")
            R.equal(c.get("resources"), CONTRACT_RESOURCES, f"{cctx}: resources")
            R.check(c.get("imagePullPolicy") == "IfNotPresent", f"{cctx}: imagePullPolicy IfNotPresent")

        want_args = [a.format(port=port) for a in CONTRACT_ARGS] + (extra_args or [])
        R.equal(c.get("args"), want_args, f"{cctx}: args")
        R.check(not c.get("command"), f"{cctx}: no command (the image's ENTRYPOINT is /fanout)")

        env = {e["name"]: e for e in c.get("env", [])}
        R.equal(env.get("NODE_NAME"), {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                f"{cctx}: NODE_NAME from the Downward API (spec.nodeName)")
        R.equal(env.get("RUST_LOG"), {"name": "RUST_LOG", "value": log_level}, f"{cctx}: RUST_LOG")
        names = [e["name"] for e in c.get("env", [])]
        R.check(len(names) == len(set(names)), f"{cctx}: no duplicate env names ({names})")

        R.equal(c.get("ports"), [{"name": "metrics", "containerPort": port, "protocol": "TCP"}], f"{cctx}: ports")
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
            p = c.get(probe, {})
            R.equal(p.get("httpGet"), {"path": path, "port": "metrics"}, f"{cctx}: {probe}.httpGet")
            for field in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"):
                R.check(isinstance(p.get(field), int) and p[field] >= (0 if field == "initialDelaySeconds" else 1),
                        f"{cctx}: {probe}.{field} set ({p.get(field)!r})")

        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        for name, vol in host_volumes.items():
            m = mounts.get(name)
            if R.check(m is not None, f"{cctx}: hostPath volume {name} is mounted"):
                R.check(m.get("readOnly") is True, f"{cctx}: hostPath volume {name} mounted readOnly")
                want_mount = CONTRACT_HOST_PATHS.get(vol["hostPath"]["path"], (None,))[0]
                R.check(m.get("mountPath") == want_mount,
                        f"{cctx}: {vol['hostPath']['path']} mounted at {want_mount} (got {m.get('mountPath')})")
                R.check(not m.get("mountPropagation") or m["mountPropagation"] == "None",
                        f"{cctx}: no mount propagation on {name}")


def check_comments(text: str, ctx: str, caps: list[str], contract_text: bool) -> None:
    """Every capability, hostNetwork, hostPID and each hostPath volume has a comment saying why."""
    lines = text.splitlines()
    for cap in caps:
        idx = [i for i, l in enumerate(lines) if re.fullmatch(rf'\s*-\s+"?{cap}"?\s*', l)]
        if not R.check(len(idx) == 1, f"{ctx}: capability {cap} listed once (found {len(idx)})"):
            continue
        comment = comment_block_before(lines, idx[0])
        R.check(comment.startswith(f"{cap}:"), f"{ctx}: comment above capability {cap} ({comment!r})")
        if contract_text and cap in CONTRACT_CAP_REASONS:
            R.check(norm_ws(CONTRACT_CAP_REASONS[cap]) in norm_ws(comment),
                    f"{ctx}: the comment on {cap} gives the contract's reason")
    for key in ("hostNetwork:", "hostPID:"):
        idx = [i for i, l in enumerate(lines) if l.strip().startswith(key)]
        if R.check(len(idx) == 1, f"{ctx}: {key} set once"):
            R.check(comment_block_before(lines, idx[0]), f"{ctx}: comment above {key}")
    idx = [i for i, l in enumerate(lines) if l.strip().startswith("seccompProfile:")]
    if R.check(len(idx) == 1, f"{ctx}: seccompProfile: set once"):
        comment = comment_block_before(lines, idx[0])
        R.check(all(s in comment for s in ("--seccomp-default", "RuntimeDefault", "containerd 1.6.9", "#7574",
                                           "Docker 23.0", "CRI-O", "CAP_SYS_ADMIN")),
                f"{ctx}: comment above seccompProfile says why it is Unconfined ({comment!r})")
    idx = [i for i, l in enumerate(lines) if l.strip().startswith(APPARMOR_ANNOTATION + ":")]
    if R.check(len(idx) <= 1, f"{ctx}: AppArmor annotation set at most once"):
        for i in idx:
            comment = comment_block_before(lines, i)
            R.check(all(s in comment for s in ("ptrace", "/host/proc/<pid>/ns/net", "1.30")),
                    f"{ctx}: comment above the AppArmor annotation says why ({comment!r})")
    for i, line in enumerate(lines):
        if line.strip() == "hostPath:":
            # the volume's "- name: x" line is just above hostPath:
            j = i - 1
            R.check(lines[j].strip().startswith("- name:") and comment_block_before(lines, j),
                    f"{ctx}: comment above hostPath volume {lines[j].strip()}")


def check_rbac(objects: list[dict], ctx: str, *, name: str, namespace: str, sa: str) -> None:
    role = one(objects, "ClusterRole", ctx)
    binding = one(objects, "ClusterRoleBinding", ctx)
    if role:
        R.equal(normalize_rules(role.get("rules", [])), normalize_rules(CONTRACT_RULES),
                f"{ctx}: ClusterRole rules are exactly the contract's")
        R.check(not role.get("aggregationRule"), f"{ctx}: no aggregationRule")
    if role and binding:
        R.equal(binding.get("roleRef"), {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                         "name": role["metadata"]["name"]}, f"{ctx}: ClusterRoleBinding roleRef")
        R.equal(binding.get("subjects"), [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
                f"{ctx}: ClusterRoleBinding subjects")
    for o in objects:
        if o.get("kind") in ("Role", "RoleBinding"):
            R.fail(f"{ctx}: unexpected {o['kind']}")


def check_metadata(objects: list[dict], ctx: str, *, namespace: str, helm: bool = True,
                   namespaces: dict[str, str] | None = None) -> None:
    for o in objects:
        meta = o.get("metadata", {})
        octx = f"{ctx}: {o.get('kind')}/{meta.get('name')}"
        R.check(re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta.get("name", "")) and len(meta["name"]) <= 253,
                f"{octx}: valid name")
        labels = meta.get("labels", {})
        want = STANDARD_LABELS if helm else [l for l in STANDARD_LABELS if l not in HELM_ONLY_LABELS]
        missing = [l for l in want if l not in labels]
        R.check(not missing, f"{octx}: standard labels (missing {missing})")
        R.check(all(isinstance(v, str) for v in labels.values()), f"{octx}: label values are strings")
        if o.get("kind") in CLUSTER_SCOPED:
            R.check("namespace" not in meta, f"{octx}: cluster-scoped, no namespace")
        else:
            want_ns = (namespaces or {}).get(o.get("kind"), namespace)
            R.check(meta.get("namespace") == want_ns, f"{octx}: namespace {want_ns} (got {meta.get('namespace')})")


def check_service(svc: dict, ds: dict, ctx: str, port: int = 9990) -> None:
    R.check(svc["metadata"]["labels"].get("app.kubernetes.io/name") == "fanout",
            f"{ctx}: Service labelled app.kubernetes.io/name: fanout")
    R.equal(svc["spec"].get("ports"), [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}],
            f"{ctx}: Service ports")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    sel = svc["spec"].get("selector", {})
    R.check(sel and all(pod_labels.get(k) == v for k, v in sel.items()), f"{ctx}: Service selects the agent pods")


# --- prometheus-operator kinds: structural schemas -------------------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                   "namespace": {"type": "string", "minLength": 1},
                   "labels": _LABELS, "annotations": _LABELS},
}
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                            "dropequal", "DropEqual"]},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"},
        "separator": {"type": "string"}, "modulus": {"type": "integer", "minimum": 0},
    },
}
_ENDPOINT = {
    "type": "object", "additionalProperties": False, "required": ["port"],
    "properties": {
        "port": {"type": "string", "minLength": 1}, "path": {"type": "string"},
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": {"type": "string", "pattern": DURATION, "minLength": 1},
        "scrapeTimeout": {"type": "string", "pattern": DURATION, "minLength": 1},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
_SELECTOR = {"type": "object", "additionalProperties": False,
             "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False,
                "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}


def _monitor_schema(kind: str, endpoints: str) -> dict:
    return {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind}, "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", endpoints],
                     "properties": {"jobLabel": {"type": "string"}, "selector": _SELECTOR,
                                    "namespaceSelector": _NS_SELECTOR,
                                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT}}},
        },
    }


CRD_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints"),
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints"),
    "PrometheusRule": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
                "groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": {"type": "string", "pattern": DURATION},
                        "query_offset": {"type": "string", "pattern": DURATION},
                        "limit": {"type": "integer", "minimum": 0},
                        "labels": _LABELS,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False, "required": ["expr"],
                            "oneOf": [{"required": ["alert"], "not": {"required": ["record"]}},
                                      {"required": ["record"], "not": {"required": ["alert"]}}],
                            "properties": {
                                "alert": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
                                "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                "expr": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]},
                                "for": {"type": "string", "pattern": DURATION},
                                "keep_firing_for": {"type": "string", "pattern": DURATION},
                                "labels": _LABELS, "annotations": _LABELS,
                            }}},
                    }}}}},
        },
    },
}


def check_crd_objects(objects: list[dict], ctx: str) -> None:
    for o in objects:
        kind = o.get("kind")
        if kind not in CRD_KINDS:
            continue
        errors = sorted(jsonschema.Draft7Validator(CRD_SCHEMAS[kind]).iter_errors(strip_source(o)), key=str)
        R.check(not errors, f"{ctx}: {kind}/{o['metadata']['name']} is structurally valid: "
                + "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))
        if kind in ("ServiceMonitor", "PodMonitor"):
            spec = o["spec"]
            R.check(spec.get("jobLabel") == "app.kubernetes.io/name", f"{ctx}: {kind} jobLabel app.kubernetes.io/name")
            eps = spec.get("endpoints") or spec.get("podMetricsEndpoints") or []
            for ep in eps:
                R.check(ep.get("port") == "metrics", f"{ctx}: {kind} scrapes the port named metrics")
                # The balance metrics' own namespace/pod/service (the client's) must win over the
                # agent pod's target labels.
                R.check(ep.get("honorLabels") is True, f"{ctx}: {kind} endpoint has honorLabels: true")
                R.check(any(r.get("sourceLabels") == ["__meta_kubernetes_pod_node_name"] and r.get("targetLabel") == "node"
                            and r.get("action", "replace").lower() == "replace" for r in ep.get("relabelings", [])),
                        f"{ctx}: {kind} relabels __meta_kubernetes_pod_node_name into node")


# --- kubernetes-validate ---------------------------------------------------------------------


def kube_validate(sets: dict[str, list[dict]], versions: list[str], tmp: Path) -> None:
    """Run `kubernetes-validate --strict` once per version over every core object of every set."""
    files = []
    for label, objects in sets.items():
        core = [strip_source(o) for o in objects if o.get("kind") not in CRD_KINDS]
        skipped = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if o.get("kind") in CRD_KINDS]
        if skipped:
            R.info(f"{label}: skipped for kubernetes-validate (CRD kinds, no schema there; checked structurally): "
                   + ", ".join(skipped))
        path = tmp / f"{re.sub(r'[^a-z0-9]+', '-', label.lower())}.yaml"
        path.write_text(yaml.safe_dump_all(core, sort_keys=False))
        files.append((label, path, len(core)))
    exe = shutil.which("kubernetes-validate")
    base_cmd = [exe] if exe else [sys.executable, "-m", "kubernetes_validate"]
    for version in versions:
        cmd = base_cmd + ["--strict", "-k", version] + [str(p) for _, p, _ in files]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = (proc.stdout + proc.stderr).strip()
        passed = len(re.findall(r"^INFO .* passed for resource", out, re.M))
        want = sum(n for _, _, n in files)
        problems = [l for l in out.splitlines() if not l.startswith("INFO ")]
        R.check(proc.returncode == 0 and not problems and passed == want,
                f"kubernetes-validate --strict -k {version}: {passed}/{want} objects passed"
                + ("\n        " + "\n        ".join(problems[:20]) if problems else "")
                + (f" (exit {proc.returncode})" if proc.returncode else ""))
        if proc.returncode == 0 and not problems and passed == want:
            R.info(f"kubernetes-validate --strict -k {version}: {passed} objects in {len(files)} sets passed")


# --- The checks ------------------------------------------------------------------------------


def feature_files(allow_missing: bool) -> dict[str, bool]:
    have = {"prometheusRule": RULES_FILE.is_file(), "grafanaDashboard": DASHBOARD_FILE.is_file()}
    for key, path in (("prometheusRule", RULES_FILE), ("grafanaDashboard", DASHBOARD_FILE)):
        if not have[key]:
            msg = f"{path.relative_to(ROOT)} is missing: {key} cannot be enabled"
            if allow_missing:
                R.warn(msg + " (tested with it disabled; --allow-missing-files)")
            else:
                R.fail(msg)
    return have


def all_features(have: dict[str, bool]) -> dict:
    return {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": have["prometheusRule"]},
        "grafanaDashboard": {"enabled": have["grafanaDashboard"]},
        "namespace": {"create": True},
    }


def check_templates_source() -> None:
    R.begin("chart sources")
    for f in sorted((CHART / "templates").rglob("*")):
        if f.is_file():
            text = f.read_text()
            # Any mention counts: the chart must render the same with and without a cluster.
            R.check(".Capabilities" not in text, f"{f.relative_to(ROOT)} does not use .Capabilities")
            # tpl would expand the alerts' own {{ $labels.x }}; look at actions, not comments.
            actions = re.findall(r"\{\{.*?\}\}", re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S), re.S)
            R.check(not [a for a in actions if re.search(r"\btpl\b", a)], f"{f.relative_to(ROOT)} does not call tpl")
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for key, want in (("apiVersion", "v2"), ("name", "fanout"), ("type", "application"), ("version", "0.1.0"),
                      ("appVersion", "0.1.0"), ("kubeVersion", ">=1.25.0-0")):
        R.check(meta.get(key) == want, f"Chart.yaml {key} is {want!r} (got {meta.get(key)!r})")
    for name in ("servicemonitor.yaml", "podmonitor.yaml"):
        lines = (CHART / "templates" / name).read_text().splitlines()
        idx = [i for i, l in enumerate(lines) if l.strip() == "honorLabels: true"]
        if R.check(len(idx) == 1, f"templates/{name}: honorLabels: true once (found {len(idx)})"):
            comment = comment_block_before(lines, idx[0])
            R.check("CLIENT" in comment and "exported_" in comment,
                    f"templates/{name}: comment above honorLabels says why ({comment!r})")
    values_text = (CHART / "values.yaml").read_text()
    R.check("pod-security.kubernetes.io/enforce: privileged" in values_text,
            "values.yaml documents the pod-security.kubernetes.io/enforce: privileged label")
    # Every value in values.yaml is documented (helm-docs style): each key has a comment right
    # above it, except keys inside a value documented with "# --" (its data, e.g. resources.requests).
    lines = values_text.splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented as a value with "# --")
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9_./-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        comment = comment_block_before(lines, i)
        if not any(is_value for _, is_value in stack):
            R.check(comment, f"values.yaml: key {m.group(2)!r} (line {i + 1}) has a comment above it")
        stack.append((indent, comment.startswith("--")))


def check_lint(versions: list[str], have: dict[str, bool]) -> None:
    R.begin("helm lint --strict")
    for values_label, values in (("defaults", None), ("all features", all_features(have))):
        for v in versions:
            report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{v}", namespace=NAMESPACE)
            bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
            R.check(not bad and not report.get("errors"),
                    f"lint ({values_label}, kube v{v}): " + "; ".join(f"{m['path']}: {m['error'].strip()}"
                                                                      for m in bad) + "; ".join(report.get("errors", [])))
            infos = [m["error"] for m in report.get("messages", []) if m.get("severity", 0) < 2]
            if infos and v == versions[0]:
                R.info(f"lint ({values_label}) info: {'; '.join(sorted(set(infos)))}")


def check_schema() -> None:
    R.begin("values schema")
    # Strict at every level: each object node either lists its properties with
    # additionalProperties false, or is a map whose values have a schema. Free-form on purpose:
    # `global` (Helm's), `affinity` and extraEnv[].valueFrom (Kubernetes types passed through).
    free_form = {"/properties/global", "/properties/affinity", "/properties/extraEnv/items/properties/valueFrom"}
    schema = json.loads((CHART / "values.schema.json").read_text())

    def audit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and path not in free_form:
                ap = node.get("additionalProperties")
                R.check(ap is False or (isinstance(ap, dict) and "properties" not in node),
                        f"values.schema.json{path or '/'}: additionalProperties false (or a typed map)")
            for k, v in node.items():
                audit(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                audit(v, f"{path}/{i}")

    audit(schema, "")
    with helm_python.Chart.load(CHART) as chart:
        R.check(chart.schema is not None, "values.schema.json present")
        R.equal(sorted(chart.values), sorted(k for k in schema["properties"] if k != "global"),
                "values.yaml and values.schema.json have the same top-level keys")

        def accepts(values: dict, what: str) -> None:
            try:
                chart.validate_schema(values)
                R.check(True, what)
            except helm_python.HelmValuesError as err:
                R.fail(f"schema rejects {what}: {err}")

        def rejects(values: dict, what: str) -> None:
            try:
                chart.validate_schema(values)
                R.fail(f"schema accepts {what}: {json.dumps(values)}")
            except helm_python.HelmValuesError:
                R.check(True, what)

        accepts({}, "the defaults")
        accepts(chart.values, "values.yaml itself")
        accepts(OVERRIDES, "the override set")
        accepts({"updateStrategy": {"maxUnavailable": "10%"}}, "maxUnavailable as a percentage")
        accepts({"image": {"digest": "sha256:" + "a" * 64}}, "an image digest")
        accepts({"securityContext": {"capabilities": {"add": ["BPF", "PERFMON", "SYS_ADMIN"]}}},
                "another capability list (older kernels)")
        accepts({"grafanaDashboard": {"labels": {"grafana_dashboard": None, "dashboards": "fanout"}}},
                "a replaced dashboard label")
        R.equal(chart.values["securityContext"]["seccompProfile"], DEFAULT_SECCOMP,
                "values.yaml: securityContext.seccompProfile defaults to {type: Unconfined}")
        R.check(chart.values.get("appArmorProfile") == DEFAULT_APPARMOR, "values.yaml: appArmorProfile defaults to unconfined")
        accepts({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}, "a RuntimeDefault seccomp profile")
        accepts({"securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/fanout.json"}}},
                "a Localhost seccomp profile")
        for profile in ("unconfined", "runtime/default", "localhost/fanout", "localhost/k8s-fanout.v2", ""):
            accepts({"appArmorProfile": profile}, f"appArmorProfile {profile!r}")
        for profile, what in (("Unconfined", "capitalised"), ("localhost/", "localhost without a name"),
                              ("localhost/a b", "a profile name with a space"), ("docker-default", "a bare profile name"),
                              ("runtime/default ", "trailing whitespace"), (" unconfined", "leading whitespace")):
            rejects({"appArmorProfile": profile}, f"appArmorProfile {profile!r} ({what})")
        rejects({"appArmorProfile": True}, "appArmorProfile of the wrong type (boolean)")
        rejects({"podAnnotations": {APPARMOR_ANNOTATION: "unconfined"}},
                "the AppArmor annotation through podAnnotations (use appArmorProfile)")

        rejects({"bogus": 1}, "an unknown top-level key")
        rejects({"image": {"registry": "x"}}, "an unknown nested key (image.registry)")
        rejects({"serviceMonitor": {"enabled": True, "intervall": "30s"}}, "an unknown key in serviceMonitor")
        rejects({"port": -1}, "a negative port")
        rejects({"port": 0}, "port 0")
        rejects({"port": 70000}, "a port above 65535")
        rejects({"port": "9990"}, "a port of the wrong type (string)")
        rejects({"logLevel": 3}, "logLevel of the wrong type (number)")
        rejects({"serviceMonitor": {"enabled": "yes"}}, "serviceMonitor.enabled of the wrong type")
        rejects({"image": {"pullPolicy": "Sometimes"}}, "an image.pullPolicy outside the enum")
        rejects({"securityContext": {"seccompProfile": {"type": "Localhost"}}}, "a Localhost seccomp profile without its path")
        rejects({"securityContext": {"seccompProfile": {"type": "Strict"}}}, "an unknown seccomp profile type")
        rejects({"securityContext": {"capabilities": {"add": ["ALL"]}}}, "adding ALL capabilities")
        rejects({"securityContext": {"capabilities": {"add": ["bpf"]}}}, "a lower-case capability")
        rejects({"securityContext": {"privileged": True}}, "securityContext.privileged")
        rejects({"updateStrategy": {"maxUnavailable": 0}}, "maxUnavailable 0")
        rejects({"livenessProbe": {"periodSeconds": 0}}, "a probe period of 0")
        rejects({"terminationGracePeriodSeconds": -5}, "a negative terminationGracePeriodSeconds")
        rejects({"serviceMonitor": {"interval": "30 seconds"}}, "a malformed scrape interval")
        rejects({"prometheusRule": {"runbookBaseURL": "not a url"}}, "a malformed runbook URL")
        rejects({"extraArgs": "--window=30s"}, "extraArgs as a string")
        rejects({"extraEnv": [{"name": "NODE_NAME", "value": "x"}]}, "overriding NODE_NAME through extraEnv")
        rejects({"tolerations": [{"operator": "Maybe"}]}, "a toleration operator outside the enum")
        rejects({"resources": {"requests": {"cpu": "fast"}}}, "a malformed resource quantity")
        rejects({"namespace": {"create": "true"}}, "namespace.create as a string")


OVERRIDES: dict = {
    "image": {"repository": "registry.example.com/obs/fanout", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"name": "fanout-agent", "annotations": {"example.com/owner": "net"}},
    "port": 9100,
    "logLevel": "info,fanout=debug",
    "extraArgs": ["--window=60s", "--max-series=1000", "--cgroup-root=/host/sys/fs/cgroup/unified"],
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/fanout.json"}},
    "appArmorProfile": "localhost/fanout",
    "livenessProbe": {"initialDelaySeconds": 30},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
    "nodeSelector": {"node-role.example.com/infra": "true"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
    "priorityClassName": "",
    "updateStrategy": {"maxUnavailable": "25%"},
    "terminationGracePeriodSeconds": 45,
    "podAnnotations": {"example.com/scrape": "false"},
    "podLabels": {"team": "net"},
    "service": {"annotations": {"example.com/svc": "metrics"}},
    "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s", "labels": {"release": "kps"}},
    "namespace": {"create": True, "labels": {"team": "net"}},
}


def check_renders(have: dict[str, bool]) -> dict[str, list[dict]]:
    """Renders and their invariants; returns the object sets to validate with kubernetes-validate."""
    sets: dict[str, list[dict]] = {}

    R.begin("render: defaults")
    d = render(None)
    objs = d["objects"]
    sets["chart defaults"] = objs
    kinds = sorted(o["kind"] for o in objs)
    R.equal(kinds, sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service"]),
            "default kinds")
    check_no_privileged(objs, "defaults")
    check_metadata(objs, "defaults", namespace=NAMESPACE)
    ds = one(objs, "DaemonSet", "defaults")
    if ds:
        check_daemonset(ds, "defaults")
        R.check(ds["spec"]["template"]["spec"]["containers"][0]["image"] == "fanout:0.1.0",
                "defaults: image fanout:0.1.0 (repository:appVersion)")
        check_comments(d["texts"]["fanout/templates/daemonset.yaml"], "defaults daemonset.yaml", CONTRACT_CAPS, True)
        svc = one(objs, "Service", "defaults")
        if svc:
            check_service(svc, ds, "defaults")
    check_rbac(objs, "defaults", name=RELEASE, namespace=NAMESPACE, sa=RELEASE)
    sa = one(objs, "ServiceAccount", "defaults")
    R.check(sa and sa["metadata"]["name"] == RELEASE, "defaults: ServiceAccount fanout")
    R.check("pod-security.kubernetes.io/enforce=privileged" in d["notes"], "defaults: NOTES tell how to label the namespace")

    R.begin("render: every optional feature")
    values = all_features(have)
    a = render(values)
    objs = a["objects"]
    sets["chart all features"] = objs
    want = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service",
            "ServiceMonitor", "PodMonitor"}
    if have["prometheusRule"]:
        want.add("PrometheusRule")
    if have["grafanaDashboard"]:
        want.add("ConfigMap")
    R.equal(sorted(o["kind"] for o in objs), sorted(want), "kinds with every feature on")
    check_no_privileged(objs, "all features")
    check_metadata(objs, "all features", namespace=NAMESPACE)
    check_crd_objects(objs, "all features")
    ns = one(objs, "Namespace", "all features")
    if ns:
        R.check(ns["metadata"]["name"] == NAMESPACE, "Namespace named after the release namespace")
        R.check(ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "privileged",
                "Namespace labelled pod-security.kubernetes.io/enforce: privileged")
    for kind in ("ServiceMonitor", "PodMonitor"):
        mon = one(objs, kind, "all features")
        if mon:
            eps = mon["spec"].get("endpoints") or mon["spec"].get("podMetricsEndpoints")
            R.check(all(ep.get("interval") == "30s" for ep in eps), f"{kind}: default interval 30s")
            R.equal(mon["spec"].get("namespaceSelector"), {"matchNames": [NAMESPACE]}, f"{kind}: namespaceSelector")
            ds = one(objs, "DaemonSet", "all features")
            target = ds["spec"]["template"]["metadata"]["labels"] if kind == "PodMonitor" else \
                one(objs, "Service", "all features")["metadata"]["labels"]
            sel = mon["spec"]["selector"]["matchLabels"]
            R.check(sel and all(target.get(k) == v for k, v in sel.items()), f"{kind}: selector matches its targets")
            R.check(target.get("app.kubernetes.io/name") == "fanout", f"{kind}: jobLabel's value on its targets is fanout")
    R.check("scraped twice" in a["notes"] and "scraped twice" not in d["notes"],
            "NOTES warn about double scraping with both monitors on, and only then")
    if have["prometheusRule"]:
        check_rules_object(one(objs, "PrometheusRule", "all features"), RULES_FILE.read_text(),
                           DEFAULT_RUNBOOK_BASE, "real rules file")
    if have["grafanaDashboard"]:
        check_dashboard_object(one(objs, "ConfigMap", "all features"), DASHBOARD_FILE.read_text(), "real dashboard")

    R.begin("render: overrides")
    values = copy.deepcopy(OVERRIDES)
    if have["prometheusRule"]:
        values["prometheusRule"] = {"enabled": True, "runbookBaseURL": "https://runbooks.example.com/fanout.md",
                                    "labels": {"release": "kps"}}
    if have["grafanaDashboard"]:
        values["grafanaDashboard"] = {"enabled": True, "namespace": "grafana",
                                      "labels": {"grafana_dashboard": None, "dashboards": "fanout"},
                                      "annotations": {"grafana_folder": "Networking"}}
    o = render(values, name="edge", namespace="monitoring")
    objs = o["objects"]
    sets["chart overrides"] = objs
    check_no_privileged(objs, "overrides")
    check_metadata(objs, "overrides", namespace="monitoring", namespaces={"ConfigMap": "grafana"})
    check_crd_objects(objs, "overrides")
    ds = one(objs, "DaemonSet", "overrides")
    if ds:
        R.check(ds["metadata"]["name"] == "edge-fanout", "overrides: full name edge-fanout")
        check_daemonset(ds, "overrides", port=9100, extra_args=OVERRIDES["extraArgs"], log_level="info,fanout=debug",
                        service_account="fanout-agent", defaults=False, apparmor="localhost/fanout")
        check_comments(o["texts"]["fanout/templates/daemonset.yaml"], "overrides daemonset.yaml", CONTRACT_CAPS, True)
        pod = ds["spec"]["template"]["spec"]
        c = pod["containers"][0]
        R.check(c["image"] == "registry.example.com/obs/fanout:1.2.3", f"overrides: image ({c['image']})")
        R.check(c["imagePullPolicy"] == "Always", "overrides: imagePullPolicy")
        R.equal(pod.get("imagePullSecrets"), [{"name": "regcred"}], "overrides: imagePullSecrets")
        R.check({"name": "TZ", "value": "UTC"} in c["env"], "overrides: extraEnv")
        R.equal(c["resources"], OVERRIDES["resources"], "overrides: resources")
        R.equal(c["securityContext"]["seccompProfile"], OVERRIDES["securityContext"]["seccompProfile"], "overrides: seccompProfile")
        R.check(c["livenessProbe"]["initialDelaySeconds"] == 30 and c["livenessProbe"]["periodSeconds"] == 20,
                "overrides: a probe field overridden, the others kept")
        R.equal(pod.get("tolerations"), OVERRIDES["tolerations"], "overrides: tolerations")
        R.equal(pod.get("affinity"), OVERRIDES["affinity"], "overrides: affinity")
        R.check(pod.get("nodeSelector", {}).get("node-role.example.com/infra") == "true", "overrides: nodeSelector merged")
        R.check("priorityClassName" not in pod, "overrides: no priorityClassName when empty")
        R.check(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "25%", "overrides: maxUnavailable 25%")
        R.check(pod.get("terminationGracePeriodSeconds") == 45, "overrides: terminationGracePeriodSeconds")
        R.equal(ds["spec"]["template"]["metadata"].get("annotations"),
                {APPARMOR_ANNOTATION: "localhost/fanout", **OVERRIDES["podAnnotations"]},
                "overrides: podAnnotations next to the AppArmor annotation")
        R.check(ds["spec"]["template"]["metadata"]["labels"].get("team") == "net", "overrides: podLabels")
        svc = one(objs, "Service", "overrides")
        if svc:
            check_service(svc, ds, "overrides", port=9100)
            R.check(svc["metadata"].get("annotations") == OVERRIDES["service"]["annotations"], "overrides: Service annotations")
    check_rbac(objs, "overrides", name="edge-fanout", namespace="monitoring", sa="fanout-agent")
    sa = one(objs, "ServiceAccount", "overrides")
    R.check(sa and sa["metadata"]["name"] == "fanout-agent", "overrides: ServiceAccount name")
    sm = one(objs, "ServiceMonitor", "overrides")
    if sm:
        ep = sm["spec"]["endpoints"][0]
        R.check(ep["interval"] == "15s" and ep.get("scrapeTimeout") == "10s", "overrides: ServiceMonitor interval and timeout")
        R.check(sm["metadata"]["labels"].get("release") == "kps", "overrides: ServiceMonitor labels")
        R.check(sm["spec"]["namespaceSelector"] == {"matchNames": ["monitoring"]}, "overrides: ServiceMonitor namespace")
    ns = one(objs, "Namespace", "overrides")
    if ns:
        R.check(ns["metadata"]["name"] == "monitoring" and ns["metadata"]["labels"].get("team") == "net"
                and ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "privileged",
                "overrides: Namespace name and labels")
    if have["prometheusRule"]:
        rule = one(objs, "PrometheusRule", "overrides")
        check_rules_object(rule, RULES_FILE.read_text(), "https://runbooks.example.com/fanout.md", "real rules file, custom runbook URL")
        if rule:
            R.check(rule["metadata"]["labels"].get("release") == "kps", "overrides: PrometheusRule labels")
    if have["grafanaDashboard"]:
        cm = one(objs, "ConfigMap", "overrides")
        if cm:
            labels = cm["metadata"]["labels"]
            R.check("grafana_dashboard" not in labels and labels.get("dashboards") == "fanout",
                    "overrides: dashboard label replaced")
            R.check(cm["metadata"]["namespace"] == "grafana", "overrides: dashboard namespace")
            R.check(cm["metadata"].get("annotations") == {"grafana_folder": "Networking"}, "overrides: dashboard annotations")

    R.begin("render: other variants")
    v = render({"image": {"digest": "sha256:" + "b" * 64}})
    ds = one(v["objects"], "DaemonSet", "digest")
    R.check(ds and ds["spec"]["template"]["spec"]["containers"][0]["image"] == "fanout@sha256:" + "b" * 64,
            "image.digest replaces the tag")
    caps = ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "SYSLOG"]
    v = render({"securityContext": {"capabilities": {"add": caps}}})
    ds = one(v["objects"], "DaemonSet", "extra capability")
    if ds:
        check_daemonset(ds, "extra capability", caps=caps)
        check_comments(v["texts"]["fanout/templates/daemonset.yaml"], "extra capability", caps, False)
    v = render({"appArmorProfile": ""})
    sets["chart without AppArmor annotation"] = v["objects"]
    ds = one(v["objects"], "DaemonSet", "appArmorProfile empty")
    if ds:
        check_daemonset(ds, "appArmorProfile empty", apparmor=None)
        R.check("annotations" not in ds["spec"]["template"]["metadata"],
                "appArmorProfile \"\" omits the annotation (and the empty annotations map)")
        check_comments(v["texts"]["fanout/templates/daemonset.yaml"], "appArmorProfile empty", CONTRACT_CAPS, True)
    v = render({"appArmorProfile": "", "podAnnotations": {"example.com/a": "b"}})
    ds = one(v["objects"], "DaemonSet", "appArmorProfile empty, podAnnotations")
    R.check(ds and ds["spec"]["template"]["metadata"].get("annotations") == {"example.com/a": "b"},
            "appArmorProfile \"\" with podAnnotations: only the podAnnotations")
    v = render({"appArmorProfile": "runtime/default",
                "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}})
    sets["chart runtime/default"] = v["objects"]
    ds = one(v["objects"], "DaemonSet", "runtime/default")
    if ds:
        check_daemonset(ds, "runtime/default", apparmor="runtime/default", defaults=False)
        R.equal(ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"],
                {"type": "RuntimeDefault"}, "securityContext.seccompProfile RuntimeDefault is rendered")
    v = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"},
                "service": {"enabled": False}}, name="bare")
    sets["chart without rbac"] = v["objects"]
    R.equal(sorted(o["kind"] for o in v["objects"]), ["DaemonSet"], "rbac/serviceAccount/service off: only the DaemonSet")
    ds = one(v["objects"], "DaemonSet", "bare")
    R.check(ds and ds["spec"]["template"]["spec"]["serviceAccountName"] == "existing", "an existing ServiceAccount is used")
    v = render({"podMonitor": {"enabled": True}, "service": {"enabled": False}}, name="pm")
    R.check(find(v["objects"], "PodMonitor") and not find(v["objects"], "Service"), "a PodMonitor works without the Service")
    for bad_values, what in (
        ({"serviceAccount": {"create": False}}, "serviceAccount.create=false without a name"),
        ({"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}, "a ServiceMonitor without the Service"),
    ):
        try:
            render(bad_values)
            R.fail(f"render accepts {what}")
        except helm_python.HelmError:
            R.check(True, f"render refuses {what}")
    try:
        render({"bogus": True})
        R.fail("render accepts values the schema rejects")
    except helm_python.HelmValuesError:
        R.check(True, "render enforces the schema")
    return sets


SYNTHETIC_RULES = """\
# A comment, which must not break the embedding.
groups:
  - name: synthetic
    rules:
      - alert: FanoutSyntheticPickFirst
        expr: max by (namespace, pod) (fanout_lb_verdict{verdict="pick_first"}) == 1
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: "{{ $labels.namespace }}/{{ $labels.pod }} pins one backend"
          description: |-
            {{ $labels.pod }} sends {{ $value | humanizePercentage }} to one backend.
          runbook_url: https://github.com/fanout-dev/fanout/blob/main/README.md#runbook-fanoutsyntheticpickfirst
      - record: fanout:requests:rate5m
        expr: sum by (namespace, pod) (rate(fanout_requests_total[5m]))
"""
SYNTHETIC_DASHBOARD = {"title": "fanout (synthetic)", "uid": "fanout-synthetic",
                       "panels": [{"type": "timeseries", "title": "{{ not a template }}",
                                   "targets": [{"expr": "sum(rate(fanout_requests_total[$__rate_interval]))"}]}]}


def check_rules_object(rule: dict | None, source_text: str, base: str, ctx: str) -> None:
    if not rule:
        return
    want = yaml.safe_load(source_text.replace(DEFAULT_RUNBOOK_BASE, base))
    R.equal(strip_source(rule)["spec"], want, f"{ctx}: PrometheusRule spec equals the rules file (runbook base {base})")
    dumped = json.dumps(rule["spec"])
    if base != DEFAULT_RUNBOOK_BASE:
        R.check(DEFAULT_RUNBOOK_BASE not in dumped, f"{ctx}: no default runbook URL left")
    if DEFAULT_RUNBOOK_BASE in source_text:
        R.check(base in dumped, f"{ctx}: runbook URLs use {base}")
    if "{{" in source_text:
        R.check("{{" in dumped, f"{ctx}: Prometheus templates kept verbatim (not run through tpl)")
    alerts = [r for g in rule["spec"].get("groups", []) for r in g.get("rules", []) if "alert" in r]
    for a in alerts:
        url = a.get("annotations", {}).get("runbook_url")
        if url is not None:
            R.check(url.startswith(base + "#runbook-"), f"{ctx}: {a['alert']} runbook_url under {base}#runbook- ({url})")


def check_dashboard_object(cm: dict | None, source_text: str, ctx: str) -> None:
    if not cm:
        return
    data = cm.get("data", {}).get("fanout-dashboard.json")
    if not R.check(data is not None, f"{ctx}: ConfigMap has data[fanout-dashboard.json]"):
        return
    try:
        R.equal(json.loads(data), json.loads(source_text), f"{ctx}: ConfigMap carries the dashboard JSON unchanged")
    except json.JSONDecodeError as err:
        R.fail(f"{ctx}: dashboard JSON does not parse: {err}")
    R.check(data.strip() == source_text.strip(), f"{ctx}: dashboard text byte-identical (modulo surrounding whitespace)")
    size = len(data.encode())
    R.check(size < 900_000, f"{ctx}: dashboard {size} bytes fits a ConfigMap")
    R.check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", f"{ctx}: label grafana_dashboard: \"1\"")


def check_synthetic_files() -> None:
    """The embedding mechanics, on a copy of the chart with synthetic files (independent of the real ones)."""
    R.begin("render: embedding mechanics (synthetic files)")
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "fanout"
        shutil.copytree(CHART, chart)
        (chart / "files").mkdir(exist_ok=True)
        (chart / "files" / "fanout.rules.yaml").write_text(SYNTHETIC_RULES)
        dash_text = json.dumps(SYNTHETIC_DASHBOARD, indent=2) + "\n"
        (chart / "files" / "fanout-dashboard.json").write_text(dash_text)
        for base in (DEFAULT_RUNBOOK_BASE, "https://wiki.example.com/runbooks/fanout"):
            out = render({"prometheusRule": {"enabled": True, "runbookBaseURL": base, "labels": {"release": "kps"}},
                          "grafanaDashboard": {"enabled": True}}, chart_path=chart)
            rule = one(out["objects"], "PrometheusRule", f"synthetic ({base})")
            check_crd_objects(out["objects"], f"synthetic ({base})")
            check_rules_object(rule, SYNTHETIC_RULES, base, f"synthetic ({base})")
            R.check("# A comment, which must not break the embedding." in out["texts"]["fanout/templates/prometheusrule.yaml"],
                    "the rules file is embedded verbatim (its comments kept)")
            if rule:
                R.check(rule["metadata"]["labels"].get("release") == "kps", "prometheusRule.labels on the PrometheusRule")
            check_dashboard_object(one(out["objects"], "ConfigMap", "synthetic"), dash_text, "synthetic")
        for broken, what in (("groups: [unclosed\n", "a broken rules file"),
                             ("---\n" + SYNTHETIC_RULES, "a rules file with a document separator"),
                             ("rules: []\n", "a rules file without groups")):
            (chart / "files" / "fanout.rules.yaml").write_text(broken)
            try:
                render({"prometheusRule": {"enabled": True}}, chart_path=chart)
                R.fail(f"{what} renders")
            except helm_python.HelmRenderError:
                R.check(True, f"{what} fails the render")
        (chart / "files" / "fanout.rules.yaml").unlink()
        (chart / "files" / "fanout-dashboard.json").unlink()
        for key in ("prometheusRule", "grafanaDashboard"):
            try:
                render({key: {"enabled": True}}, chart_path=chart)
                R.fail(f"{key} renders without its file")
            except helm_python.HelmRenderError:
                R.check(True, f"{key} without its file fails the render with a message")


def check_kustomize(chart_default_ns: list[dict]) -> list[dict]:
    R.begin("kustomize base")
    kubectl = shutil.which("kubectl")
    if not R.check(kubectl, "kubectl on PATH"):
        return []
    proc = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE_BASE)], capture_output=True, text=True, cwd=ROOT)
    if not R.check(proc.returncode == 0, f"kubectl kustomize deploy/kustomize/base: {proc.stderr.strip()}"):
        return []
    objs = load_docs(proc.stdout)
    check_no_privileged(objs, "kustomize")
    check_metadata(objs, "kustomize", namespace=NAMESPACE, helm=False)
    ds = one(objs, "DaemonSet", "kustomize")
    if ds:
        check_daemonset(ds, "kustomize")
    check_rbac(objs, "kustomize", name=RELEASE, namespace=NAMESPACE, sa=RELEASE)
    ns = one(objs, "Namespace", "kustomize")
    R.check(ns and ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "privileged",
            "kustomize: Namespace labelled pod-security.kubernetes.io/enforce: privileged")
    # kubectl kustomize drops comments: check them in the source.
    check_comments((KUSTOMIZE_BASE / "daemonset.yaml").read_text(), "kustomize daemonset.yaml", CONTRACT_CAPS, True)

    # Equivalence with the chart (default values, release fanout, namespace fanout, namespace.create).
    chart = {(o["kind"], o["metadata"]["name"]): drop_helm_only(o) for o in chart_default_ns}
    kust = {(o["kind"], o["metadata"]["name"]): drop_helm_only(o) for o in objs}
    R.equal(sorted(kust), sorted(chart), "kustomize objects (kind, name) = the chart's default render")
    kds, cds = kust.get(("DaemonSet", RELEASE)), chart.get(("DaemonSet", RELEASE))
    if kds and cds:
        R.equal(kds["spec"]["template"]["spec"], cds["spec"]["template"]["spec"],
                "kustomize DaemonSet pod template spec = the chart's")
        R.equal(kds["spec"]["template"]["metadata"], cds["spec"]["template"]["metadata"],
                "kustomize DaemonSet pod template metadata = the chart's (Helm-only labels aside)")
    for kind in ("ClusterRole",):
        if (kind, RELEASE) in kust and (kind, RELEASE) in chart:
            R.equal(kust[(kind, RELEASE)].get("rules"), chart[(kind, RELEASE)].get("rules"),
                    "kustomize ClusterRole rules = the chart's")
    for key in sorted(set(kust) & set(chart)):
        R.equal(kust[key], chart[key], f"kustomize {key[0]}/{key[1]} = the chart's (Helm-only labels aside)")
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"] if ds else None
    R.check(image == "fanout:0.1.0", f"kustomize image is the placeholder fanout:0.1.0 ({image})")
    return objs


# --- deploy/README.md: the plain Prometheus scrape config -----------------------------------


def readme_scrape_config(text: str) -> str | None:
    """The one ```yaml block of deploy/README.md that holds the `fanout` scrape job."""
    blocks = re.findall(r"^```ya?ml\n(.*?)^```\s*$", text, re.S | re.M)
    found = [b for b in blocks if re.search(r"job_name:\s*fanout\b", b)]
    if not R.check(len(found) == 1, f"deploy/README.md: one yaml block with the fanout scrape job (found {len(found)})"):
        return None
    return found[0]


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus relabelling (replace and keep with their defaults, the only actions the snippet
    may use); None when the target is dropped."""
    labels = dict(labels)
    for cfg in configs:
        action = cfg.get("action", "replace")
        value = cfg.get("separator", ";").join(labels.get(s, "") for s in cfg.get("source_labels", []))
        m = re.fullmatch(cfg.get("regex", "(.*)"), value)
        if action == "keep":
            if not m:
                return None
        elif action == "replace":
            if m:
                # Prometheus' $1 / ${1} in the replacement (default "$1").
                out = re.sub(r"\$\{?(\w+)\}?", lambda g: m.group(int(g.group(1))) if g.group(1).isdigit()
                             else m.groupdict().get(g.group(1)) or "", cfg.get("replacement", "$1"))
                if out:
                    labels[cfg["target_label"]] = out
                else:
                    labels.pop(cfg["target_label"], None)
        else:
            raise ValueError(f"relabel action {action} not simulated")
    return labels


# Prometheus' kubernetes_sd_config (discovery/kubernetes SDConfig with its inline HTTP client
# config), for promtool builds without Kubernetes discovery (Debian's drops it).
_K8S_SD = {
    "type": "object", "additionalProperties": False, "required": ["role"],
    "properties": {
        "role": {"enum": ["pod", "node", "service", "endpoints", "endpointslice", "ingress"]},
        "api_server": {"type": "string", "pattern": r"^https?://"},
        "kubeconfig_file": {"type": "string", "minLength": 1},
        "namespaces": {"type": "object", "additionalProperties": False, "properties": {
            "own_namespace": {"type": "boolean"}, "names": {"type": "array", "items": {"type": "string"}}}},
        "selectors": {"type": "array", "items": {"type": "object", "additionalProperties": False, "required": ["role"],
                                                 "properties": {"role": {"type": "string"}, "label": {"type": "string"},
                                                                "field": {"type": "string"}}}},
        "attach_metadata": {"type": "object", "additionalProperties": False, "properties": {"node": {"type": "boolean"}}},
        **{k: {} for k in ("basic_auth", "authorization", "oauth2", "bearer_token", "bearer_token_file", "tls_config",
                           "proxy_url", "no_proxy", "proxy_from_environment", "proxy_connect_header",
                           "follow_redirects", "enable_http2", "http_headers")},
    },
}


def promtool_has_kubernetes_sd(promtool: str, tmp: Path) -> bool:
    probe = tmp / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs:\n      - role: pod\n")
    proc = subprocess.run([promtool, "check", "config", str(probe)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return True
    if "field kubernetes_sd_configs not found" in out:
        return False
    raise RuntimeError(f"promtool check config on a minimal kubernetes_sd config: {out.strip()}")


def check_readme_scrape_config() -> None:
    R.begin("deploy/README.md scrape config (promtool check config)")
    if not R.check(DEPLOY_README.is_file(), "deploy/README.md exists"):
        return
    text = DEPLOY_README.read_text()
    for entry in ("helm/fanout", "kustomize/base", "prometheus/fanout.rules.yaml", "prometheus/tests",
                  "grafana/fanout-dashboard.json", "tests/check_chart.py", "tests/dashboard_queries.py"):
        R.check(entry in text and (ROOT / "deploy" / entry).exists(), f"deploy/README.md lists deploy/{entry}, which exists")
    R.check("promtool test rules deploy/prometheus/tests/*.yaml" in text, "deploy/README.md: how to run the rule tests")
    R.check(PLAIN_RULES_FILE.is_symlink() and PLAIN_RULES_FILE.resolve() == RULES_FILE.resolve(),
            "deploy/prometheus/fanout.rules.yaml is a symlink to the chart's files/fanout.rules.yaml")
    block = readme_scrape_config(text)
    if block is None:
        return
    try:
        config = yaml.safe_load(block)
    except yaml.YAMLError as err:
        R.fail(f"the README's scrape config is not valid YAML: {err}")
        return
    if not R.check(isinstance(config, dict) and set(config) == {"rule_files", "scrape_configs"},
                   f"the snippet has rule_files and scrape_configs (got {list(config) if isinstance(config, dict) else config!r})"):
        return
    R.check(isinstance(config["rule_files"], list) and len(config["rule_files"]) == 1
            and str(config["rule_files"][0]).endswith("fanout.rules.yaml"), "the snippet loads fanout.rules.yaml")
    jobs = config["scrape_configs"] or []
    R.check([j.get("job_name") for j in jobs] == ["fanout"], "the snippet has one scrape job, named fanout")
    job = jobs[0] if jobs else {}
    R.check(job.get("honor_labels") is True, "scrape job fanout: honor_labels: true (the client's namespace/pod/service win)")
    R.equal([sd.get("role") for sd in job.get("kubernetes_sd_configs", [])], ["pod"], "scrape job fanout: kubernetes_sd role pod")
    relabels = job.get("relabel_configs") or []
    try:
        meta = {"__address__": "10.0.0.7:9990", "__meta_kubernetes_pod_node_name": "node-a",
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": "fanout",
                "__meta_kubernetes_pod_container_port_name": "metrics"}
        kept = relabel(meta, relabels)
        R.check(kept is not None and kept.get("node") == "node-a",
                f"relabelling keeps a fanout pod's metrics port and sets node from the pod's node name ({kept})")
        for change, what in (({"__meta_kubernetes_pod_label_app_kubernetes_io_name": "other"}, "another app's pod"),
                             ({"__meta_kubernetes_pod_label_app_kubernetes_io_name": "fanout-proxy"}, "an app named fanout-proxy"),
                             ({"__meta_kubernetes_pod_container_port_name": "grpc"}, "another port of a fanout pod")):
            R.check(relabel({**meta, **change}, relabels) is None, f"relabelling drops {what}")
        R.check(relabel({k: v for k, v in meta.items() if k != "__meta_kubernetes_pod_label_app_kubernetes_io_name"},
                        relabels) is None, "relabelling drops a pod without app.kubernetes.io/name")
    except (ValueError, KeyError, re.error) as err:
        R.fail(f"cannot simulate the snippet's relabelling: {err}")

    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool") or "/usr/bin/promtool"
    if not R.check(Path(promtool).is_file(), f"promtool found ({promtool}; set PROMTOOL to override)"):
        return
    for i, sd in enumerate(job.get("kubernetes_sd_configs") or []):
        errors = sorted(jsonschema.Draft7Validator(_K8S_SD).iter_errors(sd), key=str)
        R.check(not errors, f"scrape job fanout: kubernetes_sd_configs[{i}] is a valid kubernetes_sd_config: "
                + "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))
    with tempfile.TemporaryDirectory() as tmp:
        prom = Path(tmp) / "prometheus.yml"
        test_config = dict(config, rule_files=[str(PLAIN_RULES_FILE)])
        if not promtool_has_kubernetes_sd(promtool, Path(tmp)):
            # This promtool cannot parse kubernetes_sd_configs (checked with the schema above):
            # let it check everything else, with a static target in place of the discovery.
            R.warn(f"{promtool} has no Kubernetes service discovery (a distribution build): kubernetes_sd_configs "
                   "checked against a schema; promtool checked the rest with static_configs in its place")
            test_config["scrape_configs"] = [
                {**{k: v for k, v in j.items() if k != "kubernetes_sd_configs"},
                 "static_configs": [{"targets": ["10.0.0.7:9990"]}]} if "kubernetes_sd_configs" in j else j
                for j in test_config["scrape_configs"]]
        prom.write_text(yaml.safe_dump(test_config, sort_keys=False))
        proc = subprocess.run([promtool, "check", "config", str(prom)], capture_output=True, text=True, cwd=tmp,
                              timeout=120)
        out = (proc.stdout + proc.stderr).strip()
        R.check(proc.returncode == 0 and "FAILED" not in out,
                f"promtool check config on the README's snippet + rule_files: [{PLAIN_RULES_FILE}]: exit "
                f"{proc.returncode}\n        " + out.replace("\n", "\n        "))
        R.check(re.search(r"SUCCESS: \d+ rules found", out), f"promtool loaded the rules through the config ({out!r})")
        if proc.returncode == 0:
            R.info(" | ".join(l.strip() for l in out.splitlines() if l.strip()))


# --- README.md: the install command and the runbook anchors ---------------------------------


def md_lines(text: str) -> list[tuple[str, bool]]:
    """Every line of a Markdown text with whether it sits inside a fenced code block (the fence
    lines themselves count as inside)."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s{0,3}(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
            out.append((line, True))
        elif fence is not None:
            out.append((line, True))
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
        else:
            out.append((line, False))
    return out


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: the rendered text, lower-cased, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def md_headings(text: str) -> list[tuple[int, str, str]]:
    """(level, text, anchor) of every ATX heading outside code blocks, with GitHub's -1, -2 ...
    suffixes for repeated anchors."""
    seen: dict[str, int] = {}
    out = []
    for line, fenced in md_lines(text):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.append((len(m.group(1)), m.group(2), slug if n == 0 else f"{slug}-{n}"))
    return out


def md_section(text: str, title: str) -> str | None:
    """The text of the level-2 section `## title`, up to the next level-2 heading."""
    lines = md_lines(text)
    start = next((i for i, (l, f) in enumerate(lines) if not f and l.strip() == f"## {title}"), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines))
                if not lines[i][1] and re.match(r"^##\s", lines[i][0])), len(lines))
    return "\n".join(l for l, _ in lines[start:end]) + "\n"


def sh_commands(text: str) -> list[list[str]]:
    """The commands of every ```sh block: `\` continuations joined, split at ; && || | ( )."""
    commands = []
    for block in re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```\s*$", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            current: list[str] = []
            for token in lexer:
                if set(token) <= set("();&|<>"):
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(token)
            if current:
                commands.append(current)
    return commands


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_flags(tokens: list[str], ctx: str) -> tuple[dict, list[str]]:
    """Values of the --set / --set-string flags in `tokens` (Helm's own parser, merged in order as
    Helm does), and every other token."""
    values: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        flag, _, inline = tok.partition("=") if tok.startswith("--set") else (tok, "", "")
        if flag in ("--set", "--set-string"):
            expr = inline if inline else (tokens[i + 1] if i + 1 < len(tokens) else None)
            i += 1 if inline else 2
            if not R.check(expr, f"{ctx}: {flag} has a value"):
                continue
            try:
                parse = helm_python.parse_set_string if flag == "--set" else helm_python.parse_set_string_values
                values = deep_merge(values, parse(expr))
            except helm_python.HelmError as err:
                R.fail(f"{ctx}: {flag} {expr!r} does not parse: {err}")
            continue
        rest.append(tok)
        i += 1
    return values, rest


def parse_helm_install(tokens: list[str], ctx: str) -> dict | None:
    """`helm install NAME CHART [--namespace NS] [--create-namespace] [--set k=v]...`."""
    values, rest = set_flags(tokens[2:], ctx)
    positional, namespace, create_ns, unknown = [], None, False, []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok in ("--namespace", "-n"):
            namespace = rest[i + 1] if i + 1 < len(rest) else None
            i += 2
            continue
        if tok.startswith("--namespace="):
            namespace = tok.split("=", 1)[1]
        elif tok == "--create-namespace":
            create_ns = True
        elif tok.startswith("-"):
            unknown.append(tok)
        else:
            positional.append(tok)
        i += 1
    ok = R.check(not unknown, f"{ctx}: only --namespace, --create-namespace and --set flags (also: {unknown}); "
                 "extend check_readme() for more")
    ok &= R.check(len(positional) == 2, f"{ctx}: a release name and a chart path (got {positional})")
    ok &= R.check(namespace, f"{ctx}: --namespace given")
    if not ok:
        return None
    name, chart = positional
    try:
        helm_python.validate_release_name(name)
        R.check(True, f"{ctx}: release name {name!r} is valid")
    except helm_python.HelmError as err:
        R.fail(f"{ctx}: release name {name!r}: {err}")
    chart_path = (ROOT / chart).resolve()
    R.check(chart_path == CHART.resolve(), f"{ctx}: the chart path {chart} (from the repository root) is {CHART.relative_to(ROOT)}")
    return {"name": name, "chart": chart_path, "namespace": namespace, "create_namespace": create_ns, "values": values}


def check_readme() -> None:
    R.begin("README.md: install command and runbook anchors")
    if not R.check(README.is_file(), "README.md exists"):
        return
    text = README.read_text()
    headings = md_headings(text)
    anchors = {a for _, _, a in headings}

    # The install command, rendered as the README gives it.
    install = md_section(text, "Install")
    if R.check(install is not None, "README.md has an `## Install` section"):
        commands = sh_commands(install)
        helm_installs = [c for c in commands if c[:2] == ["helm", "install"]]
        everywhere = [c for c in sh_commands(text) if c[:2] == ["helm", "install"]]
        R.check(len(helm_installs) == 1 and len(everywhere) == 1,
                f"exactly one `helm install` in the README's sh blocks, in Install (found {len(helm_installs)} there, "
                f"{len(everywhere)} in all)")
        R.check(["kubectl", "apply", "-k", "deploy/kustomize/base"] in commands and KUSTOMIZE_BASE.is_dir(),
                "Install gives `kubectl apply -k deploy/kustomize/base`")
        cmd = parse_helm_install(helm_installs[0], "README helm install") if helm_installs else None
        if cmd:
            R.info("README: " + " ".join(shlex.quote(t) for t in helm_installs[0]))
            repo = cmd["values"].get("image", {}).get("repository")
            R.check(repo, "README helm install sets image.repository")
            app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
            base_objects = None
            try:
                out = render(cmd["values"], name=cmd["name"], namespace=cmd["namespace"], chart_path=cmd["chart"])
                R.check(True, "the README's helm install renders")
                base_objects = out["objects"]
            except helm_python.HelmError as err:
                R.fail(f"the README's helm install does not render: {type(err).__name__}: {err}")
            ds = one(base_objects, "DaemonSet", "README helm install") if base_objects is not None else None
            if ds and repo:
                image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
                R.check(image == f"{repo}:{app_version}",
                        f"README helm install: DaemonSet image is image.repository + the default tag "
                        f"{repo}:{app_version} (got {image})")
                R.check(ds["metadata"]["namespace"] == cmd["namespace"],
                        f"README helm install: DaemonSet in namespace {cmd['namespace']}")
                check_no_privileged(base_objects, "README helm install")
            if cmd["create_namespace"]:
                R.check(["kubectl", "label", "namespace", cmd["namespace"], "pod-security.kubernetes.io/enforce=privileged"]
                        in commands, f"Install says how to label namespace {cmd['namespace']} privileged "
                        "(`helm install --create-namespace` leaves it unlabelled)")

            # Every inline `--set ...` snippet renders on top of the install command.
            spans = {s for line, fenced in md_lines(text) if not fenced for s in re.findall(r"`([^`]+)`", line)}
            snippets = []
            for span in sorted(spans):
                if not span.startswith("--set"):
                    continue
                try:
                    tokens = shlex.split(span)
                except ValueError as err:
                    R.fail(f"README snippet `{span}` does not split: {err}")
                    continue
                extra, rest = set_flags(tokens, f"README snippet `{span}`")
                if rest:
                    continue  # not only --set flags
                snippets.append((span, extra))
            R.check(any(v.get("serviceMonitor", {}).get("enabled") is True for _, v in snippets),
                    "README gives the prometheus-operator values as a `--set ...` snippet")
            kinds = {"serviceMonitor": "ServiceMonitor", "podMonitor": "PodMonitor",
                     "prometheusRule": "PrometheusRule", "grafanaDashboard": "ConfigMap"}
            for span, extra in snippets:
                ctx = f"README snippet `{span}`"
                values = deep_merge(cmd["values"], extra)
                try:
                    objs = render(values, name=cmd["name"], namespace=cmd["namespace"], chart_path=cmd["chart"])["objects"]
                except helm_python.HelmError as err:
                    R.fail(f"{ctx} with the install command does not render: {type(err).__name__}: {err}")
                    continue
                R.check(True, f"{ctx} renders with the install command")
                for key, kind in kinds.items():
                    if extra.get(key, {}).get("enabled") is True:
                        R.check(find(objs, kind), f"{ctx}: {key}.enabled=true renders a {kind}")
                if "extraArgs" in extra:
                    ds = one(objs, "DaemonSet", ctx)
                    args = ds["spec"]["template"]["spec"]["containers"][0]["args"] if ds else []
                    R.check(args[-len(extra["extraArgs"]):] == extra["extraArgs"],
                            f"{ctx}: extraArgs end the container's args ({args})")

    # Runbooks: every alert's runbook_url is an anchor of this README, and the other way round.
    if RULES_FILE.is_file():
        rules = yaml.safe_load(RULES_FILE.read_text())
        alerts = [r for g in rules.get("groups", []) for r in g.get("rules", []) if "alert" in r]
        R.check(alerts, "the rules file has alerts")
        for a in alerts:
            name = a["alert"]
            url = a.get("annotations", {}).get("runbook_url", "")
            want = f"{DEFAULT_RUNBOOK_BASE}#runbook-{name.lower()}"
            R.check(url == want, f"{name}: runbook_url is {want} (got {url!r})")
            anchor = url.partition("#")[2]
            R.check(anchor in anchors, f"{name}: README.md has a heading with the anchor #{anchor} "
                    f"(`### Runbook: {name}`)")
            R.check(re.search(rf"^\|\s*\[?{name}\b", text, re.M), f"{name}: in the README's alert table")
        runbooks = [t for level, t, _ in headings if t.startswith("Runbook: ")]
        stale = sorted(set(t.removeprefix("Runbook: ") for t in runbooks) - {a["alert"] for a in alerts})
        R.check(not stale, f"every `Runbook:` heading of README.md is an alert of the rules file (not: {stale})")

    # Links: in-page anchors and relative paths (with their anchors in other Markdown files).
    prose = "\n".join(re.sub(r"`[^`]*`", "", line) for line, fenced in md_lines(text) if not fenced)
    links = sorted(set(re.findall(r"\]\(([^)\s]+)\)", prose)))
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):
            continue  # http:, https:, mailto:
        path, _, anchor = link.partition("#")
        if not path:
            R.check(anchor in anchors, f"README.md link {link} resolves to a heading")
            continue
        target = ROOT / path
        if R.check(target.exists(), f"README.md link {link}: {path} exists"):
            if anchor and target.suffix == ".md":
                R.check(anchor in {a for _, _, a in md_headings(target.read_text())},
                        f"README.md link {link}: {path} has the heading #{anchor}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-missing-files", action="store_true",
                        help="warn instead of failing when files/fanout.rules.yaml or files/fanout-dashboard.json is missing")
    args = parser.parse_args()
    helm_python.disable_logging()

    versions = kube_versions()
    print(f"fanout chart checks: {CHART.relative_to(ROOT)}, {KUSTOMIZE_BASE.relative_to(ROOT)}; "
          f"Kubernetes versions {', '.join(versions)}")
    R.begin("feature files")
    have = feature_files(args.allow_missing_files)
    try:
        check_templates_source()
        check_lint(versions, have)
        check_schema()
        sets = check_renders(have)
        check_synthetic_files()
        chart_ns = render({"namespace": {"create": True}})["objects"]
        sets["kustomize base"] = check_kustomize(chart_ns)
        check_readme_scrape_config()
        check_readme()
        R.begin("kubernetes-validate --strict")
        with tempfile.TemporaryDirectory() as tmp:
            kube_validate({k: v for k, v in sets.items() if v}, versions, Path(tmp))
    except Exception as err:  # an unexpected crash is a failure with its traceback, not a pass
        traceback.print_exc()
        R.fail(f"crashed: {type(err).__name__}: {err}")
    R.end()

    print("\nSummary")
    for name, passed, failed in R.sections:
        print(f"  {'FAIL' if failed else 'ok  '} {name}: {passed} passed, {failed} failed")
    for w in R.warnings:
        print(f"  WARN {w}")
    if R.failures:
        print(f"\ncheck_chart: FAILED, {len(R.failures)} failure(s):")
        for f in R.failures:
            print(f"  - {f}")
        return 1
    print(f"\ncheck_chart: OK, {R.passed} checks passed"
          + (f", {len(R.warnings)} warning(s)" if R.warnings else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
