//! HTTP/2 frame-header scanner: counts gRPC requests on one direction of a TCP connection from the
//! TCP payload, one segment at a time, without reassembly and without reading frame payloads.
//!
//! # Model
//!
//! The scanner follows the byte stream of one direction by TCP sequence number. At any moment it
//! knows the sequence number of the next *byte of interest* (`want_seq`): the next byte of the
//! client connection preface, the next byte of a frame header, or, while a frame's payload is
//! being skipped, the first byte of the next frame header. Frame payloads are never looked at;
//! they are skipped by the 24-bit length of their frame header. Only the 9-byte frame headers
//! (and the 24-byte preface) are read, so a segment that lies entirely inside a frame payload
//! costs one comparison.
//!
//! A frame header or the preface may be split across segments at any byte: the header bytes
//! collected so far are kept in the state (`hdr`, `got`).
//!
//! # Counting rule
//!
//! A HEADERS frame on an odd (client-initiated) stream id greater than the highest stream id that
//! opened with HEADERS so far in this direction is one request. CONTINUATION frames, trailers (a
//! second HEADERS on a stream), HEADERS on even (server-initiated) streams, and every other frame
//! type are skipped. The reserved bit of the stream id is masked. Only HEADERS frames raise the
//! highest stream id: PRIORITY frames may name idle streams.
//!
//! On the client → server direction this counts requests exactly. On the server → client direction
//! it counts response header blocks whose stream id exceeds every earlier one; servers may answer
//! streams out of order, so there it is a lower bound on responses.
//!
//! # Unparsable connections
//!
//! The scanner sets a sticky reason ([`H2Unparsable`]) and stops counting, for good, when:
//!
//! * the client direction does not start with the connection preface ([`H2Unparsable::Preface`];
//!   HTTP/1.1, including an `Upgrade: h2c` request, ends here), or its first byte is 0x16, a TLS
//!   handshake record ([`H2Unparsable::Tls`]);
//! * the first frame is not a SETTINGS frame without ACK (RFC 9113 §3.4) ([`H2Unparsable::FirstFrame`],
//!   or [`H2Unparsable::Tls`] when the frame starts with 0x16);
//! * a frame header is one no conforming peer sends (each is a connection error in RFC 9113):
//!   a PING not 8 bytes long or not on stream 0; a SETTINGS not on stream 0, not a multiple of 6
//!   bytes, or an ACK with a payload; a GOAWAY not on stream 0 or shorter than 8 bytes; a
//!   WINDOW_UPDATE not 4 bytes long; an RST_STREAM not 4 bytes long or on stream 0; a PRIORITY
//!   not 5 bytes long or on stream 0; DATA, HEADERS or PUSH_PROMISE on stream 0; a PUSH_PROMISE
//!   shorter than 4 bytes; a CONTINUATION that does not continue a header block on the same
//!   stream; any other frame in the middle of a header block; or an unknown (extension) frame type
//!   longer than [`MAX_UNKNOWN_FRAME_LEN`] (a heuristic: a 24-bit length cannot exceed the
//!   protocol maximum of 2^24-1, but no extension frame is anywhere near the default
//!   SETTINGS_MAX_FRAME_SIZE of 16 KiB). Seeing one means the scanner lost sync or the stream is
//!   not HTTP/2 ([`H2Unparsable::BadFrame`]);
//! * a segment starts after the byte of interest, so bytes it needed were never seen
//!   ([`H2Unparsable::Gap`]), see below;
//! * the caller gave up on a segment before the scanner was done with it
//!   ([`H2Unparsable::Abandoned`]), see below.
//!
//! The count stays frozen at what was counted before; the daemon then falls back to message
//! counts and says why.
//!
//! # Retransmissions and reordering
//!
//! `begin_segment` gets the segment's sequence number (wrapping arithmetic, distances below 2^31):
//!
//! * a segment that ends at or before the byte of interest is ignored. That covers
//!   retransmissions of data already scanned and also segments that lie inside a payload being
//!   skipped, even when they arrive out of order: the bytes between are payload, never needed;
//! * a segment that contains the byte of interest is scanned from there, so a retransmission that
//!   overlaps old and new data only contributes its new part;
//! * a segment that starts after the byte of interest is a gap: the bytes needed were lost, or
//!   are still to come out of order (receive side, before TCP reassembly). There is no way to
//!   find the next frame boundary again without them, so the connection becomes
//!   [`H2Unparsable::Gap`]. On the send side (`cgroup_skb/egress`) TCP emits data in order and
//!   gaps do not happen.
//!
//! The first segment with payload fixes the start of the stream: the state must be created before
//! the first payload byte of the connection is seen (a connection already open when the tracer
//! attached fails the preface or first-frame check and ends unparsable). For a SYN carrying data
//! (TCP Fast Open) pass the SYN's sequence number plus one.
//!
//! # Driving it from eBPF
//!
//! [`H2Scan::scan_segment`] runs the bounded loop itself around a read callback (a
//! `bpf_skb_load_bytes` of 9 bytes). By hand it is:
//!
//! ```text
//! let mut next = scan.begin_segment(seq, payload_len);
//! let mut window = [0u8; WINDOW_LEN];
//! for _ in 0..H2Scan::STEPS {
//!     let Some(at) = next else { break };
//!     // Always 9 bytes (a constant size for the verifier); near the end of the segment the
//!     // window ends at the segment's end and may start before the payload (down to -8).
//!     let start = H2Scan::window_start(at, payload_len);
//!     if bpf_skb_load_bytes(skb, payload_off + start, &mut window, 9) != 0 { break }
//!     next = scan.feed(&window, payload_len).next;
//! }
//! if next.is_some() { scan.abandon() }
//! ```
//!
//! `begin_segment` and `feed` contain no loops; each `feed` consumes one chunk: the rest of one
//! frame header (wherever it started), or up to 9 bytes of the preface. A packet therefore needs
//! one step per frame header that ends in it, plus up to 3 for the preface. One that needs more
//! steps than the caller's budget cannot be finished: its remaining bytes are gone once the
//! program returns, so the caller must call [`H2Scan::abandon`] and the direction becomes
//! [`H2Unparsable::Abandoned`] (if it did not, the next segment would start after the byte of
//! interest and the direction would become [`H2Unparsable::Gap`]; either way the scanner never
//! miscounts). With [`H2Scan::STEPS`] = 32 that happens when one packet (a GSO packet on egress
//! can carry 64 KiB) holds more than 32 frame headers (29 in the packet with the preface), for
//! example many small unary calls written at once. (32 rather than 16: gRPC clients batch.)
//!
//! Verifier cost: `feed` reads the offset of the byte of interest back from the state (a map
//! value) with volatile loads, so the states at the head of the caller's loop stay equivalent and
//! verification cost grows linearly with the budget. Measured on Linux 6.18 with a
//! `cgroup_skb` program around `scan_segment`: about 1.6k instructions processed per step
//! (27.8k for 16 steps, 52k for 32, 103k for 64, against the limit of 1M), so a caller can afford
//! a larger budget.

// `fuzzing` is set by cargo-fuzz (`--cfg fuzzing`) and gates the `reference` module below.
#![allow(unexpected_cfgs)]

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: [u8; 24] = *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const FRAME_HEADER_LEN: u32 = 9;
/// Size of the window [`H2Scan::feed`] takes: one frame header.
pub const WINDOW_LEN: usize = 9;
/// Longest unknown (extension) frame accepted; longer ones mark the connection unparsable.
pub const MAX_UNKNOWN_FRAME_LEN: u32 = 16_384;
/// Mask of the 31-bit stream identifier (the top bit is reserved).
pub const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// Frame types (RFC 9113 §6).
pub mod frame {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;

