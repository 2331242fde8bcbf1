//! `cargo xtask image`: the daemon's container image, built without a container engine.
//!
//! The root filesystem is minimal: `/fanout` (the release binary), exactly the shared libraries
//! `ldd` resolves for it (and the ELF interpreter) at the paths the loader looks for them, and an
//! `/etc/passwd` and `/etc/group` with a root entry. No shell, no package manager.
//!
//! It is written as an OCI image layout directory (one gzip'd tar layer, the image config, the
//! manifest, `index.json` with one entry per tag) and as an OCI archive, a tar of that directory
//! (`skopeo copy oci-archive:…`, `podman load -i …`). Everything is deterministic: entries are
//! sorted, owned by 0:0, dated `SOURCE_DATE_EPOCH` (0 when unset), without extended attributes,
//! and the JSON documents have sorted keys, so the same binary always gives the same digests.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The workspace version: the image's `org.opencontainers.image.version`, and its tag unless
/// another is given (the chart's default image tag is the same version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The tag used when none is given. One tag only: `skopeo copy oci-archive:` and `podman load`
/// refuse an archive that holds more than one image reference.
pub const DEFAULT_TAG: &str = VERSION;
/// `org.opencontainers.image.source`.
pub const SOURCE: &str = "https://github.com/fanout-dev/fanout";
/// Where the binary lives in the image (the entrypoint).
pub const ENTRYPOINT: &str = "/fanout";
/// File name of the OCI archive written next to the layout directory.
pub const ARCHIVE_NAME: &str = "fanout-oci.tar";
/// Name of the layout directory inside the output directory.
pub const LAYOUT_NAME: &str = "oci";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str = "root:x:0:0:root:/:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\n";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A regular file of the image's root filesystem. Parent directories are implied (mode 0755).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootFile {
    /// Absolute path inside the image, e.g. `/etc/passwd`.
    pub path: String,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
    pub data: Vec<u8>,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// The OCI archive (a tar of the layout), when one was written.
    pub archive: Option<PathBuf>,
    /// Tags, in `index.json` order (`org.opencontainers.image.ref.name`).
    pub tags: Vec<String>,
    /// `sha256:…` of the manifest (the image's digest).
    pub manifest_digest: String,
    /// `sha256:…` of the image config.
    pub config_digest: String,
    /// `sha256:…` of the gzip'd layer blob.
    pub layer_digest: String,
    /// `sha256:…` of the uncompressed layer tar (`rootfs.diff_ids`).
    pub diff_id: String,
    /// Size of the gzip'd layer in bytes.
    pub layer_size: u64,
    /// Size of the uncompressed layer tar in bytes.
    pub layer_uncompressed_size: u64,
    /// Every path in the layer (directories end in `/`), sorted.
    pub entries: Vec<String>,
}

impl ImageInfo {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "image layout {} (tags: {})\n  manifest {}\n  config   {}\n  layer    {} ({} bytes gzip'd, {} bytes uncompressed, diff_id {})\n",
            self.layout.display(),
            self.tags.join(", "),
            self.manifest_digest,
            self.config_digest,
            self.layer_digest,
            self.layer_size,
            self.layer_uncompressed_size,
            self.diff_id,
        );
        s.push_str("  files:");
        for e in self.entries.iter().filter(|e| !e.ends_with('/')) {
            s.push_str(&format!(" /{e}"));
        }
        s.push('\n');
        if let Some(a) = &self.archive {
            s.push_str(&format!("archive {}\n", a.display()));
        }
        s
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The absolute paths of the shared libraries and the ELF interpreter in `ldd` output.
///
/// Lines without a path (the vDSO) are skipped; a static binary gives no paths; a library that
/// is `not found` is an error.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut paths = BTreeSet::new();
    let mut missing = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "statically linked" || line == "not a dynamic executable" {
            continue;
        }
        // `name => /path (0x…)`, `name => not found`, `/path (0x…)` or `name (0x…)`.
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    missing.push(name.trim().to_string());
                    continue;
                }
                rest
            }
            None => line,
        };
        let path = target.rsplit_once(" (0x").map_or(target, |(p, _)| p).trim();
        if path.is_empty() || path.starts_with('(') {
            continue; // `name =>  (0x…)`: nothing to copy
        }
        if !path.starts_with('/') {
            // The vDSO (`linux-vdso.so.1 (0x…)`) and friends: provided by the kernel.
            continue;
        }
        paths.insert(PathBuf::from(path));
    }
    if !missing.is_empty() {
        bail!(
            "ldd could not resolve these libraries: {}",
            missing.join(", ")
        );
    }
    Ok(paths.into_iter().collect())
}

