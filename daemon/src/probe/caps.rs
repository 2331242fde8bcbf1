//! The capabilities the daemon runs with, and what each one it lacks costs.
//!
//! Invariants:
//! - Read once at startup from `CapEff` in `/proc/self/status` (the effective set is what the
//!   kernel checks); parsing is pure and tested.
//! - CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (the kernel's `bpf_capable()` and
//!   `perfmon_capable()` accept either; kernels before 5.8 know only CAP_SYS_ADMIN) and for
//!   CAP_NET_ADMIN where only BPF program loading needs it, never for netlink conntrack.
//! - Without CAP_BPF or CAP_PERFMON nothing can be traced: the daemon refuses to start and says
//!   which to add. Every other missing capability disables a feature, which is then reported
//!   through [`crate::features`].

use std::fmt;

/// A Linux capability number (linux/capability.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u8, pub &'static str);

pub const DAC_OVERRIDE: Cap = Cap(1, "CAP_DAC_OVERRIDE");
pub const DAC_READ_SEARCH: Cap = Cap(2, "CAP_DAC_READ_SEARCH");
pub const NET_ADMIN: Cap = Cap(12, "CAP_NET_ADMIN");
pub const SYS_PTRACE: Cap = Cap(19, "CAP_SYS_PTRACE");
pub const SYS_ADMIN: Cap = Cap(21, "CAP_SYS_ADMIN");
pub const PERFMON: Cap = Cap(38, "CAP_PERFMON");
pub const BPF: Cap = Cap(39, "CAP_BPF");

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
}

impl Cap {
    /// The name Kubernetes' `securityContext.capabilities.add` takes.
    pub fn k8s_name(&self) -> &'static str {
        self.1.trim_start_matches("CAP_")
    }
}

/// A capability set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub const ALL: CapSet = CapSet(u64::MAX);

    pub fn has(&self, cap: Cap) -> bool {
        self.0 & (1u64 << cap.0) != 0
    }

    /// `bpf_capable()`: load programs and create maps.
    pub fn can_bpf(&self) -> bool {
        self.has(BPF) || self.has(SYS_ADMIN)
    }

    /// `perfmon_capable()`: attach tracepoints, read kernel memory from tracing programs.
    pub fn can_perfmon(&self) -> bool {
        self.has(PERFMON) || self.has(SYS_ADMIN)
    }

    /// `bpf_net_capable()`: load networking programs such as cgroup_skb.
    pub fn can_net_bpf(&self) -> bool {
        self.has(NET_ADMIN) || self.has(SYS_ADMIN)
    }

    /// Read other users' directories, such as /proc/<pid>/fd of a non-root process.
    pub fn can_read_search(&self) -> bool {
        self.has(DAC_READ_SEARCH) || self.has(DAC_OVERRIDE)
    }

    /// The capabilities fanout uses, with whether they are held, for the startup log.
    pub fn describe(&self) -> String {
        [
            BPF,
            PERFMON,
            NET_ADMIN,
            SYS_PTRACE,
            DAC_READ_SEARCH,
            SYS_ADMIN,
        ]
        .iter()
        .map(|c| format!("{}={}", c.k8s_name(), u8::from(self.has(*c))))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// `CapEff` from the text of /proc/self/status.
pub fn parse_status(status: &str) -> Option<CapSet> {
    status.lines().find_map(|l| {
        let hex = l.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(hex, 16).ok().map(CapSet)
    })
}

/// This process's effective capabilities; all of them when they cannot be read (the kernel
/// will then be the judge, and its errors name what failed).
pub fn effective() -> CapSet {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status(&s))
        .unwrap_or(CapSet::ALL)
}

/// The error for a capability without which nothing can be traced, or None.
pub fn fatal_gap(caps: CapSet) -> Option<String> {
    let mut missing = Vec::new();
    if !caps.can_bpf() {
        missing.push(format!("{BPF} (load eBPF programs and create maps)"));
    }
    if !caps.can_perfmon() {
        missing.push(format!(
            "{PERFMON} (attach tracepoints and read kernel memory from them)"
        ));
    }
    (!missing.is_empty()).then(|| {
        format!(
            "missing {}: add {} to the container's securityContext.capabilities.add (the Helm \
             chart does), or CAP_SYS_ADMIN on kernels before 5.8",
            missing.join(" and "),
            [BPF, PERFMON]
                .iter()
                .filter(|c| !caps.has(**c))
                .map(Cap::k8s_name)
                .collect::<Vec<_>>()
                .join(" and ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_effective_set() {
        let status = "Name:\tfanout\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000000c000081004\nCapBnd:\t000001ffffffffff\n";
        let caps = parse_status(status).unwrap();
        for c in [BPF, PERFMON, NET_ADMIN, SYS_PTRACE, DAC_READ_SEARCH] {
            assert!(caps.has(c), "{c}");
        }
        assert!(!caps.has(SYS_ADMIN));
        assert!(caps.can_bpf() && caps.can_perfmon() && caps.can_net_bpf());
        assert_eq!(parse_status("Name: x\n"), None);
        assert_eq!(parse_status("CapEff:\tzz\n"), None);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_ptrace() {
        let caps = CapSet(1 << SYS_ADMIN.0);
        assert!(caps.can_bpf() && caps.can_perfmon() && caps.can_net_bpf());
        assert!(!caps.has(SYS_PTRACE) && !caps.can_read_search());
        assert_eq!(fatal_gap(caps), None);
    }

    #[test]
    fn without_bpf_or_perfmon_the_error_names_what_to_add() {
        let no_bpf = CapSet((1 << PERFMON.0) | (1 << NET_ADMIN.0));
        let e = fatal_gap(no_bpf).unwrap();
        assert!(e.contains("CAP_BPF") && e.contains("add BPF "), "{e}");
        assert!(!e.contains("CAP_PERFMON"), "{e}");
        let none = fatal_gap(CapSet(0)).unwrap();
        assert!(none.contains("BPF and PERFMON"), "{none}");
        assert_eq!(fatal_gap(CapSet((1 << BPF.0) | (1 << PERFMON.0))), None);
    }
}
