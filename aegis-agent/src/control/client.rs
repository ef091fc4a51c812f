//! The client the CLI subcommands use: synchronous (std `UnixStream`, no runtime), one
//! request per connection, and errors that say what to do.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    group_label,
    protocol::{Reply, Request, Response, decode_response, encode_request},
};

/// How long the client waits for the agent (enforcing a change may close many
/// connections).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest response read (a full block table is a few MB).
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// Why a request did not get an answer (or got a refusal, from [`call`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {}: {reason}; is the agent running? Start it with `systemctl start aegis-agent` \
         (or `aegis-agent run`), or give the socket path it uses",
        path.display()
    )]
    NotRunning { path: PathBuf, reason: String },
    #[error("permission denied on {}: {hint}", path.display())]
    PermissionDenied { path: PathBuf, hint: String },
    /// The agent answered with an error; its message says why.
    #[error("{0}")]
    Refused(String),
    #[error("the agent at {} did not answer within {} s", path.display(), CLIENT_TIMEOUT.as_secs())]
    TimedOut { path: PathBuf },
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

/// Send `req` to the agent at `socket` and return its response (an error response
/// included).
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::TimedOut { path: socket.to_owned() }
        }
        _ => ClientError::Io { path: socket.to_owned(), source },
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = encode_request(req);
    line.push('\n');
    // The agent answers a request it will not read whole (too long) with an error and
    // closes: after a failed write, its answer may still be there to read.
    let written = (&stream).write_all(line.as_bytes());
    let mut buf = Vec::new();
    let read = BufReader::new(&stream).take(MAX_RESPONSE_BYTES).read_until(b'\n', &mut buf);
    if buf.is_empty() {
        return Err(match (written, read) {
            (Err(e), _) | (_, Err(e)) => io(e),
            _ => ClientError::Protocol("the agent closed the connection without answering".into()),
        });
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    decode_response(&buf).map_err(ClientError::Protocol)
}

/// [`request`], with an error response as [`ClientError::Refused`].
pub fn call(socket: &Path, req: &Request) -> Result<Reply, ClientError> {
    match request(socket, req)? {
        Response::Ok(reply) => Ok(reply),
        Response::Error { message } => Err(ClientError::Refused(message)),
    }
}

fn connect_error(path: &Path, e: std::io::Error) -> ClientError {
    let path = path.to_owned();
    match e.kind() {
        std::io::ErrorKind::NotFound => ClientError::NotRunning { path, reason: "no control socket there".into() },
        std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path, reason: "nothing listens on the socket (the agent stopped)".into() }
        }
        std::io::ErrorKind::PermissionDenied => {
            let hint = permission_hint(&path);
            ClientError::PermissionDenied { path, hint }
        }
        _ => ClientError::Io { path, source: e },
    }
}

/// Who may connect, from the socket's mode and group (or its directory's, when the socket
/// cannot even be looked at).
fn permission_hint(path: &Path) -> String {
    let meta = std::fs::metadata(path).or_else(|e| path.parent().map_or(Err(e), std::fs::metadata));
    match meta {
        Ok(m) if m.mode() & 0o060 != 0 => format!(
            "run as root or as a member of {} (after being added to a group, log in again)",
            group_label(m.gid())
        ),
        _ => "run as root (the agent's control socket admits no group)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testutil::TempDir;

    #[test]
    fn errors_say_what_to_do() {
        let dir = TempDir::new("client");
        let missing = dir.path().join("control.sock");
        let e = request(&missing, &Request::Status).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot reach the agent at {}: no control socket there; is the agent running? Start it with \
                 `systemctl start aegis-agent` (or `aegis-agent run`), or give the socket path it uses",
                missing.display()
            )
        );
        // A socket nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
        let e = request(&missing, &Request::Status).unwrap_err();
        assert!(matches!(&e, ClientError::NotRunning { reason, .. } if reason.contains("nothing listens")), "{e}");

        // An agent that hangs up without answering.
        let hangup = dir.path().join("hangup.sock");
        let listener = std::os::unix::net::UnixListener::bind(&hangup).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).unwrap();
            line
        });
        let e = request(&hangup, &Request::List).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected answer from the agent: the agent closed the connection without answering"
        );
        assert_eq!(t.join().unwrap(), "{\"v\":1,\"op\":\"list\"}\n");

        let e = ClientError::PermissionDenied { path: "/s".into(), hint: permission_hint(Path::new("/nonexistent/x")) };
        assert_eq!(e.to_string(), "permission denied on /s: run as root (the agent's control socket admits no group)");
    }
}
