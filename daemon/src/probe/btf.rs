//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to resolve the byte
//! offset of a struct member path such as `sock.__sk_common.skc_net.net`, looking through
//! anonymous unions and structs, typedefs and qualifiers on the way.
//!
//! Rust eBPF programs get no CO-RE relocations, so these offsets are resolved here at load time
//! and handed to the programs as globals.

use std::path::Path;

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
const TYPE_HEADER: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF from {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("BTF has no struct named `{0}`")]
    NoStruct(String),
    #[error("BTF struct `{strukt}` has no member `{member}` (resolving `{path}`)")]
    NoMember {
        strukt: String,
        member: String,
        path: String,
    },
    #[error("BTF member path `{0}` is not byte aligned (bitfield?)")]
    Bitfield(String),
}

/// Parsed view over a BTF blob. Types are decoded on demand from the owned bytes.
pub struct Btf {
    data: Vec<u8>,
    strings_start: usize,
    strings_len: usize,
    /// Byte position (relative to the blob) of each type; index 0 is type id 1.
    type_pos: Vec<usize>,
}

#[derive(Clone, Copy)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = |m: &str| BtfError::Malformed(m.to_string());
        if data.len() < HEADER_MIN {
            return Err(bad("shorter than its header"));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != BTF_MAGIC {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let u32_at = |pos: usize| -> u32 {
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]])
        };
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        if hdr_len < HEADER_MIN {
            return Err(bad("header length too small"));
        }
        let types_start = hdr_len
            .checked_add(type_off)
            .ok_or_else(|| bad("type section offset overflows"))?;
        let types_end = types_start
            .checked_add(type_len)
            .ok_or_else(|| bad("type section length overflows"))?;
        let strings_start = hdr_len
            .checked_add(str_off)
            .ok_or_else(|| bad("string section offset overflows"))?;
        let strings_end = strings_start
            .checked_add(str_len)
            .ok_or_else(|| bad("string section length overflows"))?;
        if types_end > data.len() || strings_end > data.len() {
            return Err(bad("section runs past the end of the data"));
        }

        let mut btf = Btf {
            data,
            strings_start,
            strings_len: str_len,
            type_pos: Vec::new(),
        };
        let mut pos = types_start;
        while pos < types_end {
            if pos + TYPE_HEADER > types_end {
                return Err(bad("truncated type header"));
            }
            let th = btf.header_at(pos);
            let extra = match th.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * th.vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * th.vlen as usize,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                other => return Err(BtfError::Malformed(format!("unknown type kind {other}"))),
            };
            btf.type_pos.push(pos);
            pos += TYPE_HEADER + extra;
        }
        if pos != types_end {
            return Err(bad("last type runs past the type section"));
        }
        Ok(btf)
    }

    fn u32_at(&self, pos: usize) -> u32 {
        let b = &self.data[pos..pos + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn header_at(&self, pos: usize) -> TypeHeader {
        let info = self.u32_at(pos + 4);
        TypeHeader {
            name_off: self.u32_at(pos),
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(pos + 8),
        }
    }

    fn header(&self, id: u32) -> Option<(usize, TypeHeader)> {
        let idx = (id as usize).checked_sub(1)?;
        let pos = *self.type_pos.get(idx)?;
        Some((pos, self.header_at(pos)))
    }

    fn name(&self, off: u32) -> &str {
        let off = off as usize;
        if off >= self.strings_len {
            return "";
        }
        let start = self.strings_start + off;
        let end = self.strings_start + self.strings_len;
        let bytes = &self.data[start..end];
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.header(id) {
                Some((
                    _,
                    TypeHeader {
                        kind:
                            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG,
                        size_or_type,
                        ..
                    },
                )) => id = size_or_type,
                _ => return id,
            }
        }
        id
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        (1..=self.type_pos.len() as u32).find(|&id| {
            self.header(id).is_some_and(|(_, th)| {
                matches!(th.kind, KIND_STRUCT | KIND_UNION)
                    && th.vlen > 0
                    && self.name(th.name_off) == name
            })
        })
    }

    /// Searches `member` in struct/union `id`, descending into anonymous members.
    /// Returns (bit offset, member type id).
    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let (pos, th) = self.header(self.resolve(id))?;
        if !matches!(th.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for i in 0..th.vlen as usize {
            let m = pos + TYPE_HEADER + 12 * i;
            let (name_off, type_id, raw_off) =
                (self.u32_at(m), self.u32_at(m + 4), self.u32_at(m + 8));
            let bit_off = if th.kind_flag {
                raw_off & 0x00ff_ffff
            } else {
                raw_off
            };
            let name = self.name(name_off);
            if name == member {
                return Some((bit_off, type_id));
            }
            if name.is_empty()
                && let Some((inner, ty)) = self.find_member(type_id, member, depth + 1)
            {
                return Some((bit_off + inner, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (dot-separated members) inside struct `strukt`.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = self
            .struct_id(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let mut current = strukt.to_string();
        let mut bits: u32 = 0;
        for member in path.split('.') {
            let (off, ty) = self
                .find_member(id, member, 0)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: current.clone(),
                    member: member.to_string(),
                    path: format!("{strukt}.{path}"),
                })?;
            bits += off;
            id = self.resolve(ty);
            current = self
                .header(id)
                .map(|(_, th)| self.name(th.name_off).to_string())
                .unwrap_or_default();
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield(format!("{strukt}.{path}")));
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a BTF blob from (name, kind, vlen, kind_flag, size_or_type, extra words).
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        pub(crate) fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn word(&mut self, w: u32) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, st: u32) {
            let n = self.str(name);
            self.word(n);
            self.word((kind << 24) | vlen | if kflag { 1 << 31 } else { 0 });
            self.word(st);
        }
        pub(crate) fn int(&mut self, name: &str, size: u32) {
            self.ty(name, KIND_INT, 0, false, size);
            self.word(size * 8);
        }
        pub(crate) fn ptr(&mut self, to: u32) {
            self.ty("", KIND_PTR, 0, false, to);
        }
        pub(crate) fn typedef(&mut self, name: &str, to: u32) {
            self.ty(name, KIND_TYPEDEF, 0, false, to);
        }
        /// members: (name, type id, bit offset)
        pub(crate) fn strukt(
            &mut self,
            name: &str,
            union: bool,
            size: u32,
            members: &[(&str, u32, u32)],
        ) {
            let kind = if union { KIND_UNION } else { KIND_STRUCT };
            self.ty(name, kind, members.len() as u32, false, size);
            for (n, t, off) in members {
                let n = self.str(n);
                self.word(n);
                self.word(*t);
                self.word(*off);
            }
        }
        pub(crate) fn finish(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.push(1);
            out.push(0);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Btf {
        let mut b = Builder::new();
        b.int("int", 4); // 1
        b.ptr(1); // 2
        b.typedef("possible_net_t_inner", 2); // 3
        b.strukt("possible_net_t", false, 8, &[("net", 3, 0)]); // 4
        // anonymous union holding skc_net at bit 64 inside it
        b.strukt("", true, 16, &[("skc_net", 4, 64), ("other", 1, 0)]); // 5
        b.strukt(
            "sock_common",
            false,
            32,
            &[("skc_family", 1, 0), ("", 5, 64)],
        ); // 6
        b.strukt(
            "sock",
            false,
            64,
            &[("__sk_common", 6, 0), ("sk_flag", 1, 260)],
        ); // 7
        Btf::parse(b.finish()).expect("sample BTF parses")
    }

    #[test]
    fn resolves_nested_anonymous_members() {
        let btf = sample();
        // __sk_common at 0, anonymous union at 64 bits, skc_net at 64 bits inside it: 16 bytes.
        assert_eq!(
            btf.member_offset("sock", "__sk_common.skc_net.net")
                .unwrap(),
            16
        );
        assert_eq!(btf.member_offset("sock_common", "skc_family").unwrap(), 0);
    }

    #[test]
    fn reports_missing_struct_member_and_bitfields() {
        let btf = sample();
        assert!(matches!(
            btf.member_offset("nope", "x"),
            Err(BtfError::NoStruct(_))
        ));
        let err = btf
            .member_offset("sock", "__sk_common.missing")
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(matches!(
            btf.member_offset("sock", "sk_flag"),
            Err(BtfError::Bitfield(_))
        ));
    }

    #[test]
    fn rejects_malformed_blobs() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        let mut blob = sample().data;
        blob[0] = 0;
        assert!(Btf::parse(blob).is_err());
        // Truncated type section: header claims more types than there are bytes.
        let mut blob = sample().data;
        blob.truncate(40);
        assert!(Btf::parse(blob).is_err());
        // Arbitrary garbage after a valid header never panics.
        for len in 24..200 {
            let mut blob = sample().data;
            blob.truncate(len);
            let _ = Btf::parse(blob);
        }
    }

    #[test]
    fn running_kernel_offsets_resolve() {
        // /sys/kernel/btf/vmlinux is world readable; no root needed.
        let btf = Btf::from_file(Path::new("/sys/kernel/btf/vmlinux"))
            .expect("this machine has BTF at /sys/kernel/btf/vmlinux");
        let sk_net = btf
            .member_offset("sock", "__sk_common.skc_net.net")
            .unwrap();
        assert!(sk_net > 0 && sk_net < 256, "{sk_net}");
        assert!(btf.member_offset("net", "ns.inum").is_ok());
        assert!(btf.member_offset("task_struct", "files").is_ok());
        assert_eq!(btf.member_offset("socket", "state").unwrap(), 0);
    }
}
