//! Probe: resolves kernel layouts, picks hooks, loads and attaches the eBPF programs.
//!
//! Invariants:
//! - Links are owned by this process (nothing is pinned): dropping the [`Probe`] detaches every
//!   program, and a crash leaves nothing attached.
//! - Only the lifecycle tracepoint is required: without it, or without CAP_BPF and CAP_PERFMON,
//!   loading fails with an error that says what to add. Every other hook (accept owner, byte
//!   counters, the HTTP/2 scanner) that cannot attach is reported in [`Probe::outcomes`] with the
//!   reason and the fix, and the daemon runs without it.

pub mod btf;
pub mod caps;
pub mod cgroup;
pub mod tracefs;

use std::{os::fd::AsFd as _, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint, TracePoint,
    },
};
use fanout_common::{Config, KernelOffsets, LostReason, SockLayout, SockState};

use crate::features::Feature;

use self::btf::{Btf, BtfError};
use self::tracefs::TracefsError;

/// The eBPF object, built by build.rs through aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fanout"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0} missing from the object")]
    NoProgram(&'static str),
    #[error("eBPF map {0} missing from the object")]
    NoMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "this kernel has no sock/inet_sock_set_state tracepoint (needs Linux >= 4.16 with \
         tracepoints); fanout cannot trace TCP lifecycles here"
    )]
    NoLifecycleHook,
    #[error("invalid option: {0}")]
    Option(String),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Capability(String),
}

/// Sizes and thresholds of the kernel side.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes: a power of two, at least one page.
    pub ring_bytes: u32,
    /// Capacity of the per-socket state map.
    pub sock_entries: u32,
    /// Wake the reader once this many bytes wait in the ring buffer.
    pub wakeup_bytes: u64,
    pub btf_path: PathBuf,
    /// cgroup v2 directory whose subtree's egress traffic is scanned for HTTP/2 requests (None:
    /// the host's cgroup v2 root, found as [`cgroup`] describes; none found: requests fall back
    /// to messages).
    pub cgroup_root: Option<PathBuf>,
    /// The host's /proc (for /proc/1/root, the host init's view of the cgroup2 mount).
    pub proc_root: PathBuf,
    /// Use the classic tracepoints even where raw ones work (they cost more per run: the kernel
    /// builds a trace record and every field is a helper call). For comparison and as a way out.
    /// Implies no BTF-typed ones.
    pub classic_tracepoints: bool,
    /// Use the BTF-typed tracepoints where the kernel takes them: they keep a server end's state
    /// with its socket (socket-local storage) and take its owner at its first read or write,
    /// instead of a map entry and the accept syscall's file-table walk. Off by default: on the
    /// machine measured they cost more per connection than the raw ones (BENCHMARKS.md).
    pub btf_tracepoints: bool,
    /// Name accepted sockets' owners at accept(), from the accept syscalls' tracepoints, even
    /// where the length hooks name them (at a server end's first read or write): for servers
    /// that accept in one process and serve in another; also the path of kernels without the
    /// length tracepoints (before 6.2). Raw and classic forms only.
    pub accept_tracepoints: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            // 30 000 records of 136 bytes: a quarter of a second at the highest record rate
            // measured here (BENCHMARKS.md) while the reader is away. Its pages are mapped twice
            // (so that a record that wraps reads as one piece) and count twice in the RSS.
            ring_bytes: 4 << 20,
            sock_entries: 65_536,
            wakeup_bytes: 256 << 10,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            cgroup_root: None,
            proc_root: PathBuf::from("/proc"),
            classic_tracepoints: false,
            btf_tracepoints: false,
            accept_tracepoints: false,
        }
    }
}