/// Runs `ldd` on `binary`: the shared libraries (and the interpreter) it loads.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // glibc's ldd exits 1 for a static (non-dynamic) executable.
        if stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            out.status,
            stderr.trim()
        );
    }
    parse_ldd(&stdout).with_context(|| format!("reading ldd's output for {}", binary.display()))
}

/// The root filesystem: `binary` at [`ENTRYPOINT`] (0755), each library at its own absolute
/// path (the contents of the file it resolves to, symlinks followed), `/etc/passwd` and
/// `/etc/group`.
pub fn root_files(binary: &Path, libraries: &[PathBuf]) -> Result<Vec<RootFile>> {
    let mut files = vec![RootFile {
        path: ENTRYPOINT.into(),
        mode: 0o755,
        data: fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
    }];
    for lib in libraries {
        let path = lib
            .to_str()
            .with_context(|| format!("library path {} is not UTF-8", lib.display()))?;
        // fs::read and fs::metadata follow symlinks: the real file's bytes under the soname.
        let data = fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        let mode = fs::metadata(lib)
            .with_context(|| format!("reading the metadata of {}", lib.display()))?
            .permissions();
        let executable = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0;
        files.push(RootFile {
            path: path.into(),
            mode: if executable { 0o755 } else { 0o644 },
            data,
        });
    }
    for (path, text) in [("/etc/passwd", PASSWD), ("/etc/group", GROUP)] {
        files.push(RootFile {
            path: path.into(),
            mode: 0o644,
            data: text.as_bytes().to_vec(),
        });
    }
    Ok(files)
}

/// `path` relative to `/`, checked: absolute, no `.`, `..` or empty components.
fn relative(path: &str) -> Result<&str> {
    let rel = path
        .strip_prefix('/')
        .with_context(|| format!("image path {path:?} is not absolute"))?;
    ensure!(
        !rel.is_empty()
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
        "image path {path:?} is not a plain absolute path"
    );
    Ok(rel)
}

/// One tar entry: a directory (`None`) or a file.
type Tree<'a> = BTreeMap<String, Option<&'a RootFile>>;

fn tree(files: &[RootFile]) -> Result<Tree<'_>> {
    let mut tree = Tree::new();
    for f in files {
        let rel = relative(&f.path)?;
        let mut parent = String::new();
        for c in rel
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            if let Some(Some(other)) = tree.insert(parent.clone(), None) {
                bail!("{} is a file and a directory in the image", other.path);
            }
        }
        match tree.insert(rel.to_string(), Some(f)) {
            None => {}
            Some(None) => bail!("{} is a file and a directory in the image", f.path),
            Some(Some(_)) => bail!("{} is in the image twice", f.path),
        }
    }
    Ok(tree)
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h
}

/// The layer: a deterministic tar of `files` and their parent directories, sorted by path,
/// owned by 0:0, every entry dated `mtime`, without extended attributes.
pub fn layer_tar(files: &[RootFile], mtime: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, file) in tree(files)? {
        match file {
            None => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
                    .with_context(|| format!("adding /{path}/ to the layer"))?;
            }
            Some(f) => {
                let mut h = header(
                    tar::EntryType::Regular,
                    f.mode & 0o7777,
                    f.data.len() as u64,
                    mtime,
                );
                b.append_data(&mut h, path.as_str(), f.data.as_slice())
                    .with_context(|| format!("adding {} to the layer", f.path))?;
            }
        }
    }
    b.into_inner().context("finishing the layer tar")
}

