//! Joining the two ends of one call. When a client and the model server it calls both run
//! on this host behind TLS, each end's probes see the same call. The request bytes are
//! identical on both ends, so their [`Observation::fingerprint`]s match; an observation
//! waits up to the correlation window for its other half, then goes out alone.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use super::{
    exchange::{Observation, Side},
    record::{CallRecord, Endpoint},
};

/// Observations waiting at most; past this the oldest goes out alone (counted).
const MAX_PENDING: usize = 4096;

struct Pending {
    obs: Observation,
    endpoint: Endpoint,
    arrived: Instant,
}

pub struct Correlator {
    window: Duration,
    wall_offset_ns: i128,
    pending: VecDeque<Pending>,
    /// Calls whose both ends were joined.
    pub joined: u64,
    /// Observations sent alone because the pending queue was full.
    pub overflowed: u64,
}

impl Correlator {
    pub fn new(window: Duration, wall_offset_ns: i128) -> Self {
        Self { window, wall_offset_ns, pending: VecDeque::new(), joined: 0, overflowed: 0 }
    }

    pub fn push(&mut self, obs: Observation, endpoint: Endpoint, now: Instant, out: &mut Vec<CallRecord>) {
        // Both ends may be one process (client and server threads of one program).
        let other = self.pending.iter().position(|p| p.obs.fingerprint == obs.fingerprint && p.obs.side != obs.side);
        if let Some(i) = other {
            let p = self.pending.remove(i).expect("index from position");
            self.joined += 1;
            let (client, server) = match obs.side {
                Side::Client => ((obs, endpoint), p.endpoint),
                Side::Server => ((p.obs, p.endpoint), endpoint),
            };
            out.push(CallRecord::new(client, Some(server), self.wall_offset_ns));
            return;
        }
        if self.window.is_zero() {
            out.push(CallRecord::new((obs, endpoint), None, self.wall_offset_ns));
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.overflowed += 1;
            self.emit_front(out);
        }
        self.pending.push_back(Pending { obs, endpoint, arrived: now });
    }

    /// Send out observations that waited a full window.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<CallRecord>) {
        while self.pending.front().is_some_and(|p| now.duration_since(p.arrived) >= self.window) {
            self.emit_front(out);
        }
    }

    pub fn drain(&mut self, out: &mut Vec<CallRecord>) {
        while !self.pending.is_empty() {
            self.emit_front(out);
        }
    }

    /// When the next observation's window ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.arrived + self.window)
    }

    fn emit_front(&mut self, out: &mut Vec<CallRecord>) {
        if let Some(p) = self.pending.pop_front() {
            out.push(CallRecord::new((p.obs, p.endpoint), None, self.wall_offset_ns));
        }
    }
}
