//! Kernel records → typed events, and the ring-buffer reader that feeds them to the daemon.
//!
//! Invariant: [`EventTap`] costs nothing until somebody subscribes; the daemon never does.

pub mod reader;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Duration,
};

use fanout_common::{Record, RecordKind};
use serde::{Deserialize, Serialize};

/// Every decoded event, for subscribers (embedders and tests). The channel and its buffer are
/// made at the first subscription: the buffer's slots are written when it is made, about 14 MiB
/// resident for [`EventTap::CAPACITY`] events, which the daemon (no subscriber) should not pay.
#[derive(Clone, Debug, Default)]
pub struct EventTap(Arc<OnceLock<tokio::sync::broadcast::Sender<Event>>>);

impl EventTap {
    /// Events a subscriber may lag behind before it loses some (and is told so by the channel).
    pub const CAPACITY: usize = 1 << 16;

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.0
            .get_or_init(|| tokio::sync::broadcast::channel(Self::CAPACITY).0)
            .subscribe()
    }

    /// Hands `events` to the subscribers, if there are any (emptying the vector); with none, the
    /// vector is left as it is for its owner to reuse.
    pub fn send_all(&self, events: &mut Vec<Event>) {
        if let Some(tx) = self.0.get() {
            for ev in events.drain(..) {
                // No receiver left is not an error: events are offered, not owed.
                let _ = tx.send(ev);
            }
        }
    }
}

/// The process that owns a socket, captured in its own context at connect or accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
}

impl Owner {
    /// The owner a socket's kernel state names, if it names one.
    pub fn of_state(st: &fanout_common::SockState) -> Option<Owner> {
        (st.flags & u32::from(Record::FLAG_OWNER_KNOWN) != 0).then(|| Owner {
            pid: st.tgid,
            tid: st.tid,
            comm: Comm::from_raw(&st.comm),
        })
    }
}

/// A task's command name as the kernel keeps it (`TASK_COMM_LEN`, 16 bytes), held inline: an
/// owner costs no allocation per record or per table row. Shown and serialized as text, invalid
/// UTF-8 replaced.
///
/// Invariant: the bytes after the name are zero, so equal names compare equal.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Comm([u8; 16]);

impl Comm {
    /// From the kernel's NUL-padded bytes.
    pub fn from_raw(raw: &[u8; 16]) -> Self {
        let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let mut b = [0; 16];
        b[..len].copy_from_slice(&raw[..len]);
        Comm(b)
    }

    pub fn as_bytes(&self) -> &[u8] {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        &self.0[..len]
    }

    pub fn to_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

/// The longest prefix of `s` that fits 16 bytes, cut at a character boundary, up to a NUL.
impl From<&str> for Comm {
    fn from(s: &str) -> Self {
        let s = s.split('\0').next().unwrap_or_default();
        let mut end = s.len().min(16);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut b = [0; 16];
        b[..end].copy_from_slice(&s.as_bytes()[..end]);
        Comm(b)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_str())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.to_str(), f)
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_str())
    }
}

impl<'de> Deserialize<'de> for Comm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Comm::from(&*s))
    }
}

/// One decoded lifecycle record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: RecordKind,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel socket address (identity while the socket lives).
    pub sock: u64,
    pub netns: u32,
    /// Unspecified for [`RecordKind::Accepted`], which only names the socket.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub owner: Option<Owner>,
    /// Connection lifetime, on close when the start was seen.
    pub duration: Option<Duration>,
    /// Final byte and message counters, on close when the kernel tracked the socket.
    pub counters: Option<Counters>,
    /// The HTTP/2 scanner's final figure, on close of a connection it followed.
    pub h2: Option<H2Final>,
}

/// What the HTTP/2 scanner concluded about a connection's egress, as the close record carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Final {
    /// 1 while it parsed as HTTP/2, `1 + H2Unparsable` once it did not.
    pub status: u8,
    /// Requests (client-initiated streams) counted.
    pub requests: u64,
}

/// Payload bytes and send/receive calls of one connection, counted in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub msgs_sent: u64,
    pub msgs_recv: u64,
}

