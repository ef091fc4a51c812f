//! The kernel's process events (the netlink process connector), for scoped capture: a
//! process that execs an executable known to talk to model endpoints, or that a probed
//! process forks, gets capture's probes at once, before its first connect, so that its first
//! call is seen (the connect watch alone attaches after the connect, racing that call).
//!
//! With host-wide capture ([`run_discovery`]), the executable of every process started is
//! handed to discovery at once, so that a program that carries its own TLS (Go's crypto/tls,
//! OpenSSL linked in) is probed within moments of its start, not at discovery's next scan.
//!
//! The connector needs CAP_NET_ADMIN and the host's network namespace; without it scoped
//! capture still probes processes at their first connect (said once in the log). Messages
//! the kernel could not queue (the socket's buffer full) are counted, not silent.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::SyncSender,
    },
    time::Duration,
};

use super::scope::{self, Known, ProbeCause, ProbeRequest};

/// `NETLINK_CONNECTOR`, `CN_IDX_PROC`, `CN_VAL_PROC` (linux/connector.h).
const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN` (linux/cn_proc.h).
const MCAST_LISTEN: u32 = 1;
/// `enum proc_cn_event`.
const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
/// `struct nlmsghdr` and `struct cn_msg`: 16 and 20 bytes; then `struct proc_event`: what
/// (u32), cpu (u32), timestamp (u64), and the event's fields.
const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;
const EVENT_DATA: usize = NLMSG_HDR + CN_MSG + 16;

/// One process event capture acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// Process `pid` replaced its program.
    Exec { pid: u32 },
    /// Process `parent` forked process `child` (threads are not reported).
    Fork { parent: u32, child: u32 },
}

/// A socket subscribed to the kernel's process events.
pub struct ProcWatch {
    fd: OwnedFd,
    /// Times the kernel said it dropped messages for this socket (ENOBUFS).
    pub overruns: u64,
    buf: Vec<u8>,
}

impl ProcWatch {
    /// Subscribe; reads wait at most `timeout`.
    pub fn open(timeout: Duration) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_CONNECTOR) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl is valid; its fields are set before use.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros() as _ };
        // SAFETY: a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG + 4);
        let len = (NLMSG_HDR + CN_MSG + 4) as u32;
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // data length
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&MCAST_LISTEN.to_ne_bytes());
        // SAFETY: `msg` is valid for its length.
        let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, overruns: 0, buf: vec![0; 8192] })
    }

    /// The events of the next message (none after the timeout, or for events capture does
    /// not act on). An overrun is counted and reading goes on.
    pub fn read_events(&mut self) -> io::Result<Vec<ProcEvent>> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(Vec::new()),
                Some(libc::ENOBUFS) => {
                    self.overruns += 1;
                    Ok(Vec::new())
                }
                _ => Err(e),
            };
        }
        Ok(parse(&self.buf[..n as usize]))
    }
}

/// Hand `tx` the processes to probe at their start (see the module), until `stop`. Without
/// the connector (no CAP_NET_ADMIN, another network namespace) it says so and returns:
/// processes are then probed at their first connect only.
pub fn run(known: Arc<Mutex<Known>>, tx: SyncSender<ProbeRequest>, stop: &AtomicBool) {
    let lock = || known.lock().unwrap_or_else(|e| e.into_inner());
    lock().counts.process_events = true;
    let instead = "processes are probed at their first connect to a model endpoint only (capture.scope = \
                   model_processes), and a first call may come before its probes";
    let handle = |event| {
        let since_ns = crate::clock::monotonic_ns();
        let found = match event {
            ProcEvent::Exec { pid } => std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|exe| lock().on_exec(pid, &exe, scope::cgroup_of).map(|t| (pid, ProbeCause::Exec, t))),
            ProcEvent::Fork { parent, child } => lock().on_fork(parent).map(|t| (child, ProbeCause::Fork, t)),
        };
        match found {
            Some((pid, cause, targets)) => handed(tx.try_send(ProbeRequest { pid, since_ns, cause, targets })),
            None => Handed::Done,
        }
    };
    if !follow(stop, instead, handle, |lost| lock().counts.events_lost = lost) {
        lock().counts.process_events = false;
    }
}

/// Executables remembered as handed to discovery (forgotten all at once past this; a
/// repeat costs discovery one `stat`).
const MAX_HANDED: usize = 4096;

/// Hand `tx` the executable of every process started, until `stop` (see the module).
/// Executables already handed are not handed again; what the queue has no room for is left
/// to discovery's next scan (counted in the log). Without the connector it says so and
/// returns: programs started later are probed at discovery's next scan.
pub fn run_discovery(tx: SyncSender<std::path::PathBuf>, stop: &AtomicBool) {
    let instead = "programs carrying their own TLS (Go, OpenSSL linked in) are probed at discovery's next scan \
                   (capture.rediscover_secs), and calls before it are not seen";
    let mut sent: HashSet<std::path::PathBuf> = HashSet::new();
    let handle = |event| {
        let ProcEvent::Exec { pid } = event else { return Handed::Done };
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else { return Handed::Done };
        if sent.contains(&exe) {
            return Handed::Done;
        }
        if sent.len() >= MAX_HANDED {
            sent.clear();
        }
        let result = handed(tx.try_send(exe.clone()));
        if matches!(result, Handed::Done) {
            sent.insert(exe);
        }
        result
    };
    follow(stop, instead, handle, |_| {});
}

/// What [`follow`]'s handler did with an event.
enum Handed {
    Done,
    /// Its queue had no room.
    QueueFull,
    /// Its receiver is gone: nobody listens any more.
    Closed,
}

fn handed<T>(sent: Result<(), std::sync::mpsc::TrySendError<T>>) -> Handed {
    match sent {
        Ok(()) => Handed::Done,
        Err(std::sync::mpsc::TrySendError::Full(_)) => Handed::QueueFull,
        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Handed::Closed,
    }
}

/// Follow the kernel's process events until `stop` (or the handler's receiver is gone),
/// each handed to `handle`. Events lost (the kernel's queue for the watch overflowed, or the
/// handler's queue was full) are given to `lost` as a running total whenever it grows, and
/// logged at most once a minute with `instead`, what becomes of those processes. Returns
/// false when the events cannot be read, from the start or later (said with `instead`).
fn follow(
    stop: &AtomicBool,
    instead: &str,
    mut handle: impl FnMut(ProcEvent) -> Handed,
    mut lost: impl FnMut(u64),
) -> bool {
    let mut watch = match ProcWatch::open(Duration::from_millis(200)) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot read the kernel's process events (netlink process connector; needs CAP_NET_ADMIN in the \
                 host's network namespace): {instead}"
            );
            return false;
        }
    };
    let (mut queue_full, mut logged) = (0u64, (0u64, 0u64));
    let mut last_log = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let events = match watch.read_events() {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "reading the kernel's process events failed; from now on {instead}");
                return false;
            }
        };
        for event in events {
            match handle(event) {
                Handed::Done => {}
                Handed::QueueFull => queue_full += 1,
                Handed::Closed => return true,
            }
        }
        let now = (watch.overruns, queue_full);
        if now != logged {
            lost(now.0 + now.1);
            if last_log.elapsed() >= Duration::from_secs(60) {
                logged = now;
                last_log = std::time::Instant::now();
                tracing::warn!(
                    kernel_overruns = now.0,
                    queue_full = now.1,
                    "process events lost (the kernel's queue for the watch overflowed, or the queue behind it was \
                     full): for the processes started then, {instead}"
                );
            }
        }
    }
    true
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The events in one datagram (netlink messages one after another); anything short or
/// malformed ends the parse.
pub fn parse(mut datagram: &[u8]) -> Vec<ProcEvent> {
    let mut out = Vec::new();
    while let Some(len) = u32_at(datagram, 0) {
        let len = len as usize;
        if len < NLMSG_HDR || len > datagram.len() {
            break;
        }
        let msg = &datagram[..len];
        if u32_at(msg, NLMSG_HDR) == Some(CN_IDX_PROC) && u32_at(msg, NLMSG_HDR + 4) == Some(CN_VAL_PROC) {
            let what = u32_at(msg, NLMSG_HDR + CN_MSG);
            let field = |i: usize| u32_at(msg, EVENT_DATA + 4 * i);
            match what {
                // exec: process_pid, process_tgid.
                Some(PROC_EVENT_EXEC) => {
                    if let (Some(pid), Some(tgid)) = (field(0), field(1))
                        && pid == tgid
                    {
                        out.push(ProcEvent::Exec { pid: tgid });
                    }
                }
                // fork: parent_pid, parent_tgid, child_pid, child_tgid; a new thread has
                // child_pid != child_tgid.
                Some(PROC_EVENT_FORK) => {
                    if let (Some(parent), Some(child_pid), Some(child)) = (field(1), field(2), field(3))
                        && child_pid == child
                        && parent != child
                    {
                        out.push(ProcEvent::Fork { parent, child });
                    }
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let step = len.div_ceil(4) * 4;
        datagram = datagram.get(step..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, fields: &[u32]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = (EVENT_DATA + 4 * fields.len()) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        for f in fields {
            m.extend_from_slice(&f.to_ne_bytes());
        }
        m
    }

    #[test]
    fn exec_and_process_forks_are_read_and_threads_and_garbage_are_not() {
        assert_eq!(parse(&message(PROC_EVENT_EXEC, &[42, 42])), vec![ProcEvent::Exec { pid: 42 }]);
        assert_eq!(
            parse(&message(PROC_EVENT_FORK, &[10, 10, 11, 11])),
            vec![ProcEvent::Fork { parent: 10, child: 11 }]
        );
        // A new thread of process 10.
        assert!(parse(&message(PROC_EVENT_FORK, &[10, 10, 12, 10])).is_empty());
        // Two messages in one datagram.
        let mut two = message(PROC_EVENT_EXEC, &[5, 5]);
        two.extend(message(PROC_EVENT_EXEC, &[6, 6]));
        assert_eq!(parse(&two), vec![ProcEvent::Exec { pid: 5 }, ProcEvent::Exec { pid: 6 }]);
        // Truncated, oversized length, other connector, empty.
        let m = message(PROC_EVENT_EXEC, &[7, 7]);
        assert!(parse(&m[..m.len() - 3]).is_empty());
        let mut long = m.clone();
        long[0] = 0xff;
        assert!(parse(&long).is_empty());
        let mut other = m.clone();
        other[NLMSG_HDR] = 9;
        assert!(parse(&other).is_empty());
        assert!(parse(&[]).is_empty());
        assert!(parse(&[0; 3]).is_empty());
    }

    /// The real connector: an exec of this test's child is reported (root only: the
    /// connector needs CAP_NET_ADMIN; CI runs as root).
    #[test]
    fn the_kernel_reports_a_child_exec() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (CI runs as root)");
            return;
        }
        let mut watch = ProcWatch::open(Duration::from_millis(200)).expect("process connector");
        let mut child = std::process::Command::new("/bin/true").spawn().expect("/bin/true");
        let pid = child.id();
        let _ = child.wait();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut seen = (false, false);
        while std::time::Instant::now() < deadline && !(seen.0 && seen.1) {
            for e in watch.read_events().expect("reading process events") {
                match e {
                    ProcEvent::Exec { pid: p } if p == pid => seen.0 = true,
                    ProcEvent::Fork { parent, child } if child == pid && parent == std::process::id() => seen.1 = true,
                    _ => {}
                }
            }
        }
        assert_eq!(seen, (true, true), "exec and fork of pid {pid}");
    }
}
