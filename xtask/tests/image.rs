//! Root tests: the daemon's image, as `cargo xtask image` writes it, checked with third-party
//! tools: `umoci` unpacks the OCI layout (verifying every blob's digest) into a runtime bundle,
//! and `runc` runs `/fanout --version` from it on a read-only root. The OCI archive extracts (with
//! the system `tar`) to a layout `umoci` lists with both tags.
//!
//! The image is written from the release binary in this target directory, built with
//! `cargo build --release -p fanout` when it is missing. They need root (runc) and fail, rather
//! than skip, without it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use xtask::image::{self, ImageInfo};

fn require_root() {
    xtask::lab::require_root("the image tests run the image under runc");
}

/// The target directory these tests were built in (`CARGO_TARGET_DIR` or `<workspace>/target`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .to_path_buf()
}

/// The release daemon; built once when it is missing.
fn release_binary() -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let bin = target_dir().join("release/fanout");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let ok = Command::new(&cargo)
            .args(["build", "--release", "--package", "fanout"])
            .env("CARGO_TARGET_DIR", target_dir())
            .current_dir(workspace)
            .status()
            .expect("running cargo build --release --package fanout")
            .success();
        assert!(ok, "cargo build --release --package fanout failed");
    }
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private temp dir (and runc state root); removes the containers it started and itself.
struct Scratch {
    dir: PathBuf,
    containers: Vec<String>,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(unique("fanout-image-test"));
        std::fs::create_dir_all(&dir).expect("creating the scratch dir");
        Scratch {
            dir,
            containers: Vec::new(),
        }
    }

    fn runc_root(&self) -> PathBuf {
        self.dir.join("runc-state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for id in &self.containers {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.runc_root())
                .args(["delete", "--force", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tags() -> [&'static str; 2] {
    [image::DEFAULT_TAG, "latest"]
}

fn umoci_tags(layout: &Path) -> Vec<String> {
    let out = run(Command::new("umoci").arg("ls").arg("--layout").arg(layout));
    let mut tags: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    tags.sort();
    tags
}

fn sorted_tags() -> Vec<String> {
    let mut t: Vec<String> = tags().iter().map(|t| t.to_string()).collect();
    t.sort();
    t
}

#[test]
fn image_unpacks_with_umoci_and_runs_under_runc() {
    require_root();
    let bin = release_binary();
    let mut scratch = Scratch::new();
    let layout = scratch.dir.join("oci");
    let info = image::write_layout(&bin, &layout, &tags()).expect("writing the layout");
    eprint!("{}", info.summary());
    assert_eq!(umoci_tags(&layout), sorted_tags());

    let bundle = scratch.dir.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{}", layout.display(), image::DEFAULT_TAG))
        .arg(&bundle));

    // The root filesystem: the binary, its libraries and the two files; no shell.
    let rootfs = bundle.join("rootfs");
    let meta = std::fs::metadata(rootfs.join("fanout")).expect("/fanout in the rootfs");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
        0o755
    );
    for f in ["etc/passwd", "etc/group"] {
        assert!(rootfs.join(f).is_file(), "/{f} missing");
    }
    for shell in ["bin/sh", "usr/bin/sh", "bin/bash"] {
        assert!(!rootfs.join(shell).exists(), "/{shell} must not be there");
    }
    let interpreter = info
        .entries
        .iter()
        .find(|e| e.contains("/ld-linux"))
        .expect("the ELF interpreter is in the image");
    assert!(rootfs.join(interpreter).is_file(), "{interpreter} unpacked");

    // Run `/fanout --version` on a read-only root, without a terminal.
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("reading config.json"))
            .expect("config.json is JSON");
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["/fanout", "run"]),
        "umoci turned ENTRYPOINT and CMD into the process args"
    );
    config["process"]["terminal"] = serde_json::Value::Bool(false);
    config["process"]["args"] = serde_json::json!(["/fanout", "--version"]);
    config["root"]["readonly"] = serde_json::Value::Bool(true);
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config).expect("serializing config.json"),
    )
    .expect("writing config.json");

    let id = unique("fanout-image");
    scratch.containers.push(id.clone());
    let out = run(Command::new("runc")
        .arg("--root")
        .arg(scratch.runc_root())
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(&id));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("fanout {}", image::VERSION),
        "runc printed {stdout:?}, stderr {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn layer_digest_is_stable_for_the_same_binary() {
    require_root();
    let bin = release_binary();
    let scratch = Scratch::new();
    let one = image::write_layout(&bin, &scratch.dir.join("one"), &tags()).expect("layout one");
    let two = image::write_layout(&bin, &scratch.dir.join("two"), &tags()).expect("layout two");
    let digests = |i: &ImageInfo| {
        (
            i.layer_digest.clone(),
            i.diff_id.clone(),
            i.config_digest.clone(),
            i.manifest_digest.clone(),
        )
    };
    assert_eq!(digests(&one), digests(&two));
    assert_eq!(
        std::fs::read(scratch.dir.join("one/index.json")).expect("index one"),
        std::fs::read(scratch.dir.join("two/index.json")).expect("index two")
    );
}

#[test]
fn archive_extracts_to_the_same_image() {
    require_root();
    let bin = release_binary();
    let scratch = Scratch::new();
    let out = scratch.dir.join("out");
    let info = image::build(&bin, &out, image::DEFAULT_TAG).expect("building the image");
    let archive = info.archive.clone().expect("an archive was written");
    assert_eq!(archive, out.join(image::ARCHIVE_NAME));

    let extracted = scratch.dir.join("extracted");
    std::fs::create_dir_all(&extracted).expect("mkdir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&extracted));
    assert_eq!(
        umoci_tags(&extracted),
        vec![image::DEFAULT_TAG.to_string()],
        "one tag: skopeo and podman refuse an archive of several"
    );
    for f in ["index.json", "oci-layout"] {
        assert_eq!(
            std::fs::read(extracted.join(f)).expect("extracted"),
            std::fs::read(info.layout.join(f)).expect("layout"),
            "{f}"
        );
    }
    // umoci reads every blob through a digest check.
    run(Command::new("umoci")
        .arg("stat")
        .arg("--image")
        .arg(format!("{}:{}", extracted.display(), image::VERSION)));
}