    /// SETTINGS and PING: acknowledgement.
    pub const FLAG_ACK: u8 = 0x1;
    /// DATA and HEADERS: last frame of the stream from this side.
    pub const FLAG_END_STREAM: u8 = 0x1;
    /// HEADERS, PUSH_PROMISE and CONTINUATION: the header block ends with this frame.
    pub const FLAG_END_HEADERS: u8 = 0x4;
}

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Why a connection direction cannot be parsed as HTTP/2. The discriminants are the values kept
/// in the state.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum H2Unparsable {
    /// The direction did not start with the client connection preface.
    Preface = 1,
    /// The direction starts with 0x16, a TLS handshake record: encrypted, not cleartext HTTP/2.
    Tls = 2,
    /// The first frame was not a SETTINGS frame without ACK.
    FirstFrame = 3,
    /// A frame header no conforming peer sends: the scanner lost sync or this is not HTTP/2.
    BadFrame = 4,
    /// A segment started after a byte the scanner needed (lost or reordered data).
    Gap = 5,
    /// The caller stopped before the scanner was done with a segment (budget or read failure).
    Abandoned = 6,
}

impl H2Unparsable {
    pub const COUNT: u32 = 6;
    pub const ALL: [H2Unparsable; 6] = [
        Self::Preface,
        Self::Tls,
        Self::FirstFrame,
        Self::BadFrame,
        Self::Gap,
        Self::Abandoned,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Preface),
            2 => Some(Self::Tls),
            3 => Some(Self::FirstFrame),
            4 => Some(Self::BadFrame),
            5 => Some(Self::Gap),
            6 => Some(Self::Abandoned),
            _ => None,
        }
    }

    /// Bounded label value for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Preface => "no_preface",
            Self::Tls => "tls",
            Self::FirstFrame => "first_frame",
            Self::BadFrame => "bad_frame",
            Self::Gap => "gap",
            Self::Abandoned => "abandoned",
        }
    }
}

/// What one [`H2Scan::feed`] call learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feed {
    /// Requests counted by this call (0 or 1).
    pub new_requests: u32,
    /// Offset in the segment of the next byte of interest (feed the window at
    /// [`H2Scan::window_start`]`(next, seg_len)`), or `None` when the scanner is done with this
    /// segment (the rest is payload, the segment ended, or the direction became unparsable).
    pub next: Option<u32>,
}

/// Scanner state for one direction of one connection (a BPF map value). 40 bytes, no padding,
/// 8-byte aligned. All zeroes is [`H2Scan::new`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct H2Scan {
    /// Requests counted.
    requests: u64,
    /// Frame header bytes collected so far: byte `i` in bits `8i..8i+8` (the ninth byte
    /// completes the header and is never stored).
    hdr: u64,
    /// TCP sequence number of the next byte of interest (valid once `SEQ_KNOWN` is set).
    want_seq: u32,
    /// Highest odd stream id that opened with HEADERS.
    max_stream: u32,
    /// Stream whose header block continues in CONTINUATION frames (0: none).
    cont_stream: u32,
    /// Frame headers decoded (wrapping).
    frames: u32,
    /// Bytes of the preface matched (before `PREFACE_DONE`) or of the frame header collected.
    got: u8,
    /// `PREFACE_DONE | SETTINGS_SEEN | SEQ_KNOWN`.
    flags: u8,
    /// An [`H2Unparsable`] value, 0 while parsable.
    reason: u8,
    _pad: u8,
    /// TCP sequence number of the first payload byte of the segment being scanned.
    seg_seq: u32,
}

/// The preface has been matched (or is not expected).
const PREFACE_DONE: u8 = 1;
/// The first frame (SETTINGS) has been seen.
const SETTINGS_SEEN: u8 = 2;
/// `want_seq` is set (a segment with payload has been seen).
const SEQ_KNOWN: u8 = 4;

/// The preface as three little-endian words, so that its bytes are shifts, not memory loads.
const PREFACE_WORDS: [u64; 3] = [preface_word(0), preface_word(1), preface_word(2)];

const fn preface_word(w: usize) -> u64 {
    let mut v = 0u64;
    let mut k = 0;
    while k < 8 {
        v |= (PREFACE[w * 8 + k] as u64) << (8 * k);
        k += 1;
    }
    v
}

/// `x >> bits`, 0 when `bits` >= 64.
#[inline(always)]
fn shr(x: u64, bits: u32) -> u64 {
    if bits >= 64 { 0 } else { x >> bits }
}

/// `x << bits`, 0 when `bits` >= 64.
#[inline(always)]
fn shl(x: u64, bits: u32) -> u64 {
    if bits >= 64 { 0 } else { x << bits }
}

/// Mask of the low `n` bytes (`n` >= 8: all).
#[inline(always)]
fn low_bytes(n: u32) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}

/// Nine bytes as (bytes 0..8 little-endian, byte 8) from byte `k` (clamped to 8) of the nine bytes
/// `(lo, hi)`; bytes past the end are 0.
#[inline(always)]
fn bytes_from(lo: u64, hi: u8, k: u32) -> (u64, u8) {
    let k = if k > 8 { 8 } else { k };
    let lo = shr(lo, 8 * k) | shl(hi as u64, 64 - 8 * k);
    (lo, if k == 0 { hi } else { 0 })
}

/// Word `i` of the preface, 0 past its end.
#[inline(always)]
fn preface_word_at(i: u32) -> u64 {
    match i {
        0 => PREFACE_WORDS[0],
        1 => PREFACE_WORDS[1],
        2 => PREFACE_WORDS[2],
        _ => 0,
    }
}

/// Nine bytes of the preface from byte `g` (< 24) on, as [`bytes_from`] lays them out; bytes past
/// its end are 0.
#[inline(always)]
fn preface_from(g: u32) -> (u64, u8) {
    let (j, r) = (g / 8, g % 8);
    let next = preface_word_at(j + 1);
    let lo = shr(preface_word_at(j), 8 * r) | shl(next, 64 - 8 * r);
    (lo, shr(next, 8 * r) as u8)
}

/// Whether a conforming peer may send this frame header. `cont` is the stream whose header block
/// is open (0: none).
#[inline(always)]
fn frame_allowed(len: u32, ty: u8, flags: u8, stream: u32, cont: u32) -> bool {
    if cont != 0 {
        return ty == frame::CONTINUATION && stream == cont;
    }
    match ty {
        frame::DATA | frame::HEADERS => stream != 0,
        frame::PUSH_PROMISE => stream != 0 && len >= 4,
        frame::PRIORITY => stream != 0 && len == 5,
        frame::RST_STREAM => stream != 0 && len == 4,
        frame::SETTINGS => {
            stream == 0 && len.is_multiple_of(6) && (flags & frame::FLAG_ACK == 0 || len == 0)
        }
        frame::PING => stream == 0 && len == 8,
        frame::GOAWAY => stream == 0 && len >= 8,
        frame::WINDOW_UPDATE => len == 4,
        frame::CONTINUATION => false,
        _ => len <= MAX_UNKNOWN_FRAME_LEN,
    }
}

impl Default for H2Scan {
    fn default() -> Self {
        Self::new()
    }
}

impl H2Scan {
    /// Loop bound for one segment that [`H2Scan::scan_segment`] uses (and that a hand-written
    /// BPF loop should use): at most this many [`H2Scan::feed`] calls per packet.
    pub const STEPS: usize = 32;

    /// State for a client → server direction: expects the 24-byte connection preface, then a
    /// SETTINGS frame.
    pub const fn new() -> Self {
        H2Scan {
            requests: 0,
            hdr: 0,
            want_seq: 0,
            max_stream: 0,
            cont_stream: 0,
            frames: 0,
            got: 0,
            flags: 0,
            reason: 0,
            _pad: 0,
            seg_seq: 0,
        }
    }

