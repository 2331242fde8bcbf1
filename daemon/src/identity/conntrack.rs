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
//! nfnetlink). The rust-netlink crates do the protocol: `netlink-packet-netfilter` encodes the GET
//! with its `CTA_TUPLE_ORIG` and parses the entry (`CTA_TUPLE_REPLY`), `netlink-packet-core` the
//! netlink header and `NLMSG_ERROR`, `netlink-sys` owns the socket. [`encode_get`] and
//! [`decode_answer`] are pure and tested without root. What stays ours, and why:
//!
//! - Splitting a datagram into messages (`messages`): `netlink-packet-core` parses one message
//!   from the front of a buffer and has no iterator over a datagram; we also need a message's
//!   sequence number before its body is parsed, to skip late answers to a timed-out request.
//! - Which message types reach the parser: only the netlink control messages and conntrack entries
//!   (`IPCTNL_MSG_CT_NEW`) are handed to `NetlinkMessage::deserialize`, so the crate's parsers of
//!   other nfnetlink subsystems never run on what the kernel sends.
//! - The mapping to [`Tuple`]: TCP only, both addresses of one family, IPv4-mapped IPv6 looked up
//!   as IPv4, tuples that mix families refused.
//! - The receive timeout: `netlink_sys::Socket` has no setter for `SO_RCVTIMEO`; `socket2` sets it
//!   on the socket's descriptor.
//! - Entering a namespace ([`Conntrack::open_in`]): `setns(2)` is not netlink, no crate of the
//!   family does it.
//!
//! Every read is bounded (a 64 KiB buffer, a one-second receive timeout), and nothing the kernel
//! sends can make the decoder panic: malformed answers are errors.

use std::{
    fmt,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple as CtTuple,
    },
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};

/// Size of the buffer an answer is received into. One conntrack entry takes a few hundred bytes.
pub const RECV_BUFFER: usize = 64 * 1024;
/// How long one receive waits. A lookup also gives up when this much time passed since its request
/// was sent, so it takes at most about twice this.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(1);

/// nfgenmsg.version (linux/netfilter/nfnetlink.h).
const NFNETLINK_V0: u8 = 0;
/// The netlink message type of a conntrack entry: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW.
const CT_NEW: u16 = 1 << 8;

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
    fn malformed(what: impl fmt::Display) -> Self {
        ConntrackError::Malformed(what.to_string())
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
    socket: Socket,
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
            .field("fd", &self.socket.as_raw_fd())
            .finish_non_exhaustive()
    }
}

/// Port id 0: the kernel.
fn kernel() -> NetlinkAddr {
    NetlinkAddr::new(0, 0)
}

