//! A fleet on one machine: a CA, a collector serving the fleet's policy, the fleet's
//! signing keys, and many agents, each with its own state directory, host key and client
//! certificate. Most run `aegis-agent run --no-kernel` (no eBPF programs: a real kernel
//! agent per network namespace is not possible here, they would all attach to the same
//! libraries); a test may add one real agent beside them. Shared by `tests/fleet.rs` and
//! the `fleet_bench` binary.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use aegis_agent::evidence::key::HostKey;
use nix::sys::signal::Signal;

use crate::{
    agent_bin,
    collector::{Enrolled, Pki, Process, collector_toml, free_port, start_collector},
    file_tail, scaled,
};

pub const FLEET: &str = "it-fleet";

/// One agent of the fleet.
pub struct Member {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub process: Option<Process>,
}

impl Member {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }

    /// Start it (`run --no-kernel`), without waiting.
    pub fn spawn(&mut self) {
        let _ = fs::remove_file(self.ready());
        let (config, ready) = (self.config.display().to_string(), self.ready().display().to_string());
        self.process = Some(Process::spawn(
            &["run", "--no-kernel", "--config", &config, "--ready-file", &ready],
            &self.dir.join("agent.log"),
            &format!("agent {}", self.name),
        ));
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        while !self.ready().exists() {
            let log = self.process.as_ref().map(|p| p.log.clone()).unwrap_or_default();
            assert!(Instant::now() < deadline, "agent {} did not start:\n{}", self.name, file_tail(&log, 3000));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop_with(Signal::SIGTERM);
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").pid()
    }

    /// `aegis-agent status --json` of this agent.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(agent_bin())
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .expect("running aegis-agent status");
        assert!(out.status.success(), "status of {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

/// The fleet: its collector, keys and members.
pub struct Fleet {
    pub dir: PathBuf,
    pub pki: Pki,
    pub port: u16,
    pub collector: Process,
    pub members: Vec<Member>,
    /// The fleet's two signing keys (PEM files); policies need both (threshold 2).
    pub signing_keys: [PathBuf; 2],
    /// A third key the fleet does not trust.
    pub stranger_key: PathBuf,
    /// The operator's client certificate and key.
    pub operator: (PathBuf, PathBuf),
}

/// The `[collector]` and `[fleet]` tables of an agent of `fleet` whose files are in `dir`.
pub fn member_toml(
    fleet: &FleetKeys,
    port: u16,
    pki: &Pki,
    client: (&Path, &Path),
    dir: &Path,
    drop_dir: Option<&Path>,
) -> String {
    let s = |p: &Path| format!("{:?}", p.display().to_string());
    format!(
        "[collector]\nurl = \"https://127.0.0.1:{port}\"\nca = {}\ncert = {}\nkey = {}\nspool_dir = {}\nbackoff_max_secs = 1\n\n\
         [fleet]\nname = {FLEET:?}\nkeys = [{}]\nthreshold = 2\nstate_file = {}\nwait_secs = 20\nbackoff_max_secs = 1\n\
         drop_dir = {}\n",
        s(&pki.ca()),
        s(client.0),
        s(client.1),
        s(&dir.join("spool")),
        fleet.verifiers.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", "),
        s(&dir.join("fleet.json")),
        drop_dir.map_or_else(|| "\"\"".to_owned(), s),
    )
}

/// The public halves of the fleet's keys.
pub struct FleetKeys {
    pub verifiers: Vec<String>,
}

/// A signing key at `path` named `name` (created), and its verifier line.
pub fn signing_key(path: &Path, name: &str) -> String {
    HostKey::load_or_create(path, name).expect("a signing key").0.verifier().to_string()
}

impl Fleet {
    /// A collector and `n` members (not started), plus `extra` enrolled agents (name, key
    /// file, key name) that the caller starts itself (a real agent).
    pub fn new(dir: &Path, n: usize, extra: &[(&str, &Path, &str)]) -> Self {
        fs::create_dir_all(dir).unwrap();
        let pki = Pki::new(&dir.join("pki"), "fleet-ca");
        let signing_keys = [dir.join("fleet-a.key"), dir.join("fleet-b.key")];
        let keys = FleetKeys {
            verifiers: vec![signing_key(&signing_keys[0], "fleet-a"), signing_key(&signing_keys[1], "fleet-b")],
        };
        let stranger_key = dir.join("stranger.key");
        signing_key(&stranger_key, "stranger");
        let operator = pki.issue("operator", &["operator.fleet.test"]);
        let port = free_port();
        let mut enrolled_keys = Vec::new();
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("agent-{i:03}");
            let mdir = dir.join(&name);
            fs::create_dir_all(&mdir).unwrap();
            let key = HostKey::load_or_create(&mdir.join("host.key"), &name).unwrap().0;
            let identity = format!("{name}.fleet.test");
            let client = pki.issue(&name, &[&identity]);
            let s = |p: &Path| format!("{:?}", p.display().to_string());
            let toml = format!(
                "[control]\nsocket = {}\nstate_file = {}\naudit_log = {}\n\n[evidence]\nenabled = false\nkey = {}\nname = {name:?}\n\
                 dir = {}\n\n[lookback]\nenabled = false\n\n[incidents]\ndir = {}\nbundles_dir = {}\n\n[output]\nstdout = false\nfile = \"\"\n\n{}",
                s(&mdir.join("control.sock")),
                s(&mdir.join("blocks.json")),
                s(&mdir.join("audit.jsonl")),
                s(&mdir.join("host.key")),
                s(&mdir.join("decision-log")),
                s(&mdir.join("incidents")),
                s(&mdir.join("bundles")),
                member_toml(&keys, port, &pki, (&client.0, &client.1), &mdir, None),
            );
            let config = mdir.join("agent.toml");
            fs::write(&config, toml).unwrap();
            enrolled_keys.push((name.clone(), key.verifier().to_string(), identity));
            members.push(Member { name, dir: mdir, config, process: None });
        }
        for (name, key_file, key_name) in extra {
            let key = HostKey::load_or_create(key_file, key_name).unwrap().0;
            enrolled_keys.push(((*name).to_owned(), key.verifier().to_string(), format!("{name}.fleet.test")));
        }
        let enrolled: Vec<Enrolled<'_>> = enrolled_keys
            .iter()
            .map(|(name, verifier, identity)| Enrolled { name, verifier: verifier.clone(), client_identity: identity })
            .collect();
        let fleet_table = format!(
            "[fleet]\nname = {FLEET:?}\nkeys = [{}]\nthreshold = 2\nmax_wait_secs = 20\n",
            keys.verifiers.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ")
        );
        let config = collector_toml(dir, &pki, port, &enrolled, "max_connections = 1024\n");
        // The [fleet] table after the [[agents]] array.
        let mut text = fs::read_to_string(&config).unwrap();
        text.push_str(&fleet_table);
        fs::write(&config, text).unwrap();
        let collector = start_collector(&config, dir);
        Self { dir: dir.to_owned(), pki, port, collector, members, signing_keys, stranger_key, operator }
    }

    /// The `[collector]` and `[fleet]` tables for an extra agent named `name`.
    pub fn extra_member_toml(&self, name: &str, dir: &Path, drop_dir: Option<&Path>) -> String {
        let client = self.pki.issue(name, &[&format!("{name}.fleet.test")]);
        let keys = FleetKeys { verifiers: self.signing_keys.iter().map(|k| signing_key(k, &key_name(k))).collect() };
        member_toml(&keys, self.port, &self.pki, (&client.0, &client.1), dir, drop_dir)
    }

    /// Start every member and wait until each is ready and has reached the collector.
    pub fn start_all(&mut self) {
        for m in &mut self.members {
            m.spawn();
        }
        for m in &self.members {
            m.wait_ready();
        }
        self.wait_for_contact(self.members.iter().map(|m| m.name.clone()).collect());
    }

    /// Wait until the collector has heard from each of `names`.
    pub fn wait_for_contact(&self, names: Vec<String>) {
        self.wait_for_agents(&names, Duration::from_secs(60), "never reached the collector", |a| {
            a["last_contact"].is_string()
        });
    }

    /// Wait until `pred` holds for the collector's row of each agent in `names`; the
    /// fleet's status then.
    fn wait_for_agents(
        &self,
        names: &[String],
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + scaled(timeout);
        loop {
            let status = self.status();
            let waiting: Vec<&String> = names
                .iter()
                .filter(|n| {
                    !status["agents"].as_array().into_iter().flatten().any(|a| a["agent"] == n.as_str() && pred(a))
                })
                .collect();
            if waiting.is_empty() {
                return status;
            }
            assert!(Instant::now() < deadline, "agents {what}: {waiting:?}\n{status:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `--collector --ca --cert --key` of the operator.
    pub fn collector_args(&self) -> Vec<String> {
        vec![
            "--collector".into(),
            format!("https://127.0.0.1:{}", self.port),
            "--ca".into(),
            self.pki.ca().display().to_string(),
            "--cert".into(),
            self.operator.0.display().to_string(),
            "--key".into(),
            self.operator.1.display().to_string(),
        ]
    }

    /// `--fleet --signing-key A --signing-key B`.
    pub fn signing_args(&self) -> Vec<String> {
        let mut v = vec!["--fleet".to_owned(), FLEET.to_owned()];
        for k in &self.signing_keys {
            v.push("--signing-key".into());
            v.push(k.display().to_string());
        }
        v
    }

    /// `aegis-agent fleet ARGS...`.
    pub fn fleet_cmd(&self, args: &[&str]) -> Output {
        Command::new(agent_bin()).arg("fleet").args(args).output().expect("running aegis-agent fleet")
    }

    /// A push (`fleet block|unblock|emergency ...`) with the fleet's keys, the operator's
    /// certificate and `deadline`.
    pub fn push(&self, args: &[&str], deadline: &str) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend(self.signing_args());
        all.extend(self.collector_args());
        all.extend(["--deadline".to_owned(), deadline.to_owned()]);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.fleet_cmd(&refs)
    }

    /// `fleet status --json`.
    pub fn status(&self) -> serde_json::Value {
        let mut args = vec!["status".to_owned(), "--json".to_owned()];
        args.extend(self.collector_args());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.fleet_cmd(&refs);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "fleet status --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Wait until every agent in `names` has `version` in force; the status then.
    pub fn wait_for_version(&self, names: &[String], version: u64, timeout: Duration) -> serde_json::Value {
        self.wait_for_agents(names, timeout, &format!("without version {version}"), |a| {
            a["version"].as_u64() >= Some(version)
        })
    }
}

fn key_name(path: &Path) -> String {
    path.file_stem().and_then(|s| s.to_str()).unwrap_or("fleet").to_owned()
}

/// Time from publish to in force (`since_publish_ms`) of the agents in `names` of a status.
pub fn convergence_ms(status: &serde_json::Value, names: &[String]) -> Vec<f64> {
    status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| names.iter().any(|n| a["agent"] == n.as_str()))
        .filter_map(|a| a["since_publish_ms"].as_f64())
        .collect()
}

/// The agents' own time to apply (`apply_ms`: from the policy's receipt to in force) of
/// the agents in `names` of a status.
pub fn apply_ms(status: &serde_json::Value, names: &[String]) -> Vec<f64> {
    status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| names.iter().any(|n| a["agent"] == n.as_str()))
        .filter_map(|a| a["apply_ms"].as_f64())
        .collect()
}

/// p50, p99 and max of `v` (sorted in place).
pub fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), *v.last().expect("values"))
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }
}
