//! Joining the two ends of one call. When a client and the model server it calls both run
//! on this host behind TLS, each end's probes see the same call. The request bytes are
//! identical on both ends, so their [`Observation::fingerprint`]s match; an observation
//! waits for its other half, then goes out alone.
//!
//! How long it waits is measured on the kernel's clock, not the output thread's: the two
//! ends of a call are separate connections, often read by different workers, and under
//! load one worker can be seconds behind another. Nor can the wait be a window around the
//! call's end: the two ends end apart by as long as the client takes to read its answer
//! (1.5 s, measured, for a python client with 200 threads on 2 cores). So each end
//! announces a call when its request is complete ([`Correlator::expect`]: the other half
//! is then on its way), long before its response ends. An observation is sent alone once
//! every worker has handled the events up to its end plus the window (the pipeline's
//! watermark, [`Correlator::expire`]) and no announcement of the same call from the other
//! end is waiting: by then the other end has either announced the call (and the
//! observation waits for it) or was not seen. A wall-clock bound ([`MAX_WAIT`]) and
//! bounds on what waits ([`MAX_PENDING`]) keep memory and delay bounded whatever happens.
//! Views sent out alone are counted by side: a server end alone is a call whose client
//! was not seen (or not joined); a client end alone is any call to another host, or one
//! whose server end was not joined.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::{
    exchange::{Observation, Side},
    record::{CallRecord, Endpoint},
};

/// Observations waiting at most; past this the oldest goes out alone (counted).
pub const MAX_PENDING: usize = 4096;
/// Longest wall-clock wait for the other half, whatever the workers' progress.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// How often announcements past [`MAX_WAIT`] are looked for (they may live this much
/// longer).
const FORGET_EVERY: Duration = Duration::from_millis(100);

/// A waiting observation: what `expire` and the join look at, small and in arrival order;
/// the observation itself is boxed (None once it has gone out).
struct Slot {
    fingerprint: u64,
    side: Side,
    request_start_ns: u64,
    /// Kernel time (monotonic ns) past which the other half cannot come any more.
    due_ns: u64,
    arrived: Instant,
    body: Option<Box<(Observation, Endpoint)>>,
}

pub struct Correlator {
    window_ns: u64,
    wall_offset_ns: i128,
    /// In arrival order; slots whose observation went out stay until they reach the front
    /// (or a compaction), so taking one from the middle moves nothing.
    pending: VecDeque<Slot>,
    /// Sequence number of `pending[0]`.
    head_seq: u64,
    /// Slots still holding an observation.
    live: usize,
    /// The sequence numbers of the waiting observations of each fingerprint, oldest first:
    /// a join looks at these only, not at everything that waits.
    by_fingerprint: HashMap<u64, Vec<u64>>,
    /// Calls announced by one end and not observed yet: how many, and when the last came.
    announced: HashMap<(u64, Side), (u32, Instant)>,
    /// When old announcements are looked for next.
    next_forget: Option<Instant>,
    /// Calls whose both ends were joined.
    pub joined: u64,
    /// Observations sent alone because the pending queue was full.
    pub overflowed: u64,
    /// Observations that waited and went out alone, by the side they saw.
    pub alone_client: u64,
    pub alone_server: u64,
}

impl Correlator {
    pub fn new(window: Duration, wall_offset_ns: i128) -> Self {
        Self {
            window_ns: window.as_nanos() as u64,
            wall_offset_ns,
            pending: VecDeque::new(),
            head_seq: 0,
            live: 0,
            by_fingerprint: HashMap::new(),
            announced: HashMap::new(),
            next_forget: None,
            joined: 0,
            overflowed: 0,
            alone_client: 0,
            alone_server: 0,
        }
    }

    /// One end (`side`) completed the request of a call (`fingerprint`): its observation
    /// will come.
    pub fn expect(&mut self, fingerprint: u64, side: Side, now: Instant) {
        if self.window_ns == 0 {
            return;
        }
        if self.announced.len() >= MAX_PENDING * 2 && !self.announced.contains_key(&(fingerprint, side)) {
            // Bounded: the oldest announcements go (their halves then wait no longer).
            self.forget_announcements(now, Duration::ZERO);
        }
        let entry = self.announced.entry((fingerprint, side)).or_insert((0, now));
        *entry = (entry.0 + 1, now);
    }