impl ProbeOptions {
    pub fn validate(&self) -> Result<(), ProbeError> {
        let page = page_size();
        if !self.ring_bytes.is_power_of_two() || (self.ring_bytes as u64) < page {
            return Err(ProbeError::Option(format!(
                "ring buffer size {} must be a power of two and at least the page size ({page})",
                self.ring_bytes
            )));
        }
        if self.sock_entries == 0 {
            return Err(ProbeError::Option("socket map size must be > 0".into()));
        }
        if self.wakeup_bytes >= self.ring_bytes as u64 {
            return Err(ProbeError::Option(format!(
                "wakeup threshold {} must be below the ring buffer size {}",
                self.wakeup_bytes, self.ring_bytes
            )));
        }
        Ok(())
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

/// What the kernel offers, probed at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub set_state_tracepoint: bool,
    pub accept_tracepoints: bool,
    /// `sock/sock_send_length` and `sock/sock_recv_length`.
    pub msg_tracepoints: bool,
}

/// Which hooks run. The lifecycle comes from `sock/inet_sock_set_state` on every supported kernel
/// (it carries the old and new state, the 4-tuple and the socket, and its connect transition runs
/// in the caller's context); the owner of accepted sockets comes from the accept syscall exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookPlan {
    pub lifecycle: &'static str,
    pub accept_owner: Option<&'static str>,
    /// Byte and message counters per connection.
    pub counters: Option<&'static str>,
    /// Where the HTTP/2 request scanner attached (set once it did).
    pub h2_cgroup: Option<PathBuf>,
}

impl HookPlan {
    pub fn choose(caps: Capabilities) -> Result<HookPlan, ProbeError> {
        if !caps.set_state_tracepoint {
            return Err(ProbeError::NoLifecycleHook);
        }
        Ok(HookPlan {
            lifecycle: "tracepoint:sock/inet_sock_set_state",
            accept_owner: caps
                .accept_tracepoints
                .then_some("tracepoint:syscalls/sys_exit_accept{,4}"),
            counters: caps
                .msg_tracepoints
                .then_some("tracepoint:sock/sock_{send,recv}_length"),
            h2_cgroup: None,
        })
    }

    /// Short names for logs and `fanout_build_info`-style labels.
    pub fn describe(&self) -> String {
        let mut parts = vec![self.lifecycle.to_string()];
        match self.accept_owner {
            Some(a) => parts.push(a.to_string()),
            None => parts.push("(accepted sockets without owner)".into()),
        }
        match self.counters {
            Some(c) => parts.push(c.to_string()),
            None => parts.push("(no byte counters)".into()),
        }
        match &self.h2_cgroup {
            Some(_) => parts.push("cgroup_skb/egress:h2".into()),
            None => parts.push("(requests from messages)".into()),
        }
        parts.join(" + ")
    }
}

/// Kernel struct offsets the programs need, from BTF.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    Ok(KernelOffsets {
        sock_net: btf.member_offset("sock", "__sk_common.skc_net.net")?,
        net_inum: btf.member_offset("net", "ns.inum")?,
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdt_max_fds: btf.member_offset("fdtable", "max_fds")?,
        fdt_fd: btf.member_offset("fdtable", "fd")?,
        file_private_data: btf.member_offset("file", "private_data")?,
        socket_sk: btf.member_offset("socket", "sk")?,
    })
}

/// Offsets in `struct sock` / `struct inet_sock` (which starts with it) of the fields the raw
/// tracepoints read, the ones the classic tracepoint copies into its record, from BTF (u16: they
/// are all in the first kilobytes of the struct).
pub fn sock_layout(btf: &Btf) -> Result<SockLayout, BtfError> {
    let at = |strukt: &str, path: &str| -> Result<u16, BtfError> {
        let off = btf.member_offset(strukt, path)?;
        u16::try_from(off).map_err(|_| BtfError::Bitfield(format!("{strukt}.{path} at {off}")))
    };
    Ok(SockLayout {
        protocol: at("sock", "sk_protocol")?,
        family: at("sock", "__sk_common.skc_family")?,
        sport: at("inet_sock", "inet_sport")?,
        dport: at("sock", "__sk_common.skc_dport")?,
        saddr: at("inet_sock", "inet_saddr")?,
        daddr: at("sock", "__sk_common.skc_daddr")?,
        v6_rcv_saddr: at("sock", "__sk_common.skc_v6_rcv_saddr")?,
        v6_daddr: at("sock", "__sk_common.skc_v6_daddr")?,
    })
}