    /// State for a direction that starts directly with frames (server → client): expects a
    /// SETTINGS frame first.
    pub const fn new_without_preface() -> Self {
        let mut s = Self::new();
        s.flags = PREFACE_DONE;
        s
    }

    /// Requests counted so far (frozen once unparsable).
    pub const fn requests(&self) -> u64 {
        self.requests
    }

    /// Whether the direction still parses as HTTP/2 (the count is meaningful).
    pub const fn parsable(&self) -> bool {
        self.reason == 0
    }

    /// The scanner's verdict as a lifecycle record carries it: 1 while parsable, `1 +`
    /// [`H2Unparsable`] once not (0 means no scanner followed the connection).
    pub const fn status(&self) -> u8 {
        1 + self.reason
    }

    /// Why the direction is not parsable, if it is not.
    pub const fn unparsable_reason(&self) -> Option<H2Unparsable> {
        H2Unparsable::from_u8(self.reason)
    }

    /// Frame headers decoded so far (wrapping).
    pub const fn frames(&self) -> u32 {
        self.frames
    }

    /// Highest client-initiated stream id that opened with HEADERS.
    pub const fn max_stream(&self) -> u32 {
        self.max_stream
    }

    /// Marks the direction unparsable (sticky; the first reason wins).
    #[inline(always)]
    fn fail(&mut self, reason: H2Unparsable) {
        if self.reason == 0 {
            self.reason = reason as u8;
        }
    }

    /// Tells the scanner the caller stopped feeding a segment before `feed` returned
    /// `next: None` (budget exhausted, or the bytes could not be read). The direction becomes
    /// [`H2Unparsable::Abandoned`].
    #[inline(always)]
    pub fn abandon(&mut self) {
        self.fail(H2Unparsable::Abandoned);
    }

    /// Starts a TCP segment whose first payload byte has sequence number `seq` and that carries
    /// `len` payload bytes. Returns the offset (0-based, in the payload) of the first byte to
    /// [`H2Scan::feed`], or `None` when the segment needs no look: no payload, entirely old
    /// (retransmission), entirely inside a frame payload being skipped, or the direction is (or
    /// just became, on a gap) unparsable.
    #[inline(always)]
    pub fn begin_segment(&mut self, seq: u32, len: u32) -> Option<u32> {
        if self.reason != 0 || len == 0 {
            return None;
        }
        if self.flags & SEQ_KNOWN == 0 {
            self.want_seq = seq;
            self.flags |= SEQ_KNOWN;
        }
        self.seg_seq = seq;
        let off = self.want_seq.wrapping_sub(seq);
        if (off as i32) < 0 {
            self.fail(H2Unparsable::Gap);
            return None;
        }
        if off >= len {
            return None;
        }
        Some(off)
    }

    /// Where the caller reads the [`WINDOW_LEN`]-byte window for the byte of interest at payload
    /// offset `at` of a segment of `seg_len` payload bytes: `at` itself, or `seg_len - 9` when
    /// fewer than 9 bytes are left, so that every read has the same constant size. The result
    /// may be negative (down to -8) when the whole segment is shorter than 9 bytes: those bytes
    /// come before the payload (the TCP header) and are ignored.
    #[inline(always)]
    pub const fn window_start(at: u32, seg_len: u32) -> i64 {
        let end = seg_len as i64 - WINDOW_LEN as i64;
        if (at as i64) < end { at as i64 } else { end }
    }

    /// Offset of the byte of interest in the segment being scanned.
    ///
    /// Read back from the state with volatile loads: in BPF the state is a map value, so the
    /// verifier sees a fresh unknown value here instead of the arithmetic of earlier steps. That
    /// keeps the states at the head of the caller's loop equivalent, and verification cost
    /// linear in the number of steps.
    #[inline(always)]
    fn segment_offset(&self) -> u32 {
        // SAFETY: reads of two initialised `u32` fields of `*self`.
        let (want, seg) = unsafe {
            (
                core::ptr::read_volatile(&self.want_seq),
                core::ptr::read_volatile(&self.seg_seq),
            )
        };
        want.wrapping_sub(seg)
    }

    /// Feeds the window for the byte of interest in the current segment, which carries `seg_len`
    /// payload bytes. The byte of interest is at the offset `at` that `begin_segment` or the
    /// previous `feed` returned, and `window` must hold the [`WINDOW_LEN`] bytes at payload offset
    /// [`H2Scan::window_start`]`(at, seg_len)`.
    ///
    /// One call consumes one chunk: up to 9 bytes of the preface, or the rest of one frame header
    /// (then the frame is decoded and its payload skipped). There is no loop inside.
    #[inline(always)]
    pub fn feed(&mut self, window: &[u8; WINDOW_LEN], seg_len: u32) -> Feed {
        let mut out = Feed {
            new_requests: 0,
            next: None,
        };
        let at = self.segment_offset();
        if self.reason != 0 || at >= seg_len {
            return out;
        }
        let left = seg_len - at;
        let avail = if left < WINDOW_LEN as u32 {
            left
        } else {
            WINDOW_LEN as u32
        };
        // The bytes of interest, from the window's byte `WINDOW_LEN - avail` on.
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = *window;
        let lo = u64::from_le_bytes([w0, w1, w2, w3, w4, w5, w6, w7]);
        let (lo, hi) = bytes_from(lo, w8, WINDOW_LEN as u32 - avail);

        let consumed;
        let mut skip = 0;
        if self.flags & PREFACE_DONE == 0 {
            let got = if self.got < 23 { self.got as u32 } else { 23 };
            let need = PREFACE.len() as u32 - got;
            let n = if avail < need { avail } else { need };
            let (plo, phi) = preface_from(got);
            if (lo ^ plo) & low_bytes(n) != 0 || (n == 9 && hi != phi) {
                self.fail(if got == 0 && lo as u8 == TLS_HANDSHAKE {
                    H2Unparsable::Tls
                } else {
                    H2Unparsable::Preface
                });
                return out;
            }
            consumed = n;
            if got + n >= PREFACE.len() as u32 {
                self.got = 0;
                self.flags |= PREFACE_DONE;
            } else {
                self.got = (got + n) as u8;
            }
        } else {
            let got = if self.got < 8 { self.got as u32 } else { 8 };
            let need = FRAME_HEADER_LEN - got;
            let n = if avail < need { avail } else { need };
            consumed = n;
            if n < need {
                self.hdr |= shl(lo & low_bytes(n), 8 * got);
                self.got = (got + n) as u8;
            } else {
                let hdr = self.hdr | shl(lo, 8 * got);
                let last = if got == 0 {
                    hi
                } else {
                    shr(lo, 8 * (8 - got)) as u8
                };
                self.hdr = 0;
                self.got = 0;
                match self.frame_header(hdr, last) {
                    Ok((len, request)) => {
                        out.new_requests = request;
                        skip = len;
                    }
                    Err(reason) => {
                        self.fail(reason);
                        return out;
                    }
                }
            }
        }
        // `consumed` <= 9 and `skip` < 2^24: no overflow in u64, and the sum fits the wrapping
        // u32 sequence space.
        let advance = consumed as u64 + skip as u64;
        self.want_seq = self.want_seq.wrapping_add(advance as u32);
        let next = at as u64 + advance;
        if next < seg_len as u64 {
            out.next = Some(next as u32);
        }
        out
    }

