//! Finding the host's cgroup v2 root, where the HTTP/2 request scanner (`cgroup_skb/egress`)
//! attaches so that it sees the egress traffic of every socket on the node.
//!
//! Invariants:
//! - Only the root of the cgroup v2 hierarchy is ever chosen on its own. A directory qualifies
//!   when it is on a cgroup2 filesystem (statfs magic) and is the hierarchy's root cgroup, whose
//!   kernfs inode (the cgroup id) is always 1. A container with a private cgroup namespace sees its
//!   own cgroup as `/sys/fs/cgroup`, with another inode: a scanner attached there would count only
//!   the container's own traffic, so such a mount is rejected with the reason.
//! - Candidates, in order: every cgroup2 mount in `/proc/self/mountinfo` (the host's
//!   `/sys/fs/cgroup` mounted into the pod shows up here, and on hybrid hosts its `unified`
//!   submount too), then `<proc-root>/1/root/sys/fs/cgroup{,/unified}`: the host init's view, which
//!   needs ptrace access to pid 1 (CAP_SYS_PTRACE in a container).
//! - An explicit `--cgroup-root` wins. It must be a cgroup2 directory; one that is not the root
//!   is used as asked (a subtree's sockets only), with a warning.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC` (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// The kernfs inode of a cgroup hierarchy's root cgroup (its cgroup id).
pub const ROOT_CGROUP_INO: u64 = 1;

/// Why a candidate directory was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("cannot read it: {0}")]
    Unreadable(io::Error),
    #[error("not a cgroup v2 filesystem")]
    NotCgroup2,
    #[error(
        "a cgroup below the hierarchy root (cgroup id {0}; a private cgroup namespace shows the \
         container's own cgroup here): attaching there would only see this container's traffic"
    )]
    NotRoot(u64),
}

/// What [`find`] concluded.
#[derive(Debug)]
pub enum Found {
    /// The hierarchy root at this path.
    Root(PathBuf),
    /// `--cgroup-root`, a cgroup2 directory below the root (cgroup id): used as asked.
    Subtree(PathBuf, u64),
    /// Nothing usable; each candidate tried with why it was refused (empty: no cgroup2 anywhere).
    None(Vec<(PathBuf, Rejected)>),
}

/// How a directory looks: its filesystem and inode.
pub trait Inspect {
    fn inspect(&self, path: &Path) -> Result<(i64, u64), io::Error>;
}

/// The real filesystem.
pub struct Fs;

impl Inspect for Fs {
    fn inspect(&self, path: &Path) -> Result<(i64, u64), io::Error> {
        let meta = std::fs::metadata(path)?;
        if !meta.is_dir() {
            return Err(io::Error::other("not a directory"));
        }
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(io::Error::other)?;
        // SAFETY: statfs is plain data; all zeroes is a valid initial value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid NUL-terminated path and a statfs buffer.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.f_type as i64, meta.ino()))
    }
}

/// Checks one directory.
pub fn check(fs: &impl Inspect, path: &Path) -> Result<u64, Rejected> {
    let (magic, ino) = fs.inspect(path).map_err(Rejected::Unreadable)?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(Rejected::NotCgroup2);
    }
    Ok(ino)
}

/// Mount points of cgroup2 filesystems, in mount order, from `/proc/self/mountinfo` text
/// (field 5 is the mount point, the filesystem type follows the ` - ` separator). Octal escapes
/// (`\040` for a space) are decoded.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split(' ').nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The candidates, in the order they are tried (see the module doc).
pub fn candidates(mountinfo: &str, proc_root: &Path) -> Vec<PathBuf> {
    let mut all = cgroup2_mounts(mountinfo);
    let host = proc_root.join("1/root/sys/fs/cgroup");
    all.push(host.join("unified"));
    all.push(host);
    let mut seen = std::collections::HashSet::new();
    all.retain(|p| seen.insert(p.clone()));
    all
}

