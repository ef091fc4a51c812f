//! The drill's cgroup ([`DrillCgroup`]) and the drill client run inside it ([`call`]):
//! `curl`, which links the system OpenSSL, so the agent's probes see its calls exactly as
//! they see an application's. (The agent binary itself speaks TLS through rustls, which the
//! probes do not see, so it cannot be the client.)

use std::{
    fs,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::scenario::Api;
/// Prefix of every drill cgroup's directory name (`aegis-drill-<id>`).
pub use crate::control::drills::CGROUP_PREFIX;
/// Longest a drill call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A cgroup made for one drill, under the agent's `enforce.cgroup` (so that the kernel
/// containment covers it). Dropping it kills the drill clients still in it (by pid: only
/// processes the drill started) and removes it.
#[derive(Debug)]
pub struct DrillCgroup {
    /// The directory under the cgroup v2 mount.
    pub dir: PathBuf,
    /// Its cgroup v2 path (as in /proc/PID/cgroup), which the agent's records carry.
    pub path: String,
}

impl DrillCgroup {
    /// Make `<parent>/aegis-drill-<id>`; `root` is the cgroup v2 mount.
    pub fn create(root: &Path, parent: &Path, id: &str) -> anyhow::Result<Self> {
        let dir = parent.join(format!("{CGROUP_PREFIX}{}", id.trim_start_matches("drill-")));
        fs::create_dir(&dir).with_context(|| {
            format!("cannot make the drill cgroup {} (the drill runs as root, on cgroup v2)", dir.display())
        })?;
        let rel = dir.strip_prefix(root).context("the drill cgroup is not under the cgroup v2 mount")?;
        let path = format!("/{}", rel.display());
        Ok(Self { dir, path })
    }

    /// Remove it; processes still in it are killed first (they can only be drill clients:
    /// nothing else is put there).
    pub fn remove(&self) -> anyhow::Result<()> {
        crate::cgroup::remove_dir_killing(&self.dir)
            .map(|_| ())
            .with_context(|| format!("cannot remove the drill cgroup {}", self.dir.display()))
    }
}

/// What a drill call came to.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CallOutcome {
    /// curl's exit status (0: a response was read whole; 7: the connect was refused; 35,
    /// 52, 56: the connection was cut).
    pub exit: Option<i32>,
    /// The HTTP status, when a response head arrived.
    pub status: Option<u16>,
    /// Which drill endpoint answered (`primary`, `fallback`), from its header.
    pub served_by: Option<String>,
    pub pid: u32,
    pub took_ms: u64,
    /// The start of curl's error message, when it failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl CallOutcome {
    /// A whole response with a 2xx status.
    pub fn succeeded(&self) -> bool {
        self.exit == Some(0) && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// What a drill call asks.
#[derive(Clone, Copy, Debug)]
pub struct CallSpec<'a> {
    pub api: Api,
    pub model: &'a str,
    pub prompt: &'a str,
    pub stream: bool,
}

/// One synthetic call from inside `cgroup` to `addr` through curl, with `work` (the drill's
/// private directory) holding the CA and the exchange's files (named by `seq`).
pub fn call(
    cgroup: &DrillCgroup,
    work: &Path,
    addr: std::net::SocketAddr,
    spec: CallSpec<'_>,
    seq: u32,
) -> anyhow::Result<CallOutcome> {
    let CallSpec { api, model, prompt, stream } = spec;
    let body = match api {
        Api::Openai => serde_json::json!({"model": model, "stream": stream,
                                         "messages": [{"role": "user", "content": prompt}]}),
        Api::Anthropic => serde_json::json!({"model": model, "stream": stream, "max_tokens": 64,
                                            "messages": [{"role": "user", "content": prompt}]}),
    };
    let body_file = work.join(format!("request-{seq}.json"));
    let head_file = work.join(format!("head-{seq}.txt"));
    fs::File::create(&body_file)?.write_all(body.to_string().as_bytes())?;
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-N", "--http1.1", "--max-time", &CALL_TIMEOUT.as_secs().to_string()])
        .arg("--cacert")
        .arg(work.join("endpoint.pem"))
        .args(["-H", "content-type: application/json"])
        .arg("-D")
        .arg(&head_file)
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg("--data-binary")
        .arg(format!("@{}", body_file.display()));
    match api {
        Api::Openai => cmd.args(["-H", "authorization: Bearer drill-not-a-key"]),
        Api::Anthropic => cmd.args(["-H", "x-api-key: drill-not-a-key", "-H", "anthropic-version: 2023-06-01"]),
    };
    cmd.arg(format!("https://{addr}{}", api.path()));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Opened before the fork: the child only writes "0" (itself) to it between fork and
    // exec, with one write(2) on a descriptor it inherited.
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.dir.join("cgroup.procs"))
        .with_context(|| format!("cannot open {}/cgroup.procs", cgroup.dir.display()))?;
    let fd = procs.as_raw_fd();
    // SAFETY: write(2) is async-signal-safe; nothing is allocated between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
    let started = Instant::now();
    let child = cmd.spawn().map_err(|e| {
        anyhow::anyhow!(
            "cannot run the drill client curl ({e}): install curl (a TLS client linking the system OpenSSL, which \
             the agent's probes see)"
        )
    })?;
    drop(procs);
    let pid = child.id();
    let out = child.wait_with_output().context("waiting for the drill client")?;
    let head = fs::read_to_string(&head_file).unwrap_or_default();
    let served_by = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("x-aegis-drill-served-by").then(|| value.trim().to_owned())
    });
    let status = String::from_utf8_lossy(&out.stdout).trim().parse::<u16>().ok().filter(|&s| s != 0);
    let error: String = String::from_utf8_lossy(&out.stderr).trim().chars().take(200).collect();
    Ok(CallOutcome {
        exit: out.status.code(),
        status,
        served_by,
        pid,
        took_ms: started.elapsed().as_millis() as u64,
        error,
    })
}