impl Conntrack {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, ConntrackError> {
        let sock_err = |step| move |source| ConntrackError::Socket { step, source };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(sock_err("open"))?;
        socket2::SockRef::from(&socket)
            .set_read_timeout(Some(RECV_TIMEOUT))
            .map_err(sock_err("set the receive timeout of"))?;
        // The kernel picks a unique port id.
        socket.bind_auto().map_err(sock_err("bind"))?;
        Ok(Conntrack {
            socket,
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
            for msg in messages(buf.get(..n).unwrap_or_default()) {
                let (msg_seq, msg) = msg?;
                // A late answer to an earlier request that timed out.
                if msg_seq != seq {
                    continue;
                }
                match parse_message(msg)? {
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
        loop {
            match self.socket.send_to(req, &kernel(), 0) {
                Ok(n) if n == req.len() => return Ok(()),
                Ok(n) => {
                    return Err(ConntrackError::Send(io::Error::other(format!(
                        "sent {n} of {} bytes",
                        req.len()
                    ))));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConntrackError::Send(e)),
            }
        }
    }

    /// Receives one datagram from the kernel into `buf`; returns its length.
    fn recv(&self, buf: &mut [u8], deadline: Instant) -> Result<usize, ConntrackError> {
        loop {
            if Instant::now() >= deadline {
                return Err(ConntrackError::Timeout(RECV_TIMEOUT));
            }
            // MSG_TRUNC makes the call return the datagram's real length, so an oversized one is
            // detected.
            let (n, from) = match self.socket.recv_from(&mut &mut buf[..], libc::MSG_TRUNC) {
                Ok(received) => received,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(ConntrackError::Timeout(RECV_TIMEOUT));
                    }
                    _ => return Err(ConntrackError::Recv(e)),
                },
            };
            // Only the kernel (port id 0) answers lookups.
            if from.port_number() != 0 {
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
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(ip) => IpAddr::V6(ip.to_ipv6_mapped()),
        v6 => v6,
    };
    let (family, src, dst) = if orig.src.is_ipv4() && orig.dst.is_ipv4() {
        (NetfilterProtoFamily::IPv4, orig.src.ip(), orig.dst.ip())
    } else {
        let (src, dst) = (v6(orig.src.ip()), v6(orig.dst.ip()));
        (NetfilterProtoFamily::IPv6, src, dst)
    };
    let tuple = vec![
        CtTuple::Ip(vec![
            IPTuple::SourceAddress(src),
            IPTuple::DestinationAddress(dst),
        ]),
        CtTuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Tcp),
            ProtoTuple::SourcePort(orig.src.port()),
            ProtoTuple::DestinationPort(orig.dst.port()),
        ]),
    ];
    let get = NetfilterMessage::new(
        NetfilterHeader::new(family, NFNETLINK_V0, 0),
        ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(tuple)]),
    );
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(get));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Pure: parses a netlink answer to a CT_GET: Ok(Some(reply)) for an IPCTNL_MSG_CT_NEW message,
/// Ok(None) for NLMSG_ERROR with -ENOENT, Err for other errors or malformed input.
///
/// `buf` holds one or more netlink messages (the entry may be followed by the ACK). An ACK alone,
/// or an empty buffer, is an error: it answers nothing.
pub fn decode_answer(buf: &[u8]) -> Result<Option<Tuple>, ConntrackError> {
    let mut entry = None;
    for msg in messages(buf) {
        match parse_message(msg?.1)? {
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

/// The netlink messages of a datagram, as (sequence number, the message's bytes). Yields an
/// error (and then stops) on a malformed header: a message longer than what is left, or shorter
/// than its own header.
fn messages(mut rest: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), ConntrackError>> {
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let msg = NetlinkBuffer::new_checked(rest).map(|header| {
            // new_checked made sure the length is within `rest`.
            let len = usize::try_from(header.length()).unwrap_or(usize::MAX);
            let msg = (header.sequence_number(), rest.get(..len).unwrap_or(rest));
            let next = len.checked_next_multiple_of(4).unwrap_or(usize::MAX);
            rest = rest.get(next..).unwrap_or_default();
            msg
        });
        if msg.is_err() {
            rest = &[];
        }
        Some(msg.map_err(ConntrackError::malformed))
    })
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

/// Parses one message that [`messages`] split off.
fn parse_message(msg: &[u8]) -> Result<Message, ConntrackError> {
    let ty = NetlinkBuffer::new_checked(msg)
        .map_err(ConntrackError::malformed)?
        .message_type();
    // Nothing but control messages and conntrack entries answers a CT_GET.
    if !matches!(
        ty,
        NLMSG_NOOP | NLMSG_ERROR | NLMSG_DONE | NLMSG_OVERRUN | CT_NEW
    ) {
        return Err(ConntrackError::malformed(format!(
            "unexpected netlink message type {ty:#06x}"
        )));
    }
    let msg =
        NetlinkMessage::<NetfilterMessage>::deserialize(msg).map_err(ConntrackError::malformed)?;
    match msg.payload {
        NetlinkPayload::Noop | NetlinkPayload::Done(_) => Ok(Message::Ignored),
        NetlinkPayload::Error(e) => match e.code.map(|c| c.get()) {
            None => Ok(Message::Ack),
            Some(c) => c
                .checked_neg()
                .filter(|errno| *errno > 0)
                .map(Message::Failed)
                .ok_or_else(|| ConntrackError::malformed(format!("error code {c}"))),
        },
        NetlinkPayload::Overrun(_) => Err(ConntrackError::malformed(
            "NLMSG_OVERRUN: the kernel dropped data",
        )),
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
            ..
        }) => attrs
            .iter()
            .find_map(|a| match a {
                ConntrackAttribute::CtaTupleReply(reply) => Some(reply),
                _ => None,
            })
            .ok_or_else(|| ConntrackError::malformed("conntrack entry without CTA_TUPLE_REPLY"))
            .and_then(|reply| tuple_of(reply))
            .map(Message::Entry),
        other => Err(ConntrackError::malformed(format!(
            "unexpected netlink message {other:?}"
        ))),
    }
}

