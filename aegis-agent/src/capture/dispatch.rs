//! Which worker reads a connection's events.
//!
//! A connection's state (its reassembly, its parser, the call under way) lives in one
//! worker, so all of a connection's events must go to the same one. Hashing the connection
//! does that, but a few busy connections hash unevenly: four connections on two workers
//! split three to one (or four to none) five times in eight, that worker alone then sets
//! the pace of the whole pipeline, and the ring fills (`cargo xtask bench capture`'s loop,
//! 8 s runs: 41 000 to 93 000 events dropped, all counted).
//!
//! So a connection seen from its first byte (both directions at position 0, the first
//! chunk of its first call) goes to the worker holding the fewest connections, and stays
//! there until its `SSL_free`. A connection first seen past its start (the agent started
//! after it did) is hashed, as before: its first event may not be the first one this
//! reader saw of it, and a changed mind would split it between two workers. The table is
//! bounded ([`MAX_ASSIGNED`]; past it new connections are hashed too), and connections of
//! processes that have exited are forgotten ([`Dispatch::forget_exited`]): Go's and
//! GnuTLS's probes see no `SSL_free`.
//!
//! This balances connections, not work: two connections doing unequal work can still
//! leave one worker busier (in the bench's loop, the worker holding both client ends
//! scores every prompt and the one holding both server ends finds them in the
//! classifier's cache, and the ring still filled in one run of four).

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
};

use aegis_common::TlsHook;

use super::event::{ConnKey, TlsEvent};

/// Connections assigned to a worker, at most.
pub const MAX_ASSIGNED: usize = 65_536;

pub struct Dispatch {
    hasher: RandomState,
    assigned: HashMap<ConnKey, usize>,
    /// Connections assigned to each worker.
    load: Vec<usize>,
}

impl Dispatch {
    pub fn new(workers: usize) -> Self {
        assert!(workers > 0, "at least one worker");
        Self { hasher: RandomState::new(), assigned: HashMap::new(), load: vec![0; workers] }
    }

    /// The worker for `ev` (see the module doc).
    pub fn worker(&mut self, ev: &TlsEvent) -> usize {
        let w = match self.assigned.get(&ev.key) {
            Some(&w) => w,
            None if is_first(ev) && self.assigned.len() < MAX_ASSIGNED => {
                let w = (0..self.load.len()).min_by_key(|&w| self.load[w]).unwrap_or(0);
                self.assigned.insert(ev.key, w);
                self.load[w] += 1;
                w
            }
            None => (self.hasher.hash_one(ev.key) % self.load.len() as u64) as usize,
        };
        if ev.hook == TlsHook::SslFree {
            self.forget(&ev.key);
        }
        w
    }

    /// Forget the connections of processes that are gone (their `SSL_free` was not seen).
    pub fn forget_exited(&mut self, alive: impl Fn(u32) -> bool) {
        let tgids: HashSet<u32> = self.assigned.keys().map(|k| k.tgid).collect();
        let gone: HashSet<u32> = tgids.into_iter().filter(|&t| !alive(t)).collect();
        if gone.is_empty() {
            return;
        }
        let keys: Vec<ConnKey> = self.assigned.keys().filter(|k| gone.contains(&k.tgid)).copied().collect();
        for key in keys {
            self.forget(&key);
        }
    }

    /// Connections assigned now.
    pub fn assigned(&self) -> usize {
        self.assigned.len()
    }

    fn forget(&mut self, key: &ConnKey) {
        if let Some(w) = self.assigned.remove(key) {
            self.load[w] -= 1;
        }
    }
}

/// The first chunk of a connection's first call: nothing moved before it either way.
fn is_first(ev: &TlsEvent) -> bool {
    ev.hook != TlsHook::SslFree && ev.stream_pos == 0 && ev.peer_pos == 0 && ev.offset == 0
}

/// A process is alive while `/proc/<tgid>` is there.
pub fn process_alive(tgid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}")).exists()
}

#[cfg(test)]
mod tests {
    use aegis_common::Direction;

    use super::*;

    fn ev(tgid: u32, conn: u64, hook: TlsHook, stream_pos: u64, peer_pos: u64) -> TlsEvent {
        TlsEvent {
            key: ConnKey { tgid, conn },
            tid: tgid,
            uid: 0,
            cgroup_id: 1,
            source: 0,
            timestamp_ns: 1,
            hook,
            direction: if hook == TlsHook::SslRead { Direction::Ingress } else { Direction::Egress },
            call_len: 10,
            offset: 0,
            stream_pos,
            peer_pos,
            turn: 0,
            comm: [0; 16],
            data: bytes::Bytes::from_static(b"0123456789"),
            missing: 0,
        }
    }

    /// Four connections seen from their start spread two and two, whatever their keys;
    /// each keeps its worker for all its events; `SSL_free` and exited processes free
    /// their places, which the next new connection takes.
    #[test]
    fn new_connections_go_to_the_least_loaded_worker_and_stay_there() {
        let mut d = Dispatch::new(2);
        let first: Vec<usize> = (0..4).map(|c| d.worker(&ev(10 + c as u32 % 2, c, TlsHook::SslWrite, 0, 0))).collect();
        assert_eq!(first, [0, 1, 0, 1]);
        for round in 1..50u64 {
            for c in 0..4u64 {
                let read = ev(10 + c as u32 % 2, c, TlsHook::SslRead, round * 100, round * 10);
                assert_eq!(d.worker(&read), first[c as usize], "connection {c}, round {round}");
            }
        }
        // Connection 1 ends: its free goes to its worker, and the next new one takes its place.
        assert_eq!(d.worker(&ev(11, 1, TlsHook::SslFree, 5000, 500)), 1);
        assert_eq!((d.assigned(), d.load.clone()), (3, vec![2, 1]));
        assert_eq!(d.worker(&ev(12, 99, TlsHook::SslWrite, 0, 0)), 1);
        // Process 10 exits without a free (Go): its connections 0 and 2 are forgotten.
        d.forget_exited(|tgid| tgid != 10);
        assert_eq!((d.assigned(), d.load.clone()), (2, vec![0, 2]));
        assert_eq!(d.worker(&ev(13, 5, TlsHook::SslWrite, 0, 0)), 0);
    }

    /// A connection first seen past its start is hashed, the same way for each of its
    /// events, and not counted; so is every new one once the table is full.
    #[test]
    fn connections_seen_midway_and_past_the_bound_are_hashed() {
        let mut d = Dispatch::new(4);
        let mid = ev(20, 1, TlsHook::SslRead, 4096, 512);
        let w = d.worker(&mid);
        for pos in 1..20 {
            assert_eq!(d.worker(&ev(20, 1, TlsHook::SslWrite, 4096 + pos, 512)), w);
        }
        // Even its next event at position 0 of one direction (the other has moved).
        assert_eq!(d.worker(&ev(20, 1, TlsHook::SslWrite, 0, 512)), w);
        assert_eq!(d.assigned(), 0);
        for c in 0..MAX_ASSIGNED as u64 {
            d.worker(&ev(30, 1000 + c, TlsHook::SslWrite, 0, 0));
        }
        assert_eq!(d.assigned(), MAX_ASSIGNED);
        assert!(d.load.iter().all(|&n| n == MAX_ASSIGNED / 4), "{:?}", d.load);
        let late = ev(31, 1, TlsHook::SslWrite, 0, 0);
        let w = d.worker(&late);
        assert_eq!(d.worker(&ev(31, 1, TlsHook::SslRead, 10, 10)), w);
        assert_eq!(d.assigned(), MAX_ASSIGNED);
    }
}
