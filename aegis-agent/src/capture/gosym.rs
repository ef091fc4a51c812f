//! Where Go's crypto/tls lives in a Go executable: the file offsets of `(*Conn).Write`,
//! `(*Conn).Read` and `(*Conn).Close`, of the first instruction after the stack check of the
//! first two, and of every RET instruction of `Read` (capture's Go probes go there instead
//! of on the return address: see `aegis-ebpf/src/go_tls.rs`).
//!
//! The functions are found through Go's own symbol table, the pclntab, which the runtime
//! needs for tracebacks and garbage collection and which therefore survives `go build
//! -ldflags='-s -w'` and `strip`: the ELF `.symtab` is not used. The table is the
//! `.gopclntab` section when the file has one, else it is found by its header (magic, then
//! the x86-64 quantum and pointer size) anywhere in the file and must parse as a whole.
//! Layout (Go 1.18 and later; `runtime/symtab.go`, `pcHeader`):
//! ```text
//! magic u32 (0xfffffff0: 1.18-1.19, 0xfffffff1: 1.20+), 0, 0, minLC u8 = 1, ptrSize u8 = 8,
//! nfunc, nfiles, textStart, funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset
//! functab (at pclnOffset): nfunc + 1 pairs (entryOff u32, funcOff u32), entries from textStart
//! _func (at pclnOffset + funcOff): entryOff u32, nameOff i32 (into funcnametab), ...
//! ```
//! Go 1.17 (the first with the register ABI) has the older layout (magic 0xfffffffa, shared
//! with 1.16, whose stack ABI the probes cannot read): its binaries are not probed.
//!
//! Every input byte is hostile: offsets are checked against the table and the file, and a
//! function whose machine code does not decode cleanly to its end is not probed (a probe
//! inside an instruction would corrupt the program).

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// The crypto/tls functions probed.
pub const WRITE: &str = "crypto/tls.(*Conn).Write";
pub const READ: &str = "crypto/tls.(*Conn).Read";
pub const CLOSE: &str = "crypto/tls.(*Conn).Close";

const MAGIC_118: u32 = 0xffff_fff0;
const MAGIC_120: u32 = 0xffff_fff1;
const MAGIC_116: u32 = 0xffff_fffa;
const HEADER_LEN: usize = 72;
/// Bytes of one function decoded at most (Read and Write are a few hundred bytes).
const MAX_FUNCTION_BYTES: u64 = 64 * 1024;
/// RET instructions of one function probed at most.
const MAX_RETURNS: usize = 16;
/// The section that marks a Go executable (`runtime/debug.ReadBuildInfo`), and its magic.
const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// A probed Go function: where it starts, where its body starts and where it returns, as
/// file offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoFunction {
    pub entry: u64,
    /// The first instruction after the stack check (`CMP SP, g.stackguard0; JBE more`):
    /// reached once per call, with the arguments still in their registers. The entry is
    /// reached again when the stack must grow (or the goroutine is asked to yield):
    /// `runtime.morestack` then jumps back to it, so a probe there can see one call twice.
    pub body: u64,
    pub returns: Vec<u64>,
}

/// What capture's Go probes need of one executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoTls {
    pub write: GoFunction,
    pub read: GoFunction,
    /// `(*Conn).Close`'s body, when the binary has it.
    pub close: Option<u64>,
}

