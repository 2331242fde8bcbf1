//! Conntrack lookups over netlink: which backend kube-proxy's DNAT chose for a connection to a
//! ClusterIP.
//!
//! A client socket connected to a ClusterIP still names the service address: the rewrite to a
//! backend happens in netfilter, and only the connection tracking table remembers it. Its entry for
//! the connection holds two tuples: the ORIGINAL one, as the client sent it (client → ClusterIP),
//! and the REPLY one, as answers come back (backend → client). Asking the kernel for the entry
//! whose original tuple is the socket's 4-tuple therefore names the backend: the reply source.
//!
//! Conntrack tables are per network namespace, and a netlink socket talks to the namespace it was
//! created in. kube-proxy rewrites in the node's namespace (PREROUTING for pod traffic, OUTPUT for
//! host-network clients); [`Conntrack::open_in`] opens the socket inside any namespace, after which
//! it works from every thread.
//!
//! The protocol is one request and one answer (`IPCTNL_MSG_CT_GET` of the ctnetlink subsystem of
//! nfnetlink), small enough to encode by hand: [`encode_get`] and [`decode_answer`] are pure and
//! tested without root. Every read is bounded (a 64 KiB buffer, a one-second receive timeout), and
//! nothing the kernel sends can make the decoder panic: malformed answers are errors.

use std::{
    fmt,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Size of the buffer an answer is received into. One conntrack entry takes a few hundred bytes.
pub const RECV_BUFFER: usize = 64 * 1024;
/// How long one receive waits. A lookup also gives up when this much time passed since its request
/// was sent, so it takes at most about twice this.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(1);

// netlink (linux/netlink.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// nfnetlink (linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h).
const NFGENMSG_LEN: usize = 4;
const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CT_NEW: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
const CT_GET: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_TCP: u8 = 6;

/// A TCP connection's addresses in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Tuple {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        Tuple { src, dst }
    }

    /// The same tuple with IPv4-mapped IPv6 addresses written as IPv4, the way conntrack keeps
    /// them (a dual-stack socket talking IPv4 reports `::ffff:a.b.c.d`).
    pub fn canonical(self) -> Self {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        Tuple {
            src: canon(self.src),
            dst: canon(self.dst),
        }
    }

    /// The other direction: what an unNATed reply would look like.
    pub fn reversed(self) -> Self {
        Tuple {
            src: self.dst,
            dst: self.src,
        }
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot {step} the NETLINK_NETFILTER socket: {source}")]
    Socket {
        step: &'static str,
        source: io::Error,
    },
    #[error("cannot open the conntrack socket in network namespace {path}: {source}")]
    Namespace { path: PathBuf, source: io::Error },
    #[error("cannot send the conntrack request: {0}")]
    Send(io::Error),
    #[error("cannot receive the conntrack answer: {0}")]
    Recv(io::Error),
    #[error("no conntrack answer from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("the kernel refused the conntrack lookup: {}", errno_message(*.errno))]
    Kernel { errno: i32 },
    #[error("the kernel acknowledged the conntrack lookup without sending an entry")]
    NoEntry,
    #[error("malformed conntrack answer: {0}")]
    Malformed(String),
    #[error("tuple {0} mixes IPv4 and IPv6 addresses")]
    MixedFamilies(Tuple),
}

impl ConntrackError {
    fn malformed(what: impl Into<String>) -> Self {
        ConntrackError::Malformed(what.into())
    }
}

fn errno_message(errno: i32) -> String {
    let err = io::Error::from_raw_os_error(errno);
    if errno == libc::EPERM {
        format!("{err} (conntrack lookups need CAP_NET_ADMIN in the namespace)")
    } else {
        err.to_string()
    }
}

/// A NETLINK_NETFILTER socket bound to the network namespace it was opened in.
pub struct Conntrack {
    fd: OwnedFd,
    /// One request at a time: answers are matched to requests by sequence number, and the buffer
    /// is reused.
    exchange: Mutex<Exchange>,
}

struct Exchange {
    seq: u32,
    buf: Vec<u8>,
}

impl fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conntrack")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value (pid 0 is the kernel).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

const SOCKADDR_NL_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;