impl From<&fanout_common::SockState> for Counters {
    fn from(s: &fanout_common::SockState) -> Self {
        Counters {
            bytes_sent: s.bytes_sent,
            bytes_recv: s.bytes_recv,
            msgs_sent: s.msgs_sent,
            msgs_recv: s.msgs_recv,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has {0} bytes, expected {expected}", expected = Record::SIZE)]
    Size(usize),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown IP version {0}")]
    IpVersion(u8),
}

impl DecodeError {
    /// Bounded label value for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Size(_) => "decode_size",
            DecodeError::Kind(_) => "decode_kind",
            DecodeError::IpVersion(_) => "decode_ip_version",
        }
    }
}

fn ip(version: u8, raw: [u8; 16]) -> IpAddr {
    if version == 4 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        // Dual-stack sockets talk IPv4 as ::ffff:a.b.c.d; report the IPv4 address.
        Ipv6Addr::from(raw).to_canonical()
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != Record::SIZE {
        return Err(DecodeError::Size(bytes.len()));
    }
    // Ring records are 8-byte aligned: read in place, copying only if one ever is not.
    let copy: Record;
    let rec: &Record = match bytemuck::try_from_bytes(bytes) {
        Ok(r) => r,
        Err(_) => {
            copy = bytemuck::pod_read_unaligned(bytes);
            &copy
        }
    };
    let kind = RecordKind::from_u8(rec.kind).ok_or(DecodeError::Kind(rec.kind))?;
    let (local, remote) = match (kind, rec.ip_version) {
        (RecordKind::Accepted, _) => {
            let none = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
            (none, none)
        }
        (_, 4 | 6) => (
            SocketAddr::new(ip(rec.ip_version, rec.saddr), rec.sport),
            SocketAddr::new(ip(rec.ip_version, rec.daddr), rec.dport),
        ),
        (_, v) => return Err(DecodeError::IpVersion(v)),
    };
    let owner = (rec.flags & Record::FLAG_OWNER_KNOWN != 0).then(|| Owner {
        pid: rec.tgid,
        tid: rec.tid,
        comm: Comm::from_raw(&rec.comm),
    });
    let duration =
        (rec.flags & Record::FLAG_START_KNOWN != 0).then(|| Duration::from_nanos(rec.duration_ns));
    let counters = (rec.flags & Record::FLAG_COUNTERS != 0).then_some(Counters {
        bytes_sent: rec.bytes_sent,
        bytes_recv: rec.bytes_recv,
        msgs_sent: rec.msgs_sent,
        msgs_recv: rec.msgs_recv,
    });
    let h2 = (kind == RecordKind::Close && rec.h2 != 0).then_some(H2Final {
        status: rec.h2,
        requests: rec.requests,
    });
    Ok(Event {
        kind,
        ts_ns: rec.ts_ns,
        sock: rec.sock,
        netns: rec.netns,
        local,
        remote,
        owner,
        duration,
        counters,
        h2,
    })
}