    pub fn push(&mut self, obs: Observation, endpoint: Endpoint, now: Instant, out: &mut Vec<CallRecord>) {
        if let Some(fingerprint) = obs.fingerprint
            && let Some((count, _)) = self.announced.get_mut(&(fingerprint, obs.side))
        {
            *count -= 1;
            if *count == 0 {
                self.announced.remove(&(fingerprint, obs.side));
            }
        }
        let Some(fingerprint) = obs.fingerprint.filter(|_| self.window_ns > 0) else {
            // Nothing to join on (no request was read), or no joining at all.
            out.push(CallRecord::new((obs, endpoint), None, self.wall_offset_ns));
            return;
        };
        // Both ends may be one process (client and server threads of one program). Of
        // several candidates (identical requests), the one closest in time is this call's
        // (the oldest of equally close ones).
        let other = self.by_fingerprint.get(&fingerprint).and_then(|seqs| {
            seqs.iter()
                .copied()
                .filter_map(|seq| {
                    let slot = &self.pending[(seq - self.head_seq) as usize];
                    (slot.side != obs.side).then(|| (seq, slot.request_start_ns.abs_diff(obs.request_start_ns)))
                })
                .min_by_key(|(_, diff)| *diff)
                .map(|(seq, _)| seq)
        });
        if let Some(seq) = other {
            let (p_obs, p_endpoint) = *self.take(seq).expect("a waiting observation");
            self.joined += 1;
            let (client, server) = match obs.side {
                Side::Client => ((obs, endpoint), p_endpoint),
                Side::Server => ((p_obs, p_endpoint), endpoint),
            };
            out.push(CallRecord::new(client, Some(server), self.wall_offset_ns));
            return;
        }
        if self.live >= MAX_PENDING {
            self.overflowed += 1;
            self.trim_front();
            if let Some(seq) = self.pending.front().map(|_| self.head_seq) {
                self.send_alone(seq, out);
            }
        }
        let ended = obs.response_end_ns.or(obs.response_first_ns).unwrap_or(obs.request_start_ns);
        let seq = self.head_seq + self.pending.len() as u64;
        self.pending.push_back(Slot {
            fingerprint,
            side: obs.side,
            request_start_ns: obs.request_start_ns,
            due_ns: ended.saturating_add(self.window_ns),
            arrived: now,
            body: Some(Box::new((obs, endpoint))),
        });
        self.live += 1;
        self.by_fingerprint.entry(fingerprint).or_default().push(seq);
    }

    /// Take the observation of slot `seq` out, then drop the empty slots at the front.
    fn take(&mut self, seq: u64) -> Option<Box<(Observation, Endpoint)>> {
        let body = self.take_in_place(seq);
        self.trim_front();
        body
    }

    /// Take the observation of slot `seq` out; its slot stays, empty (sequence numbers of
    /// the others do not change).
    fn take_in_place(&mut self, seq: u64) -> Option<Box<(Observation, Endpoint)>> {
        let slot = self.pending.get_mut(seq.checked_sub(self.head_seq)? as usize)?;
        let body = slot.body.take()?;
        let fingerprint = slot.fingerprint;
        self.live -= 1;
        if let Some(seqs) = self.by_fingerprint.get_mut(&fingerprint) {
            seqs.retain(|s| *s != seq);
            if seqs.is_empty() {
                self.by_fingerprint.remove(&fingerprint);
            }
        }
        Some(body)
    }

    /// Drop the empty slots at the front; compact when empty slots are most of the queue
    /// (an old observation holding the front while many after it were joined).
    fn trim_front(&mut self) {
        while self.pending.front().is_some_and(|s| s.body.is_none()) {
            self.pending.pop_front();
            self.head_seq += 1;
        }
        if self.pending.len() > 64 && self.pending.len() > 2 * self.live {
            let base = self.head_seq;
            let mut renumber: HashMap<u64, u64> = HashMap::with_capacity(self.live);
            let mut kept = VecDeque::with_capacity(self.live);
            for (i, slot) in std::mem::take(&mut self.pending).into_iter().enumerate() {
                if slot.body.is_some() {
                    renumber.insert(base + i as u64, base + kept.len() as u64);
                    kept.push_back(slot);
                }
            }
            self.pending = kept;
            for seqs in self.by_fingerprint.values_mut() {
                for s in seqs.iter_mut() {
                    *s = renumber[s];
                }
            }
        }
    }

    /// Send out the observations whose other half cannot come any more: every worker has
    /// handled the events up to `watermark_ns` (kernel time) past their window, or they
    /// waited [`MAX_WAIT`].
    pub fn expire(&mut self, watermark_ns: u64, now: Instant, out: &mut Vec<CallRecord>) {
        self.forget_announcements(now, MAX_WAIT);
        let mut due = Vec::new();
        // Halves that arrived at or before this waited MAX_WAIT (one subtraction per burst,
        // not one per waiting half: that was a tenth of the output thread's time).
        let waited_out = now.checked_sub(MAX_WAIT);
        for (i, p) in self.pending.iter().enumerate() {
            if p.body.is_none() {
                continue;
            }
            let other = match p.side {
                Side::Client => Side::Server,
                Side::Server => Side::Client,
            };
            // The announcement is looked up for due halves only (a lookup per waiting half
            // and per burst of output was 8% of the agent's CPU on model calls).
            if waited_out.is_some_and(|at| p.arrived <= at)
                || (p.due_ns <= watermark_ns && !self.announced.contains_key(&(p.fingerprint, other)))
            {
                due.push(self.head_seq + i as u64);
            }
        }
        // In arrival order, the slots left in place until all are out (no renumbering).
        for seq in due {
            if let Some(body) = self.take_in_place(seq) {
                self.alone(*body, out);
            }
        }
        self.trim_front();
    }

