//! Runs a rendered DaemonSet's container under runc the way a kubelet with containerd would, so
//! that the container-true test exercises exactly what the chart asks for.
//!
//! Invariants:
//! - Everything the pod spec says about privilege is carried over, nothing is added: the
//!   capability list (drop ALL, then add: bounding = effective = permitted, no ambient), no new
//!   privileges, the read-only root filesystem, the uid, hostNetwork and hostPID, and every
//!   hostPath mount with its `readOnly`. A field this translation does not know how to honour
//!   (another volume type, a seccomp profile it cannot reproduce, `privileged`) is an error, never
//!   silently dropped.
//! - What the kubelet and containerd add is added as they do: private mount, cgroup, pid, ipc and
//!   uts namespaces (uts shared with hostNetwork), the default /proc, /dev, /sys (read-only) and
//!   /sys/fs/cgroup (read-only, the container's own cgroup) mounts, masked and read-only /proc
//!   paths, the service account token directory, `$(VAR)` expansion in args, Downward API
//!   `spec.nodeName`, and `KUBERNETES_SERVICE_HOST`/`PORT`.
//! - "The node" is a network namespace the caller names (a lab node): hostNetwork joins it.
//! - Containers get unique ids (`fo<pid>x<n>-<name>`); dropping a [`Container`] kills and deletes
//!   it and its bundle, and [`sweep`] deletes those of dead test processes.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// The node the pod is scheduled on.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// The node's network namespace (joined with hostNetwork).
    pub netns: PathBuf,
    /// The Kubernetes API server as the pod sees it (`KUBERNETES_SERVICE_HOST`/`PORT`).
    pub api: (IpAddr, u16),
    /// A directory with `token`, `ca.crt` and `namespace`, mounted where the kubelet mounts the
    /// service account token.
    pub service_account: PathBuf,
}

/// A bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// One container of a pod spec, resolved for runc.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `CAP_*` names.
    pub capabilities: Vec<String>,
    pub no_new_privileges: bool,
    pub read_only_root: bool,
    pub uid: u32,
    pub host_network: bool,
    pub host_pid: bool,
    pub binds: Vec<Bind>,
    pub memory_limit: Option<u64>,
    /// The container port named `metrics`, if any.
    pub metrics_port: Option<u16>,
}

/// Where the kubelet mounts a pod's service account token.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Parses a Kubernetes memory quantity (`256Mi`, `1G`, `1048576`) into bytes.
pub fn memory_bytes(q: &str) -> Result<u64> {
    let units: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("K", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    for (suffix, mult) in units {
        if let Some(num) = q.strip_suffix(suffix)
            && let Ok(n) = num.parse::<u64>()
        {
            return n
                .checked_mul(mult)
                .with_context(|| format!("memory quantity {q} overflows"));
        }
    }
    bail!("unsupported memory quantity {q:?}")
}

/// Expands `$(VAR)` references to the container's env, as the kubelet does (`$$` escapes).
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| k == &body[..end])
        {
            out.push_str(v);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{what} is not a string: {v}"))
}

