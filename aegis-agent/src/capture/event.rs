//! Decoding ring-buffer records into [`TlsEvent`]s. The bytes come from our own eBPF
//! program, but a short or unknown record is still counted and skipped, not trusted.

use aegis_common::{Direction, HEADER_LEN, TlsChunkHeader, TlsHook};
use bytes::Bytes;

/// A connection: process and library-level connection object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub conn: u64,
}

/// One ring-buffer record, decoded.
#[derive(Clone, Debug)]
pub struct TlsEvent {
    pub key: ConnKey,
    pub tid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    /// Index of the probed file (attach cookie).
    pub source: u64,
    pub timestamp_ns: u64,
    pub hook: TlsHook,
    pub direction: Direction,
    /// Bytes the library call moved, and where this chunk sits in it.
    pub call_len: u32,
    pub offset: u32,
    /// Where the call starts in the connection's stream for this direction
    /// ([`TlsChunkHeader::stream_pos`]); for `SSL_free`, the bytes sent in all.
    pub stream_pos: u64,
    /// Bytes the other direction had moved by then ([`TlsChunkHeader::peer_pos`]); for
    /// `SSL_free`, the bytes received in all.
    pub peer_pos: u64,
    /// The call's turn on its connection ([`TlsChunkHeader::turn`]).
    pub turn: u64,
    pub comm: [u8; 16],
    /// Plaintext; shorter than `call_len - offset` when the call was split or capped.
    pub data: Bytes,
    /// The kernel could not read this chunk's bytes (`data` is empty, `missing` says how many).
    pub missing: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Short(usize),
    UnknownHook(u8),
    LengthMismatch { declared: u32, present: usize },
}

impl TlsEvent {
    pub fn decode(record: &[u8]) -> Result<Self, DecodeError> {
        if record.len() < HEADER_LEN {
            return Err(DecodeError::Short(record.len()));
        }
        // SAFETY: the record holds at least HEADER_LEN bytes written from a
        // TlsChunkHeader; read_unaligned copes with the ring's 8-byte alignment.
        let h: TlsChunkHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let hook = TlsHook::from_u8(h.hook).ok_or(DecodeError::UnknownHook(h.hook))?;
        let direction = if h.direction == Direction::Ingress as u8 { Direction::Ingress } else { Direction::Egress };
        let payload = &record[HEADER_LEN..];
        if payload.len() < h.data_len as usize {
            return Err(DecodeError::LengthMismatch { declared: h.data_len, present: payload.len() });
        }
        let data = Bytes::copy_from_slice(&payload[..h.data_len as usize]);
        let chunk_expected = h.call_len.saturating_sub(h.offset).min(aegis_common::CHUNK_DATA_MAX as u32);
        let missing = if hook != TlsHook::SslFree && h.data_len == 0 { chunk_expected } else { 0 };
        Ok(Self {
            key: ConnKey { tgid: (h.pid_tgid >> 32) as u32, conn: h.conn },
            tid: h.pid_tgid as u32,
            uid: h.uid_gid as u32,
            cgroup_id: h.cgroup_id,
            source: h.source,
            timestamp_ns: h.timestamp_ns,
            hook,
            direction,
            call_len: h.call_len,
            offset: h.offset,
            stream_pos: h.stream_pos,
            peer_pos: h.peer_pos,
            turn: h.turn,
            comm: h.comm,
            data,
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[u8], hook: u8) -> Vec<u8> {
        let h = TlsChunkHeader {
            timestamp_ns: 5,
            conn: 0xabc,
            pid_tgid: (42u64 << 32) | 43,
            uid_gid: 1000,
            cgroup_id: 7,
            source: 1,
            call_len: data.len() as u32,
            offset: 0,
            data_len: data.len() as u32,
            direction: 1,
            hook,
            _pad: [0; 2],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            stream_pos: 77,
            peer_pos: 12,
            turn: 3,
        };
        let mut v = vec![0u8; HEADER_LEN];
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), h) };
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn decodes_a_record() {
        let e = TlsEvent::decode(&record(b"hello", 3)).unwrap();
        assert_eq!(e.key, ConnKey { tgid: 42, conn: 0xabc });
        assert_eq!(e.tid, 43);
        assert_eq!(e.uid, 1000);
        assert_eq!(e.hook, TlsHook::SslReadEx);
        assert_eq!(e.direction, Direction::Ingress);
        assert_eq!(&e.data[..], b"hello");
        assert_eq!(&e.comm[..5], b"curl\0");
        assert_eq!(e.missing, 0);
        assert_eq!((e.stream_pos, e.peer_pos, e.turn), (77, 12, 3));
    }

    #[test]
    fn rejects_short_and_inconsistent_records() {
        assert_eq!(TlsEvent::decode(&[0u8; 3]).unwrap_err(), DecodeError::Short(3));
        let mut r = record(b"hello", 0);
        r.truncate(HEADER_LEN + 2);
        assert!(matches!(TlsEvent::decode(&r), Err(DecodeError::LengthMismatch { .. })));
        assert_eq!(TlsEvent::decode(&record(b"x", 9)).unwrap_err(), DecodeError::UnknownHook(9));
    }
}