impl Conntrack {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, ConntrackError> {
        let sock_err = |step| ConntrackError::Socket {
            step,
            source: io::Error::last_os_error(),
        };
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(sock_err("open"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: valid socket and a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(sock_err("set the receive timeout of"));
        }
        // Binding to pid 0 lets the kernel pick a unique port id.
        let local = kernel_addr();
        // SAFETY: valid socket and a sockaddr_nl of the size passed.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), SOCKADDR_NL_LEN) };
        if rc != 0 {
            return Err(sock_err("bind"));
        }
        Ok(Conntrack {
            fd,
            exchange: Mutex::new(Exchange {
                seq: 0,
                buf: vec![0; RECV_BUFFER],
            }),
        })
    }

    /// Opens the socket inside the namespace at `netns_path` (e.g. /run/netns/x or
    /// /proc/1/ns/net), from a short-lived thread that setns()es there; the socket keeps working
    /// from any thread afterwards. The calling thread's namespace does not change.
    pub fn open_in(netns_path: &Path) -> Result<Self, ConntrackError> {
        let ns_err = |source| ConntrackError::Namespace {
            path: netns_path.to_path_buf(),
            source,
        };
        let ns = File::open(netns_path).map_err(ns_err)?;
        std::thread::scope(|s| {
            let thread = std::thread::Builder::new()
                .name("conntrack-netns".into())
                .spawn_scoped(s, || {
                    // SAFETY: valid namespace fd; setns only moves this short-lived thread.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(ns_err(io::Error::last_os_error()));
                    }
                    Conntrack::open()
                })
                .map_err(ns_err)?;
            thread
                .join()
                .map_err(|_| ns_err(io::Error::other("the namespace thread panicked")))?
        })
    }

    /// IPCTNL_MSG_CT_GET for the entry whose ORIGINAL tuple is `orig` (TCP). Ok(None) when there
    /// is no such entry (ENOENT). Returns the REPLY tuple: after a DNAT, reply.src is the backend
    /// the NAT chose. IPv4-mapped IPv6 addresses are looked up as IPv4.
    pub fn reply_tuple(&self, orig: Tuple) -> Result<Option<Tuple>, ConntrackError> {
        let orig = orig.canonical();
        if orig.src.is_ipv4() != orig.dst.is_ipv4() {
            return Err(ConntrackError::MixedFamilies(orig));
        }
        let mut guard = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        let Exchange { seq, buf } = &mut *guard;
        *seq = seq.wrapping_add(1);
        let seq = *seq;
        self.send(&encode_get(seq, orig))?;
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut entry = None;
        loop {
            let n = self.recv(buf, deadline)?;
            let datagram = buf.get(..n).unwrap_or_default();
            for msg in Messages::new(datagram) {
                let msg = msg?;
                // A late answer to an earlier request that timed out.
                if msg.seq != seq {
                    continue;
                }
                match parse_message(msg.ty, msg.body)? {
                    Message::Entry(reply) => {
                        entry.get_or_insert(reply);
                    }
                    Message::Ack => return entry.map(Some).ok_or(ConntrackError::NoEntry),
                    Message::Failed(libc::ENOENT) => return Ok(None),
                    Message::Failed(errno) => return Err(ConntrackError::Kernel { errno }),
                    Message::Ignored => {}
                }
            }
        }
    }

    fn send(&self, req: &[u8]) -> Result<(), ConntrackError> {
        let to = kernel_addr();
        loop {
            // SAFETY: valid socket, buffer and address of the sizes passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&raw const to).cast(),
                    SOCKADDR_NL_LEN,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ConntrackError::Send(err));
            }
            if usize::try_from(n).ok() != Some(req.len()) {
                return Err(ConntrackError::Send(io::Error::other(format!(
                    "sent {n} of {} bytes",
                    req.len()
                ))));
            }
            return Ok(());
        }
    }

    /// Receives one datagram from the kernel into `buf`; returns its length.
    fn recv(&self, buf: &mut [u8], deadline: Instant) -> Result<usize, ConntrackError> {
        loop {
            if Instant::now() >= deadline {
                return Err(ConntrackError::Timeout(RECV_TIMEOUT));
            }
            let mut from = kernel_addr();
            let mut from_len = SOCKADDR_NL_LEN;
            // SAFETY: valid socket, buffer and address of the sizes passed. MSG_TRUNC makes the
            // call return the datagram's real length, so an oversized one is detected.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(ConntrackError::Timeout(RECV_TIMEOUT));
                    }
                    _ => return Err(ConntrackError::Recv(err)),
                }
            };
            // Only the kernel (port id 0) answers lookups.
            if from.nl_pid != 0 {
                continue;
            }
            if n > buf.len() {
                return Err(ConntrackError::malformed(format!(
                    "a datagram of {n} bytes does not fit the {} byte buffer",
                    buf.len()
                )));
            }
            return Ok(n);
        }
    }
}