/// The TCP tuple a CTA_TUPLE_ORIG or CTA_TUPLE_REPLY holds.
fn tuple_of(parts: &[CtTuple]) -> Result<Tuple, ConntrackError> {
    let (mut src_ip, mut dst_ip) = (None, None);
    let (mut proto, mut src_port, mut dst_port) = (None, None, None);
    for part in parts {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src_ip = Some(*a),
                        IPTuple::DestinationAddress(a) => dst_ip = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(p) => proto = Some(*p),
                        ProtoTuple::SourcePort(p) => src_port = Some(*p),
                        ProtoTuple::DestinationPort(p) => dst_port = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let missing = |what: &str| ConntrackError::malformed(format!("tuple without {what}"));
    match proto {
        Some(Protocol::Tcp) => {}
        Some(p) => {
            return Err(ConntrackError::malformed(format!(
                "tuple of protocol {}, not TCP",
                u8::from(p)
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DefaultNla, ErrorMessage, NLA_F_NESTED};
    use netlink_packet_netfilter::conntrack::{ProtoInfo, ProtoInfoTCP, Status};

    use super::*;

    // The kernel's numbers (linux/netfilter/nfnetlink_conntrack.h), written out so the layout
    // tests check the crate's encoding against the uapi rather than against itself.
    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_IP: u16 = 1;
    const CTA_TUPLE_PROTO: u16 = 2;
    const CTA_IP_V4_SRC: u16 = 1;
    const CTA_IP_V4_DST: u16 = 2;
    const CTA_IP_V6_SRC: u16 = 3;
    const CTA_IP_V6_DST: u16 = 4;
    const CTA_PROTO_NUM: u16 = 1;
    const CTA_PROTO_SRC_PORT: u16 = 2;
    const CTA_PROTO_DST_PORT: u16 = 3;
    const CTA_ID: u16 = 12;
    const NLMSG_HDRLEN: usize = 16;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tuple(src: &str, dst: &str) -> Tuple {
        Tuple::new(addr(src), addr(dst))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
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
            assert!(len >= 4 && at + len <= b.len(), "attribute fits");
            if ty & NLA_F_NESTED != 0 {
                assert!(
                    len.is_multiple_of(4),
                    "nested attributes hold padded children"
                );
                check_alignment(&b[at + 4..at + len], base + at + 4);
            }
            at += len.next_multiple_of(4);
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
        check_attr(&b, 28, 20, CTA_IP_V6_SRC);
        let mapped = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(&b[32..48], &mapped.octets());
        check_alignment(&b[20..], 20);
    }

    /// A netlink message of `ty` with `body`, written byte by byte (for malformed ones).
    fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + body.len()) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    /// `payload` as a netlink message with sequence number `seq`.
    fn serialize(seq: u32, payload: NetlinkPayload<NetfilterMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, payload);
        msg.finalize();
        let mut b = vec![0; msg.buffer_len()];
        msg.serialize(&mut b);
        b
    }

    /// An IPCTNL_MSG_CT_NEW message with these attributes.
    fn entry(seq: u32, family: NetfilterProtoFamily, attrs: Vec<ConntrackAttribute>) -> Vec<u8> {
        let msg = NetfilterMessage::new(
            NetfilterHeader::new(family, NFNETLINK_V0, 0),
            ConntrackMessage::New(attrs),
        );
        serialize(seq, NetlinkPayload::from(msg))
    }

    fn ct_tuple(t: Tuple, proto: Protocol) -> Vec<CtTuple> {
        vec![
            CtTuple::Ip(vec![
                IPTuple::SourceAddress(t.src.ip()),
                IPTuple::DestinationAddress(t.dst.ip()),
            ]),
            CtTuple::Proto(vec![
                ProtoTuple::Protocol(proto),
                ProtoTuple::SourcePort(t.src.port()),
                ProtoTuple::DestinationPort(t.dst.port()),
            ]),
        ]
    }

    fn family_of(t: Tuple) -> NetfilterProtoFamily {
        if t.src.is_ipv4() {
            NetfilterProtoFamily::IPv4
        } else {
            NetfilterProtoFamily::IPv6
        }
    }

    /// A CT_NEW answer the way the kernel writes one: orig and reply tuples among other
    /// attributes.
    fn ct_new(seq: u32, orig: Tuple, reply: Tuple) -> Vec<u8> {
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(ct_tuple(orig, Protocol::Tcp)),
            ConntrackAttribute::CtaTupleReply(ct_tuple(reply, Protocol::Tcp)),
            ConntrackAttribute::CtaStatus(Status::from_bits_retain(0x18e)),
            ConntrackAttribute::CtaTimeout(120),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(3)])]),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, 0x1234_5678u32.to_be_bytes().into())),
        ];
        entry(seq, family_of(orig), attrs)
    }

    /// NLMSG_ERROR with `error` (negative errno, or 0 for an ACK), echoing a request header.
    fn error_msg(seq: u32, error: i32) -> Vec<u8> {
        let mut err = ErrorMessage::default();
        err.code = std::num::NonZeroI32::new(error);
        err.header = encode_get(seq, tuple("10.0.0.1:1", "10.0.0.2:2"))[..16].to_vec();
        serialize(seq, NetlinkPayload::Error(err))
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

    /// What a 6.x kernel answered (one datagram each) to a CT_GET with sequence number 3 of
    /// 10.244.0.2:41646 -> 10.96.0.10:80, DNATed in nat OUTPUT to 10.244.0.2:8080: the entry
    /// (NLM_F_MULTI; CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, STATUS, MARK, ID, USE, TIMEOUT, PROTOINFO),
    /// then the ACK (NLM_F_CAPPED: the request's header only).
    const KERNEL_ENTRY: &str = "d40000000001020003000000406d0000020000003400018014000180080001000a\
        f40002080002000a60000a1c000280050001000600000006000200a2ae000006000300005000003400028014\
        000180080001000af40002080002000af400021c0002800500010006000000060002001f90000006000300a2\
        ae000008000300000001ae080008000000000008000c00e1a29ff008000b0000000002080007000006978030\
        0004802c0001800500010003000000050002000a000000050003000a00000006000400230000000600050023\
        000000";
    const KERNEL_ACK: &str =
        "240000000200000103000000406d00000000000048000000010105000300000000000000";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_what_the_kernel_sent() {
        let (entry, ack) = (unhex(KERNEL_ENTRY), unhex(KERNEL_ACK));
        assert_eq!((entry.len(), ack.len()), (212, 36));
        let reply = tuple("10.244.0.2:8080", "10.244.0.2:41646");
        assert_eq!(decode_answer(&entry).unwrap(), Some(reply));
        assert!(matches!(decode_answer(&ack), Err(ConntrackError::NoEntry)));
        let seqs: Vec<u32> = messages(&[entry, ack].concat())
            .map(|m| m.unwrap().0)
            .collect();
        assert_eq!(seqs, vec![3, 3]);
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
        let v4 = NetfilterProtoFamily::IPv4;
        // Without a reply tuple.
        let only_orig = vec![ConntrackAttribute::CtaTupleOrig(ct_tuple(
            orig,
            Protocol::Tcp,
        ))];
        let err = decode_answer(&entry(1, v4, only_orig)).unwrap_err();
        assert!(err.to_string().contains("CTA_TUPLE_REPLY"), "{err}");
        // A UDP reply tuple.
        let udp = vec![ConntrackAttribute::CtaTupleReply(ct_tuple(
            orig.reversed(),
            Protocol::Udp,
        ))];
        let err = decode_answer(&entry(1, v4, udp)).unwrap_err();
        assert!(err.to_string().contains("not TCP"), "{err}");
        // A reply tuple without ports.
        let mut portless = ct_tuple(orig.reversed(), Protocol::Tcp);
        portless.truncate(1);
        portless.push(CtTuple::Proto(vec![ProtoTuple::Protocol(Protocol::Tcp)]));
        let portless = vec![ConntrackAttribute::CtaTupleReply(portless)];
        let err = decode_answer(&entry(1, v4, portless)).unwrap_err();
        assert!(err.to_string().contains("CTA_PROTO_SRC_PORT"), "{err}");
        // A reply tuple that mixes families.
        let mut mixed = ct_tuple(orig.reversed(), Protocol::Tcp);
        mixed[0] = CtTuple::Ip(vec![
            IPTuple::SourceAddress("10.0.0.2".parse().unwrap()),
            IPTuple::DestinationAddress("fd00::1".parse().unwrap()),
        ]);
        let mixed = vec![ConntrackAttribute::CtaTupleReply(mixed)];
        let err = decode_answer(&entry(1, v4, mixed)).unwrap_err();
        assert!(err.to_string().contains("mixes"), "{err}");
        // An address of the wrong size.
        let short = vec![ConntrackAttribute::CtaTupleReply(vec![CtTuple::Ip(vec![
            IPTuple::Other(DefaultNla::new(CTA_IP_V4_SRC, vec![10, 0, 0])),
        ])])];
        assert!(decode_answer(&entry(1, v4, short)).is_err());
        // A zero-length attribute must not loop forever.
        let body = [libc::AF_INET as u8, 0, 0, 0, 0, 0, 2, 0];
        assert!(decode_answer(&nlmsg(CT_NEW, 1, &body)).is_err());
        // A zero-length message must not loop forever either.
        assert!(decode_answer(&[0; 16]).is_err());
        // Other message types (CT_DELETE, another subsystem's) and overruns.
        assert!(decode_answer(&nlmsg(0x0102, 1, &[0; 4])).is_err());
        assert!(decode_answer(&nlmsg(0x0a00, 1, &[0; 4])).is_err());
        assert!(decode_answer(&nlmsg(NLMSG_OVERRUN, 1, &[])).is_err());
        // The request itself is not an answer.
        assert!(decode_answer(&encode_get(1, orig)).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for answer in [v4_answer().0, v6_answer().0, unhex(KERNEL_ENTRY)] {
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
        let kernel = unhex(KERNEL_ENTRY);
        for answer in [&v4, &v6, &with_ack, &error_msg(3, -libc::ENOENT), &kernel] {
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
        b.extend(error_msg(4, 0));
        let seqs: Vec<u32> = messages(&b).map(|m| m.unwrap().0).collect();
        assert_eq!(seqs, vec![3, 4]);
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
