//! tracefs: finding (and if need be mounting) it, and reading tracepoint record layouts from the
//! `format` files so that the eBPF programs never hard-code a kernel's field offsets.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use fanout_common::TracepointLayout;

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}. In a \
         container, mount the host's /sys/kernel/tracing at /sys/kernel/tracing (a read-only \
         hostPath; the Helm chart does): mounting tracefs itself needs CAP_SYS_ADMIN"
    )]
    Mount(std::io::Error),
    #[error("tracepoint {0} does not exist on this kernel ({1})")]
    Missing(String, std::io::Error),
    #[error("tracepoint {tp}: field `{field}` missing from its format")]
    NoField { tp: String, field: String },
    #[error("tracepoint {tp}: field `{field}` has size {got}, expected {want}")]
    FieldSize {
        tp: String,
        field: String,
        got: u16,
        want: u16,
    },
}

/// The tracefs root, mounting tracefs at /sys/kernel/tracing when no mount is found.
pub fn root() -> Result<PathBuf, TracefsError> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    mount_tracefs(CANDIDATES[0]).map_err(TracefsError::Mount)?;
    Ok(PathBuf::from(CANDIDATES[0]))
}

fn mount_tracefs(at: &str) -> std::io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (src, target, fstype) = (c("tracefs")?, c(at)?, c("tracefs")?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        tracing::info!(path = at, "mounted tracefs");
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `category/name` exists under the tracefs root.
pub fn exists(root: &Path, category: &str, name: &str) -> bool {
    root.join("events")
        .join(category)
        .join(name)
        .join("format")
        .is_file()
}

/// Field name → (offset, size) from a tracepoint `format` file.
pub fn parse_format(text: &str) -> HashMap<String, (u16, u16)> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u16>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse::<u16>().ok();
            } else if decl.is_none() && !part.is_empty() && !part.contains(':') {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // `const void * skaddr`, `__u8 saddr[4]`, `__data_loc char[] name`
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("");
        let name = name.split('[').next().unwrap_or("");
        if !name.is_empty() {
            fields.insert(name.to_string(), (offset, size));
        }
    }
    fields
}

fn read_format(root: &Path, category: &str, name: &str) -> Result<String, TracefsError> {
    let path = root.join("events").join(category).join(name).join("format");
    std::fs::read_to_string(&path)
        .map_err(|e| TracefsError::Missing(format!("{category}/{name}"), e))
}

fn field(
    fields: &HashMap<String, (u16, u16)>,
    tp: &str,
    name: &str,
    size: u16,
) -> Result<u16, TracefsError> {
    let (off, got) = fields
        .get(name)
        .copied()
        .ok_or_else(|| TracefsError::NoField {
            tp: tp.to_string(),
            field: name.to_string(),
        })?;
    if got != size {
        return Err(TracefsError::FieldSize {
            tp: tp.to_string(),
            field: name.to_string(),
            got,
            want: size,
        });
    }
    Ok(off)
}

/// Layout of `sock/inet_sock_set_state` from its format text, of the accept exit tracepoint
/// (`ret`) and of `sock/sock_{send,recv}_length` when their format texts are given.
pub fn layout_from_formats(
    set_state: &str,
    accept_exit: Option<&str>,
    msg_length: Option<&str>,
) -> Result<TracepointLayout, TracefsError> {
    let tp = "sock/inet_sock_set_state";
    let f = parse_format(set_state);
    let accept_ret = match accept_exit {
        Some(text) => field(&parse_format(text), "syscalls/sys_exit_accept4", "ret", 8)?,
        None => 0,
    };
    let (msg_sk, msg_protocol, msg_ret, msg_flags) = match msg_length {
        Some(text) => {
            let m = parse_format(text);
            let t = "sock/sock_send_length";
            (
                field(&m, t, "sk", 8)?,
                field(&m, t, "protocol", 2)?,
                field(&m, t, "ret", 4)?,
                field(&m, t, "flags", 4)?,
            )
        }
        None => (0, 0, 0, 0),
    };
    Ok(TracepointLayout {
        skaddr: field(&f, tp, "skaddr", 8)?,
        oldstate: field(&f, tp, "oldstate", 4)?,
        newstate: field(&f, tp, "newstate", 4)?,
        sport: field(&f, tp, "sport", 2)?,
        dport: field(&f, tp, "dport", 2)?,
        family: field(&f, tp, "family", 2)?,
        protocol: field(&f, tp, "protocol", 2)?,
        saddr: field(&f, tp, "saddr", 4)?,
        daddr: field(&f, tp, "daddr", 4)?,
        saddr_v6: field(&f, tp, "saddr_v6", 16)?,
        daddr_v6: field(&f, tp, "daddr_v6", 16)?,
        accept_ret,
        msg_sk,
        msg_protocol,
        msg_ret,
        msg_flags,
    })
}