/// Pure: the request bytes for a CT_GET of `orig` with sequence number `seq`.
///
/// IPv4-mapped IPv6 addresses are encoded as IPv4. A tuple that mixes families (which no
/// connection has) is encoded as IPv6 with the IPv4 side mapped, so it matches nothing.
pub fn encode_get(seq: u32, orig: Tuple) -> Vec<u8> {
    let orig = orig.canonical();
    let family = if orig.src.is_ipv4() && orig.dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut b = Vec::with_capacity(96);
    // nlmsghdr: length (patched below), type, flags, sequence, port id (0: the kernel fills it).
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&CT_GET.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version, resource id (big endian).
    b.push(family as u8);
    b.push(NFNETLINK_V0);
    b.extend_from_slice(&0u16.to_be_bytes());
    nest(&mut b, CTA_TUPLE_ORIG, |b| put_tuple(b, orig, family));
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// Writes a tuple's CTA_TUPLE_IP and CTA_TUPLE_PROTO (TCP) attributes.
fn put_tuple(b: &mut Vec<u8>, t: Tuple, family: i32) {
    nest(b, CTA_TUPLE_IP, |b| {
        if family == libc::AF_INET {
            attr(b, CTA_IP_V4_SRC, &v4_octets(t.src.ip()));
            attr(b, CTA_IP_V4_DST, &v4_octets(t.dst.ip()));
        } else {
            attr(b, CTA_IP_V6_SRC, &v6_octets(t.src.ip()));
            attr(b, CTA_IP_V6_DST, &v6_octets(t.dst.ip()));
        }
    });
    nest(b, CTA_TUPLE_PROTO, |b| {
        attr(b, CTA_PROTO_NUM, &[IPPROTO_TCP]);
        attr(b, CTA_PROTO_SRC_PORT, &t.src.port().to_be_bytes());
        attr(b, CTA_PROTO_DST_PORT, &t.dst.port().to_be_bytes());
    });
}

fn v4_octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(ip) => ip.octets(),
        IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
            .octets(),
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Appends an attribute, padded to 4 bytes.
fn attr(b: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = NLA_HDRLEN + value.len();
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(align4(b.len()), 0);
}

/// Appends a nested attribute (NLA_F_NESTED) whose content `fill` writes.
fn nest(b: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    fill(b);
    let len = (b.len() - start) as u16;
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Pure: parses a netlink answer to a CT_GET: Ok(Some(reply)) for an IPCTNL_MSG_CT_NEW message,
/// Ok(None) for NLMSG_ERROR with -ENOENT, Err for other errors or malformed input.
///
/// `buf` holds one or more netlink messages (the entry may be followed by the ACK). An ACK alone,
/// or an empty buffer, is an error: it answers nothing.
pub fn decode_answer(buf: &[u8]) -> Result<Option<Tuple>, ConntrackError> {
    let mut entry = None;
    for msg in Messages::new(buf) {
        let msg = msg?;
        match parse_message(msg.ty, msg.body)? {
            Message::Entry(reply) => {
                entry.get_or_insert(reply);
            }
            Message::Ack | Message::Ignored => {}
            Message::Failed(libc::ENOENT) => return Ok(None),
            Message::Failed(errno) => return Err(ConntrackError::Kernel { errno }),
        }
    }
    entry.map(Some).ok_or(ConntrackError::NoEntry)
}

/// What one netlink message says.
#[derive(Debug, PartialEq, Eq)]
enum Message {
    /// A conntrack entry; its reply tuple.
    Entry(Tuple),
    /// NLMSG_ERROR with error 0.
    Ack,
    /// NLMSG_ERROR with this (positive) errno.
    Failed(i32),
    /// NLMSG_NOOP or NLMSG_DONE.
    Ignored,
}

fn parse_message(ty: u16, body: &[u8]) -> Result<Message, ConntrackError> {
    match ty {
        NLMSG_NOOP | NLMSG_DONE => Ok(Message::Ignored),
        NLMSG_ERROR => {
            let error = read_i32(body, 0).ok_or_else(|| {
                ConntrackError::malformed("NLMSG_ERROR shorter than its error code")
            })?;
            match error {
                0 => Ok(Message::Ack),
                e if e < 0 => e
                    .checked_neg()
                    .map(Message::Failed)
                    .ok_or_else(|| ConntrackError::malformed(format!("error code {e}"))),
                e => Err(ConntrackError::malformed(format!(
                    "positive error code {e}"
                ))),
            }
        }
        NLMSG_OVERRUN => Err(ConntrackError::malformed(
            "NLMSG_OVERRUN: the kernel dropped data",
        )),
        CT_NEW => {
            let attrs = body.get(NFGENMSG_LEN..).ok_or_else(|| {
                ConntrackError::malformed("conntrack message shorter than its nfgenmsg")
            })?;
            for a in Attrs::new(attrs) {
                let (ty, value) = a?;
                if ty == CTA_TUPLE_REPLY {
                    return parse_tuple(value).map(Message::Entry);
                }
            }
            Err(ConntrackError::malformed(
                "conntrack entry without CTA_TUPLE_REPLY",
            ))
        }
        other => Err(ConntrackError::malformed(format!(
            "unexpected netlink message type {other:#06x}"
        ))),
    }
}

/// Parses the content of a CTA_TUPLE_ORIG or CTA_TUPLE_REPLY attribute (TCP only).
fn parse_tuple(buf: &[u8]) -> Result<Tuple, ConntrackError> {
    let (mut src_ip, mut dst_ip) = (None, None);
    let (mut proto, mut src_port, mut dst_port) = (None, None, None);
    for a in Attrs::new(buf) {
        match a? {
            (CTA_TUPLE_IP, ip) => {
                for a in Attrs::new(ip) {
                    match a? {
                        (CTA_IP_V4_SRC, v) => src_ip = Some(IpAddr::V4(ipv4(v)?)),
                        (CTA_IP_V4_DST, v) => dst_ip = Some(IpAddr::V4(ipv4(v)?)),
                        (CTA_IP_V6_SRC, v) => src_ip = Some(IpAddr::V6(ipv6(v)?)),
                        (CTA_IP_V6_DST, v) => dst_ip = Some(IpAddr::V6(ipv6(v)?)),
                        _ => {}
                    }
                }
            }
            (CTA_TUPLE_PROTO, p) => {
                for a in Attrs::new(p) {
                    match a? {
                        (CTA_PROTO_NUM, v) => proto = v.first().copied(),
                        (CTA_PROTO_SRC_PORT, v) => src_port = Some(port(v)?),
                        (CTA_PROTO_DST_PORT, v) => dst_port = Some(port(v)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let missing = |what: &str| ConntrackError::malformed(format!("tuple without {what}"));
    match proto {
        Some(IPPROTO_TCP) => {}
        Some(p) => {
            return Err(ConntrackError::malformed(format!(
                "tuple of protocol {p}, not TCP"
            )));
        }
        None => return Err(missing("CTA_PROTO_NUM")),
    }
    let src = SocketAddr::new(
        src_ip.ok_or_else(|| missing("a source address"))?,
        src_port.ok_or_else(|| missing("CTA_PROTO_SRC_PORT"))?,
    );
    let dst = SocketAddr::new(
        dst_ip.ok_or_else(|| missing("a destination address"))?,
        dst_port.ok_or_else(|| missing("CTA_PROTO_DST_PORT"))?,
    );
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(ConntrackError::malformed(
            "tuple mixes IPv4 and IPv6 addresses",
        ));
    }
    Ok(Tuple { src, dst })
}

fn ipv4(v: &[u8]) -> Result<Ipv4Addr, ConntrackError> {
    <[u8; 4]>::try_from(v)
        .map(Ipv4Addr::from)
        .map_err(|_| ConntrackError::malformed(format!("IPv4 address of {} bytes", v.len())))
}

fn ipv6(v: &[u8]) -> Result<Ipv6Addr, ConntrackError> {
    <[u8; 16]>::try_from(v)
        .map(Ipv6Addr::from)
        .map_err(|_| ConntrackError::malformed(format!("IPv6 address of {} bytes", v.len())))
}

fn port(v: &[u8]) -> Result<u16, ConntrackError> {
    <[u8; 2]>::try_from(v)
        .map(u16::from_be_bytes)
        .map_err(|_| ConntrackError::malformed(format!("port of {} bytes", v.len())))
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(i32::from_ne_bytes(bytes.try_into().ok()?))
}

/// One netlink message of a datagram.
struct RawMessage<'a> {
    ty: u16,
    seq: u32,
    body: &'a [u8],
}

/// The netlink messages of a datagram. Yields an error (and then stops) on a malformed header.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Messages { rest: buf }
    }

    fn next_message(&mut self) -> Result<RawMessage<'a>, ConntrackError> {
        let have = self.rest.len();
        let (Some(len), Some(ty), Some(seq)) = (
            read_u32(self.rest, 0),
            read_u16(self.rest, 4),
            read_u32(self.rest, 8),
        ) else {
            return Err(ConntrackError::malformed(format!(
                "{have} trailing bytes, shorter than a netlink header"
            )));
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < NLMSG_HDRLEN || len > have {
            return Err(ConntrackError::malformed(format!(
                "netlink message of length {len} in {have} remaining bytes"
            )));
        }
        let body = self.rest.get(NLMSG_HDRLEN..len).unwrap_or_default();
        self.rest = self.rest.get(align4(len).min(have)..).unwrap_or_default();
        Ok(RawMessage { ty, seq, body })
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<RawMessage<'a>, ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let msg = self.next_message();
        if msg.is_err() {
            self.rest = &[];
        }
        Some(msg)
    }
}

/// The attributes of a buffer, as (type without flags, value). Yields an error (and then stops)
/// on a malformed attribute.
struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Attrs { rest: buf }
    }

    fn next_attr(&mut self) -> Result<(u16, &'a [u8]), ConntrackError> {
        let have = self.rest.len();
        let (Some(len), Some(ty)) = (read_u16(self.rest, 0), read_u16(self.rest, 2)) else {
            return Err(ConntrackError::malformed(format!(
                "{have} trailing bytes, shorter than an attribute header"
            )));
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || len > have {
            return Err(ConntrackError::malformed(format!(
                "attribute of length {len} in {have} remaining bytes"
            )));
        }
        let value = self.rest.get(NLA_HDRLEN..len).unwrap_or_default();
        self.rest = self.rest.get(align4(len).min(have)..).unwrap_or_default();
        Ok((ty & NLA_TYPE_MASK, value))
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let attr = self.next_attr();
        if attr.is_err() {
            self.rest = &[];
        }
        Some(attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tuple(src: &str, dst: &str) -> Tuple {
        Tuple::new(addr(src), addr(dst))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        read_u16(b, at).unwrap()
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        read_u32(b, at).unwrap()
    }

    /// Checks an attribute header at `at`: its length and type (with flags).
    fn check_attr(b: &[u8], at: usize, len: u16, ty: u16) {
        assert_eq!(u16_at(b, at), len, "length of the attribute at {at}");
        assert_eq!(u16_at(b, at + 2), ty, "type of the attribute at {at}");
        assert!(at.is_multiple_of(4), "the attribute at {at} is aligned");
    }

    /// Walks nested attributes, checking that every one is 4-byte aligned and fits its parent.
    fn check_alignment(b: &[u8], base: usize) {
        let mut at = 0;
        while at < b.len() {
            assert!(
                (base + at).is_multiple_of(4),
                "attribute at {} is aligned",
                base + at
            );
            let len = usize::from(u16_at(b, at));
            let ty = u16_at(b, at + 2);
            assert!(len >= NLA_HDRLEN && at + len <= b.len(), "attribute fits");
            if ty & NLA_F_NESTED != 0 {
                assert!(
                    len.is_multiple_of(4),
                    "nested attributes hold padded children"
                );
                check_alignment(&b[at + 4..at + len], base + at + 4);
            }
            at += align4(len);
        }
        assert_eq!(at, b.len(), "padding ends exactly at the end");
    }

    #[test]
    fn encode_get_ipv4_layout() {
        let b = encode_get(7, tuple("10.0.0.1:40000", "10.96.0.10:80"));
        assert_eq!(b.len(), 72);
        // nlmsghdr
        assert_eq!(u32_at(&b, 0), 72);
        assert_eq!(u16_at(&b, 4), 0x0101, "ctnetlink subsystem, CT_GET");
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&b, 8), 7);
        assert_eq!(u32_at(&b, 12), 0);
        // nfgenmsg
        assert_eq!(&b[16..20], &[libc::AF_INET as u8, NFNETLINK_V0, 0, 0]);
        // CTA_TUPLE_ORIG { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO { num, sport, dport } }
        check_attr(&b, 20, 52, CTA_TUPLE_ORIG | NLA_F_NESTED);
        check_attr(&b, 24, 20, CTA_TUPLE_IP | NLA_F_NESTED);
        check_attr(&b, 28, 8, CTA_IP_V4_SRC);
        assert_eq!(&b[32..36], &[10, 0, 0, 1]);
        check_attr(&b, 36, 8, CTA_IP_V4_DST);
        assert_eq!(&b[40..44], &[10, 96, 0, 10]);
        check_attr(&b, 44, 28, CTA_TUPLE_PROTO | NLA_F_NESTED);
        check_attr(&b, 48, 5, CTA_PROTO_NUM);
        assert_eq!(&b[52..56], &[6, 0, 0, 0], "protocol byte and zero padding");
        check_attr(&b, 56, 6, CTA_PROTO_SRC_PORT);
        assert_eq!(
            &b[60..64],
            &[0x9c, 0x40, 0, 0],
            "40000 in network order, padded"
        );
        check_attr(&b, 64, 6, CTA_PROTO_DST_PORT);
        assert_eq!(&b[68..72], &[0, 80, 0, 0], "80 in network order, padded");
        check_alignment(&b[20..], 20);
    }

    #[test]
    fn encode_get_ipv6_layout() {
        let b = encode_get(0xdead_beef, tuple("[fd00::1]:40000", "[fd00:96::10]:443"));
        assert_eq!(b.len(), 96);
        assert_eq!(u32_at(&b, 0), 96);
        assert_eq!(u16_at(&b, 4), 0x0101);
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&b, 8), 0xdead_beef);
        assert_eq!(&b[16..20], &[libc::AF_INET6 as u8, NFNETLINK_V0, 0, 0]);
        check_attr(&b, 20, 76, CTA_TUPLE_ORIG | NLA_F_NESTED);
        check_attr(&b, 24, 44, CTA_TUPLE_IP | NLA_F_NESTED);
        check_attr(&b, 28, 20, CTA_IP_V6_SRC);
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(&b[32..48], &src.octets());
        check_attr(&b, 48, 20, CTA_IP_V6_DST);
        let dst: Ipv6Addr = "fd00:96::10".parse().unwrap();
        assert_eq!(&b[52..68], &dst.octets());
        check_attr(&b, 68, 28, CTA_TUPLE_PROTO | NLA_F_NESTED);
        check_attr(&b, 72, 5, CTA_PROTO_NUM);
        assert_eq!(&b[76..80], &[6, 0, 0, 0]);
        check_attr(&b, 80, 6, CTA_PROTO_SRC_PORT);
        assert_eq!(&b[84..88], &[0x9c, 0x40, 0, 0]);
        check_attr(&b, 88, 6, CTA_PROTO_DST_PORT);
        assert_eq!(&b[92..96], &[0x01, 0xbb, 0, 0], "443 in network order");
        check_alignment(&b[20..], 20);
    }

    #[test]
    fn encode_get_treats_ipv4_mapped_as_ipv4() {
        let mapped = tuple("[::ffff:10.0.0.1]:40000", "[::ffff:10.96.0.10]:80");
        let plain = tuple("10.0.0.1:40000", "10.96.0.10:80");
        assert_eq!(encode_get(1, mapped), encode_get(1, plain));
        assert_eq!(mapped.canonical(), plain);
    }

    #[test]
    fn encode_get_of_mixed_families_is_ipv6_and_mapped() {
        let b = encode_get(1, tuple("10.0.0.1:40000", "[fd00::1]:80"));
        assert_eq!(b[16], libc::AF_INET6 as u8);
        let mapped = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(&b[32..48], &mapped.octets());
        check_alignment(&b[20..], 20);
    }

    /// A netlink message of `ty` with `body`.
    fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + body.len()) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b.resize(align4(b.len()), 0);
        b
    }

    /// A CT_NEW answer the way the kernel writes one: orig and reply tuples among other
    /// attributes.
    fn ct_new(seq: u32, orig: Tuple, reply: Tuple) -> Vec<u8> {
        let family = if orig.src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let mut body = vec![family as u8, NFNETLINK_V0, 0, 0];
        nest(&mut body, CTA_TUPLE_ORIG, |b| put_tuple(b, orig, family));
        nest(&mut body, CTA_TUPLE_REPLY, |b| put_tuple(b, reply, family));
        // CTA_STATUS, CTA_TIMEOUT, CTA_PROTOINFO { CTA_PROTOINFO_TCP { state } }, CTA_ID
        attr(&mut body, 3 | NLA_F_NET_BYTEORDER, &0x18eu32.to_be_bytes());
        attr(&mut body, 7, &120u32.to_be_bytes());
        nest(&mut body, 4, |b| nest(b, 1, |b| attr(b, 1, &[3])));
        attr(&mut body, 12, &0x1234_5678u32.to_be_bytes());
        nlmsg(CT_NEW, seq, &body)
    }

    /// NLMSG_ERROR with `error` (negative errno, or 0 for an ACK), echoing a request header.
    fn error_msg(seq: u32, error: i32) -> Vec<u8> {
        let mut body = error.to_ne_bytes().to_vec();
        body.extend_from_slice(&encode_get(seq, tuple("10.0.0.1:1", "10.0.0.2:2"))[..16]);
        nlmsg(NLMSG_ERROR, seq, &body)
    }

    fn v4_answer() -> (Vec<u8>, Tuple) {
        let orig = tuple("10.244.0.2:41646", "10.96.0.10:80");
        let reply = tuple("10.244.0.7:8080", "10.244.0.2:41646");
        (ct_new(3, orig, reply), reply)
    }

    fn v6_answer() -> (Vec<u8>, Tuple) {
        let orig = tuple("[fd00:244::2]:41646", "[fd00:96::10]:80");
        let reply = tuple("[fd00:244::7]:8080", "[fd00:244::2]:41646");
        (ct_new(3, orig, reply), reply)
    }

    #[test]
    fn decodes_the_reply_tuple_of_an_entry() {
        for (answer, reply) in [v4_answer(), v6_answer()] {
            assert_eq!(decode_answer(&answer).unwrap(), Some(reply));
            // The entry followed by the ACK in the same buffer.
            let mut with_ack = answer.clone();
            with_ack.extend(error_msg(3, 0));
            assert_eq!(decode_answer(&with_ack).unwrap(), Some(reply));
        }
    }

    #[test]
    fn enoent_is_none_and_other_errors_are_errors() {
        assert_eq!(decode_answer(&error_msg(3, -libc::ENOENT)).unwrap(), None);
        match decode_answer(&error_msg(3, -libc::EPERM)) {
            Err(ConntrackError::Kernel { errno }) => assert_eq!(errno, libc::EPERM),
            other => panic!("expected a kernel error, got {other:?}"),
        }
        let err = decode_answer(&error_msg(3, -libc::EPERM)).unwrap_err();
        assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
        assert!(matches!(
            decode_answer(&error_msg(3, -libc::EINVAL)),
            Err(ConntrackError::Kernel {
                errno: libc::EINVAL
            })
        ));
        for bad in [i32::MIN, 1, 5] {
            assert!(matches!(
                decode_answer(&error_msg(3, bad)),
                Err(ConntrackError::Malformed(_))
            ));
        }
    }

    #[test]
    fn an_ack_alone_or_nothing_answers_nothing() {
        assert!(matches!(
            decode_answer(&error_msg(3, 0)),
            Err(ConntrackError::NoEntry)
        ));
        assert!(matches!(decode_answer(&[]), Err(ConntrackError::NoEntry)));
        assert!(matches!(
            decode_answer(&nlmsg(NLMSG_DONE, 3, &[])),
            Err(ConntrackError::NoEntry)
        ));
    }

    #[test]
    fn rejects_malformed_entries() {
        let orig = tuple("10.0.0.1:1000", "10.96.0.10:80");
        // Without a reply tuple.
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        nest(&mut body, CTA_TUPLE_ORIG, |b| {
            put_tuple(b, orig, libc::AF_INET)
        });
        assert!(decode_answer(&nlmsg(CT_NEW, 1, &body)).is_err());
        // A UDP reply tuple.
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        nest(&mut body, CTA_TUPLE_REPLY, |b| {
            nest(b, CTA_TUPLE_IP, |b| {
                attr(b, CTA_IP_V4_SRC, &[10, 0, 0, 2]);
                attr(b, CTA_IP_V4_DST, &[10, 0, 0, 1]);
            });
            nest(b, CTA_TUPLE_PROTO, |b| {
                attr(b, CTA_PROTO_NUM, &[17]);
                attr(b, CTA_PROTO_SRC_PORT, &53u16.to_be_bytes());
                attr(b, CTA_PROTO_DST_PORT, &1000u16.to_be_bytes());
            });
        });
        let err = decode_answer(&nlmsg(CT_NEW, 1, &body)).unwrap_err();
        assert!(err.to_string().contains("not TCP"), "{err}");
        // An address of the wrong size.
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        nest(&mut body, CTA_TUPLE_REPLY, |b| {
            nest(b, CTA_TUPLE_IP, |b| attr(b, CTA_IP_V4_SRC, &[10, 0, 0]));
        });
        assert!(decode_answer(&nlmsg(CT_NEW, 1, &body)).is_err());
        // A zero-length attribute must not loop forever.
        let body = [libc::AF_INET as u8, 0, 0, 0, 0, 0, 2, 0];
        assert!(decode_answer(&nlmsg(CT_NEW, 1, &body)).is_err());
        // A zero-length message must not loop forever either.
        assert!(decode_answer(&[0; 16]).is_err());
        // Unknown message types and overruns.
        assert!(decode_answer(&nlmsg(0x0102, 1, &[0; 4])).is_err());
        assert!(decode_answer(&nlmsg(NLMSG_OVERRUN, 1, &[])).is_err());
        // The request itself is not an answer.
        assert!(decode_answer(&encode_get(1, orig)).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (answer, _) in [v4_answer(), v6_answer()] {
            for len in 0..answer.len() {
                assert!(
                    decode_answer(&answer[..len]).is_err(),
                    "truncated to {len} of {} bytes",
                    answer.len()
                );
            }
        }
        for error in [0, -libc::ENOENT, -libc::EPERM] {
            let msg = error_msg(3, error);
            for len in 0..msg.len() {
                assert!(
                    decode_answer(&msg[..len]).is_err(),
                    "{error} truncated to {len}"
                );
            }
        }
    }

    #[test]
    fn shortened_message_lengths_never_panic() {
        // Shrink the outer message length field while keeping the bytes: every shorter length
        // cuts an attribute.
        let (answer, _) = v4_answer();
        for len in NLMSG_HDRLEN..answer.len() {
            let mut b = answer.clone();
            b[..4].copy_from_slice(&(len as u32).to_ne_bytes());
            // Never panics; may decode when the cut falls after the reply tuple.
            let _ = decode_answer(&b);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let (v4, _) = v4_answer();
        let (v6, _) = v6_answer();
        let mut with_ack = v6.clone();
        with_ack.extend(error_msg(3, 0));
        // Every byte of valid answers set to interesting values.
        for answer in [&v4, &v6, &with_ack, &error_msg(3, -libc::ENOENT)] {
            for i in 0..answer.len() {
                for v in [0x00, 0x01, 0x03, 0x04, 0x05, 0x7f, 0x80, 0xfe, 0xff] {
                    let mut b = answer.clone();
                    b[i] = v;
                    let _ = decode_answer(&b);
                    let _ = decode_answer(&b[..i]);
                }
            }
        }
        // Random bytes, some behind a plausible netlink header so the attribute parser runs.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000u32 {
            let len = (next() % 200) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round.is_multiple_of(2) && len >= 20 {
                b[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                let ty = if round.is_multiple_of(4) {
                    CT_NEW
                } else {
                    NLMSG_ERROR
                };
                b[4..6].copy_from_slice(&ty.to_ne_bytes());
            }
            let _ = decode_answer(&b);
        }
    }

    #[test]
    fn messages_carry_their_sequence_numbers() {
        let (mut b, _) = v4_answer();
        b.extend(error_msg(3, 0));
        let seqs: Vec<u32> = Messages::new(&b).map(|m| m.unwrap().seq).collect();
        assert_eq!(seqs, vec![3, 3]);
    }

    #[test]
    fn tuple_helpers() {
        let t = tuple("10.0.0.1:1000", "10.96.0.10:80");
        assert_eq!(t.reversed(), tuple("10.96.0.10:80", "10.0.0.1:1000"));
        assert_eq!(t.to_string(), "10.0.0.1:1000 -> 10.96.0.10:80");
        let v6 = tuple("[fd00::1]:1000", "[fd00::2]:80");
        assert_eq!(v6.canonical(), v6);
    }
}
