//! Just enough of a BTF reader for what the agent asks of the running kernel's
//! `/sys/kernel/btf/vmlinux`: struct member offsets, so the connect programs can follow
//! `task->mm->exe_file->f_inode` on this kernel's layout (no CO-RE in Rust eBPF here), and
//! whether a kernel function (a kfunc such as `bpf_sock_destroy`) exists.
//!
//! Format: include/uapi/linux/btf.h (header, then type records, then strings).

use anyhow::{Context as _, bail, ensure};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy)]
struct TypeRec {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    /// Offset of the record's trailing data (members etc.) in `types`.
    extra: usize,
}

impl TypeRec {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

pub struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// Index = type id (0 is void and has no record).
    recs: Vec<TypeRec>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Btf({} types)", self.recs.len())
    }
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let bytes = b.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes(bytes.try_into()?))
}

impl Btf {
    pub fn parse(data: &[u8]) -> anyhow::Result<Self> {
        ensure!(data.len() >= 24, "BTF too short");
        ensure!(u16::from_le_bytes([data[0], data[1]]) == BTF_MAGIC, "not little-endian BTF");
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?
            .to_vec();
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();
        let mut recs = vec![TypeRec { name_off: 0, info: 0, size_or_type: 0, extra: 0 }];
        let mut pos = 0;
        while pos < types.len() {
            let rec = TypeRec {
                name_off: u32_at(&types, pos)?,
                info: u32_at(&types, pos + 4)?,
                size_or_type: u32_at(&types, pos + 8)?,
                extra: pos + 12,
            };
            let trailing = match rec.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * rec.vlen(),
                KIND_ENUM | KIND_FUNC_PROTO => 8 * rec.vlen(),
                0..=19 => 0,
                k => bail!("unknown BTF kind {k}"),
            };
            pos = rec.extra + trailing;
            recs.push(rec);
        }
        Ok(Self { types, strings, recs })
    }

    pub fn from_sys() -> anyhow::Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        Self::parse(&std::fs::read(path).with_context(|| format!("cannot read {path}"))?)
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&TypeRec> {
        for _ in 0..32 {
            let rec = self.recs.get(id as usize)?;
            match rec.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = rec.size_or_type,
                _ => return Some(rec),
            }
        }
        None
    }

    /// Whether the kernel has a function `name` (kfuncs are described as BTF functions).
    pub fn has_func(&self, name: &str) -> bool {
        self.recs.iter().any(|r| r.kind() == KIND_FUNC && self.name(r.name_off) == name.as_bytes())
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u64> {
        let rec = self
            .recs
            .iter()
            .find(|r| r.kind() == KIND_STRUCT && r.vlen() > 0 && self.name(r.name_off) == name.as_bytes())
            .with_context(|| format!("struct {name} not in the kernel's BTF"))?;
        let bits = self
            .find_member(rec, member.as_bytes(), 0)
            .with_context(|| format!("struct {name} has no member {member}"))?;
        ensure!(bits % 8 == 0, "{name}.{member} is a bitfield");
        Ok(bits / 8)
    }

    fn find_member(&self, rec: &TypeRec, member: &[u8], depth: u32) -> Option<u64> {
        if depth > 8 {
            return None;
        }
        for i in 0..rec.vlen() {
            let at = rec.extra + 12 * i;
            let name_off = u32_at(&self.types, at).ok()?;
            let ty = u32_at(&self.types, at + 4).ok()?;
            let raw = u32_at(&self.types, at + 8).ok()?;
            let offset = u64::from(if rec.kind_flag() { raw & 0xff_ffff } else { raw });
            if name_off != 0 {
                if self.name(name_off) == member {
                    return Some(offset);
                }
                continue;
            }
            // An anonymous struct or union: its members are members of this one.
            if let Some(inner) = self.resolve(ty)
                && matches!(inner.kind(), KIND_STRUCT | KIND_UNION)
                && let Some(found) = self.find_member(inner, member, depth + 1)
            {
                return Some(offset + found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_offsets_and_functions_are_found() {
        let btf = Btf::from_sys().expect("this kernel has BTF");
        // Nested anonymous members are found (mm_struct keeps everything in one).
        let off = btf.member_offset("mm_struct", "exe_file").unwrap();
        assert!(off > 0 && off < 8192, "{off}");
        assert!(btf.member_offset("task_struct", "no_such_member").is_err());
        assert!(btf.has_func("tcp_sendmsg"));
        assert!(!btf.has_func("no_such_kernel_function"));
    }
}