/// The loaded, attached programs. Dropping it detaches everything.
pub struct Probe {
    ebpf: Ebpf,
    lost: PerCpuArray<MapData, u64>,
    socks: HashMap<MapData, u64, SockState>,
    /// Forwards the programs' aya-log records to `tracing`.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub plan: HookPlan,
    /// What became of each optional hook: on (how) or off (why, and the fix).
    pub outcomes: Vec<(Feature, Outcome)>,
}

/// What became of an optional hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    On(String),
    Off { reason: String, fix: String },
}

/// The in-kernel log level (aya-log's `AYA_LOG_LEVEL`) matching the daemon's tracing level, so
/// that disabled log statements cost nothing in the kernel.
fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

impl Probe {
    /// Loads and attaches. Returns the probe and the ring buffer to read records from.
    pub fn load(opts: &ProbeOptions) -> Result<(Probe, RingBuf<MapData>), ProbeError> {
        opts.validate()?;
        let held = caps::effective();
        tracing::info!(capabilities = %held.describe(), "effective capabilities");
        if let Some(gap) = caps::fatal_gap(held) {
            return Err(ProbeError::Capability(gap));
        }
        let root = tracefs::root()?;
        let kernel = Capabilities {
            set_state_tracepoint: tracefs::exists(&root, "sock", "inet_sock_set_state"),
            accept_tracepoints: tracefs::exists(&root, "syscalls", "sys_exit_accept4")
                && tracefs::exists(&root, "syscalls", "sys_exit_accept"),
            msg_tracepoints: tracefs::exists(&root, "sock", "sock_send_length")
                && tracefs::exists(&root, "sock", "sock_recv_length"),
        };
        let mut plan = HookPlan::choose(kernel.clone())?;
        let btf = Btf::from_file(&opts.btf_path)?;
        // The raw tracepoints read the socket's fields themselves; without their offsets the
        // classic tracepoints (whose record carries them) are the way.
        let sk_layout = match (opts.classic_tracepoints, sock_layout(&btf)) {
            (true, _) => None,
            (false, Ok(l)) => Some(l),
            (false, Err(e)) => {
                tracing::warn!(error = %e, "socket layout not in BTF; using the classic tracepoints, which cost more per run");
                None
            }
        };
        let config = Config {
            tp: tracefs::layout(&root, plan.accept_owner.is_some(), plan.counters.is_some())?,
            offsets: kernel_offsets(&btf)?,
            sk: sk_layout.unwrap_or(Config::zeroed().sk),
            wakeup_bytes: opts.wakeup_bytes,
        };
        drop(btf);
        tracing::debug!(?config, "resolved kernel layout");

        let log_level = kernel_log_level();
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .override_global(aya_log::LEVEL, &log_level, false)
            .map_max_entries("RECORDS", opts.ring_bytes)
            .map_max_entries("SOCKS", opts.sock_entries)
            .load(EBPF_OBJECT)?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "kernel-side logs unavailable");
                None
            }
        };
        let mut outcomes = Vec::new();
        let btf_first = opts.btf_tracepoints && kernel.msg_tracepoints && sk_layout.is_some();
        match btf_first.then(|| attach_btf(&mut ebpf, &opts.btf_path)) {
            Some(Ok(())) => {
                plan.lifecycle = BTF_LIFECYCLE;
                plan.accept_owner = Some(BTF_OWNER);
                plan.counters = Some(BTF_COUNTERS);
                outcomes.push((Feature::AcceptOwner, Outcome::On(BTF_OWNER.into())));
                outcomes.push((Feature::ByteCounters, Outcome::On(BTF_COUNTERS.into())));
            }
            attempt => {
                if let Some(Err(e)) = attempt {
                    tracing::warn!(
                        error = %e,
                        "BTF-typed tracepoints refused; using raw ones, which keep server ends' \
                         state in the socket map"
                    );
                }
                attach_tracepoints(
                    &mut ebpf,
                    opts,
                    sk_layout.is_some(),
                    &mut plan,
                    &mut outcomes,
                )?;
            }
        }
        let h2 = attach_h2(&mut ebpf, opts, held);
        if let Outcome::On(_) = &h2.1 {
            plan.h2_cgroup = h2.0;
        }
        outcomes.push((Feature::H2Requests, h2.1));

        let ring = ebpf
            .take_map("RECORDS")
            .ok_or(ProbeError::NoMap("RECORDS"))?;
        let ring = RingBuf::try_from(ring).map_err(|source| ProbeError::Map {
            name: "RECORDS",
            source,
        })?;
        let socks = ebpf.take_map("SOCKS").ok_or(ProbeError::NoMap("SOCKS"))?;
        let socks = HashMap::try_from(socks).map_err(|source| ProbeError::Map {
            name: "SOCKS",
            source,
        })?;
        let lost = ebpf.take_map("LOST").ok_or(ProbeError::NoMap("LOST"))?;
        let lost = PerCpuArray::try_from(lost).map_err(|source| ProbeError::Map {
            name: "LOST",
            source,
        })?;
        tracing::info!(hooks = %plan.describe(), "eBPF programs attached");
        Ok((
            Probe {
                ebpf,
                lost,
                socks,
                logger,
                plan,
                outcomes,
            },
            ring,
        ))
    }

    /// Totals of the kernel's loss counters, summed over CPUs, by reason.
    pub fn lost(&self) -> Result<Vec<(LostReason, u64)>, ProbeError> {
        LostReason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu =
                    self.lost
                        .get(&(reason as u32), 0)
                        .map_err(|source| ProbeError::Map {
                            name: "LOST",
                            source,
                        })?;
                Ok((reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// The kernel's state of a live socket (owner, start, byte and message counters, and the
    /// HTTP/2 scanner's figure for a client end it follows).
    pub fn sock_state(&self, sock: u64) -> Option<SockState> {
        self.socks.get(&sock, 0).ok()
    }

    /// Forwards pending kernel-side log records to `tracing`.
    pub fn flush_logs(&mut self) {
        let Some(logger) = self.logger.as_mut() else {
            return;
        };
        // aya-log panics on a record it cannot parse; never let that take the daemon down.
        let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush()));
        if flushed.is_err() {
            tracing::warn!("dropping kernel-side logs after an unparsable record");
            self.logger = None;
        }
    }

    /// For every loaded program: the runs the kernel skipped (`recursion_misses` of the
    /// program's info, read from its fdinfo): each skipped run of a record-emitting program may
    /// be a lost record.
    pub fn program_misses(&self) -> Vec<(String, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let fd = prog.fd().ok()?;
                let path = format!(
                    "/proc/self/fdinfo/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
                );
                let text = std::fs::read_to_string(path).ok()?;
                Some((name.to_string(), fdinfo_field(&text, "recursion_misses")?))
            })
            .collect()
    }

    /// Names of the attached programs.
    pub fn programs(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_string()).collect()
    }
}

