//! One-command, idempotent machine setup: everything a fresh machine needs to build and test fanout.
//! Each step checks first and does nothing when already done.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Debian packages the lab, the tests and the demo use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    // The container test: runc runs the image that umoci unpacks; the chart's security context
    // needs nothing else. setpriv (util-linux) runs a lab process as another user.
    ("runc", "runc"),
    ("umoci", "umoci"),
    ("util-linux", "setpriv"),
    // Prometheus 2.42: promtool for the rule checks and unit tests, and the server the live
    // alert test starts on a lab loopback.
    ("prometheus", "promtool"),
];

/// PyPI packages the offline chart checks, the container test and the real-client tests use: the
/// Helm SDK (there is no helm binary), offline Kubernetes schemas, YAML, and grpcio (real gRPC
/// clients and servers, `daemon/tests/real_clients.rs`). Pinned to the versions checked here.
const PIP_PACKAGES: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "pyyaml==6.0.3",
    "grpcio==1.85.3",
];
/// The modules those packages provide, to check they import.
const PIP_MODULES: &str = "import helm_python, kubernetes_validate, yaml, grpc";

/// bpf-linker version known to build against rustc's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn status(cmd: &mut Command) -> Result<bool> {
    Ok(cmd
        .status()
        .with_context(|| format!("running {cmd:?}"))?
        .success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `cmd` runs and succeeds (its stderr discarded): a check, never an error.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have(bin: &str) -> bool {
    succeeds(Command::new("sh").args(["-c", &format!("command -v {bin} >/dev/null 2>&1")]))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is required to build the eBPF programs")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    if !status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))? {
        bail!("rustup component add rust-src --toolchain nightly failed");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    // It links rustc's libLLVM dynamically and finds it through the toolchain's library path,
    // which `rustup run nightly` sets (aya-build runs it the same way).
    let works = Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    // bpf-linker must use rustc's own LLVM: point LLVM_PREFIX at a directory whose
    // lib/libLLVM.so is the nightly sysroot's libLLVM.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM in {}", libdir.display()))?;
    let prefix = cargo_home().join("fanout-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about 2 minutes)",
        llvm.display()
    );
    if !status(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix),
    )? {
        bail!("building bpf-linker failed");
    }
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    if !status(Command::new("apt-get").args(["update", "-qq"]))? {
        bail!("apt-get update failed");
    }
    if !status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )? {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// Installs the PyPI packages into the `python3` on PATH (the one the tests run) when any of
/// their modules does not import.
fn pip_packages() -> Result<()> {
    if succeeds(Command::new("python3").args(["-c", PIP_MODULES])) {
        return Ok(());
    }
    eprintln!("setup: installing {} from PyPI", PIP_PACKAGES.join(" "));
    if !status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PIP_PACKAGES),
    )? {
        bail!("pip install {} failed", PIP_PACKAGES.join(" "));
    }
    Ok(())
}

/// The Node package of the real-client tests (@grpc/grpc-js, pinned by its lockfile).
const NPM_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../daemon/tests/support/grpc_js"
);

/// Installs the lockfile's Node packages (`npm ci`) unless the installed @grpc/grpc-js already
/// is the locked version.
fn npm_packages() -> Result<()> {
    if !have("node") || !have("npm") {
        bail!(
            "node and npm are missing: the real-client tests run @grpc/grpc-js (Node 20 or newer)"
        );
    }
    let locked = "const l = require('./package-lock.json'); \
        const i = require('./node_modules/@grpc/grpc-js/package.json'); \
        process.exit(l.packages['node_modules/@grpc/grpc-js'].version === i.version ? 0 : 1)";
    if succeeds(
        Command::new("node")
            .args(["-e", locked])
            .current_dir(NPM_DIR),
    ) {
        return Ok(());
    }
    eprintln!("setup: installing @grpc/grpc-js from npm (npm ci in {NPM_DIR})");
    if !status(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel", "error"])
            .current_dir(NPM_DIR),
    )? {
        bail!("npm ci in {NPM_DIR} failed");
    }
    Ok(())
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

fn mounts() -> Result<()> {
    for (fs, path) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        if mounted(path) {
            continue;
        }
        eprintln!("setup: mounting {fs} at {path}");
        if !status(Command::new("mount").args(["-t", fs, fs, path]))? {
            bail!("mount -t {fs} {fs} {path} failed");
        }
    }
    Ok(())
}

/// Runs every step. Root is needed for packages and mounts; without root those steps are
/// reported, not skipped silently.
pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup must run as root (packages, tracefs and bpffs mounts, eBPF)");
    }
    packages()?;
    pip_packages()?;
    npm_packages()?;
    mounts()?;
    Ok(())
}
