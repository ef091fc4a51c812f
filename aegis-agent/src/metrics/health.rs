//! Capture health: whether calls are being seen and written, and if not, why and what to
//! do. The same answer serves `/healthz`, `aegis-agent status` and systemd's watchdog.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aegis_common::{DROP_CAUSES, DropCounter};

use crate::{
    capture::Counters,
    control::{CaptureHealth, ControlView},
    kernel::capability::{Capabilities, Capability, State},
    policy::Inspector,
};

/// The kernel's drop causes, in `aegis_common::DropCause` order.
pub const DROP_CAUSE_NAMES: [&str; DROP_CAUSES] = ["ring_full", "over_call_cap", "read_failed", "args_map_full"];

/// How long the ring buffer reader or the output thread may go without turning before
/// capture is reported unhealthy and the watchdog is no longer fed (each turns every
/// 100 ms when it is not stuck).
pub const STALL: Duration = Duration::from_secs(30);

/// What health and the scrape-time metrics are read from: the running daemon's parts.
#[derive(Clone)]
pub struct Sources {
    pub counters: Arc<Counters>,
    pub drops: Arc<Mutex<[DropCounter; DROP_CAUSES]>>,
    pub caps: Capabilities,
    pub inspector: Option<Arc<Inspector>>,
    /// The enforcement mode in force; None when containment is not loaded.
    pub mode: Option<ControlView>,
    /// The blind-spot report's counts; None when it does not run.
    pub blind_spots: Option<Arc<Mutex<crate::capture::blindspot::service::Counts>>>,
    /// Scoped capture's state; None when capture probes every process.
    pub scoped: Option<Arc<Mutex<crate::capture::scope::Known>>>,
}

impl Sources {
    /// How capture is doing now.
    pub fn health(&self) -> CaptureHealth {
        self.health_at(crate::clock::monotonic_ns())
    }

    fn health_at(&self, now_ns: u64) -> CaptureHealth {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let drops = *self.drops.lock().unwrap_or_else(|e| e.into_inner());
        let capture = self.caps.get(Capability::Capture);
        let state = capture.as_ref().map_or(State::Unavailable, |c| c.state);
        let mut reasons = Vec::new();
        match (&capture, state) {
            (None, _) => reasons.push("capture has not started yet".to_owned()),
            (Some(c), State::Unavailable | State::Off) => reasons.push(format!(
                "capture is {}: {} (see `aegis-agent kernel` for what this kernel lacks)",
                state.name(),
                c.reason.as_deref().unwrap_or("no reason given")
            )),
            _ => {
                if let Some(why) = self.stalled_at(now_ns) {
                    reasons.push(why);
                }
            }
        }
        let pending = load(&c.records_pending);
        if pending > 0 {
            reasons.push(format!(
                "output.file cannot be written: {pending} records wait in memory (the agent's log says why; free \
                 space or fix its permissions)"
            ));
        }
        CaptureHealth {
            healthy: reasons.is_empty(),
            reasons,
            state,
            events: load(&c.events),
            records: load(&c.records),
            records_pending: pending,
            records_lost: load(&c.records_lost),
            kernel_dropped_events: drops.iter().map(|d| d.events).sum(),
            kernel_dropped_bytes: drops.iter().map(|d| d.bytes).sum(),
            blind_spots: self.blind_spots.as_ref().map(|b| Box::new(*b.lock().unwrap_or_else(|e| e.into_inner()))),
            scoped: self.scoped.as_ref().map(|k| Box::new(k.lock().unwrap_or_else(|e| e.into_inner()).counts())),
        }
    }

    /// Why the pipeline is stuck, when a thread of it has not turned for [`STALL`]: what
    /// the watchdog is fed on (a restart helps a stuck agent, not a kernel without capture).
    pub fn stalled(&self) -> Option<String> {
        self.stalled_at(crate::clock::monotonic_ns())
    }

    fn stalled_at(&self, now_ns: u64) -> Option<String> {
        let c = &self.counters;
        let threads = [
            ("the ring buffer reader", &c.reader_beat_ns, "calls are not being read from the kernel"),
            ("the output thread", &c.output_beat_ns, "records are not being written"),
        ];
        for (name, beat, meaning) in threads {
            let last = beat.load(Ordering::Relaxed);
            // 0: not started yet (or no reader: capture is unavailable, reported above).
            if last == 0 {
                continue;
            }
            let idle = Duration::from_nanos(now_ns.saturating_sub(last));
            if idle >= STALL {
                return Some(format!(
                    "{name} has not run for {} s: {meaning} (the agent's log says more; restart the agent)",
                    idle.as_secs()
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::capability::CapabilityStatus;

    fn sources() -> Sources {
        Sources {
            counters: Arc::new(Counters::default()),
            drops: Arc::new(Mutex::new([DropCounter::default(); DROP_CAUSES])),
            caps: Capabilities::default(),
            inspector: None,
            mode: None,
            blind_spots: None,
            scoped: None,
        }
    }

    #[test]
    fn healthy_only_while_capture_is_in_force_its_threads_turn_and_records_are_written() {
        let s = sources();
        let h = s.health_at(1);
        assert!(!h.healthy);
        assert_eq!(h.reasons, ["capture has not started yet"]);

        s.caps.set(CapabilityStatus::unavailable(Capability::Capture, "this kernel lacks helper bpf_loop"));
        let h = s.health_at(1);
        assert_eq!((h.healthy, h.state), (false, State::Unavailable));
        assert!(h.reasons[0].starts_with("capture is unavailable: this kernel lacks helper bpf_loop"), "{h:?}");

        s.caps.set(CapabilityStatus::active(Capability::Capture, "probes on 1 TLS target"));
        let start = 1_000_000_000;
        s.counters.reader_beat_ns.store(start, Ordering::Relaxed);
        s.counters.output_beat_ns.store(start, Ordering::Relaxed);
        s.counters.events.store(40, Ordering::Relaxed);
        s.drops.lock().unwrap()[0] = DropCounter { events: 2, bytes: 300 };
        s.drops.lock().unwrap()[1] = DropCounter { events: 0, bytes: 50 };
        let h = s.health_at(start + 1_000_000);
        assert!(h.healthy, "{h:?}");
        assert_eq!((h.events, h.kernel_dropped_events, h.kernel_dropped_bytes), (40, 2, 350));

        // The output thread stuck for the stall time: unhealthy, and the watchdog is not fed.
        s.counters.reader_beat_ns.store(start + STALL.as_nanos() as u64, Ordering::Relaxed);
        let now = start + STALL.as_nanos() as u64 + 1;
        let h = s.health_at(now);
        assert!(!h.healthy);
        assert_eq!(
            h.reasons,
            ["the output thread has not run for 30 s: records are not being written (the agent's log says more; \
              restart the agent)"]
        );
        assert!(s.stalled_at(now).is_some());

        s.counters.output_beat_ns.store(now, Ordering::Relaxed);
        s.counters.records_pending.store(3, Ordering::Relaxed);
        let h = s.health_at(now);
        assert!(!h.healthy && h.reasons[0].starts_with("output.file cannot be written: 3 records"), "{h:?}");
        assert!(s.stalled_at(now).is_none(), "a full disk is not cured by a restart");
    }
}