/// Programs whose runs emit lifecycle records: a run the kernel skipped may be a lost record.
pub const RECORD_PROGRAMS: [&str; 7] = [
    "inet_sock_set_state_btf",
    "inet_sock_set_state_raw",
    "inet_sock_set_state",
    "sys_exit_accept4",
    "sys_exit_accept",
    // They emit the owner of a server end at its first read or write. The raw and classic
    // length hooks emit nothing: they keep that owner in the socket's state.
    "sock_send_length_btf",
    "sock_recv_length_btf",
];

/// A `name:\tvalue` field of a BPF object's fdinfo text.
pub fn fdinfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().parse().ok())?
    })
}

/// Maps a program error to the probe error naming the program.
fn program_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> ProbeError {
    move |source| ProbeError::Program { name, source }
}

/// The object's program `name` as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::NoProgram(name))?
        .try_into()
        .map_err(program_err(name))
}

fn attach(ebpf: &mut Ebpf, name: &'static str, category: &str, tp: &str) -> Result<(), ProbeError> {
    let prog: &mut TracePoint = program(ebpf, name)?;
    prog.load().map_err(program_err(name))?;
    prog.attach(category, tp).map_err(program_err(name))?;
    Ok(())
}

/// The lifecycle, accept and length hooks as raw tracepoints where `raw`, else classic ones.
fn attach_tracepoints(
    ebpf: &mut Ebpf,
    opts: &ProbeOptions,
    raw: bool,
    plan: &mut HookPlan,
    outcomes: &mut Vec<(Feature, Outcome)>,
) -> Result<(), ProbeError> {
    plan.lifecycle = attach_either(
        ebpf,
        raw,
        (
            "inet_sock_set_state_raw",
            "raw_tracepoint:inet_sock_set_state",
        ),
        (
            "inet_sock_set_state",
            "sock",
            "tracepoint:sock/inet_sock_set_state",
        ),
    )?;
    let kernel_fix = "a kernel with these tracepoints (Linux 4.16 or later with \
                      CONFIG_FTRACE_SYSCALLS for the syscall ones)";
    let counters = match plan.counters {
        None => Outcome::Off {
            reason: "sock/sock_{send,recv}_length tracepoints missing from this kernel".into(),
            fix: "Linux 6.2 or later".into(),
        },
        Some(_) => {
            let attached = [
                ("sock_send_length_raw", "sock_send_length"),
                ("sock_recv_length_raw", "sock_recv_length"),
            ]
            .into_iter()
            .try_fold("", |_, (raw, classic)| {
                attach_either(
                    ebpf,
                    !opts.classic_tracepoints,
                    (raw, RAW_COUNTERS),
                    (classic, "sock", CLASSIC_COUNTERS),
                )
            });
            match attached {
                Ok(hook) => {
                    plan.counters = Some(hook);
                    Outcome::On(hook.into())
                }
                Err(e) => {
                    plan.counters = None;
                    Outcome::Off {
                        reason: e.to_string(),
                        fix: "see the error; CAP_PERFMON attaches tracepoints".into(),
                    }
                }
            }
        }
    };
    outcomes.push((Feature::ByteCounters, counters));
    // The length hooks name a server end's owner at its first read or write (see the eBPF
    // crate's `count_msg`); the accept syscall's file-table walk, a microsecond per accept, is
    // attached only where they are missing.
    let accept = match (plan.counters, plan.accept_owner) {
        (Some(counters), _) if !opts.accept_tracepoints => {
            let hook = if counters == RAW_COUNTERS {
                RAW_OWNER
            } else {
                CLASSIC_OWNER
            };
            plan.accept_owner = Some(hook);
            Outcome::On(hook.into())
        }
        (_, None) => Outcome::Off {
            reason: "syscalls/sys_exit_accept{,4} tracepoints missing from this kernel".into(),
            fix: kernel_fix.into(),
        },
        (_, Some(hook)) => [
            ("sys_exit_accept4", "sys_exit_accept4"),
            ("sys_exit_accept", "sys_exit_accept"),
        ]
        .into_iter()
        .try_for_each(|(name, tp)| attach(ebpf, name, "syscalls", tp))
        .map_or_else(
            |e| {
                plan.accept_owner = None;
                Outcome::Off {
                    reason: e.to_string(),
                    fix: "see the error; CAP_PERFMON attaches tracepoints".into(),
                }
            },
            |()| Outcome::On(hook.into()),
        ),
    };
    outcomes.push((Feature::AcceptOwner, accept));
    Ok(())
}