/// Resolves container `container` of the DaemonSet `ds` (a rendered object) for `node`.
/// `entrypoint` is the image's ENTRYPOINT (the container has no `command`).
pub fn plan(ds: &Value, container: &str, entrypoint: &[String], node: &Node) -> Result<Plan> {
    let pod = &ds["spec"]["template"]["spec"];
    let c = pod["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == container))
        .with_context(|| format!("no container {container} in the DaemonSet"))?;
    let sc = &c["securityContext"];
    if sc["privileged"] == json!(true) {
        bail!("privileged containers are not reproduced");
    }
    match sc["seccompProfile"]["type"].as_str() {
        Some("Unconfined") => {}
        other => bail!(
            "seccomp profile {other:?}: only Unconfined is reproduced here (runc applies no \
             profile); RuntimeDefault would need the runtime's own profile"
        ),
    }
    if pod["shareProcessNamespace"] == json!(true) || pod["hostIPC"] == json!(true) {
        bail!("shareProcessNamespace and hostIPC are not reproduced");
    }

    // Env: literal values and the Downward API node name, then what the kubelet adds.
    let mut env: Vec<(String, String)> = vec![(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    )];
    for e in c["env"].as_array().into_iter().flatten() {
        let name = str_of(&e["name"], "env name")?.to_string();
        let value = if let Some(v) = e.get("value") {
            expand(str_of(v, "env value")?, &env)
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => node.name.clone(),
                _ => bail!("env {name}: only literal values and spec.nodeName are reproduced"),
            }
        };
        env.push((name, value));
    }
    env.push(("KUBERNETES_SERVICE_HOST".into(), node.api.0.to_string()));
    env.push(("KUBERNETES_SERVICE_PORT".into(), node.api.1.to_string()));

    if c.get("command").is_some() {
        bail!("a container command is not expected (the image's ENTRYPOINT runs)");
    }
    let mut args: Vec<String> = entrypoint.to_vec();
    for a in c["args"].as_array().into_iter().flatten() {
        args.push(expand(str_of(a, "arg")?, &env));
    }

    let drop: Vec<&str> = sc["capabilities"]["drop"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if drop != ["ALL"] {
        bail!("capabilities.drop must be [ALL] (got {drop:?})");
    }
    let capabilities = sc["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| str_of(v, "capability").map(|c| format!("CAP_{c}")))
        .collect::<Result<Vec<_>>>()?;

    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    let mut binds = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = str_of(&m["name"], "volumeMount name")?;
        let vol = volumes
            .get(name)
            .with_context(|| format!("volumeMount {name} names no volume"))?;
        let Some(path) = vol["hostPath"]["path"].as_str() else {
            bail!("volume {name}: only hostPath volumes are reproduced");
        };
        if m.get("mountPropagation").is_some() || m.get("subPath").is_some() {
            bail!("volumeMount {name}: mountPropagation and subPath are not reproduced");
        }
        binds.push(Bind {
            source: PathBuf::from(path),
            destination: str_of(&m["mountPath"], "mountPath")?.to_string(),
            read_only: m["readOnly"] == json!(true),
        });
    }
    if pod["automountServiceAccountToken"] != json!(false) {
        binds.push(Bind {
            source: node.service_account.clone(),
            destination: SERVICE_ACCOUNT_DIR.into(),
            read_only: true,
        });
    }
    let memory_limit = c["resources"]["limits"]["memory"]
        .as_str()
        .map(memory_bytes)
        .transpose()?;
    let metrics_port = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "metrics")
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok());
    Ok(Plan {
        name: container.to_string(),
        args,
        env,
        capabilities,
        no_new_privileges: sc["allowPrivilegeEscalation"] == json!(false),
        read_only_root: sc["readOnlyRootFilesystem"] == json!(true),
        uid: sc["runAsUser"]
            .as_u64()
            .and_then(|u| u32::try_from(u).ok())
            .unwrap_or(0),
        host_network: pod["hostNetwork"] == json!(true),
        host_pid: pod["hostPID"] == json!(true),
        binds,
        memory_limit,
        metrics_port,
    })
}

/// The OCI runtime config (config.json) for `plan`, with the root filesystem at `rootfs`
/// (relative to the bundle) and the cgroup at `cgroups_path`.
pub fn oci_config(plan: &Plan, node: &Node, rootfs: &str, cgroups_path: &str) -> Value {
    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
        json!({"type": "ipc"}),
    ];
    if !plan.host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    if plan.host_network {
        namespaces.push(json!({"type": "network", "path": node.netns.display().to_string()}));
    } else {
        namespaces.push(json!({"type": "network"}));
        namespaces.push(json!({"type": "uts"}));
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    for b in &plan.binds {
        let mut options = vec!["rbind", "rprivate"];
        if b.read_only {
            options.push("ro");
        }
        mounts.push(json!({"destination": b.destination, "type": "bind",
                           "source": b.source.display().to_string(), "options": options}));
    }
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(limit) = plan.memory_limit {
        resources["memory"] = json!({"limit": limit});
    }
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": plan.uid, "gid": 0},
            "args": plan.args,
            "env": plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": "/",
            "capabilities": {
                "bounding": plan.capabilities,
                "effective": plan.capabilities,
                "permitted": plan.capabilities,
                "inheritable": [],
                "ambient": [],
            },
            "noNewPrivileges": plan.no_new_privileges,
        },
        "root": {"path": rootfs, "readonly": plan.read_only_root},
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ],
        },
    });
    // With hostNetwork the pod shares the node's UTS namespace, and so its hostname.
    if !plan.host_network {
        config["hostname"] = json!(plan.name);
    }
    config
}