    /// Decodes a complete frame header (`hdr` holds its first 8 bytes, `last` is the ninth),
    /// updates the state, and returns the payload length to skip and the requests counted.
    #[inline(always)]
    fn frame_header(&mut self, hdr: u64, last: u8) -> Result<(u32, u32), H2Unparsable> {
        let byte = |i: u32| (hdr >> (8 * i)) as u8;
        let len = ((byte(0) as u32) << 16) | ((byte(1) as u32) << 8) | byte(2) as u32;
        let ty = byte(3);
        let flags = byte(4);
        let stream = (((byte(5) as u32) << 24)
            | ((byte(6) as u32) << 16)
            | ((byte(7) as u32) << 8)
            | last as u32)
            & STREAM_ID_MASK;
        self.frames = self.frames.wrapping_add(1);
        if self.flags & SETTINGS_SEEN == 0 {
            if byte(0) == TLS_HANDSHAKE {
                return Err(H2Unparsable::Tls);
            }
            if ty != frame::SETTINGS || flags & frame::FLAG_ACK != 0 {
                return Err(H2Unparsable::FirstFrame);
            }
            self.flags |= SETTINGS_SEEN;
        }
        if !frame_allowed(len, ty, flags, stream, self.cont_stream) {
            return Err(H2Unparsable::BadFrame);
        }
        if ty == frame::HEADERS || ty == frame::PUSH_PROMISE || ty == frame::CONTINUATION {
            self.cont_stream = if flags & frame::FLAG_END_HEADERS != 0 {
                0
            } else {
                stream
            };
        }
        let mut request = 0;
        if ty == frame::HEADERS && stream & 1 == 1 && stream > self.max_stream {
            self.max_stream = stream;
            self.requests = self.requests.wrapping_add(1);
            request = 1;
        }
        Ok((len, request))
    }

