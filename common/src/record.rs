//! The record the kernel writes to the ring buffer, the per-socket state it keeps, and the reasons
//! a record can be lost.

/// One lifecycle step of one TCP socket. 136 bytes, no padding, 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Record {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the step happened.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub sock: u64,
    /// For [`RecordKind::Close`]: nanoseconds since the connection established, when known
    /// ([`Record::FLAG_START_KNOWN`]).
    pub duration_ns: u64,
    /// Inode of the socket's network namespace (`sk->sk_net->ns.inum`).
    pub netns: u32,
    /// Thread-group id (the process id user space sees) of the owner, when known.
    pub tgid: u32,
    /// Thread id of the owner, when known.
    pub tid: u32,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// A [`RecordKind`] value.
    pub kind: u8,
    /// 4 or 6.
    pub ip_version: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// For [`RecordKind::Close`] of a connection the HTTP/2 scanner followed: 1 while it parsed
    /// as HTTP/2, `1 + H2Unparsable` once it did not; 0 when the scanner never followed it.
    pub h2: u8,
    /// Local address; IPv4 uses the first four bytes.
    pub saddr: [u8; 16],
    /// Remote address; IPv4 uses the first four bytes.
    pub daddr: [u8; 16],
    /// Owner's command (`comm`), NUL padded, when known.
    pub comm: [u8; 16],
    pub _pad1: [u8; 4],
    /// For [`RecordKind::Close`]: the connection's final counters (see [`SockState`]).
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub msgs_sent: u64,
    pub msgs_recv: u64,
    /// For [`RecordKind::Close`] with `h2 != 0`: the client-initiated HTTP/2 streams (requests)
    /// the scanner counted on the connection's egress, final.
    pub requests: u64,
}

impl Record {
    /// `tgid`, `tid` and `comm` were captured in the owner's process context.
    pub const FLAG_OWNER_KNOWN: u8 = 1;
    /// `duration_ns` is meaningful.
    pub const FLAG_START_KNOWN: u8 = 2;
    /// The byte and message counters are the connection's final ones.
    pub const FLAG_COUNTERS: u8 = 4;
    /// Size in bytes, as laid out in the ring buffer.
    pub const SIZE: usize = core::mem::size_of::<Record>();

    pub const fn zeroed() -> Self {
        Record {
            ts_ns: 0,
            sock: 0,
            duration_ns: 0,
            netns: 0,
            tgid: 0,
            tid: 0,
            sport: 0,
            dport: 0,
            kind: 0,
            ip_version: 0,
            flags: 0,
            h2: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            _pad1: [0; 4],
            bytes_sent: 0,
            bytes_recv: 0,
            msgs_sent: 0,
            msgs_recv: 0,
            requests: 0,
        }
    }
}

/// Lifecycle steps. The discriminants are the wire values in [`Record::kind`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// Active open started: `connect()` moved the socket from CLOSE to SYN_SENT. Emitted only
    /// when the socket's state could not be kept (`sock_map_full`): otherwise the connecting
    /// task travels in that state to the [`RecordKind::Established`] or
    /// [`RecordKind::ConnectFailed`] record.
    Connect = 1,
    /// Active open completed: SYN_SENT to ESTABLISHED.
    Established = 2,
    /// Passive open completed: SYN_RECV to ESTABLISHED (the accept side).
    PassiveOpen = 3,
    /// Active open failed: SYN_SENT to CLOSE.
    ConnectFailed = 4,
    /// An established connection closed.
    Close = 5,
    /// `accept()` handed a passively opened socket to a process: carries the owner.
    Accepted = 6,
}

impl RecordKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Connect),
            2 => Some(Self::Established),
            3 => Some(Self::PassiveOpen),
            4 => Some(Self::ConnectFailed),
            5 => Some(Self::Close),
            6 => Some(Self::Accepted),
            _ => None,
        }
    }
}

/// What the kernel side remembers about a socket between lifecycle steps (map value keyed by the
/// socket address: the socket's identity while it lives, which NAT never rewrites). 88 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockState {
    /// When the connection established (0 while still connecting).
    pub start_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    /// `Record::FLAG_OWNER_KNOWN` when the owner fields are valid, `SockState::FLAG_PASSIVE` for
    /// the server end of a connection.
    pub flags: u32,
    /// The HTTP/2 scanner's status for the client end it follows: 0 while it does not, 1 while
    /// the egress parses as HTTP/2, `1 + H2Unparsable` once it did not. The scanner keeps its
    /// own state with the socket (socket-local storage) and mirrors its figure here whenever the
    /// figure changes, so that the close record and the sampler read one entry.
    pub h2: u32,
    /// The socket's network namespace (inode), read once when the state is made, so that later
    /// records of the socket do not read it again (0: not read; a socket never changes
    /// namespace).
    pub netns: u32,
    pub _reserved: u32,
    /// Payload bytes and send/receive calls (`sock_sendmsg`/`sock_recvmsg`) since the socket was
    /// first seen, counted in the kernel (atomically: several CPUs may send on one socket).
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub msgs_sent: u64,
    pub msgs_recv: u64,
    /// Requests (client-initiated HTTP/2 streams) the scanner counted, with `h2`.
    pub requests: u64,
}

impl SockState {
    /// The socket is the server end (a passive open): it sends no client preface, so its close
    /// looks up no HTTP/2 state. Above the bits `Record::FLAG_*` use.
    pub const FLAG_PASSIVE: u32 = 1 << 8;

    /// State of the server end of a connection that established at `start_ns`, owner not known
    /// until its first read or write (or `accept()`, where the length hooks are missing).
    pub const fn passive(start_ns: u64) -> Self {
        let mut st = Self::started(start_ns);
        st.flags = Self::FLAG_PASSIVE;
        st
    }

    /// State of a socket that established at `start_ns` (0: not yet), owner not known (yet).
    pub const fn started(start_ns: u64) -> Self {
        SockState {
            start_ns,
            tgid: 0,
            tid: 0,
            comm: [0; 16],
            flags: 0,
            h2: 0,
            netns: 0,
            _reserved: 0,
            bytes_sent: 0,
            bytes_recv: 0,
            msgs_sent: 0,
            msgs_recv: 0,
            requests: 0,
        }
    }
}

/// Why a record did not reach user space. Index into the kernel's per-CPU loss counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LostReason {
    /// The ring buffer had no room for the record.
    RingFull = 0,
    /// The per-socket state map was full, or the kernel could not allocate a socket's storage
    /// (the scanner's state, or a server end's with `--btf-tracepoints`); the record went out
    /// without owner or start time, or the connection without a request count.
    SockMapFull = 1,
    /// A kernel read (`bpf_probe_read_kernel`) failed; the record went out without that field.
    KernelRead = 2,
}

impl LostReason {
    pub const COUNT: u32 = 3;
    pub const ALL: [LostReason; 3] = [Self::RingFull, Self::SockMapFull, Self::KernelRead];

    /// Bounded label value for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RingFull => "ring_full",
            Self::SockMapFull => "sock_map_full",
            Self::KernelRead => "kernel_read",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data without padding or pointers; any bit pattern is valid.
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::Record {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Record>(), 136);
        assert_eq!(core::mem::align_of::<Record>(), 8);
        assert_eq!(core::mem::size_of::<SockState>(), 88);
    }

    #[test]
    fn kinds_round_trip() {
        for v in 0..=255u8 {
            if let Some(k) = RecordKind::from_u8(v) {
                assert_eq!(k as u8, v);
            }
        }
        assert_eq!(RecordKind::from_u8(0), None);
        assert_eq!(RecordKind::from_u8(7), None);
    }
}