/// Wire name of a record kind, for logs and bounded metric labels.
pub fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Connect => "connect",
        RecordKind::Established => "established",
        RecordKind::PassiveOpen => "passive_open",
        RecordKind::ConnectFailed => "connect_failed",
        RecordKind::Close => "close",
        RecordKind::Accepted => "accepted",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(kind: RecordKind) -> Record {
        let mut r = Record::zeroed();
        r.kind = kind as u8;
        r.ts_ns = 1_000;
        r.sock = 0xffff_8880_0000_1000;
        r.netns = 4026532000;
        r.ip_version = 4;
        r.saddr[..4].copy_from_slice(&[10, 244, 0, 2]);
        r.daddr[..4].copy_from_slice(&[10, 244, 0, 3]);
        r.sport = 40000;
        r.dport = 8080;
        r
    }

    #[test]
    fn decodes_ipv4_with_owner_and_duration() {
        let mut r = record(RecordKind::Close);
        r.flags = Record::FLAG_OWNER_KNOWN | Record::FLAG_START_KNOWN | Record::FLAG_COUNTERS;
        r.bytes_sent = 10;
        r.msgs_recv = 3;
        r.tgid = 42;
        r.tid = 43;
        r.comm[..4].copy_from_slice(b"curl");
        r.duration_ns = 1_500_000_000;
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert_eq!(ev.kind, RecordKind::Close);
        assert_eq!(ev.local, "10.244.0.2:40000".parse().unwrap());
        assert_eq!(ev.remote, "10.244.0.3:8080".parse().unwrap());
        assert_eq!(
            ev.owner,
            Some(Owner {
                pid: 42,
                tid: 43,
                comm: "curl".into()
            })
        );
        assert_eq!(ev.duration, Some(Duration::from_millis(1500)));
        let c = ev.counters.unwrap();
        assert_eq!((c.bytes_sent, c.msgs_recv), (10, 3));
    }

    #[test]
    fn decodes_ipv6_and_canonicalises_mapped_ipv4() {
        let mut r = record(RecordKind::Established);
        r.ip_version = 6;
        r.saddr = "fd00:244::2".parse::<Ipv6Addr>().unwrap().octets();
        r.daddr = "::ffff:10.244.0.3".parse::<Ipv6Addr>().unwrap().octets();
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert_eq!(ev.local, "[fd00:244::2]:40000".parse().unwrap());
        assert_eq!(ev.remote, "10.244.0.3:8080".parse().unwrap());
        assert_eq!(ev.owner, None);
        assert_eq!(ev.duration, None);
        assert_eq!(ev.counters, None);
    }

    #[test]
    fn rejects_bad_records() {
        let r = record(RecordKind::Connect);
        let bytes = bytemuck::bytes_of(&r);
        assert_eq!(
            decode(&bytes[..Record::SIZE - 1]),
            Err(DecodeError::Size(Record::SIZE - 1))
        );
        let mut bad = r;
        bad.kind = 99;
        assert_eq!(decode(bytemuck::bytes_of(&bad)), Err(DecodeError::Kind(99)));
        let mut bad = r;
        bad.ip_version = 5;
        assert_eq!(
            decode(bytemuck::bytes_of(&bad)),
            Err(DecodeError::IpVersion(5))
        );
        // Any byte soup of the right size decodes or errors, never panics.
        for seed in 0u8..=255 {
            let soup: Vec<u8> = (0..Record::SIZE)
                .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
                .collect();
            let _ = decode(&soup);
        }
    }

    #[test]
    fn accepted_records_need_no_address() {
        let mut r = record(RecordKind::Accepted);
        r.ip_version = 0;
        r.flags = Record::FLAG_OWNER_KNOWN;
        let ev = decode(bytemuck::bytes_of(&r)).unwrap();
        assert_eq!(ev.kind, RecordKind::Accepted);
        assert!(ev.owner.is_some());
    }

    #[test]
    fn comm_is_the_kernels_bytes_shown_as_text() {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(b"curl");
        let c = Comm::from_raw(&raw);
        assert_eq!(c, Comm::from("curl"));
        assert_eq!(c.to_string(), "curl");
        // Sixteen bytes with no NUL (the kernel's longest name, 15, plus one) are all kept.
        assert_eq!(Comm::from_raw(&[b'a'; 16]).as_bytes().len(), 16);
        // Invalid UTF-8 is replaced when shown, not when kept.
        raw[..2].copy_from_slice(&[0xff, b'x']);
        assert_eq!(Comm::from_raw(&raw).to_string(), "\u{fffd}xrl");
        // Text longer than 16 bytes is cut at a character boundary (é is two bytes).
        let long = Comm::from("éééééééééé");
        assert_eq!(long.to_string(), "éééééééé");
        assert_eq!(Comm::from("a\0b"), Comm::from("a"));
        let json = serde_json::to_string(&Owner {
            pid: 1,
            tid: 2,
            comm: c,
        })
        .unwrap();
        assert_eq!(json, r#"{"pid":1,"tid":2,"comm":"curl"}"#);
        let back: Owner = serde_json::from_str(&json).unwrap();
        assert_eq!(back.comm, c);
    }
}