    /// Scans one segment with at most [`H2Scan::STEPS`] reads: `read(offset, window)` must fill
    /// `window` with the [`WINDOW_LEN`] bytes at payload offset `offset` (which may be negative,
    /// down to -8, for a segment shorter than 9 bytes: see [`H2Scan::window_start`]) and return
    /// whether it could. Calls [`H2Scan::abandon`] when the budget runs out or a read fails.
    /// Returns the requests counted in this segment.
    #[inline(always)]
    pub fn scan_segment<R>(&mut self, seq: u32, len: u32, mut read: R) -> u32
    where
        R: FnMut(i64, &mut [u8; WINDOW_LEN]) -> bool,
    {
        let mut counted = 0;
        let mut next = self.begin_segment(seq, len);
        let mut window = [0u8; WINDOW_LEN];
        let mut step = 0;
        while step < Self::STEPS {
            step += 1;
            let Some(at) = next else { break };
            if !read(Self::window_start(at, len), &mut window) {
                break;
            }
            let fed = self.feed(&window, len);
            counted += fed.new_requests;
            next = fed.next;
        }
        if next.is_some() {
            self.abandon();
        }
        counted
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` data without padding; any bit pattern is valid.
unsafe impl aya::Pod for H2Scan {}

/// A whole-stream reference parser and segment drivers, shared by the unit tests and the
/// cargo-fuzz target (which builds with `--cfg fuzzing`). Not part of the API.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod reference {
    use super::{H2Scan, H2Unparsable, PREFACE, WINDOW_LEN};

    /// What a parse of a byte stream ends with.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Outcome {
        pub requests: u64,
        pub frames: u32,
        pub reason: Option<H2Unparsable>,
    }

    impl Outcome {
        pub fn of(scan: &H2Scan) -> Self {
            Outcome {
                requests: scan.requests(),
                frames: scan.frames(),
                reason: scan.unparsable_reason(),
            }
        }
    }

    /// Parses a reassembled direction in one go with the same rules as the scanner, written
    /// the obvious way (whole-stream indexing, no state machine).
    pub fn parse(stream: &[u8], preface: bool) -> Outcome {
        let mut out = Outcome {
            requests: 0,
            frames: 0,
            reason: None,
        };
        let mut pos = 0usize;
        if preface {
            for (i, (&got, &want)) in stream.iter().zip(PREFACE.iter()).enumerate() {
                if got != want {
                    out.reason = Some(if i == 0 && got == 0x16 {
                        H2Unparsable::Tls
                    } else {
                        H2Unparsable::Preface
                    });
                    return out;
                }
            }
            pos = PREFACE.len();
        }
        let mut first = true;
        let mut max = 0u32;
        let mut open = 0u32;
        while let Some(h) = stream.get(pos..pos + 9) {
            out.frames += 1;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
            let (ty, fl) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if first {
                if h[0] == 0x16 {
                    out.reason = Some(H2Unparsable::Tls);
                    return out;
                }
                if ty != 4 || fl & 1 != 0 {
                    out.reason = Some(H2Unparsable::FirstFrame);
                    return out;
                }
                first = false;
            }
            let ok = if open != 0 {
                ty == 9 && id == open
            } else {
                match ty {
                    0 | 1 => id != 0,
                    2 => id != 0 && len == 5,
                    3 => id != 0 && len == 4,
                    4 => id == 0 && len.is_multiple_of(6) && (fl & 1 == 0 || len == 0),
                    5 => id != 0 && len >= 4,
                    6 => id == 0 && len == 8,
                    7 => id == 0 && len >= 8,
                    8 => len == 4,
                    9 => false,
                    _ => len <= 16_384,
                }
            };
            if !ok {
                out.reason = Some(H2Unparsable::BadFrame);
                return out;
            }
            if matches!(ty, 1 | 5 | 9) {
                open = if fl & 4 != 0 { 0 } else { id };
            }
            if ty == 1 && id % 2 == 1 && id > max {
                max = id;
                out.requests += 1;
            }
            pos += 9 + len as usize;
        }
        out
    }

    /// Feeds one segment through `begin_segment`/`feed` with at most `steps` feeds, calling
    /// `abandon` when they run out. Returns the requests counted. Checks that every feed makes
    /// progress and that the per-call counts add up.
    pub fn drive(scan: &mut H2Scan, seq: u32, seg: &[u8], steps: usize) -> u32 {
        let len = seg.len() as u32;
        let before = scan.requests();
        let mut next = scan.begin_segment(seq, len);
        let mut counted = 0;
        let mut step = 0;
        let mut last = None;
        while let Some(at) = next {
            assert!(
                (at as usize) < seg.len(),
                "offset {at} outside a {len}-byte segment"
            );
            if let Some(prev) = last {
                assert!(at > prev, "no progress: {prev} then {at}");
            }
            last = Some(at);
            if step == steps {
                scan.abandon();
                break;
            }
            step += 1;
            let fed = scan.feed(&window(seg, at), len);
            counted += fed.new_requests;
            next = fed.next;
        }
        assert_eq!(scan.requests() - before, counted as u64);
        counted
    }

    /// Feeds one segment through [`H2Scan::scan_segment`] (the bounded loop a BPF caller runs).
    pub fn drive_bounded(scan: &mut H2Scan, seq: u32, seg: &[u8]) -> u32 {
        scan.scan_segment(seq, seg.len() as u32, |start, buf| {
            // A read past the payload fails, as `bpf_skb_load_bytes` would.
            if start < -(WINDOW_LEN as i64 - 1) || start + WINDOW_LEN as i64 > seg.len() as i64 {
                return false;
            }
            *buf = window_at(seg, start);
            true
        })
    }

    /// The window [`H2Scan::feed`] wants for offset `at` of `seg`.
    pub fn window(seg: &[u8], at: u32) -> [u8; WINDOW_LEN] {
        window_at(seg, H2Scan::window_start(at, seg.len() as u32))
    }

    /// The [`WINDOW_LEN`] bytes at offset `start` of `seg`; bytes before it (negative offsets, the
    /// TCP header in a real packet) and after it are 0xEE, which the scanner must ignore.
    fn window_at(seg: &[u8], start: i64) -> [u8; WINDOW_LEN] {
        let mut w = [0xEE; WINDOW_LEN];
        for (k, b) in w.iter_mut().enumerate() {
            if let Ok(i) = usize::try_from(start + k as i64)
                && let Some(&v) = seg.get(i)
            {
                *b = v;
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::reference::{Outcome, drive, drive_bounded, parse, window};
    use super::*;
    use std::vec::Vec;

    /// xorshift64* with a fixed seed: deterministic "fuzzing" in `cargo test`.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform-ish in `0..n` (n > 0).
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
            lo + self.below((hi_inclusive - lo + 1) as u64) as usize
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    /// Payload filler that looks like frame headers (HEADERS on odd streams), so a scanner that
    /// reads payload as headers would miscount.
    const FILLER: [u8; 9] = [0, 0, 0, frame::HEADERS, 4, 0, 0, 0, 7];

    fn frame(ty: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(9 + len);
        f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        f.push(ty);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend((0..len).map(|i| FILLER[i % FILLER.len()]));
        f
    }

    fn settings() -> Vec<u8> {
        frame(frame::SETTINGS, 0, 0, 12)
    }

    fn headers(stream: u32, len: usize) -> Vec<u8> {
        frame(frame::HEADERS, frame::FLAG_END_HEADERS, stream, len)
    }

    fn data(stream: u32, len: usize) -> Vec<u8> {
        frame(frame::DATA, 0, stream, len)
    }

    /// Preface + SETTINGS + `frames`.
    fn client(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = PREFACE.to_vec();
        s.extend(settings());
        for f in frames {
            s.extend_from_slice(f);
        }
        s
    }

    /// SETTINGS + `frames` (a server → client direction).
    fn server(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = settings();
        for f in frames {
            s.extend_from_slice(f);
        }
        s
    }

    fn fresh(preface: bool) -> H2Scan {
        if preface {
            H2Scan::new()
        } else {
            H2Scan::new_without_preface()
        }
    }

    /// Scans `stream` cut at `cuts` (sorted offsets), first byte at sequence number `isn`.
    fn scan_cuts(stream: &[u8], preface: bool, cuts: &[usize], isn: u32) -> H2Scan {
        let mut scan = fresh(preface);
        let mut from = 0;
        for &to in cuts.iter().chain(core::iter::once(&stream.len())) {
            drive(
                &mut scan,
                isn.wrapping_add(from as u32),
                &stream[from..to],
                usize::MAX,
            );
            from = to;
        }
        scan
    }

    fn scan_whole(stream: &[u8], preface: bool) -> H2Scan {
        scan_cuts(stream, preface, &[], 1000)
    }

    fn requests(stream: &[u8]) -> u64 {
        let scan = scan_whole(stream, true);
        assert!(scan.parsable(), "{:?}", scan.unparsable_reason());
        scan.requests()
    }

    fn reason(stream: &[u8], preface: bool) -> Option<H2Unparsable> {
        scan_whole(stream, preface).unparsable_reason()
    }

    #[test]
    fn layout_has_no_padding_and_zero_is_new() {
        assert_eq!(core::mem::size_of::<H2Scan>(), 40);
        assert_eq!(core::mem::align_of::<H2Scan>(), 8);
        let offsets = [
            core::mem::offset_of!(H2Scan, requests),
            core::mem::offset_of!(H2Scan, hdr),
            core::mem::offset_of!(H2Scan, want_seq),
            core::mem::offset_of!(H2Scan, max_stream),
            core::mem::offset_of!(H2Scan, cont_stream),
            core::mem::offset_of!(H2Scan, frames),
            core::mem::offset_of!(H2Scan, got),
            core::mem::offset_of!(H2Scan, flags),
            core::mem::offset_of!(H2Scan, reason),
            core::mem::offset_of!(H2Scan, _pad),
            core::mem::offset_of!(H2Scan, seg_seq),
        ];
        assert_eq!(offsets, [0, 8, 16, 20, 24, 28, 32, 33, 34, 35, 36]);
        // SAFETY: all-zero bytes are a valid H2Scan (plain integers).
        let zero: H2Scan = unsafe { core::mem::zeroed() };
        assert_eq!(zero, H2Scan::new());
        assert_eq!(H2Scan::default(), H2Scan::new());
        assert!(H2Scan::new().parsable());
        for (i, r) in H2Unparsable::ALL.iter().enumerate() {
            assert_eq!(H2Unparsable::from_u8(*r as u8), Some(*r));
            assert_eq!(*r as u32, i as u32 + 1);
        }
        assert_eq!(H2Unparsable::ALL.len() as u32, H2Unparsable::COUNT);
        assert_eq!(H2Unparsable::from_u8(0), None);
        for g in 0..24 {
            let (lo, hi) = preface_from(g);
            let mut want = [0u8; 9];
            for (k, b) in want.iter_mut().enumerate() {
                *b = PREFACE.get(g as usize + k).copied().unwrap_or(0);
            }
            assert_eq!(lo.to_le_bytes(), want[..8]);
            assert_eq!(hi, want[8]);
        }
        let nine = [1, 2, 3, 4, 5, 6, 7, 8, 9u8];
        let lo = u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        for k in 0..=9 {
            let (l, h) = bytes_from(lo, 9, k);
            let mut want = [0u8; 9];
            for (i, b) in want.iter_mut().enumerate() {
                *b = nine.get(k.min(8) as usize + i).copied().unwrap_or(0);
            }
            assert_eq!(
                (l.to_le_bytes(), h),
                (want[..8].try_into().unwrap(), want[8])
            );
        }
    }

    #[test]
    fn counts_requests_and_skips_other_frames() {
        let s = client(&[
            frame(frame::SETTINGS, frame::FLAG_ACK, 0, 0),
            frame(frame::WINDOW_UPDATE, 0, 0, 4),
            headers(1, 40),
            data(1, 100),
            headers(3, 7),
            data(3, 0),
            frame(frame::PING, 0, 0, 8),
            frame(frame::PRIORITY, 0, 9, 5),
            frame(frame::RST_STREAM, 0, 3, 4),
            frame(frame::WINDOW_UPDATE, 0, 1, 4),
            frame(0xfa, 0, 0, 100),
            headers(5, 0),
            frame(frame::GOAWAY, 0, 0, 8),
        ]);
        let scan = scan_whole(&s, true);
        assert!(scan.parsable());
        assert_eq!(scan.requests(), 3);
        assert_eq!(scan.frames(), 14);
        assert_eq!(scan.max_stream(), 5);
        assert_eq!(parse(&s, true), Outcome::of(&scan));
    }

    #[test]
    fn continuation_trailers_even_and_repeated_streams_do_not_count() {
        // Header block split over CONTINUATION frames.
        assert_eq!(
            requests(&client(&[
                frame(frame::HEADERS, 0, 1, 10),
                frame(frame::CONTINUATION, 0, 1, 10),
                frame(frame::CONTINUATION, frame::FLAG_END_HEADERS, 1, 3),
                headers(3, 5),
            ])),
            2
        );
        // Trailers: a second HEADERS on stream 1.
        assert_eq!(
            requests(&client(&[
                headers(1, 10),
                data(1, 10),
                frame(
                    frame::HEADERS,
                    frame::FLAG_END_HEADERS | frame::FLAG_END_STREAM,
                    1,
                    10
                ),
            ])),
            1
        );
        // Even (server-initiated) streams never count.
        assert_eq!(requests(&client(&[headers(2, 3), headers(4, 3)])), 0);
        // Repeated and lower stream ids do not count.
        assert_eq!(
            requests(&client(&[headers(5, 3), headers(5, 3), headers(3, 3)])),
            1
        );
        // PRIORITY on an idle stream does not raise the bar.
        assert_eq!(
            requests(&client(&[frame(frame::PRIORITY, 0, 11, 5), headers(1, 3)])),
            1
        );
        // The reserved bit is masked: this is stream 1, then stream 1 again.
        let scan = scan_whole(&client(&[headers(0x8000_0001, 3), headers(1, 3)]), true);
        assert_eq!((scan.requests(), scan.max_stream()), (1, 1));
        // PUSH_PROMISE with CONTINUATION, then a request.
        assert_eq!(
            requests(&client(&[
                frame(frame::PUSH_PROMISE, 0, 1, 8),
                frame(frame::CONTINUATION, frame::FLAG_END_HEADERS, 1, 8),
                headers(7, 1),
            ])),
            1
        );
    }

    #[test]
    fn server_direction_without_preface() {
        let s = server(&[
            frame(frame::SETTINGS, frame::FLAG_ACK, 0, 0),
            headers(1, 20),
            data(1, 30),
            headers(1, 5), // trailers
            headers(3, 20),
        ]);
        let scan = scan_whole(&s, false);
        assert!(scan.parsable());
        assert_eq!(scan.requests(), 2);
        // The same bytes where a preface is expected: not HTTP/2.
        assert_eq!(reason(&s, true), Some(H2Unparsable::Preface));
    }

    #[test]
    fn frames_no_peer_sends_make_it_unparsable() {
        let bad = [
            frame(frame::PING, 0, 0, 7),
            frame(frame::PING, 0, 1, 8),
            frame(frame::SETTINGS, 0, 0, 5),
            frame(frame::SETTINGS, 0, 1, 6),
            frame(frame::SETTINGS, frame::FLAG_ACK, 0, 6),
            frame(frame::DATA, 0, 0, 1),
            frame(frame::HEADERS, frame::FLAG_END_HEADERS, 0, 1),
            frame(frame::RST_STREAM, 0, 1, 3),
            frame(frame::RST_STREAM, 0, 0, 4),
            frame(frame::PRIORITY, 0, 1, 4),
            frame(frame::PRIORITY, 0, 0, 5),
            frame(frame::WINDOW_UPDATE, 0, 0, 5),
            frame(frame::GOAWAY, 0, 1, 8),
            frame(frame::GOAWAY, 0, 0, 7),
            frame(frame::PUSH_PROMISE, frame::FLAG_END_HEADERS, 0, 4),
            frame(frame::PUSH_PROMISE, frame::FLAG_END_HEADERS, 2, 3),
            frame(frame::CONTINUATION, frame::FLAG_END_HEADERS, 1, 1),
            frame(0x42, 0, 0, MAX_UNKNOWN_FRAME_LEN as usize + 1),
        ];
        for f in &bad {
            let s = client(&[headers(1, 3), f.clone(), headers(3, 3)]);
            let scan = scan_whole(&s, true);
            assert_eq!(
                scan.unparsable_reason(),
                Some(H2Unparsable::BadFrame),
                "{:02x?}",
                &f[..9]
            );
            assert_eq!(scan.requests(), 1, "counting stops at the bad frame");
            assert_eq!(parse(&s, true), Outcome::of(&scan));
        }
        // Interleaving inside a header block.
        for f in [
            headers(3, 1),
            data(1, 1),
            frame(frame::CONTINUATION, 4, 3, 1),
        ] {
            let s = client(&[frame(frame::HEADERS, 0, 1, 3), f]);
            assert_eq!(reason(&s, true), Some(H2Unparsable::BadFrame));
        }
        // An unknown frame at the limit is fine.
        assert_eq!(
            requests(&client(&[
                frame(0x42, 0, 0, MAX_UNKNOWN_FRAME_LEN as usize),
                headers(1, 1)
            ])),
            1
        );
    }

    #[test]
    fn first_frame_must_be_settings() {
        let mut s = PREFACE.to_vec();
        s.extend(headers(1, 3));
        assert_eq!(reason(&s, true), Some(H2Unparsable::FirstFrame));
        let mut s = PREFACE.to_vec();
        s.extend(frame(frame::SETTINGS, frame::FLAG_ACK, 0, 0));
        assert_eq!(reason(&s, true), Some(H2Unparsable::FirstFrame));
        assert_eq!(
            reason(&headers(1, 3), false),
            Some(H2Unparsable::FirstFrame)
        );
        assert_eq!(
            reason(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            Some(H2Unparsable::FirstFrame)
        );
    }

    #[test]
    fn http1_and_tls_are_not_http2() {
        assert_eq!(
            reason(b"GET / HTTP/1.1\r\nHost: pricing\r\n\r\n", true),
            Some(H2Unparsable::Preface)
        );
        assert_eq!(
            reason(b"POST /pricing.Pricing/Get HTTP/1.1\r\n", true),
            Some(H2Unparsable::Preface)
        );
        // Start of a TLS 1.3 ClientHello (record header, handshake header, version, random).
        let client_hello: [u8; 48] = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5d, 0x8a, 0x1c,
            0x3e, 0x02, 0x47, 0x91, 0xaa, 0x0b, 0x6e, 0x2f, 0x11, 0x90, 0xc4, 0x7d, 0x03, 0x5a,
            0x8e, 0x21, 0x33, 0x70, 0xd9, 0x0e, 0xb2, 0x64, 0x18, 0x4f, 0xa7, 0x12, 0xcd, 0x66,
            0x20, 0xe1, 0x5b, 0x9c, 0x00, 0x3e,
        ];
        assert_eq!(reason(&client_hello, true), Some(H2Unparsable::Tls));
        assert_eq!(reason(&client_hello, false), Some(H2Unparsable::Tls));
        // Split after the first byte.
        let scan = scan_cuts(&client_hello, true, &[1], 7);
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Tls));
        // ServerHello on the server direction.
        let server_hello: [u8; 12] = [
            0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00, 0x00, 0x76, 0x03, 0x03, 0x9f,
        ];
        assert_eq!(reason(&server_hello, false), Some(H2Unparsable::Tls));
        for split in 1..server_hello.len() {
            let scan = scan_cuts(&server_hello, false, &[split], 7);
            assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Tls));
        }
        // A partial preface is not (yet) a failure.
        assert_eq!(reason(&PREFACE[..10], true), None);
    }

    #[test]
    fn unparsable_is_sticky() {
        let mut scan = H2Scan::new();
        drive(&mut scan, 0, b"GET / HTTP/1.1\r\n\r\n", usize::MAX);
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Preface));
        let s = client(&[headers(1, 3)]);
        drive(&mut scan, 18, &s, usize::MAX);
        assert_eq!(scan.begin_segment(18, 10), None);
        assert_eq!(
            scan.feed(&window(&s, 0), 9),
            Feed {
                new_requests: 0,
                next: None
            }
        );
        scan.abandon();
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Preface));
        assert_eq!(scan.requests(), 0);
    }

    /// Three requests with CONTINUATION, trailers, empty frames, even streams and PINGs: the
    /// stream used by the exhaustive split tests.
    fn split_stream(preface: bool) -> Vec<u8> {
        let frames = [
            headers(1, 10),
            data(1, 5),
            frame(frame::HEADERS, 0, 3, 3),
            frame(frame::CONTINUATION, frame::FLAG_END_HEADERS, 3, 0),
            frame(frame::DATA, frame::FLAG_END_STREAM, 3, 0),
            frame(frame::WINDOW_UPDATE, 0, 0, 4),
            frame(frame::PING, frame::FLAG_ACK, 0, 8),
            headers(1, 2),
            headers(2, 0),
            headers(5, 1),
            data(5, 11),
        ];
        if preface {
            client(&frames)
        } else {
            server(&frames)
        }
    }

    #[test]
    fn every_split_into_two_and_three_segments_counts_the_same() {
        for preface in [true, false] {
            let s = split_stream(preface);
            let whole = parse(&s, preface);
            assert_eq!(whole.requests, 3);
            assert_eq!(whole.reason, None);
            assert_eq!(Outcome::of(&scan_whole(&s, preface)), whole);
            for a in 0..=s.len() {
                let isn = 0xffff_ff00u32; // crosses the sequence wrap
                assert_eq!(Outcome::of(&scan_cuts(&s, preface, &[a], isn)), whole);
                for b in a..=s.len() {
                    assert_eq!(
                        Outcome::of(&scan_cuts(&s, preface, &[a, b], isn)),
                        whole,
                        "cuts {a} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn random_splits_into_many_segments_count_the_same() {
        let mut rng = Rng(0x5eed_0001);
        for preface in [true, false] {
            let s = split_stream(preface);
            let whole = parse(&s, preface);
            for _ in 0..2000 {
                let mut cuts: Vec<usize> = (0..rng.range(1, 40))
                    .map(|_| rng.range(0, s.len()))
                    .collect();
                cuts.sort_unstable();
                let isn = rng.next() as u32;
                assert_eq!(
                    Outcome::of(&scan_cuts(&s, preface, &cuts, isn)),
                    whole,
                    "{cuts:?}"
                );
            }
        }
    }

    #[test]
    fn retransmissions_are_ignored() {
        let s = client(&[headers(1, 30), data(1, 100), headers(3, 30), data(3, 50)]);
        let cut1 = PREFACE.len() + settings().len() + 20; // inside HEADERS(1)'s payload
        let cut2 = PREFACE.len() + settings().len() + 39 + 109 + 4; // inside HEADERS(3)'s header
        let isn = 4242;
        let mut scan = H2Scan::new();
        drive(&mut scan, isn, &s[..cut1], usize::MAX);
        drive(&mut scan, isn, &s[..cut1], usize::MAX); // whole retransmission
        assert_eq!(scan.requests(), 1);
        drive(&mut scan, isn + cut1 as u32, &s[cut1..cut2], usize::MAX);
        let after = scan;
        // Retransmissions of old data, whole and partial, change nothing.
        drive(&mut scan, isn + cut1 as u32, &s[cut1..cut2], usize::MAX);
        drive(&mut scan, isn + 10, &s[10..cut2], usize::MAX);
        drive(&mut scan, isn, &s[..5], usize::MAX);
        scan.seg_seq = after.seg_seq; // the only thing a retransmission touches
        assert_eq!(scan, after);
        // A retransmission that overlaps old and new data contributes its new part once.
        drive(&mut scan, isn + 30, &s[30..], usize::MAX);
        drive(&mut scan, isn + 30, &s[30..], usize::MAX);
        assert!(scan.parsable());
        assert_eq!(scan.requests(), 2);
        assert_eq!(Outcome::of(&scan), parse(&s, true));
    }

    #[test]
    fn a_gap_is_unparsable_unless_it_is_inside_a_payload() {
        let s = client(&[headers(1, 30), data(1, 1000), headers(3, 30)]);
        let data_payload = PREFACE.len() + settings().len() + 39 + 9;
        let next_header = data_payload + 1000;
        let isn = u32::MAX - 100; // wraps inside the stream

        // Bytes inside DATA's payload arrive out of order: nothing of interest is missed.
        let mut scan = H2Scan::new();
        let at = |off: usize| isn.wrapping_add(off as u32);
        drive(&mut scan, at(0), &s[..data_payload + 10], usize::MAX);
        drive(
            &mut scan,
            at(data_payload + 500),
            &s[data_payload + 500..next_header - 5],
            usize::MAX,
        );
        drive(
            &mut scan,
            at(data_payload + 10),
            &s[data_payload + 10..data_payload + 500],
            usize::MAX,
        );
        drive(
            &mut scan,
            at(next_header - 5),
            &s[next_header - 5..],
            usize::MAX,
        );
        assert!(scan.parsable());
        assert_eq!(scan.requests(), 2);

        // A segment holding the next header is lost: the next one starts past it.
        let mut scan = H2Scan::new();
        drive(&mut scan, at(0), &s[..next_header - 5], usize::MAX);
        drive(
            &mut scan,
            at(next_header + 4),
            &s[next_header + 4..],
            usize::MAX,
        );
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Gap));
        assert_eq!(scan.requests(), 1);

        // The same when the segment lost was part of the preface.
        let mut scan = H2Scan::new();
        drive(&mut scan, at(0), &s[..10], usize::MAX);
        drive(&mut scan, at(11), &s[11..], usize::MAX);
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Gap));
    }

    #[test]
    fn empty_segments_do_not_fix_the_sequence() {
        let s = client(&[headers(1, 3)]);
        let mut scan = H2Scan::new();
        assert_eq!(scan.begin_segment(77, 0), None); // the SYN/ACK
        drive(&mut scan, 1000, &s, usize::MAX);
        assert_eq!(scan.requests(), 1);
    }

    #[test]
    fn the_per_packet_budget_abandons_crowded_segments() {
        // 40 empty HEADERS frames in one packet: more frame headers than steps.
        let frames: Vec<Vec<u8>> = (0..40).map(|i| headers(2 * i + 1, 0)).collect();
        let s = client(&frames);
        let mut scan = H2Scan::new();
        let counted = drive_bounded(&mut scan, 1, &s);
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Abandoned));
        assert_eq!(counted as u64, scan.requests());
        assert!(scan.requests() < 40);
        // The same bytes in packets of 10 frames each fit the budget.
        let mut scan = H2Scan::new();
        let mut from = 0;
        while from < s.len() {
            let to = s.len().min(from + 90);
            drive_bounded(&mut scan, 1 + from as u32, &s[from..to]);
            from = to;
        }
        assert!(scan.parsable());
        assert_eq!(scan.requests(), 40);
        // A read failure abandons too.
        let mut scan = H2Scan::new();
        scan.scan_segment(1, s.len() as u32, |_, _| false);
        assert_eq!(scan.unparsable_reason(), Some(H2Unparsable::Abandoned));
        // Large payloads cost one step each.
        let big = client(&[headers(1, 16_000), data(1, 40_000), headers(3, 9_000)]);
        let mut scan = H2Scan::new();
        assert_eq!(drive_bounded(&mut scan, 1, &big), 2);
        assert!(scan.parsable());
    }

    /// Stream lengths: mostly small, sometimes large.
    fn random_len(rng: &mut Rng) -> usize {
        match rng.below(10) {
            0..=5 => rng.range(0, 64),
            6..=8 => rng.range(0, 2000),
            _ => rng.range(0, 40_000),
        }
    }

    /// A random valid gRPC-like direction and the number of requests it carries.
    fn random_stream(rng: &mut Rng, preface: bool) -> (Vec<u8>, u64) {
        let mut s = Vec::new();
        if preface {
            s.extend_from_slice(&PREFACE);
        }
        s.extend(frame(frame::SETTINGS, 0, 0, 6 * rng.range(0, 5)));
        let mut next_stream = 1u32;
        let mut opened: Vec<u32> = Vec::new();
        let mut expected = 0;
        let reserved = |rng: &mut Rng, id: u32| {
            if rng.chance(5) { id | 0x8000_0000 } else { id }
        };
        for _ in 0..rng.range(0, 40) {
            let old = |rng: &mut Rng| {
                if opened.is_empty() {
                    1 + 2 * rng.below(50) as u32
                } else {
                    opened[rng.below(opened.len() as u64) as usize]
                }
            };
            match rng.below(16) {
                0..=3 => {
                    // A new request, its header block maybe split over CONTINUATION frames.
                    next_stream += 2 * rng.below(3) as u32;
                    let id = next_stream;
                    next_stream += 2;
                    opened.push(id);
                    expected += 1;
                    let conts = if rng.chance(25) { rng.range(1, 3) } else { 0 };
                    let flags = if conts == 0 {
                        frame::FLAG_END_HEADERS
                    } else {
                        0
                    } | if rng.chance(30) {
                        frame::FLAG_END_STREAM
                    } else {
                        0
                    };
                    let id = reserved(rng, id);
                    s.extend(frame(frame::HEADERS, flags, id, random_len(rng)));
                    for c in 0..conts {
                        let end = if c + 1 == conts {
                            frame::FLAG_END_HEADERS
                        } else {
                            0
                        };
                        s.extend(frame(frame::CONTINUATION, end, id, random_len(rng)));
                    }
                }
                4..=6 => {
                    let id = old(rng);
                    let id = reserved(rng, id);
                    s.extend(frame(frame::DATA, rng.byte() & 0x9, id, random_len(rng)));
                }
                7 => {
                    // Trailers, or HEADERS on a server-initiated (even) stream.
                    let id = if rng.chance(50) && !opened.is_empty() {
                        old(rng)
                    } else {
                        2 * rng.range(1, 50) as u32
                    };
                    s.extend(headers(id, random_len(rng)));
                }
                8 => s.extend(frame(
                    frame::SETTINGS,
                    rng.byte() & 0xfe,
                    0,
                    6 * rng.range(0, 6),
                )),
                9 => s.extend(frame(frame::SETTINGS, frame::FLAG_ACK, 0, 0)),
                10 => s.extend(frame(frame::PING, rng.byte(), 0, 8)),
                11 => {
                    let id = if rng.chance(50) { 0 } else { old(rng) };
                    s.extend(frame(frame::WINDOW_UPDATE, 0, id, 4));
                }
                12 => {
                    let (ty, len) = if rng.chance(50) {
                        (frame::RST_STREAM, 4)
                    } else {
                        (frame::PRIORITY, 5)
                    };
                    s.extend(frame(ty, 0, rng.range(1, 200) as u32, len));
                }
                13 => s.extend(frame(frame::GOAWAY, 0, 0, 8 + random_len(rng))),
                14 => {
                    let id = old(rng);
                    let split = rng.chance(30);
                    let flags = if split { 0 } else { frame::FLAG_END_HEADERS };
                    s.extend(frame(frame::PUSH_PROMISE, flags, id, 4 + random_len(rng)));
                    if split {
                        s.extend(frame(
                            frame::CONTINUATION,
                            frame::FLAG_END_HEADERS,
                            id,
                            random_len(rng),
                        ));
                    }
                }
                _ => {
                    let ty = rng.range(10, 255) as u8;
                    let len = random_len(rng).min(MAX_UNKNOWN_FRAME_LEN as usize);
                    s.extend(frame(ty, rng.byte(), rng.next() as u32, len));
                }
            }
        }
        if rng.chance(20) {
            // Cut the last frame short.
            let cut = rng.range(0, s.len());
            s.truncate(cut);
            expected = 0; // unknown: compare against the reference only
        }
        (s, expected)
    }

    /// Random deliveries of `stream`: segments that never leave a gap, with retransmissions and
    /// overlaps, scanned unbounded (`bounded == false`) or through `scan_segment`.
    fn deliver(rng: &mut Rng, stream: &[u8], preface: bool, bounded: bool) -> H2Scan {
        let mut scan = fresh(preface);
        let isn = rng.next() as u32;
        let max_seg = match rng.below(4) {
            0 => 12,
            1 => 200,
            2 => 3000,
            _ => 70_000,
        };
        let mut end = 0;
        while end < stream.len() {
            let from = if rng.chance(15) {
                rng.range(0, end)
            } else {
                end
            };
            let to = stream.len().min(from + rng.range(1, max_seg));
            let seq = isn.wrapping_add(from as u32);
            if bounded {
                drive_bounded(&mut scan, seq, &stream[from..to]);
            } else {
                drive(&mut scan, seq, &stream[from..to], usize::MAX);
            }
            end = end.max(to);
        }
        scan
    }

    fn check(rng: &mut Rng, stream: &[u8], preface: bool, expected: Option<u64>) {
        let want = parse(stream, preface);
        if let Some(n) = expected {
            assert_eq!(want.requests, n);
            assert_eq!(want.reason, None);
        }
        let got = Outcome::of(&deliver(rng, stream, preface, false));
        assert_eq!(got, want);
        let bounded = Outcome::of(&deliver(rng, stream, preface, true));
        if bounded.reason == Some(H2Unparsable::Abandoned) {
            assert!(bounded.requests <= want.requests);
        } else {
            assert_eq!(bounded, want);
        }
    }

    #[test]
    fn random_streams_match_the_reference() {
        let mut rng = Rng(0x00c0_ffee_1234_5678);
        let mut total = 0;
        for i in 0..3000 {
            let preface = i % 4 != 3;
            let (s, expected) = random_stream(&mut rng, preface);
            total += expected;
            check(&mut rng, &s, preface, (expected > 0).then_some(expected));
        }
        assert!(total > 10_000, "the generator makes requests ({total})");
    }

    #[test]
    fn garbage_matches_the_reference_and_never_panics() {
        let mut rng = Rng(0xbad_5eed);
        let mut unparsable = 0;
        for i in 0..3000 {
            let preface = i % 2 == 0;
            let s: Vec<u8> = match i % 3 {
                // Random bytes.
                0 => (0..rng.range(0, 300)).map(|_| rng.byte()).collect(),
                // A valid start followed by random bytes.
                1 => {
                    let mut s = if preface { client(&[]) } else { server(&[]) };
                    s.extend((0..rng.range(0, 300)).map(|_| rng.byte()));
                    s
                }
                // A valid stream with a few bytes flipped, inserted or removed.
                _ => {
                    let (mut s, _) = random_stream(&mut rng, preface);
                    for _ in 0..rng.range(1, 4) {
                        if s.is_empty() {
                            break;
                        }
                        let at = rng.range(0, s.len() - 1);
                        match rng.below(3) {
                            0 => s[at] ^= 1 << rng.below(8),
                            1 => s.insert(at, rng.byte()),
                            _ => {
                                s.remove(at);
                            }
                        }
                    }
                    s
                }
            };
            check(&mut rng, &s, preface, None);
            unparsable += parse(&s, preface).reason.is_some() as u32;
        }
        assert!(unparsable > 1500, "garbage is mostly caught ({unparsable})");
    }

    #[test]
    fn arbitrary_states_and_calls_never_panic() {
        let mut rng = Rng(0xdead_beef);
        let mut buf = [0u8; WINDOW_LEN];
        for _ in 0..20_000 {
            let mut scan = H2Scan {
                requests: rng.below(1 << 40),
                hdr: rng.next(),
                want_seq: rng.next() as u32,
                max_stream: rng.next() as u32,
                cont_stream: if rng.chance(50) { 0 } else { rng.next() as u32 },
                frames: rng.next() as u32,
                got: rng.byte(),
                flags: rng.byte(),
                reason: if rng.chance(80) { 0 } else { rng.byte() },
                _pad: 0,
                seg_seq: rng.next() as u32,
            };
            for _ in 0..8 {
                let before = scan;
                for b in buf.iter_mut() {
                    *b = rng.byte();
                }
                let seg_len = rng.next() as u32 >> rng.below(32);
                match rng.below(3) {
                    0 => {
                        if let Some(off) = scan.begin_segment(rng.next() as u32, seg_len) {
                            assert!(off < seg_len);
                        }
                    }
                    1 => {
                        let at = scan.segment_offset();
                        let fed = scan.feed(&buf, seg_len);
                        assert!(fed.new_requests <= 1);
                        if let Some(next) = fed.next {
                            assert!(next > at && next < seg_len);
                        }
                    }
                    _ => {
                        scan.scan_segment(rng.next() as u32, seg_len, |_, b| {
                            b.fill(0x5a);
                            rng.chance(90)
                        });
                    }
                }
                assert!(scan.requests() >= before.requests());
                if !before.parsable() {
                    assert_eq!(scan, before, "an unparsable state never changes");
                }
            }
        }
    }
}
