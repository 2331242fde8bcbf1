//! Differential fuzzing of the HTTP/2 scanner: for any byte stream and any segmentation (in order,
//! with retransmissions and overlaps, never a gap), scanning segment by segment must end exactly
//! where the whole-stream reference parser ends: same request count, same frame count, same
//! verdict. With the per-packet budget (`scan_segment`) it may instead give up (`Abandoned`), but
//! never count more.
//!
//! Input: byte 0 = mode, bytes 1..9 = segmentation seed, the rest = body.
//! * mode bit 0: the direction has no preface (server → client);
//! * mode bit 1: prepend a valid start (preface and SETTINGS), to get past the first checks;
//! * mode bit 2: the body is a list of 6-byte frame specs (type, flags, stream id byte, reserved
//!   bit + length high, length low, payload filler) instead of raw bytes.
#![no_main]

use fanout_common::h2::{
    H2Scan, H2Unparsable, PREFACE,
    reference::{Outcome, drive, drive_bounded, parse},
};
use libfuzzer_sys::fuzz_target;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn build(mode: u8, body: &[u8]) -> Vec<u8> {
    let preface = mode & 1 == 0;
    let mut s = Vec::new();
    if mode & 2 != 0 {
        if preface {
            s.extend_from_slice(&PREFACE);
        }
        s.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
    }
    if mode & 4 == 0 {
        s.extend_from_slice(body);
        return s;
    }
    for spec in body.chunks_exact(6) {
        let len = (((spec[3] & 0x3f) as usize) << 8) | spec[4] as usize;
        let stream = (spec[2] as u32) | if spec[3] & 0x80 != 0 { 0x8000_0000 } else { 0 };
        s.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        s.push(spec[0] % 12); // mostly known types, sometimes unknown ones
        s.push(spec[1]);
        s.extend_from_slice(&stream.to_be_bytes());
        s.extend(std::iter::repeat_n(spec[5], len));
    }
    s
}

fn deliver(stream: &[u8], preface: bool, rng: &mut Rng, bounded: bool) -> Outcome {
    let mut scan = if preface {
        H2Scan::new()
    } else {
        H2Scan::new_without_preface()
    };
    let isn = rng.next() as u32;
    let max_seg = [3u64, 12, 100, 1500, 70_000][rng.below(5) as usize];
    let mut end = 0usize;
    while end < stream.len() {
        let from = if rng.below(100) < 15 {
            rng.below(end as u64 + 1) as usize
        } else {
            end
        };
        let to = stream.len().min(from + 1 + rng.below(max_seg) as usize);
        let seq = isn.wrapping_add(from as u32);
        if bounded {
            drive_bounded(&mut scan, seq, &stream[from..to]);
        } else {
            drive(&mut scan, seq, &stream[from..to], usize::MAX);
        }
        end = end.max(to);
    }
    Outcome::of(&scan)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((seed, body)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let preface = mode & 1 == 0;
    let stream = build(mode, body);
    let want = parse(&stream, preface);
    let mut rng = Rng(u64::from_le_bytes(*seed) | 1);

    let got = deliver(&stream, preface, &mut rng, false);
    assert_eq!(got, want, "unbounded scan differs from the reference");

    let bounded = deliver(&stream, preface, &mut rng, true);
    if bounded.reason == Some(H2Unparsable::Abandoned) {
        assert!(bounded.requests <= want.requests, "{bounded:?} vs {want:?}");
    } else {
        assert_eq!(bounded, want, "bounded scan differs from the reference");
    }
});