/// The ENTRYPOINT of image `tag` in the OCI layout `layout` (index → manifest → config).
pub fn image_entrypoint(layout: &Path, tag: &str) -> Result<Vec<String>> {
    let blob = |digest: &str| -> Result<Value> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("digest {digest}"))?;
        let path = layout.join("blobs/sha256").join(hex);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&text)?)
    };
    let index: Value = serde_json::from_slice(
        &std::fs::read(layout.join("index.json")).context("reading the layout's index.json")?,
    )?;
    let manifest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("no tag {tag} in {}", layout.display()))?;
    let manifest = blob(str_of(&manifest["digest"], "manifest digest")?)?;
    let config = blob(str_of(&manifest["config"]["digest"], "config digest")?)?;
    config["config"]["Entrypoint"]
        .as_array()
        .context("the image has no Entrypoint")?
        .iter()
        .map(|v| str_of(v, "entrypoint").map(String::from))
        .collect()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `runc` with `args`; returns stdout.
fn runc(args: &[&str]) -> Result<String> {
    let out = Command::new("runc")
        .args(args)
        .output()
        .context("running runc (install it: cargo xtask setup)")?;
    if !out.status.success() {
        bail!(
            "runc {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the containers of test processes that are gone (ids `fo<pid>x…`).
pub fn sweep() {
    let Ok(list) = runc(&["list", "--quiet"]) else {
        return;
    };
    for id in list.lines() {
        let Some(pid) = id
            .strip_prefix(crate::lab::PREFIX)
            .and_then(|r| r.split_once('x'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = runc(&["delete", "--force", id]);
        }
    }
}

/// A container started with `runc run --detach`. Dropping it kills and deletes it.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// The container's stdout and stderr.
    pub log: PathBuf,
    cgroup: String,
}

impl Container {
    /// Unpacks `image` (an OCI layout and tag, `dir:tag`) with umoci into a fresh bundle, writes
    /// `config` as its config.json and starts it.
    pub fn start(image: &str, plan: &Plan, node: &Node) -> Result<Container> {
        sweep();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{}{}x{seq}-{}",
            crate::lab::PREFIX,
            std::process::id(),
            plan.name
        );
        let bundle = std::env::temp_dir().join(format!("{id}-bundle"));
        let _ = std::fs::remove_dir_all(&bundle);
        let st = Command::new("umoci")
            .args(["unpack", "--image", image])
            .arg(&bundle)
            .stdout(Stdio::null())
            .status()
            .context("running umoci (install it: cargo xtask setup)")?;
        if !st.success() {
            bail!("umoci unpack --image {image} failed");
        }
        let cgroup = format!("/fanout-test/{id}");
        let config = oci_config(plan, node, "rootfs", &cgroup);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let log = bundle.with_extension("log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let c = Container {
            id: id.clone(),
            bundle: bundle.clone(),
            log,
            cgroup,
        };
        let st = Command::new("runc")
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .context("running runc")?;
        if !st.success() {
            bail!("runc run {id} failed:\n{}", c.logs());
        }
        Ok(c)
    }

    /// What the container printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `running`, `stopped`, … (runc state).
    pub fn status(&self) -> String {
        runc(&["state", &self.id])
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["status"].as_str().map(String::from))
            .unwrap_or_else(|| "unknown".into())
    }

    /// The container's init process id on the host.
    pub fn pid(&self) -> Option<u32> {
        runc(&["state", &self.id])
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok())
    }

    /// Waits until the container stopped, up to `limit`.
    pub fn wait_stopped(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.status() == "stopped" {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Sends SIGTERM and waits up to `grace` for the container to stop.
    pub fn terminate(&self, grace: Duration) -> bool {
        let _ = runc(&["kill", &self.id, "TERM"]);
        self.wait_stopped(grace)
    }

    /// Peak memory use of the container's cgroup (cgroup v1 memory controller), in bytes.
    pub fn memory_peak(&self) -> Option<u64> {
        ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"]
            .iter()
            .flat_map(|root| {
                [
                    format!("{root}{}/memory.max_usage_in_bytes", self.cgroup),
                    format!("{root}{}/memory.peak", self.cgroup),
                ]
            })
            .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = runc(&["kill", &self.id, "KILL"]);
        let _ = self.wait_stopped(Duration::from_secs(5));
        if let Err(e) = runc(&["delete", "--force", &self.id]) {
            eprintln!("container {}: {e}", self.id);
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            name: "lab-node".into(),
            netns: "/run/netns/x".into(),
            api: ("10.244.0.1".parse().unwrap(), 6443),
            service_account: "/tmp/sa".into(),
        }
    }

    fn ds(security: Value) -> Value {
        json!({"spec": {"template": {"spec": {
            "hostNetwork": true,
            "hostPID": false,
            "containers": [{
                "name": "fanout",
                "args": ["run", "--node=$(NODE_NAME)", "--x=$$(NODE_NAME)"],
                "env": [
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "RUST_LOG", "value": "info"}
                ],
                "ports": [{"name": "metrics", "containerPort": 9990}],
                "resources": {"limits": {"memory": "256Mi"}},
                "securityContext": security,
                "volumeMounts": [{"name": "proc", "mountPath": "/host/proc", "readOnly": true}]
            }],
            "volumes": [{"name": "proc", "hostPath": {"path": "/proc", "type": "Directory"}}]
        }}}})
    }

    fn secure() -> Value {
        json!({"runAsUser": 0, "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"], "add": ["BPF", "PERFMON"]},
               "seccompProfile": {"type": "Unconfined"}})
    }

    #[test]
    fn a_pod_spec_becomes_exactly_its_runc_config() {
        let p = plan(&ds(secure()), "fanout", &["/fanout".into()], &node()).unwrap();
        assert_eq!(
            p.args,
            ["/fanout", "run", "--node=lab-node", "--x=$(NODE_NAME)"]
        );
        assert_eq!(p.capabilities, ["CAP_BPF", "CAP_PERFMON"]);
        assert!(p.no_new_privileges && p.read_only_root && p.host_network && !p.host_pid);
        assert_eq!(p.memory_limit, Some(256 << 20));
        assert_eq!(p.metrics_port, Some(9990));
        assert!(
            p.env
                .contains(&("KUBERNETES_SERVICE_HOST".into(), "10.244.0.1".into()))
        );
        assert_eq!(
            p.binds.len(),
            2,
            "the hostPath and the service account token"
        );
        let c = oci_config(&p, &node(), "rootfs", "/t/x");
        assert_eq!(
            c["process"]["capabilities"]["effective"],
            json!(["CAP_BPF", "CAP_PERFMON"])
        );
        assert_eq!(c["process"]["capabilities"]["ambient"], json!([]));
        assert_eq!(c["root"]["readonly"], json!(true));
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "network", "path": "/run/netns/x"})));
        assert!(ns.contains(&json!({"type": "cgroup"})) && ns.contains(&json!({"type": "pid"})));
        assert!(
            !ns.iter().any(|n| n["type"] == "uts"),
            "hostNetwork shares uts"
        );
        let proc_bind = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/host/proc")
            .unwrap();
        assert_eq!(proc_bind["options"], json!(["rbind", "rprivate", "ro"]));
        assert_eq!(
            c["linux"]["resources"]["memory"]["limit"],
            json!(256u64 << 20)
        );
    }

    #[test]
    fn what_cannot_be_reproduced_is_refused() {
        let mut privileged = secure();
        privileged["privileged"] = json!(true);
        assert!(plan(&ds(privileged), "fanout", &[], &node()).is_err());
        let mut seccomp = secure();
        seccomp["seccompProfile"] = json!({"type": "RuntimeDefault"});
        assert!(plan(&ds(seccomp), "fanout", &[], &node()).is_err());
        let mut keep = secure();
        keep["capabilities"]["drop"] = json!([]);
        assert!(plan(&ds(keep), "fanout", &[], &node()).is_err());
        assert!(plan(&ds(secure()), "other", &[], &node()).is_err());
    }

    #[test]
    fn quantities_and_expansion() {
        assert_eq!(memory_bytes("96Mi").unwrap(), 96 << 20);
        assert_eq!(memory_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(memory_bytes("4096").unwrap(), 4096);
        assert!(memory_bytes("lots").is_err());
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "1-$(B)-$(A)-$");
    }
}
