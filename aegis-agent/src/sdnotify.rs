//! systemd's notification protocol (`sd_notify(3)`), in the few lines it takes: one
//! datagram of `KEY=value` lines to the unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with `@`). With `Type=notify` the unit is started once the
//! agent sends `READY=1`; with `WatchdogSec=` systemd restarts it when `WATCHDOG=1` stops
//! coming; `STATUS=` is the line `systemctl status` shows.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op.

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    time::Duration,
};

/// Where notifications go.
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    /// What `$NOTIFY_SOCKET` said, for messages.
    name: String,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names; None when it is unset or empty (not started by
    /// systemd with `Type=notify`, or `NotifyAccess=` does not allow this process).
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) if !name.is_empty() => Self::to(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `name`: a socket path, or `@name` for an abstract socket.
    pub fn to(name: &OsStr) -> io::Result<Self> {
        let bytes = name.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt as _;
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?
            }
            None if bytes.starts_with(b"/") => std::os::unix::net::SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NOTIFY_SOCKET must be an absolute path or an abstract name starting with '@'",
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        Ok(Self { socket, addr, name: name.to_string_lossy().into_owned() })
    }

    /// Send `state`: newline-separated `KEY=value` assignments, as one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the notification was cut short"));
        }
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: the agent is alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `STATUS=`: the line `systemctl status` shows.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// What `$NOTIFY_SOCKET` said.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// How often systemd expects `WATCHDOG=1` from this process (`$WATCHDOG_USEC`, when
/// `$WATCHDOG_PID` is unset or names this process); None without a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|&u| u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// A status is one line: newlines would start new assignments.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 5 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_path_socket_as_one_datagram_each() {
        let dir = std::env::temp_dir().join(format!("aegis-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.as_os_str()).unwrap();
        n.ready("capture active\non 3 libraries").unwrap();
        n.watchdog().unwrap();
        n.status("capture degraded").unwrap();
        assert_eq!(receive(&systemd), "READY=1\nSTATUS=capture active on 3 libraries");
        assert_eq!(receive(&systemd), "WATCHDOG=1");
        assert_eq!(receive(&systemd), "STATUS=capture degraded");
        drop(systemd);
        std::fs::remove_dir_all(&dir).unwrap();
        // Nobody listening any more: the error says so, it does not pass silently.
        assert!(n.watchdog().is_err());
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("aegis-sdnotify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to(OsStr::new(&format!("@{name}"))).unwrap();
        n.stopping("finishing open calls").unwrap();
        assert_eq!(receive(&systemd), "STOPPING=1\nSTATUS=finishing open calls");
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        let err = Notifier::to(OsStr::new("notify.sock")).err().expect("refused");
        assert!(err.to_string().contains("absolute path or an abstract name"), "{err}");
    }
}
