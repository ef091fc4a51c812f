//! The collector under test: a CA with server and client certificates (rcgen), the
//! `aegis-agent collector` process, the agent-side shipper process, and signed bundles.
//! Shared by `tests/collector.rs` and the `collector_bench` binary.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use aegis_agent::evidence::{
    bundle_meta::{BundleMetaBuilder, PREDICATE_TYPE, Severity},
    dsse::{self, Subject},
    hex,
    key::HostKey,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sha2::{Digest as _, Sha256};

use crate::{agent_bin, file_tail, scaled};

/// A test CA, the collector's certificate (localhost, 127.0.0.1) and client certificates,
/// as PEM files in one directory.
pub struct Pki {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A CA named `name` writing into `dir`, with the collector's certificate.
    pub fn new(dir: &Path, name: &str) -> Self {
        fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("a CA certificate");
        fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        let pki = Self { dir: dir.to_owned(), name: name.to_owned(), issuer: Issuer::new(params, key) };
        pki.issue(&format!("{name}-server"), &["localhost", "127.0.0.1"]);
        pki
    }

    /// A certificate for `sans` (written as `<file>.pem`, `<file>.key`).
    pub fn issue(&self, file: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, sans.first().copied().unwrap_or(file));
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
        let (c, k) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    pub fn server(&self) -> (PathBuf, PathBuf) {
        let name = &self.name;
        (self.dir.join(format!("{name}-server.pem")), self.dir.join(format!("{name}-server.key")))
    }
}

/// A port free on 127.0.0.1 now (the collector binds it when it starts; a restart binds the
/// same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An enrolled agent of the collector config.
pub struct Enrolled<'a> {
    pub name: &'a str,
    pub verifier: String,
    pub client_identity: &'a str,
}

/// A collector config serving on `port`, storing under `dir`.
pub fn collector_toml(dir: &Path, pki: &Pki, port: u16, agents: &[Enrolled<'_>], extra: &str) -> PathBuf {
    let (cert, key) = pki.server();
    let mut text = format!(
        "[collector]\nlisten = \"127.0.0.1:{port}\"\nstore = {:?}\nindex = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n{extra}\n",
        dir.join("store").display().to_string(),
        dir.join("index.sqlite").display().to_string(),
        pki.ca().display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    for a in agents {
        text.push_str(&format!(
            "[[agents]]\nname = {:?}\nverifier = {:?}\nclient_identity = {:?}\n",
            a.name, a.verifier, a.client_identity
        ));
    }
    let path = dir.join("collector.toml");
    fs::write(&path, text).unwrap();
    path
}

/// An agent config whose `[collector]` ships to `port` from the spool `dir/spool`.
pub fn agent_toml(dir: &Path, pki: &Pki, port: u16, client: (&Path, &Path), spool_max_files: u64) -> PathBuf {
    let text = format!(
        "[collector]\nurl = \"https://127.0.0.1:{port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nspool_dir = {:?}\n\
         spool_max_bytes = 1073741824\nspool_max_files = {spool_max_files}\nbackoff_max_secs = 1\n",
        pki.ca().display().to_string(),
        client.0.display().to_string(),
        client.1.display().to_string(),
        dir.join("spool").display().to_string(),
    );
    let path = dir.join("agent.toml");
    fs::write(&path, text).unwrap();
    path
}

/// A child process of the agent binary with its stderr in a log file; killed on drop.
pub struct Process {
    child: Option<Child>,
    pub log: PathBuf,
    what: String,
}

impl Process {
    pub fn spawn(args: &[&str], log: &Path, what: &str) -> Self {
        let err = File::options().create(true).append(true).open(log).unwrap();
        let child = Command::new(agent_bin())
            .args(args)
            .env("AEGIS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self { child: Some(child), log: log.to_owned(), what: what.to_owned() }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Send `signal` and wait for the exit.
    pub fn stop_with(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let deadline = Instant::now() + scaled(Duration::from_secs(15));
            loop {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{} did not exit after {signal}:\n{}", self.what, file_tail(&self.log, 4000));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `aegis-agent collector --config`, waited for until it serves.
pub fn start_collector(config: &Path, dir: &Path) -> Process {
    let ready = dir.join("collector.ready");
    let _ = fs::remove_file(&ready);
    let process = Process::spawn(
        &["collector", "--config", config.to_str().unwrap(), "--ready-file", ready.to_str().unwrap()],
        &dir.join("collector.log"),
        "the collector",
    );
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the collector did not start:\n{}", file_tail(&process.log, 4000));
        std::thread::sleep(Duration::from_millis(20));
    }
    process
}

/// `aegis-agent evidence shipper --config`.
pub fn start_shipper(agent_config: &Path, dir: &Path) -> Process {
    Process::spawn(
        &["evidence", "shipper", "--config", agent_config.to_str().unwrap()],
        &dir.join("shipper.log"),
        "the shipper",
    )
}

/// `aegis-agent ARGS`.
pub fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).output().expect("running aegis-agent")
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The spool's state, as `evidence spool` prints it.
pub fn spool_status(agent_config: &Path) -> serde_json::Value {
    let out = agent(&["evidence", "spool", "--config", agent_config.to_str().unwrap()]);
    assert!(out.status.success(), "evidence spool: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Wait until the spool is empty; panics with the logs after `timeout`.
pub fn wait_spool_empty(agent_config: &Path, timeout: Duration, logs: &[&Process]) {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        let status = spool_status(agent_config);
        if status["files"] == 0 {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|p| file_tail(&p.log, 3000)).collect();
            panic!("the spool still holds {status} after {timeout:?}:\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The subject file every test bundle attests to.
pub const SUBJECT_NAME: &str = "decisions.jsonl";
pub fn subject_bytes(sequence: u64) -> Vec<u8> {
    format!("{{\"i\":{sequence},\"kind\":\"llm_call\"}}\n").into_bytes()
}

/// A bundle of `key` numbered `sequence`, about [`subject_bytes`], with `padding` bytes of
/// predicate to reach a size; `incident` optional.
pub fn bundle(key: &HostKey, sequence: u64, padding: usize, incident: Option<(&str, Severity)>) -> Vec<u8> {
    let data = subject_bytes(sequence);
    let subject = Subject {
        name: SUBJECT_NAME.into(),
        digest: BTreeMap::from([("sha256".into(), hex::encode(&Sha256::digest(&data)))]),
    };
    let mut meta = BundleMetaBuilder::new(key.name());
    if let Some((id, severity)) = incident {
        meta = meta.incident(id, severity).window("2026-12-06T07:00:00Z", "2026-12-06T07:25:00Z");
    }
    if padding > 0 {
        meta = meta.field("padding", serde_json::Value::String("p".repeat(padding)));
    }
    let created = format!("2026-12-06T07:{:02}:{:02}Z", (sequence / 60) % 60, sequence % 60);
    let predicate = meta.build(&key.verifier(), sequence, &created).unwrap();
    serde_json::to_vec(&dsse::sign_statement(key, vec![subject], PREDICATE_TYPE, predicate).unwrap()).unwrap()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes))
}

/// The objects in a directory store.
pub fn stored_objects(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("store/bundles/sha256"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}