/// Gzip with a fixed header (no name, mtime 0) and level: the same input gives the same bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).context("compressing the layer")?;
    enc.finish().context("compressing the layer")
}

/// The OCI architecture name of the machine the binary was built for.
pub fn oci_architecture() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => bail!("no OCI architecture name known for {other}"),
    })
}

/// `SOURCE_DATE_EPOCH` (seconds) or 0 when it is unset.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds")),
        _ => Ok(0),
    }
}

/// RFC 3339 UTC time of a Unix time in seconds (`created` in the image config).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Checks a tag against the OCI/Docker tag grammar `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        && !tag.starts_with(['.', '-']);
    ensure!(ok, "{tag:?} is not a valid image tag");
    Ok(())
}

/// The image config document.
fn config_json(diff_id: &str, architecture: &str, created: &str) -> serde_json::Value {
    json!({
        "architecture": architecture,
        "os": "linux",
        "created": created,
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["run"],
            "User": "0",
            "Env": [PATH_ENV],
            "Labels": {
                "org.opencontainers.image.title": "fanout",
                "org.opencontainers.image.version": VERSION,
                "org.opencontainers.image.source": SOURCE,
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    })
}

fn to_bytes(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).context("serializing JSON")
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let digest = sha256_digest(data);
    let hex = digest.trim_start_matches("sha256:");
    let path = layout.join("blobs/sha256").join(hex);
    fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok(digest)
}

/// Empties `dir` for a new layout: it may be missing, empty, or an earlier OCI layout (which is
/// removed); anything else is refused rather than deleted.
fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.join("oci-layout").is_file() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("removing the old layout {}", dir.display()))?;
    } else if dir.exists() {
        let mut entries =
            fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} exists and is not an OCI image layout; refusing to overwrite it",
                dir.display()
            );
        }
    }
    fs::create_dir_all(dir.join("blobs/sha256"))
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes an OCI image layout of `files` into `out` (replacing an earlier layout there), with
/// one `index.json` entry per tag, every entry dated `mtime`.
pub fn write_oci_layout(
    files: &[RootFile],
    out: &Path,
    tags: &[&str],
    mtime: u64,
) -> Result<ImageInfo> {
    ensure!(!tags.is_empty(), "an image needs at least one tag");
    let mut unique = Vec::new();
    for tag in tags {
        check_tag(tag)?;
        if !unique.contains(tag) {
            unique.push(*tag);
        }
    }
    let architecture = oci_architecture()?;
    let tar = layer_tar(files, mtime)?;
    let entries = tree(files)?
        .into_iter()
        .map(|(p, f)| if f.is_some() { p } else { format!("{p}/") })
        .collect();
    let diff_id = sha256_digest(&tar);
    let layer = gzip(&tar)?;

    prepare_dir(out)?;
    let layer_digest = write_blob(out, &layer)?;
    let config = to_bytes(&config_json(&diff_id, architecture, &rfc3339(mtime)))?;
    let config_digest = write_blob(out, &config)?;
    let manifest = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
    }))?;
    let manifest_digest = write_blob(out, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": unique.iter().map(|tag| json!({
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": architecture, "os": "linux" },
            "annotations": { REF_NAME: tag },
        })).collect::<Vec<_>>(),
    });
    let index_path = out.join("index.json");
    fs::write(&index_path, to_bytes(&index)?)
        .with_context(|| format!("writing {}", index_path.display()))?;
    let marker = out.join("oci-layout");
    fs::write(
        &marker,
        to_bytes(&json!({ "imageLayoutVersion": "1.0.0" }))?,
    )
    .with_context(|| format!("writing {}", marker.display()))?;

    Ok(ImageInfo {
        layout: out.to_path_buf(),
        archive: None,
        tags: unique.iter().map(|t| t.to_string()).collect(),
        manifest_digest,
        config_digest,
        layer_digest,
        diff_id,
        layer_size: layer.len() as u64,
        layer_uncompressed_size: tar.len() as u64,
        entries,
    })
}