const RAW_COUNTERS: &str = "raw_tracepoint:sock_{send,recv}_length";
const CLASSIC_COUNTERS: &str = "tracepoint:sock/sock_{send,recv}_length";
const RAW_OWNER: &str =
    "raw_tracepoint:sock_{send,recv}_length (a server end's owner at its first read or write)";
const CLASSIC_OWNER: &str =
    "tracepoint:sock/sock_{send,recv}_length (a server end's owner at its first read or write)";
const BTF_LIFECYCLE: &str = "tp_btf:inet_sock_set_state";
const BTF_OWNER: &str =
    "tp_btf:sock_{send,recv}_length (a server end's owner at its first read or write)";
const BTF_COUNTERS: &str = "tp_btf:sock_{send,recv}_length";

/// The BTF-typed lifecycle and length tracepoints, all or none: on an error, the ones already
/// attached are detached again.
fn attach_btf(ebpf: &mut Ebpf, btf_path: &std::path::Path) -> Result<(), ProbeError> {
    const PROGRAMS: [(&str, &str); 3] = [
        ("inet_sock_set_state_btf", "inet_sock_set_state"),
        ("sock_send_length_btf", "sock_send_length"),
        ("sock_recv_length_btf", "sock_recv_length"),
    ];
    let btf = aya::Btf::parse_file(btf_path, aya::Endianness::default())
        .map_err(|e| ProbeError::Option(format!("reading BTF from {}: {e}", btf_path.display())))?;
    let attached = PROGRAMS.iter().try_for_each(|&(name, tp)| {
        let prog: &mut BtfTracePoint = program(ebpf, name)?;
        prog.load(tp, &btf).map_err(program_err(name))?;
        prog.attach().map_err(program_err(name))?;
        Ok(())
    });
    if attached.is_err() {
        for (name, _) in PROGRAMS {
            if let Ok(prog) = program::<BtfTracePoint>(ebpf, name) {
                // Unloading detaches its links; one never loaded has nothing to undo.
                let _ = prog.unload();
            }
        }
    }
    attached
}