/// Reads the formats from tracefs. The accept and message-length tracepoints are optional
/// (without them, accepted sockets have no owner and connections no byte counts). The send and
/// receive tracepoints share one event class; a kernel where they differ is refused.
pub fn layout(
    root: &Path,
    with_accept: bool,
    with_msg: bool,
) -> Result<TracepointLayout, TracefsError> {
    let set_state = read_format(root, "sock", "inet_sock_set_state")?;
    let accept = if with_accept {
        Some(read_format(root, "syscalls", "sys_exit_accept4")?)
    } else {
        None
    };
    let msg = if with_msg {
        let send = read_format(root, "sock", "sock_send_length")?;
        let recv = read_format(root, "sock", "sock_recv_length")?;
        if parse_format(&send) != parse_format(&recv) {
            return Err(TracefsError::NoField {
                tp: "sock/sock_recv_length".into(),
                field: "(layout differs from sock_send_length)".into(),
            });
        }
        Some(send)
    } else {
        None
    };
    layout_from_formats(&set_state, accept.as_deref(), msg.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\", REC->family
";

    const ACCEPT: &str = "name: sys_exit_accept4
format:
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;
";

    const MSG: &str = "name: sock_send_length
format:
\tfield:void * sk;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 family;\toffset:16;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:18;\tsize:2;\tsigned:0;
\tfield:int ret;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int flags;\toffset:24;\tsize:4;\tsigned:1;
";

    #[test]
    fn parses_field_names_offsets_and_sizes() {
        let f = parse_format(SET_STATE);
        assert_eq!(f["skaddr"], (8, 8));
        assert_eq!(f["saddr_v6"], (40, 16));
        assert_eq!(f["common_pid"], (4, 4));
        let l = layout_from_formats(SET_STATE, Some(ACCEPT), Some(MSG)).unwrap();
        assert_eq!((l.sport, l.dport, l.family, l.protocol), (24, 26, 28, 30));
        assert_eq!(l.accept_ret, 16);
        assert_eq!(
            (l.msg_sk, l.msg_protocol, l.msg_ret, l.msg_flags),
            (8, 18, 20, 24)
        );
    }

    #[test]
    fn missing_or_resized_fields_are_errors() {
        let no_family = SET_STATE.replace("family", "fam");
        let err = layout_from_formats(&no_family, None, None).unwrap_err();
        assert!(err.to_string().contains("`family` missing"), "{err}");
        let resized = SET_STATE.replace("offset:24;\tsize:2", "offset:24;\tsize:4");
        let err = layout_from_formats(&resized, None, None).unwrap_err();
        assert!(err.to_string().contains("size 4"), "{err}");
        let err = layout_from_formats(SET_STATE, None, Some("field:int ret;offset:20;size:4;"))
            .unwrap_err();
        assert!(err.to_string().contains("`sk` missing"), "{err}");
        assert!(parse_format("garbage\nfield:;;;\nfield:int x;offset:zz;size:1;").is_empty());
    }
}