/// Why a Go executable's crypto/tls cannot be probed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GoError {
    #[error("no Go symbol table (pclntab) found")]
    NoTable,
    #[error("Go symbol table of an unsupported layout (magic {0:#x}: Go older than 1.18, or not amd64)")]
    Unsupported(u32),
    #[error("malformed Go symbol table: {0}")]
    Malformed(&'static str),
    #[error("{0} is at a virtual address no loaded segment of the file holds")]
    NotInFile(&'static str),
    #[error("{0}: its machine code does not decode cleanly ({1}); not probed")]
    Undecodable(&'static str, String),
}

/// Whether `file` is a Go executable: it has Go's build information or symbol table
/// section, or (its section headers stripped) its build information's header at the start
/// of a 16-byte block (the magic anywhere else may be any program's string constant).
pub fn is_go(file: &object::File, data: &[u8]) -> bool {
    if file.section_by_name(".go.buildinfo").is_some() || file.section_by_name(".gopclntab").is_some() {
        return true;
    }
    file.sections().next().is_none() && memchr::memmem::find_iter(data, BUILDINFO_MAGIC).any(|at| at % 16 == 0)
}

/// crypto/tls in the Go executable `file` (whose bytes are `data`). Ok(None): a Go program
/// without crypto/tls's `Conn` (it makes no TLS connection).
pub fn find(file: &object::File, data: &[u8]) -> Result<Option<GoTls>, GoError> {
    let table = Pclntab::locate(file, data)?;
    let mut found: [Option<(u64, u64)>; 3] = [None; 3];
    for (i, name) in [WRITE, READ, CLOSE].into_iter().enumerate() {
        found[i] = table.function(name)?;
    }
    let [Some(write), Some(read), close] = found else {
        return Ok(None);
    };
    let write = function(file, data, WRITE, write)?;
    let read = function(file, data, READ, read)?;
    // Past its stack check too (a Close seen twice would end a reused `*Conn`'s new stream).
    let close = close.map(|range| function(file, data, CLOSE, range)).transpose()?.map(|f| f.body);
    Ok(Some(GoTls { write, read, close }))
}

/// A parsed pclntab header over the table's bytes.
struct Pclntab<'a> {
    table: &'a [u8],
    nfunc: usize,
    text_start: u64,
    funcnames: usize,
    pcln: usize,
}

impl<'a> Pclntab<'a> {
    fn locate(file: &object::File<'a>, data: &'a [u8]) -> Result<Self, GoError> {
        if let Some(section) = file.section_by_name(".gopclntab")
            && let Ok(bytes) = section.data()
        {
            return Self::parse(bytes, text_address(file));
        }
        // No section (stripped of its section headers, or a layout that names it otherwise):
        // the first header that parses as a whole. The magic sits on a pointer boundary.
        let mut unsupported = None;
        // After the magic's low byte: its three 0xff, two zero bytes, quantum 1, pointer size 8.
        for after in memchr::memmem::find_iter(data, b"\xff\xff\xff\x00\x00\x01\x08") {
            let Some(start) = after.checked_sub(1).filter(|s| s % 8 == 0) else {
                continue;
            };
            match Self::parse(&data[start..], text_address(file)) {
                Ok(t) => return Ok(t),
                Err(GoError::Unsupported(m)) if m == MAGIC_116 => unsupported = Some(m),
                Err(_) => {}
            }
        }
        Err(unsupported.map_or(GoError::NoTable, GoError::Unsupported))
    }

    fn parse(table: &'a [u8], text: Option<u64>) -> Result<Self, GoError> {
        let magic = read_u32(table, 0).ok_or(GoError::NoTable)?;
        if table.len() < HEADER_LEN || table[4] != 0 || table[5] != 0 {
            return Err(GoError::NoTable);
        }
        if !matches!(magic, MAGIC_118 | MAGIC_120) || table[6] != 1 || table[7] != 8 {
            return Err(if matches!(magic, MAGIC_116 | 0xffff_fffb) {
                GoError::Unsupported(magic)
            } else {
                GoError::NoTable
            });
        }
        let word = |i: usize| read_u64(table, 8 + 8 * i).ok_or(GoError::Malformed("short header"));
        let nfunc = usize::try_from(word(0)?).map_err(|_| GoError::Malformed("function count"))?;
        let mut text_start = word(2)?;
        let funcnames = usize::try_from(word(3)?).map_err(|_| GoError::Malformed("name table offset"))?;
        let pcln = usize::try_from(word(7)?).map_err(|_| GoError::Malformed("function table offset"))?;
        // Position-independent executables leave textStart to a relocation.
        if text_start == 0 {
            text_start = text.ok_or(GoError::Malformed("no text start"))?;
        }
        let functab_len =
            nfunc.checked_add(1).and_then(|n| n.checked_mul(8)).ok_or(GoError::Malformed("function count"))?;
        if funcnames >= table.len() || pcln.checked_add(functab_len).is_none_or(|end| end > table.len()) {
            return Err(GoError::Malformed("tables past the end"));
        }
        Ok(Self { table, nfunc, text_start, funcnames, pcln })
    }

    /// The virtual address range (start, end) of the function named `name`.
    fn function(&self, name: &str) -> Result<Option<(u64, u64)>, GoError> {
        for i in 0..self.nfunc {
            let at = self.pcln + 8 * i;
            let (Some(entry), Some(func), Some(next)) =
                (read_u32(self.table, at), read_u32(self.table, at + 4), read_u32(self.table, at + 8))
            else {
                return Err(GoError::Malformed("function table"));
            };
            let func = self.pcln + func as usize;
            let name_off = read_u32(self.table, func + 4).ok_or(GoError::Malformed("function record"))?;
            let Some(at) = self.funcnames.checked_add(name_off as usize) else { continue };
            let Some(rest) = self.table.get(at..) else {
                return Err(GoError::Malformed("function name past the end"));
            };
            if rest.len() > name.len() && rest.starts_with(name.as_bytes()) && rest[name.len()] == 0 {
                if next <= entry {
                    return Err(GoError::Malformed("function table out of order"));
                }
                return Ok(Some((self.text_start + u64::from(entry), self.text_start + u64::from(next))));
            }
        }
        Ok(None)
    }
}

/// The `.text` section's address, for tables that leave their text start to a relocation.
fn text_address(file: &object::File) -> Option<u64> {
    file.section_by_name(".text").map(|s| s.address())
}

/// The function `name` at virtual addresses `start..end`: its entry and RET instructions as
/// file offsets, found by decoding it from its entry to its end (Go pads between functions
/// with INT3, which decodes).
fn function(
    file: &object::File,
    data: &[u8],
    name: &'static str,
    (start, end): (u64, u64),
) -> Result<GoFunction, GoError> {
    let entry = file_offset(file, start).ok_or(GoError::NotInFile(name))?;
    let len = (end - start).min(MAX_FUNCTION_BYTES);
    let code = usize::try_from(entry)
        .ok()
        .and_then(|e| data.get(e..e.checked_add(len as usize)?))
        .ok_or(GoError::NotInFile(name))?;
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    let mut returns = Vec::new();
    let mut body = None;
    for (i, instruction) in (&mut decoder).into_iter().enumerate() {
        if instruction.code() == Code::INVALID {
            return Err(GoError::Undecodable(name, format!("invalid instruction at {:#x}", instruction.ip())));
        }
        // The prologue: at most `LEA R12, [SP-n]` and `CMP`, which leave the argument
        // registers alone, then the conditional jump to the stack growth path.
        if body.is_none() {
            match instruction.mnemonic() {
                Mnemonic::Lea | Mnemonic::Cmp if i < 2 => {}
                Mnemonic::Jbe if i < 3 => body = Some(entry + (instruction.next_ip() - start)),
                _ => return Err(GoError::Undecodable(name, "no stack check at its entry".into())),
            }
        }
        if instruction.mnemonic() == Mnemonic::Ret {
            if returns.len() == MAX_RETURNS {
                return Err(GoError::Undecodable(name, format!("more than {MAX_RETURNS} returns")));
            }
            returns.push(entry + (instruction.ip() - start));
        }
    }
    let Some(body) = body.filter(|_| !returns.is_empty()) else {
        return Err(GoError::Undecodable(name, "no RET instruction".into()));
    };
    Ok(GoFunction { entry, body, returns })
}

/// The file offset of virtual address `address`, in the executable segment that loads it.
fn file_offset(file: &object::File, address: u64) -> Option<u64> {
    file.segments().find_map(|s| {
        let (offset, size) = s.file_range();
        let within = address.checked_sub(s.address())?;
        (within < size).then(|| offset + within)
    })
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command};

    use super::*;

    /// A small Go program that makes a TLS connection, built here with Debian's golang
    /// (`golang-go`), plain and stripped (`-s -w`).
    fn build_go(dir: &Path, stripped: bool) -> Vec<u8> {
        let src = dir.join("main.go");
        std::fs::write(
            &src,
            "package main\nimport (\"crypto/tls\"; \"os\")\nfunc main() {\n\
             c, err := tls.Dial(\"tcp\", \"127.0.0.1:1\", &tls.Config{})\n\
             if err == nil { c.Write([]byte(\"x\")); b := make([]byte, 1); c.Read(b); c.Close() }\nos.Exit(0)\n}\n",
        )
        .unwrap();
        let out = dir.join(if stripped { "stripped" } else { "plain" });
        let mut cmd = Command::new("go");
        cmd.arg("build").arg("-o").arg(&out);
        if stripped {
            cmd.arg("-ldflags=-s -w");
        }
        let status = cmd
            .arg(&src)
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOCACHE", dir.join("cache"))
            .status()
            .expect("go is installed (apt-get install golang-go; cargo xtask setup installs it)");
        assert!(status.success(), "go build failed");
        std::fs::read(out).unwrap()
    }

    #[test]
    fn go_binaries_plain_and_stripped_give_the_same_functions() {
        let dir = std::env::temp_dir().join(format!("aegis-gosym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = build_go(&dir, false);
        let stripped = build_go(&dir, true);
        let parse = |data: &[u8]| {
            let file = object::File::parse(data).unwrap();
            assert!(is_go(&file, data));
            find(&file, data).unwrap().expect("crypto/tls is linked in")
        };
        let a = parse(&plain);
        let b = parse(&stripped);
        for f in [&a.write, &a.read, &b.write, &b.read] {
            assert!(!f.returns.is_empty() && f.returns.iter().all(|r| *r > f.body), "{f:?}");
            // The body follows the stack check's JBE (0F 86 rel32, or 76 rel8).
            let (entry, body) = (f.entry as usize, f.body as usize);
            assert!(body > entry && body - entry <= 16, "{f:?}");
            assert!(plain[body - 6..body - 4] == [0x0f, 0x86] || plain[body - 2] == 0x76, "{f:?}");
        }
        // The same code in both; stripping moves no function (only symbols are left out).
        assert_eq!(a, b);
        let file = object::File::parse(&*stripped).unwrap();
        assert!(file.section_by_name(".symtab").is_none(), "-s -w leaves no ELF symbol table");
        // Every offset found is a RET (C3, or C2 with a pop count).
        for r in a.write.returns.iter().chain(&a.read.returns) {
            assert!(matches!(plain[*r as usize], 0xc3 | 0xc2), "{r:#x}");
        }
        // Without the section the header is found by its magic.
        let mut anon = stripped.clone();
        let section = file.section_by_name(".gopclntab").unwrap();
        let (off, _) = section.file_range().unwrap();
        let name_off = {
            // Rename the section (".gopclntab" -> ".xopclntab") in the section name table.
            let at = memchr::memmem::find(&anon, b".gopclntab\0").unwrap();
            anon[at + 1] = b'x';
            at
        };
        let file = object::File::parse(&*anon).unwrap();
        assert!(file.section_by_name(".gopclntab").is_none(), "{name_off} {off}");
        assert_eq!(find(&file, &anon).unwrap(), Some(a.clone()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_program_holding_go_magic_strings_is_not_go() {
        // This test program holds BUILDINFO_MAGIC and the pclntab header bytes as constants.
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let file = object::File::parse(&*data).unwrap();
        assert!(!is_go(&file, &data));
    }

    #[test]
    fn hostile_tables_are_refused_not_followed() {
        // A header claiming more functions than its bytes hold.
        let mut t = vec![0u8; HEADER_LEN + 16];
        t[..4].copy_from_slice(&MAGIC_118.to_le_bytes());
        t[6] = 1;
        t[7] = 8;
        t[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Pclntab::parse(&t, Some(0x401000)), Err(GoError::Malformed(_))));
        t[8..16].copy_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(Pclntab::parse(&t, Some(0x401000)), Err(GoError::Malformed(_))));
        // Go 1.16/1.17 layout: said so.
        t[..4].copy_from_slice(&MAGIC_116.to_le_bytes());
        assert_eq!(Pclntab::parse(&t, None).err(), Some(GoError::Unsupported(MAGIC_116)));
        // A function record pointing past the table.
        let mut t = vec![0u8; HEADER_LEN + 16];
        t[..4].copy_from_slice(&MAGIC_120.to_le_bytes());
        t[6] = 1;
        t[7] = 8;
        t[8..16].copy_from_slice(&1u64.to_le_bytes());
        t[24..32].copy_from_slice(&0x401000u64.to_le_bytes());
        t[32..40].copy_from_slice(&8u64.to_le_bytes());
        t[64..72].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
        t[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        let table = Pclntab::parse(&t, None).unwrap();
        assert!(matches!(table.function(WRITE), Err(GoError::Malformed(_))));
    }
}