/// Every file under `dir` as (path relative to `dir`, is_dir), sorted by path.
fn walk(dir: &Path, rel: &str, into: &mut Vec<(String, bool)>) -> Result<()> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("{n:?} in {} is not UTF-8", dir.display()))?;
        let is_dir = e
            .file_type()
            .with_context(|| format!("reading {}", e.path().display()))?
            .is_dir();
        names.push((name, is_dir));
    }
    names.sort();
    for (name, is_dir) in names {
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        into.push((path.clone(), is_dir));
        if is_dir {
            walk(&dir.join(&name), &path, into)?;
        }
    }
    Ok(())
}

/// Writes `archive`: a deterministic tar of the layout directory `layout` (its contents at the
/// tar's root), as `skopeo copy oci-archive:` and `podman load` read it.
pub fn write_oci_archive(layout: &Path, archive: &Path, mtime: u64) -> Result<()> {
    ensure!(
        layout.join("oci-layout").is_file(),
        "{} is not an OCI image layout",
        layout.display()
    );
    let mut paths = Vec::new();
    walk(layout, "", &mut paths)?;
    let tmp = archive.with_extension("tar.partial");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    for (path, is_dir) in paths {
        if is_dir {
            let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
            b.append_data(&mut h, format!("{path}/"), std::io::empty())
                .with_context(|| format!("adding {path}/ to {}", archive.display()))?;
        } else {
            let src = layout.join(&path);
            let f = fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?;
            let len = f
                .metadata()
                .with_context(|| format!("reading {}", src.display()))?
                .len();
            let mut h = header(tar::EntryType::Regular, 0o644, len, mtime);
            b.append_data(&mut h, path.as_str(), f)
                .with_context(|| format!("adding {path} to {}", archive.display()))?;
        }
    }
    let mut w = b
        .into_inner()
        .with_context(|| format!("writing {}", tmp.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(w);
    fs::rename(&tmp, archive)
        .with_context(|| format!("renaming {} to {}", tmp.display(), archive.display()))
}

/// The image of an already-built daemon binary as an OCI layout in `out`: the binary, the
/// libraries `ldd` finds for it, `/etc/passwd` and `/etc/group`; dated `SOURCE_DATE_EPOCH`.
pub fn write_layout(binary: &Path, out: &Path, tags: &[&str]) -> Result<ImageInfo> {
    let libraries = shared_libraries(binary)?;
    let files = root_files(binary, &libraries)?;
    write_oci_layout(&files, out, tags, source_date_epoch()?)
}

/// `cargo xtask image` after the release build: the layout in `<out>/oci` tagged `tag` and the
/// workspace version, and the archive `<out>/fanout-oci.tar`; prints a summary.
pub fn build(binary: &Path, out: &Path, tag: &str) -> Result<ImageInfo> {
    let layout = out.join(LAYOUT_NAME);
    let mut info = write_layout(binary, &layout, &[tag])?;
    let archive = out.join(ARCHIVE_NAME);
    write_oci_archive(&layout, &archive, source_date_epoch()?)?;
    info.archive = Some(archive);
    print!("{}", info.summary());
    println!(
        "push it with: skopeo copy oci-archive:{0} docker://REGISTRY/fanout:{tag}  (or podman load -i {0})",
        out.join(ARCHIVE_NAME).display()
    );
    Ok(info)
}

/// Fails early, with the fix, when the eBPF build's linker is missing (daemon/build.rs needs it).
pub fn require_bpf_linker() -> Result<()> {
    let ok = Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ensure!(
        ok,
        "`rustup run nightly bpf-linker` does not work: the daemon embeds eBPF programs that \
         need it; run `cargo xtask setup` first"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd8a9f3000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2a1c8a0000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f2a1c7c1000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2a1c5e0000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f2a1d4b9000)
";

    fn files() -> Vec<RootFile> {
        vec![
            RootFile {
                path: "/fanout".into(),
                mode: 0o755,
                data: b"\x7fELF binary".to_vec(),
            },
            RootFile {
                path: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                mode: 0o755,
                data: vec![7; 5000],
            },
            RootFile {
                path: "/lib64/ld-linux-x86-64.so.2".into(),
                mode: 0o755,
                data: vec![1; 100],
            },
            RootFile {
                path: "/etc/passwd".into(),
                mode: 0o644,
                data: PASSWD.into(),
            },
            RootFile {
                path: "/etc/group".into(),
                mode: 0o644,
                data: GROUP.into(),
            },
        ]
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fanout-image-unit-{}-{name}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn parses_glibc_ldd_output() {
        let libs = parse_ldd(LDD).expect("parse");
        let libs: Vec<&str> = libs.iter().map(|p| p.to_str().expect("utf-8")).collect();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
        );
    }

    #[test]
    fn static_binaries_have_no_libraries() {
        assert!(
            parse_ldd("\tstatically linked\n")
                .expect("parse")
                .is_empty()
        );
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .expect("parse")
                .is_empty()
        );
        // Old glibc printed the vDSO with an empty target.
        assert!(
            parse_ldd("\tlinux-gate.so.1 =>  (0xb7f2b000)\n")
                .expect("parse")
                .is_empty()
        );
    }

    #[test]
    fn missing_libraries_are_an_error() {
        let e = parse_ldd("\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n")
            .expect_err("not found");
        assert!(format!("{e:#}").contains("libfoo.so.1"), "{e:#}");
    }

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn tags_are_checked() {
        for ok in ["latest", "0.1.0", "v1_2-rc.3", "_x"] {
            check_tag(ok).expect(ok);
        }
        for bad in ["", "a/b", "a:b", ".x", "-x", &"x".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layer_is_sorted_owned_by_root_and_dated() {
        let tar = layer_tar(&files(), 1234).expect("tar");
        let mut a = tar::Archive::new(tar.as_slice());
        let mut seen = Vec::new();
        for e in a.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!(h.uid().expect("uid"), 0);
            assert_eq!(h.gid().expect("gid"), 0);
            assert_eq!(h.mtime().expect("mtime"), 1234);
            assert!(h.as_ustar().is_some(), "ustar headers");
            let path = String::from_utf8(e.path_bytes().into_owned()).expect("utf-8");
            let mode = h.mode().expect("mode");
            let kind = h.entry_type();
            seen.push((path, kind.is_dir(), mode, e.size()));
        }
        let expected = [
            ("etc/", true, 0o755, 0),
            ("etc/group", false, 0o644, GROUP.len() as u64),
            ("etc/passwd", false, 0o644, PASSWD.len() as u64),
            ("fanout", false, 0o755, 11),
            ("lib/", true, 0o755, 0),
            ("lib/x86_64-linux-gnu/", true, 0o755, 0),
            ("lib/x86_64-linux-gnu/libc.so.6", false, 0o755, 5000),
            ("lib64/", true, 0o755, 0),
            ("lib64/ld-linux-x86-64.so.2", false, 0o755, 100),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(p, d, m, s)| (p.to_string(), *d, *m, *s))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn layer_does_not_depend_on_input_order() {
        let mut reversed = files();
        reversed.reverse();
        assert_eq!(
            layer_tar(&files(), 0).expect("tar"),
            layer_tar(&reversed, 0).expect("tar")
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in ["relative", "/a/../b", "/a//b", "/", "/./a"] {
            let f = RootFile {
                path: bad.into(),
                mode: 0o644,
                data: vec![],
            };
            assert!(layer_tar(&[f], 0).is_err(), "{bad}");
        }
        let f = |p: &str| RootFile {
            path: p.into(),
            mode: 0o644,
            data: vec![],
        };
        assert!(layer_tar(&[f("/a"), f("/a")], 0).is_err(), "duplicate");
        assert!(layer_tar(&[f("/a"), f("/a/b")], 0).is_err(), "file and dir");
        assert!(layer_tar(&[f("/a/b"), f("/a")], 0).is_err(), "dir and file");
    }

    #[test]
    fn gzip_round_trips_deterministically() {
        let data = layer_tar(&files(), 0).expect("tar");
        let gz = gzip(&data).expect("gzip");
        assert_eq!(gz, gzip(&data).expect("gzip"));
        // mtime 0 in the gzip header (bytes 4..8).
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut back)
            .expect("gunzip");
        assert_eq!(back, data);
    }

    fn read_json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(path).expect("read")).expect("json")
    }

    fn blob(layout: &Path, digest: &str) -> Vec<u8> {
        let path = layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").expect("sha256"));
        let data = fs::read(path).expect("blob");
        assert_eq!(
            sha256_digest(&data),
            digest,
            "blob content matches its name"
        );
        data
    }

    #[test]
    fn layout_documents_link_up() {
        let dir = tmpdir("layout");
        let info =
            write_oci_layout(&files(), &dir, &["latest", VERSION, "latest"], 0).expect("layout");
        assert_eq!(info.tags, ["latest", VERSION]);
        assert_eq!(
            read_json(&dir.join("oci-layout")),
            json!({"imageLayoutVersion": "1.0.0"})
        );
        let index = read_json(&dir.join("index.json"));
        assert_eq!(index["schemaVersion"], 2);
        let manifests = index["manifests"].as_array().expect("manifests");
        let refs: Vec<&str> = manifests
            .iter()
            .map(|m| m["annotations"][REF_NAME].as_str().expect("ref"))
            .collect();
        assert_eq!(refs, ["latest", VERSION]);
        for m in manifests {
            assert_eq!(m["digest"], info.manifest_digest.as_str());
            assert_eq!(m["mediaType"], MEDIA_MANIFEST);
        }
        let manifest_bytes = blob(&dir, &info.manifest_digest);
        assert_eq!(manifests[0]["size"], manifest_bytes.len());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).expect("json");
        assert_eq!(manifest["config"]["digest"], info.config_digest.as_str());
        assert_eq!(manifest["layers"][0]["digest"], info.layer_digest.as_str());
        assert_eq!(manifest["layers"][0]["mediaType"], MEDIA_LAYER);
        let layer = blob(&dir, &info.layer_digest);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        assert_eq!(info.layer_size, layer.len() as u64);

        let config: serde_json::Value =
            serde_json::from_slice(&blob(&dir, &info.config_digest)).expect("json");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], oci_architecture().expect("arch"));
        assert_eq!(config["config"]["Entrypoint"], json!(["/fanout"]));
        assert_eq!(config["config"]["Cmd"], json!(["run"]));
        assert_eq!(config["config"]["User"], "0");
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.version"],
            VERSION
        );
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
        // diff_id is the digest of the uncompressed layer.
        let mut tar = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(layer.as_slice()),
            &mut tar,
        )
        .expect("gunzip");
        assert_eq!(config["rootfs"]["diff_ids"], json!([sha256_digest(&tar)]));
        assert_eq!(info.diff_id, sha256_digest(&tar));
        assert_eq!(info.layer_uncompressed_size, tar.len() as u64);
        // Exactly three blobs.
        assert_eq!(
            fs::read_dir(dir.join("blobs/sha256"))
                .expect("blobs")
                .count(),
            3
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn same_files_give_the_same_digests() {
        let (a, b) = (tmpdir("a"), tmpdir("b"));
        let one = write_oci_layout(&files(), &a, &["latest"], 0).expect("layout");
        let two = write_oci_layout(&files(), &b, &["latest"], 0).expect("layout");
        assert_eq!(one.layer_digest, two.layer_digest);
        assert_eq!(one.diff_id, two.diff_id);
        assert_eq!(one.config_digest, two.config_digest);
        assert_eq!(one.manifest_digest, two.manifest_digest);
        // Rewriting over an old layout leaves no stale blobs and the same digests.
        let mut changed = files();
        changed[0].data.push(0);
        let three = write_oci_layout(&changed, &a, &["latest"], 0).expect("layout");
        assert_ne!(three.layer_digest, one.layer_digest);
        assert_eq!(
            fs::read_dir(a.join("blobs/sha256")).expect("blobs").count(),
            3
        );
        // A different date changes the layer.
        let four = write_oci_layout(&files(), &a, &["latest"], 1).expect("layout");
        assert_ne!(four.diff_id, one.diff_id);
        let (ar_a, ar_b) = (a.with_extension("tar"), b.with_extension("tar"));
        write_oci_layout(&files(), &a, &["latest"], 0).expect("layout");
        write_oci_archive(&a, &ar_a, 0).expect("archive");
        write_oci_archive(&b, &ar_b, 0).expect("archive");
        assert_eq!(fs::read(&ar_a).expect("a"), fs::read(&ar_b).expect("b"));
        for d in [&a, &b] {
            fs::remove_dir_all(d).expect("cleanup");
        }
        for f in [&ar_a, &ar_b] {
            fs::remove_file(f).expect("cleanup");
        }
    }

    #[test]
    fn archive_holds_the_layout_at_its_root() {
        let dir = tmpdir("archive");
        let info = write_oci_layout(&files(), &dir, &["latest"], 0).expect("layout");
        let archive = dir.with_extension("tar");
        write_oci_archive(&dir, &archive, 0).expect("archive");
        let data = fs::read(&archive).expect("archive");
        let mut a = tar::Archive::new(data.as_slice());
        let paths: Vec<String> = a
            .entries()
            .expect("entries")
            .map(|e| String::from_utf8(e.expect("entry").path_bytes().into_owned()).expect("utf-8"))
            .collect();
        let mut blobs: Vec<String> = [
            &info.config_digest,
            &info.layer_digest,
            &info.manifest_digest,
        ]
        .iter()
        .map(|d| format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
        .collect();
        blobs.sort();
        let mut expected = vec!["blobs/".to_string(), "blobs/sha256/".to_string()];
        expected.extend(blobs);
        expected.extend(["index.json".to_string(), "oci-layout".to_string()]);
        assert_eq!(paths, expected);
        fs::remove_dir_all(&dir).expect("cleanup");
        fs::remove_file(&archive).expect("cleanup");
    }

    #[test]
    fn refuses_to_overwrite_a_directory_that_is_not_a_layout() {
        let dir = tmpdir("foreign");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("precious"), b"x").expect("write");
        assert!(write_oci_layout(&files(), &dir, &["latest"], 0).is_err());
        assert!(dir.join("precious").exists());
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn root_files_follow_symlinks_and_keep_the_soname() {
        let dir = tmpdir("libs");
        fs::create_dir_all(&dir).expect("mkdir");
        let real = dir.join("libz.so.1.2.13");
        fs::write(&real, b"real library").expect("write");
        let soname = dir.join("libz.so.1");
        std::os::unix::fs::symlink("libz.so.1.2.13", &soname).expect("symlink");
        let bin = dir.join("bin");
        fs::write(&bin, b"binary").expect("write");
        let files = root_files(&bin, std::slice::from_ref(&soname)).expect("root files");
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/fanout",
                soname.to_str().expect("utf-8"),
                "/etc/passwd",
                "/etc/group"
            ]
        );
        assert_eq!(files[0].mode, 0o755);
        assert_eq!(files[0].data, b"binary");
        assert_eq!(files[1].data, b"real library");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