    /// Forget announcements older than `age` (their observations did not come), looking at
    /// most every [`FORGET_EVERY`] (expiry runs after every burst of output).
    fn forget_announcements(&mut self, now: Instant, age: Duration) {
        if self.next_forget.is_some_and(|next| now < next) {
            return;
        }
        self.next_forget = Some(now + FORGET_EVERY);
        self.announced.retain(|_, (_, at)| now.duration_since(*at) < age);
    }

    pub fn drain(&mut self, out: &mut Vec<CallRecord>) {
        while let Some(slot) = self.pending.pop_front() {
            self.head_seq += 1;
            if let Some(body) = slot.body {
                self.live -= 1;
                self.alone(*body, out);
            }
        }
        self.by_fingerprint.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn send_alone(&mut self, seq: u64, out: &mut Vec<CallRecord>) {
        if let Some(body) = self.take(seq) {
            self.alone(*body, out);
        }
    }

    fn alone(&mut self, (obs, endpoint): (Observation, Endpoint), out: &mut Vec<CallRecord>) {
        match obs.side {
            Side::Client => self.alone_client += 1,
            Side::Server => self.alone_server += 1,
        }
        out.push(CallRecord::new((obs, endpoint), None, self.wall_offset_ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{
        detect::{ApiCall, ApiKind},
        record::TlsSource,
        usage::ResponseSummary,
    };

    fn obs(side: Side, fingerprint: Option<u64>, start_ns: u64, end_ns: u64) -> Observation {
        Observation {
            side,
            call: ApiCall { api: ApiKind::ChatCompletions, provider: "openai", model: None, stream: false },
            summary: ResponseSummary::default(),
            method: Some("POST".into()),
            target: Some("/v1/chat/completions".into()),
            host: None,
            status: Some(200),
            request_start_ns: start_ns,
            response_first_ns: Some(end_ns),
            response_end_ns: Some(end_ns),
            request_bytes: 1,
            response_bytes: 1,
            fingerprint,
            complete: true,
            notes: Vec::new(),
            inspection: None,
            decision: None,
            enforcement: None,
            ruling: None,
            payload: None,
            http2_stream: None,
        }
    }

    fn endpoint(pid: u32) -> Endpoint {
        Endpoint {
            pid,
            tid: pid,
            comm: "t".into(),
            exe: None,
            uid: 0,
            cgroup: "/".into(),
            tls: TlsSource { library: "l".into(), stack: None, hooks: Vec::new() },
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_half_waits_for_the_workers_not_the_wall_clock() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        c.push(obs(Side::Server, Some(7), 1000 * MS, 1001 * MS), endpoint(2), now, &mut out);
        // Long after on the wall clock, but the client's worker has not reached the call's
        // window yet: the server half still waits.
        c.expire(1100 * MS, now + Duration::from_secs(3), &mut out);
        assert!(out.is_empty() && !c.is_empty());
        c.push(obs(Side::Client, Some(7), 999 * MS, 1002 * MS), endpoint(1), now + Duration::from_secs(3), &mut out);
        assert_eq!((out.len(), c.joined, c.alone_client + c.alone_server), (1, 1, 0));
        assert_eq!(out[0].process.pid, 1, "the client end leads");
        assert_eq!(out[0].server.as_ref().map(|s| s.pid), Some(2));
    }

    #[test]
    fn halves_go_out_alone_past_the_watermark_and_are_counted() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        c.push(obs(Side::Server, Some(1), 0, 10 * MS), endpoint(2), now, &mut out);
        c.push(obs(Side::Client, Some(2), 0, 20 * MS), endpoint(1), now, &mut out);
        c.expire(260 * MS, now, &mut out);
        assert_eq!((out.len(), c.alone_server, c.alone_client), (1, 1, 0), "only the first is due");
        c.expire(u64::MAX, now, &mut out);
        assert_eq!((out.len(), c.alone_server, c.alone_client), (2, 1, 1));
        // A stalled watermark does not hold a half past the wall-clock bound.
        c.push(obs(Side::Client, Some(3), 0, 30 * MS), endpoint(1), now, &mut out);
        c.expire(0, now + MAX_WAIT, &mut out);
        assert_eq!((out.len(), c.alone_client), (3, 2));
    }

    #[test]
    fn the_closest_identical_request_is_the_other_half() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        c.push(obs(Side::Server, Some(5), 100 * MS, 101 * MS), endpoint(20), now, &mut out);
        c.push(obs(Side::Server, Some(5), 200 * MS, 201 * MS), endpoint(21), now, &mut out);
        c.push(obs(Side::Client, Some(5), 199 * MS, 202 * MS), endpoint(1), now, &mut out);
        assert_eq!(out[0].server.as_ref().map(|s| s.pid), Some(21));
    }

    #[test]
    fn a_half_waits_while_the_other_end_announced_the_call() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        // The client announced the call when its request was sent; its answer is read
        // 1.5 s after the server wrote it.
        c.expect(9, Side::Client, now);
        c.expect(9, Side::Server, now);
        c.push(obs(Side::Server, Some(9), 1000 * MS, 1001 * MS), endpoint(2), now, &mut out);
        c.expire(2400 * MS, now + Duration::from_millis(1400), &mut out);
        assert!(out.is_empty(), "past its window, but the client's view is on its way");
        c.push(obs(Side::Client, Some(9), 1000 * MS, 2500 * MS), endpoint(1), now, &mut out);
        assert_eq!((out.len(), c.joined), (1, 1));
        assert!(c.announced.is_empty(), "both announcements met their observations");
        // An announcement whose observation never comes holds a half no longer than MAX_WAIT.
        c.expect(10, Side::Client, now);
        c.push(obs(Side::Server, Some(10), 0, MS), endpoint(2), now, &mut out);
        c.expire(u64::MAX, now + Duration::from_secs(1), &mut out);
        assert_eq!(out.len(), 1);
        c.expire(u64::MAX, now + MAX_WAIT, &mut out);
        assert_eq!((out.len(), c.alone_server), (2, 1));
    }

    #[test]
    fn joins_behind_an_old_half_keep_the_queue_small_and_the_order() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        // An old half holds the front while thousands of calls are joined behind it.
        c.push(obs(Side::Server, Some(1), 0, MS), endpoint(2), now, &mut out);
        for k in 2..3000u64 {
            c.push(obs(Side::Server, Some(k), k * MS, k * MS + 1), endpoint(2), now, &mut out);
            c.push(obs(Side::Client, Some(k), k * MS, k * MS + 2), endpoint(1), now, &mut out);
            assert!(c.pending.len() <= 2 * c.live + 64, "empty slots are compacted away");
        }
        assert_eq!((out.len(), c.joined, c.live), (2998, 2998, 1));
        // Three halves waiting, two due: they go out in arrival order; the third joins later.
        c.push(obs(Side::Client, Some(7000), 5000 * MS, 5001 * MS), endpoint(1), now, &mut out);
        c.push(obs(Side::Client, Some(7001), 9000 * MS, 9001 * MS), endpoint(1), now, &mut out);
        out.clear();
        c.expire(6000 * MS, now, &mut out);
        assert_eq!((out.len(), c.live), (2, 1));
        assert!(out[0].server.is_none() && out[1].server.is_none());
        c.push(obs(Side::Server, Some(7001), 9000 * MS, 9001 * MS), endpoint(3), now, &mut out);
        assert_eq!((out.len(), c.joined, c.live), (3, 2999, 0));
        assert!(c.is_empty() && c.by_fingerprint.is_empty());
    }

    #[test]
    fn a_full_queue_sends_out_its_oldest_and_counts_them() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        for k in 0..(MAX_PENDING as u64 + 5) {
            c.push(obs(Side::Server, Some(k), k * MS, k * MS + 1), endpoint(k as u32), now, &mut out);
        }
        assert_eq!((c.overflowed, c.live, c.alone_server), (5, MAX_PENDING, 5));
        let pids: Vec<u32> = out.iter().map(|r| r.process.pid).collect();
        assert_eq!(pids, [0, 1, 2, 3, 4], "the oldest go first");
        // The last one still joins.
        let last = MAX_PENDING as u64 + 4;
        c.push(obs(Side::Client, Some(last), last * MS, last * MS + 2), endpoint(9), now, &mut out);
        assert_eq!((c.joined, c.live), (1, MAX_PENDING - 1));
        c.drain(&mut out);
        assert!(c.is_empty());
        assert_eq!(out.len(), 5 + 1 + MAX_PENDING - 1);
    }

    #[test]
    fn views_without_a_request_are_never_joined() {
        let mut c = Correlator::new(Duration::from_millis(250), 0);
        let (now, mut out) = (Instant::now(), Vec::new());
        c.push(obs(Side::Server, None, 0, MS), endpoint(2), now, &mut out);
        c.push(obs(Side::Client, None, 0, MS), endpoint(1), now, &mut out);
        assert_eq!((out.len(), c.joined), (2, 0));
        assert!(out.iter().all(|r| r.server.is_none()));
    }
}