/// Attaches the raw tracepoint form of a hook when `raw` (falling back to the classic form, with a
/// warning, if the kernel refuses it), else the classic form. Returns the hook's description.
fn attach_either(
    ebpf: &mut Ebpf,
    raw: bool,
    (raw_name, raw_hook): (&'static str, &'static str),
    (name, category, hook): (&'static str, &str, &'static str),
) -> Result<&'static str, ProbeError> {
    if raw {
        let attached = (|| {
            let prog: &mut RawTracePoint = program(ebpf, raw_name)?;
            prog.load().map_err(program_err(raw_name))?;
            // The raw tracepoint's name is the classic one's (the same TRACE_EVENT).
            prog.attach(name).map_err(program_err(raw_name))?;
            Ok::<_, ProbeError>(())
        })();
        match attached {
            Ok(()) => return Ok(raw_hook),
            Err(e) => tracing::warn!(
                error = %e,
                hook,
                "raw tracepoint refused; using the classic tracepoint, which costs more per run"
            ),
        }
    }
    attach(ebpf, name, category, name)?;
    Ok(hook)
}

fn attach_cgroup_skb(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &std::path::Path,
) -> Result<(), ProbeError> {
    let prog: &mut CgroupSkb = program(ebpf, name)?;
    prog.load().map_err(program_err(name))?;
    let dir = std::fs::File::open(cgroup).map_err(|source| ProbeError::Cgroup {
        path: cgroup.display().to_string(),
        source,
    })?;
    // aya attaches through bpf_link where the kernel has it (links to one cgroup always coexist,
    // so another fanout or a CNI keeps working); link_create takes no attach flags, so the
    // mode must be the default one.
    prog.attach(
        dir,
        CgroupSkbAttachType::Egress,
        CgroupAttachMode::default(),
    )
    .map_err(program_err(name))?;
    Ok(())
}