/// Finds the directory to attach the scanner to.
pub fn find(
    fs: &impl Inspect,
    explicit: Option<&Path>,
    mountinfo: &str,
    proc_root: &Path,
) -> Found {
    if let Some(path) = explicit {
        return match check(fs, path) {
            Ok(ROOT_CGROUP_INO) => Found::Root(path.to_path_buf()),
            Ok(id) => Found::Subtree(path.to_path_buf(), id),
            Err(why) => Found::None(vec![(path.to_path_buf(), why)]),
        };
    }
    let mut rejected = Vec::new();
    for path in candidates(mountinfo, proc_root) {
        match check(fs, &path) {
            Ok(ROOT_CGROUP_INO) => return Found::Root(path),
            Ok(id) => rejected.push((path, Rejected::NotRoot(id))),
            // A path that does not exist is no candidate worth reporting (`unified` on a host
            // without a hybrid layout, /proc/1/root without the host's /proc).
            Err(Rejected::Unreadable(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(why) => rejected.push((path, why)),
        }
    }
    Found::None(rejected)
}

/// [`find`] on this process's mount table and the real filesystem.
pub fn find_here(explicit: Option<&Path>, proc_root: &Path) -> Found {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    find(&Fs, explicit, &mountinfo, proc_root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A made-up filesystem: path → (magic, inode), or absent.
    struct Fake(HashMap<PathBuf, (i64, u64)>);

    impl Inspect for Fake {
        fn inspect(&self, path: &Path) -> Result<(i64, u64), io::Error> {
            self.0
                .get(path)
                .copied()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn fake(entries: &[(&str, i64, u64)]) -> Fake {
        Fake(
            entries
                .iter()
                .map(|(p, m, i)| (PathBuf::from(p), (*m, *i)))
                .collect(),
        )
    }

    const TMPFS: i64 = 0x0102_1994;
    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A container with a private cgroup namespace: its own cgroup at /sys/fs/cgroup, and the
    /// host's /sys/fs/cgroup bind-mounted (recursively) at /host/sys/fs/cgroup.
    const CONTAINER: &str = "600 500 0:38 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
601 500 0:28 / /host/sys/fs/cgroup ro,relatime - tmpfs tmpfs rw,mode=755
602 601 0:38 / /host/sys/fs/cgroup/unified ro,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_lists_cgroup2_mounts_in_order_and_unescapes() {
        assert_eq!(
            cgroup2_mounts(CONTAINER),
            vec![
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/host/sys/fs/cgroup/unified")
            ]
        );
        assert_eq!(
            cgroup2_mounts("1 2 0:3 / /a\\040b rw - cgroup2 none rw\n"),
            vec![PathBuf::from("/a b")]
        );
        assert!(cgroup2_mounts("garbage\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn the_hosts_root_is_found_on_a_hybrid_host() {
        let fs = fake(&[
            ("/sys/fs/cgroup", TMPFS, 1),
            ("/sys/fs/cgroup/unified", CGROUP2_SUPER_MAGIC, 1),
        ]);
        assert!(matches!(
            find(&fs, None, HYBRID, Path::new("/proc")),
            Found::Root(p) if p == Path::new("/sys/fs/cgroup/unified")
        ));
    }

    #[test]
    fn a_containers_own_cgroup_is_never_taken_for_the_root() {
        // The container's own cgroup comes first in the mount table and is cgroup2, but not the
        // root: the host's mount below /host is chosen.
        let fs = fake(&[
            ("/sys/fs/cgroup", CGROUP2_SUPER_MAGIC, 4242),
            ("/host/sys/fs/cgroup/unified", CGROUP2_SUPER_MAGIC, 1),
        ]);
        assert!(matches!(
            find(&fs, None, CONTAINER, Path::new("/host/proc")),
            Found::Root(p) if p == Path::new("/host/sys/fs/cgroup/unified")
        ));
        // Without the host mount, nothing is found, and the container's cgroup is reported.
        let fs = fake(&[("/sys/fs/cgroup", CGROUP2_SUPER_MAGIC, 4242)]);
        let Found::None(why) = find(
            &fs,
            None,
            "600 500 0:38 / /sys/fs/cgroup ro - cgroup2 cgroup rw\n",
            Path::new("/host/proc"),
        ) else {
            panic!("a subtree was taken for the root")
        };
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(matches!(why[0].1, Rejected::NotRoot(4242)));
        assert!(why[0].1.to_string().contains("private cgroup namespace"));
    }

    #[test]
    fn the_host_init_view_is_the_fallback() {
        let fs = fake(&[
            ("/sys/fs/cgroup", CGROUP2_SUPER_MAGIC, 4242),
            ("/host/proc/1/root/sys/fs/cgroup", CGROUP2_SUPER_MAGIC, 1),
        ]);
        assert!(matches!(
            find(&fs, None, "600 500 0:38 / /sys/fs/cgroup ro - cgroup2 cgroup rw\n", Path::new("/host/proc")),
            Found::Root(p) if p == Path::new("/host/proc/1/root/sys/fs/cgroup")
        ));
    }

    #[test]
    fn an_explicit_root_is_checked_and_a_subtree_is_used_as_asked() {
        let fs = fake(&[
            ("/cg", CGROUP2_SUPER_MAGIC, 1),
            ("/cg/kubepods", CGROUP2_SUPER_MAGIC, 77),
            ("/tmp", TMPFS, 5),
        ]);
        assert!(matches!(
            find(&fs, Some(Path::new("/cg")), "", Path::new("/proc")),
            Found::Root(_)
        ));
        assert!(matches!(
            find(&fs, Some(Path::new("/cg/kubepods")), "", Path::new("/proc")),
            Found::Subtree(_, 77)
        ));
        let Found::None(why) = find(&fs, Some(Path::new("/tmp")), "", Path::new("/proc")) else {
            panic!("tmpfs accepted")
        };
        assert!(matches!(why[0].1, Rejected::NotCgroup2));
        let Found::None(why) = find(&fs, Some(Path::new("/nope")), "", Path::new("/proc")) else {
            panic!("a missing path accepted")
        };
        assert!(
            matches!(why[0].1, Rejected::Unreadable(_)),
            "an explicit path that is missing is reported"
        );
    }

    #[test]
    fn this_hosts_root_has_cgroup_id_1() {
        // Unprivileged: stat and statfs of the mount table's cgroup2 mounts. Every machine fanout
        // is developed on has one (hybrid: /sys/fs/cgroup/unified).
        match find_here(None, Path::new("/proc")) {
            Found::Root(p) => assert_eq!(check(&Fs, &p).ok(), Some(ROOT_CGROUP_INO)),
            other => panic!("no cgroup2 root found here: {other:?}"),
        }
    }
}