/// Finds the host's cgroup v2 root and attaches the HTTP/2 scanner there. Returns where, and
/// the outcome.
fn attach_h2(
    ebpf: &mut Ebpf,
    opts: &ProbeOptions,
    held: caps::CapSet,
) -> (Option<PathBuf>, Outcome) {
    const MOUNT_FIX: &str = "mount the host's /sys/fs/cgroup into the container (hostPath, \
        read-only; the Helm chart mounts it at /host/sys/fs/cgroup) or pass --cgroup-root with \
        the host's cgroup v2 root";
    let (path, subtree) = match cgroup::find_here(opts.cgroup_root.as_deref(), &opts.proc_root) {
        cgroup::Found::Root(p) => (p, None),
        cgroup::Found::Subtree(p, id) => (p, Some(id)),
        cgroup::Found::None(tried) => {
            let reason = if tried.is_empty() {
                "no cgroup v2 hierarchy is mounted here, and the host's is not reachable through \
                 <proc-root>/1/root (a cgroup v1-only host, or a container without the host's \
                 /sys/fs/cgroup)"
                    .to_string()
            } else {
                let list: Vec<String> = tried
                    .iter()
                    .map(|(p, why)| format!("{}: {why}", p.display()))
                    .collect();
                format!("no host cgroup v2 root found ({})", list.join("; "))
            };
            return (
                None,
                Outcome::Off {
                    reason,
                    fix: MOUNT_FIX.into(),
                },
            );
        }
    };
    if let Some(id) = subtree {
        tracing::warn!(
            path = %path.display(),
            cgroup_id = id,
            "--cgroup-root is not the cgroup v2 hierarchy root: only sockets of processes \
             below it are scanned for HTTP/2 requests"
        );
    }
    match attach_cgroup_skb(ebpf, "h2_egress", &path) {
        Ok(()) => {
            let how = match subtree {
                None => format!(
                    "cgroup_skb/egress on the host cgroup v2 root {}",
                    path.display()
                ),
                Some(id) => format!(
                    "cgroup_skb/egress on {} (cgroup id {id}, a subtree, as asked)",
                    path.display()
                ),
            };
            (Some(path), Outcome::On(how))
        }
        Err(e) => {
            let fix = if held.can_net_bpf() {
                "see the error".to_string()
            } else {
                "add NET_ADMIN to the container's securityContext.capabilities.add (loading a \
                 cgroup_skb program needs CAP_NET_ADMIN)"
                    .to_string()
            };
            (
                None,
                Outcome::Off {
                    reason: format!("attaching the HTTP/2 scanner to {}: {e}", path.display()),
                    fix,
                },
            )
        }
    }
}

/// Where `ip netns` keeps named namespaces (scanned at startup besides /proc).
pub fn default_netns_dirs() -> Vec<PathBuf> {
    ["/run/netns", "/var/run/netns"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn plan_requires_the_lifecycle_tracepoint() {
        let none = Capabilities {
            set_state_tracepoint: false,
            accept_tracepoints: true,
            msg_tracepoints: true,
        };
        assert!(matches!(
            HookPlan::choose(none),
            Err(ProbeError::NoLifecycleHook)
        ));
        let no_accept = Capabilities {
            set_state_tracepoint: true,
            accept_tracepoints: false,
            msg_tracepoints: false,
        };
        let plan = HookPlan::choose(no_accept).unwrap();
        assert_eq!(plan.accept_owner, None);
        assert!(plan.describe().contains("without owner"));
        assert!(plan.describe().contains("no byte counters"));
        assert!(plan.describe().contains("requests from messages"));
    }

    #[test]
    fn fdinfo_fields_are_read() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nprog_id:\t42\nrun_time_ns:\t0\n\
                    run_cnt:\t0\nrecursion_misses:\t17\nverified_insns:\t300\n";
        assert_eq!(fdinfo_field(text, "recursion_misses"), Some(17));
        assert_eq!(fdinfo_field(text, "prog_id"), Some(42));
        assert_eq!(fdinfo_field(text, "missing"), None);
    }

    #[test]
    fn options_are_validated() {
        let ok = ProbeOptions::default();
        ok.validate().unwrap();
        let bad = ProbeOptions {
            ring_bytes: 3 << 20,
            ..ProbeOptions::default()
        };
        assert!(bad.validate().is_err());
        let bad = ProbeOptions {
            wakeup_bytes: 16 << 20,
            ..ProbeOptions::default()
        };
        assert!(bad.validate().is_err());
        let bad = ProbeOptions {
            sock_entries: 0,
            ..ProbeOptions::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn this_kernels_offsets_resolve() {
        let btf = Btf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let off = kernel_offsets(&btf).unwrap();
        assert!(off.sock_net > 0);
        assert_eq!(off.socket_sk % 8, 0);
        // The raw tracepoints' socket fields: sock_common at the head of struct sock, the
        // inet_sock fields after it.
        let sk = sock_layout(&btf).unwrap();
        assert_eq!((sk.daddr, sk.saddr % 4, sk.sport % 2), (0, 0, 0), "{sk:?}");
        assert!(
            sk.family < 32 && sk.dport < 32 && sk.v6_daddr < 128,
            "{sk:?}"
        );
        assert!(
            sk.protocol > sk.v6_rcv_saddr && sk.sport > sk.protocol,
            "{sk:?}"
        );
    }
}
