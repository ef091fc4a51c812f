//! Agent configuration: TOML, with the defaults embedded from `packaging/aegis.toml` so the
//! agent runs with no file at all and a file only needs the keys it changes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// The default configuration shipped in `packaging/aegis.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../packaging/aegis.toml");

/// Largest configuration file read, in bytes: the commented default is 14 KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest ring buffer `capture.ring_buffer_bytes` may ask for: the kernel pins it in
/// memory, and the agent's own buffers grow with it (2 GiB cost 4.2 GB of RSS). 256 MiB
/// holds several seconds of the heaviest capture measured; the default is 16 MiB.
pub const MAX_RING_BUFFER_BYTES: u32 = 256 << 20;
/// Bounds of `capture.max_head_bytes`, `capture.max_header_fields` and
/// `capture.max_oversized_head_bytes`: what one connection may hold while reading a head,
/// and how long an oversized head is read (it is not kept).
pub const MAX_HEAD_BYTES: usize = 1 << 20;
pub const MAX_HEADER_FIELDS: usize = 4096;
pub const MAX_OVERSIZED_HEAD_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub capture: CaptureConfig,
    pub rules: RulesConfig,
    pub output: OutputConfig,
    pub enforce: EnforceConfig,
    #[serde(default)]
    pub control: crate::control::ControlConfig,
    /// Providers a block can name, besides the built-in ones (`[providers.NAME]`).
    #[serde(default)]
    pub providers: crate::enforce::providers::ProvidersConfig,
    pub capabilities: CapabilitiesConfig,
    /// The host key and the decision log (`[evidence]`).
    pub evidence: crate::evidence::EvidenceConfig,
    /// Incidents: where they are kept, and the rules that open them (`[incidents]`).
    pub incidents: crate::evidence::incident::IncidentsConfig,
    /// The recent history snapshots are cut from (`[lookback]`).
    pub lookback: crate::sinks::lookback::LookbackConfig,
    /// Where evidence bundles are shipped (`[collector]`; empty url: nowhere).
    pub collector: crate::evidence::spool::ShipperConfig,
    /// Signed fleet policies (`[fleet]`; empty name: none).
    pub fleet: crate::fleet::FleetConfig,
    /// The Prometheus `/metrics` and `/healthz` listener, and model prices (`[metrics]`).
    pub metrics: crate::metrics::MetricsConfig,
    /// Call records as OpenTelemetry spans over OTLP/HTTP (`[otlp]`; empty endpoint: off).
    pub otlp: crate::sinks::otlp::OtlpConfig,
    /// Processes that talk to model endpoints unseen (`[blind_spots]`).
    pub blind_spots: crate::capture::blindspot::service::Settings,
    /// The file it was read from (None: the embedded defaults): what the agent's own
    /// children (fleet drills) are given.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// `[capabilities]`: what this host cannot do without.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesConfig {
    /// Start fails, saying which and why, when one of these is unavailable.
    pub require: Vec<crate::kernel::capability::Capability>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    pub enabled: bool,
    pub packs: Vec<PathBuf>,
    pub reload_secs: u64,
    pub evidence_key: PathBuf,
    /// Run the learned classifier (`rules::classifier`) on the request's user and tool
    /// messages after the rules.
    pub classifier: bool,
    /// Its threshold (a probability); unset: the model's own, set at most 1% false
    /// positives on its benign texts.
    #[serde(default)]
    pub classifier_threshold: Option<f32>,
    /// The verdict of a score at or above the threshold (warn: the product observes).
    pub classifier_action: crate::rules::pack::Action,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    pub ring_buffer_bytes: u32,
    pub discover: bool,
    pub libraries: Vec<PathBuf>,
    pub executables: Vec<PathBuf>,
    pub rediscover_secs: u64,
    pub workers: usize,
    pub max_connections: usize,
    pub max_body_bytes: usize,
    /// HTTP/1.1 heads: see [`crate::protocol::http1::Limits`].
    pub max_head_bytes: usize,
    pub max_header_fields: usize,
    pub max_oversized_head_bytes: usize,
    pub correlation_window_ms: u64,
    pub idle_timeout_secs: u64,
    /// Every process (`all`), or only those that connect to a model endpoint
    /// (`model_processes`, see `capture::scope`).
    #[serde(default)]
    pub scope: crate::capture::scope::CaptureScope,
    /// Executables probed for every process whatever `scope` says.
    #[serde(default)]
    pub always_probe: Vec<PathBuf>,
}

impl CaptureConfig {
    /// How HTTP/1.1 heads are read.
    pub fn head_limits(&self) -> crate::protocol::http1::Limits {
        crate::protocol::http1::Limits {
            max_head_bytes: self.max_head_bytes,
            max_headers: self.max_header_fields,
            max_oversized_head_bytes: self.max_oversized_head_bytes,
        }
    }
}

/// What happens to the kernel's blocks when the agent is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Blocks stay in force (pinned programs and maps), also after a crash.
    Closed,
    /// Blocks lift once the agent's heartbeat is older than `enforce.grace_secs`.
    Open,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforceConfig {
    /// Load the containment programs and serve the control socket.
    pub enabled: bool,
    /// cgroup v2 directory the connect programs attach to: empty for the cgroup v2 root
    /// (the whole host); a relative path is taken under the cgroup v2 mount; an absolute
    /// one is a directory under the mount or a cgroup v2 path (see `cgroup::Mounts::v2_path`).
    pub cgroup: PathBuf,
    /// bpffs directory holding the pinned programs' links and maps.
    pub pin_dir: PathBuf,
    pub fail: FailMode,
    /// With `fail = "open"`: seconds without the agent's heartbeat before blocks lift.
    pub grace_secs: u64,
    /// Whether rule verdicts of block end the call's connection (`enforce`) or are only
    /// recorded (`observe`); the mode the agent starts in (see `control::mode` for how it
    /// meets `aegis-agent enforce on|off` across restarts).
    pub mode: crate::control::EnforceMode,
    /// The verdict for content the rules could not see (see `policy::inspect`).
    pub uninspectable: crate::rules::pack::Action,
    #[serde(default)]
    pub gate: GateSection,
    /// How provider names are resolved and kept (`[enforce.resolve]`).
    #[serde(default)]
    pub resolve: crate::enforce::providers::BookSettings,
}

/// The in-kernel content gate (`[enforce.gate]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateSection {
    /// Refuse, in the kernel, the send of a TLS write holding a keyword of a `kernel = true`
    /// rule (attached only when the packs have such rules).
    pub enabled: bool,
    /// Remote ports whose connections are gated, besides 443.
    pub ports: Vec<u16>,
}

impl Default for GateSection {
    fn default() -> Self {
        Self { enabled: true, ports: Vec::new() }
    }
}

impl EnforceConfig {
    /// The cgroup v2 directory to attach to.
    pub fn cgroup_dir(&self) -> anyhow::Result<PathBuf> {
        let root = crate::kernel::cgroup2_root()
            .context("no cgroup v2 mount found: enforcement needs cgroup v2 (or set enforce.enabled = false)")?;
        if self.cgroup.as_os_str().is_empty() {
            return Ok(root);
        }
        let text = self.cgroup.to_str().context("enforce.cgroup is not UTF-8")?;
        // Relative: taken under the mount. Absolute: a v2 path or a directory under the mount.
        let given = if self.cgroup.is_absolute() { text.to_owned() } else { format!("/{text}") };
        let mounts = crate::cgroup::Mounts {
            v2: Some(root.to_string_lossy().into_owned()),
            ..crate::cgroup::Mounts::of_this_host()
        };
        let v2 = mounts.v2_path(&given).map_err(|e| anyhow::anyhow!("enforce.cgroup: {e}"))?;
        Ok(root.join(v2.trim_start_matches('/')))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub stdout: bool,
    pub file: PathBuf,
    pub stats_interval_secs: u64,
    /// Bytes of records held in memory while `file` cannot be written.
    pub max_pending_bytes: usize,
}

impl Config {
    /// The embedded defaults.
    pub fn defaults() -> Self {
        Self::parse(DEFAULT_TOML).expect("embedded default config is valid")
    }

    /// Read `path`, layered over the embedded defaults.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = read_file(path)?;
        let mut config = Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))?;
        config.source = Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()));
        Ok(config)
    }

    /// Parse TOML text, layered over the embedded defaults.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut base: toml::Table = DEFAULT_TOML.parse().expect("embedded default config is TOML");
        let over: toml::Table = text.parse()?;
        check_enforce_mode(&over)?;
        merge(&mut base, over);
        let config: Config = toml::Value::Table(base).try_into()?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let ring = self.capture.ring_buffer_bytes;
        anyhow::ensure!(
            ring.is_power_of_two() && ring >= 4096,
            "capture.ring_buffer_bytes = {ring}: must be a power of two and at least 4096"
        );
        anyhow::ensure!(
            ring <= MAX_RING_BUFFER_BYTES,
            "capture.ring_buffer_bytes = {ring}: at most {MAX_RING_BUFFER_BYTES} (256 MiB); the kernel pins the \
             whole buffer in memory. If records report ring buffer drops, add capture.workers instead"
        );
        if let Some(t) = self.rules.classifier_threshold {
            anyhow::ensure!(
                (0.0..=1.0).contains(&t),
                "rules.classifier_threshold = {t}: give a probability between 0 and 1 (or leave it unset for the \
                 model's own)"
            );
        }
        self.lookback.validate()?;
        self.metrics.validate()?;
        self.otlp.validate()?;
        anyhow::ensure!(self.capture.max_connections > 0, "capture.max_connections must be > 0");
        anyhow::ensure!(self.capture.max_body_bytes > 0, "capture.max_body_bytes must be > 0");
        let c = &self.capture;
        anyhow::ensure!(
            (1024..=MAX_HEAD_BYTES).contains(&c.max_head_bytes),
            "capture.max_head_bytes = {}: must be 1024 to {MAX_HEAD_BYTES} (every connection may hold one head of \
             this size)",
            c.max_head_bytes
        );
        anyhow::ensure!(
            (8..=MAX_HEADER_FIELDS).contains(&c.max_header_fields),
            "capture.max_header_fields = {}: must be 8 to {MAX_HEADER_FIELDS}",
            c.max_header_fields
        );
        anyhow::ensure!(
            (c.max_head_bytes..=MAX_OVERSIZED_HEAD_BYTES).contains(&c.max_oversized_head_bytes),
            "capture.max_oversized_head_bytes = {}: must be at least capture.max_head_bytes ({}) and at most \
             {MAX_OVERSIZED_HEAD_BYTES}; equal to it gives up every head over the limits at once",
            c.max_oversized_head_bytes,
            c.max_head_bytes
        );
        anyhow::ensure!(
            self.enforce.enabled || self.enforce.mode == crate::control::EnforceMode::Observe,
            "enforce.mode = \"enforce\" needs enforce.enabled = true (no containment is loaded without it): set \
             enforce.enabled = true, or enforce.mode = \"observe\""
        );
        if !self.evidence.name.is_empty() {
            crate::evidence::key::check_key_name(&self.evidence.name)?;
        }
        Ok(())
    }

    /// Worker threads to run.
    pub fn workers(&self) -> usize {
        match self.capture.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

/// The text of a configuration file, read with the cap of [`MAX_CONFIG_BYTES`] (also by
/// commands that only look up the control socket in it).
pub fn read_file(path: &Path) -> anyhow::Result<String> {
    crate::files::read_capped_to_string(path, MAX_CONFIG_BYTES, "a configuration only needs the keys it changes")
        .with_context(|| format!("cannot read config file {}", path.display()))
}

/// `enforce.mode` and the key it replaced, checked in the operator's own text so that the
/// error names the key, the value and what to write instead (serde's would not name the
/// key).
fn check_enforce_mode(over: &toml::Table) -> anyhow::Result<()> {
    let Some(enforce) = over.get("enforce").and_then(toml::Value::as_table) else {
        return Ok(());
    };
    if let Some(old) = enforce.get("kill_on_block") {
        let instead = if old.as_bool() == Some(false) { "observe" } else { "enforce" };
        anyhow::bail!(
            "enforce.kill_on_block was replaced by enforce.mode: write mode = \"{instead}\" instead of \
             kill_on_block = {old} (\"observe\" records rule verdicts of block, \"enforce\" also ends the call's \
             connection; operator blocks act in both)"
        );
    }
    match enforce.get("mode") {
        None => Ok(()),
        Some(toml::Value::String(m)) if ["observe", "enforce"].contains(&m.as_str()) => Ok(()),
        Some(other) => anyhow::bail!(
            "enforce.mode = {other}: expected \"observe\" (record rule verdicts, stop nothing on their account) or \
             \"enforce\" (a rule verdict of block ends the call's connection)"
        ),
    }
}

/// Recursive table merge: keys of `over` replace those of `base`; nested tables merge.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = Config::defaults();
        assert_eq!(c.capture.ring_buffer_bytes, 16 * 1024 * 1024);
        assert!(c.output.stdout);
        // The learned second stage is on, warns, at the threshold its trainer set on the
        // benign texts.
        assert!(c.rules.classifier && c.rules.classifier_threshold.is_none());
        assert_eq!(c.rules.classifier_action, crate::rules::pack::Action::Warn);
    }

    /// The package's /etc/aegis/aegis.toml holds overrides only: as shipped it changes
    /// nothing, and its commented examples, uncommented, are valid keys.
    #[test]
    fn the_shipped_host_file_is_overrides_only_and_its_examples_are_valid() {
        const SHIPPED: &str = include_str!("../../packaging/etc-aegis.toml");
        let c = Config::parse(SHIPPED).unwrap();
        assert_eq!(c.enforce.mode, Config::defaults().enforce.mode);
        assert_eq!(c.output.file, Config::defaults().output.file);
        let examples: String = SHIPPED
            .lines()
            .skip_while(|l| !l.starts_with("# Common changes"))
            .skip(1)
            .filter_map(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&examples).unwrap_or_else(|e| panic!("{e:#}\n{examples}"));
        assert_eq!(c.enforce.mode, crate::control::EnforceMode::Enforce);
        assert_eq!(c.fleet.name, "prod");
    }

    #[test]
    fn partial_file_overrides_only_its_keys() {
        let c = Config::parse("[output]\nstdout = false\nfile = \"/tmp/x.jsonl\"\n").unwrap();
        assert!(!c.output.stdout);
        assert_eq!(c.output.file, PathBuf::from("/tmp/x.jsonl"));
        assert_eq!(c.capture.max_connections, 16384);
    }

    /// On this host's cgroup v2 mount, wherever it is: every form names the same directory.
    #[test]
    fn the_containment_cgroup_takes_every_form() {
        let Some(root) = crate::kernel::cgroup2_root() else { return };
        let dir = |cgroup: &str| {
            let c = Config::parse(&format!("[enforce]\ncgroup = {cgroup:?}\n")).unwrap();
            c.enforce.cgroup_dir().map_err(|e| format!("{e:#}"))
        };
        assert_eq!(dir(""), Ok(root.clone()));
        let want = Ok(root.join("team-a/job-1"));
        assert_eq!(dir("team-a/job-1"), want);
        assert_eq!(dir("/team-a/job-1"), want);
        assert_eq!(dir(&format!("{}/team-a/job-1/", root.display())), want);
        if let Some(v1) = crate::cgroup::Mounts::of_this_host().v1.first() {
            let err = dir(&format!("{v1}/team-a")).unwrap_err();
            assert!(err.starts_with("enforce.cgroup: cgroup ") && err.contains("cgroup v1 hierarchy"), "{err}");
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::parse("[capture]\nring_bufer_bytes = 4096\n").unwrap_err();
        assert!(format!("{err:#}").contains("ring_bufer_bytes"), "{err:#}");
    }

    #[test]
    fn required_capabilities_are_named_by_their_status_names() {
        use crate::kernel::capability::Capability;
        assert_eq!(Config::defaults().capabilities.require, vec![Capability::Capture]);
        let c = Config::parse("[capabilities]\nrequire = [\"capture\", \"content_gate\"]\n").unwrap();
        assert_eq!(c.capabilities.require, vec![Capability::Capture, Capability::ContentGate]);
        let err = Config::parse("[capabilities]\nrequire = [\"gate\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("unknown variant `gate`"), "{err:#}");
    }

    #[test]
    fn enforce_mode_defaults_to_observe_and_parses() {
        use crate::control::EnforceMode;
        assert_eq!(Config::defaults().enforce.mode, EnforceMode::Observe, "a fresh install observes");
        assert!(Config::defaults().enforce.enabled, "and loads containment for the operator");
        let c = Config::parse("[enforce]\nmode = \"enforce\"\n").unwrap();
        assert_eq!(c.enforce.mode, crate::control::EnforceMode::Enforce);
        let c = Config::parse("[enforce]\nmode = \"observe\"\nenabled = false\n").unwrap();
        assert_eq!((c.enforce.mode, c.enforce.enabled), (EnforceMode::Observe, false));
    }

    #[test]
    fn bad_enforce_mode_names_the_key_and_the_allowed_values() {
        for (value, shown) in [("\"enforcing\"", "\"enforcing\""), ("\"Enforce\"", "\"Enforce\""), ("true", "true")] {
            let err = format!("{:#}", Config::parse(&format!("[enforce]\nmode = {value}\n")).unwrap_err());
            assert_eq!(
                err,
                format!(
                    "enforce.mode = {shown}: expected \"observe\" (record rule verdicts, stop nothing on their \
                     account) or \"enforce\" (a rule verdict of block ends the call's connection)"
                )
            );
        }
    }

    #[test]
    fn kill_on_block_says_what_replaced_it() {
        let err = format!("{:#}", Config::parse("[enforce]\nkill_on_block = true\n").unwrap_err());
        assert!(err.starts_with("enforce.kill_on_block was replaced by enforce.mode: write mode = \"enforce\" instead of kill_on_block = true"), "{err}");
        let err = format!("{:#}", Config::parse("[enforce]\nkill_on_block = false\n").unwrap_err());
        assert!(err.contains("write mode = \"observe\" instead of kill_on_block = false"), "{err}");
    }

    #[test]
    fn enforce_mode_needs_containment_loaded() {
        let err = format!("{:#}", Config::parse("[enforce]\nenabled = false\nmode = \"enforce\"\n").unwrap_err());
        assert_eq!(
            err,
            "enforce.mode = \"enforce\" needs enforce.enabled = true (no containment is loaded without it): set \
             enforce.enabled = true, or enforce.mode = \"observe\""
        );
    }

    #[test]
    fn evidence_key_names_are_checked_at_load() {
        assert_eq!(Config::defaults().evidence.name, "", "the host name by default");
        assert_eq!(Config::parse("[evidence]\nname = \"web-1\"\n").unwrap().evidence.key_name().unwrap(), "web-1");
        let err = format!("{:#}", Config::parse("[evidence]\nname = \"web 1\"\n").unwrap_err());
        assert!(err.starts_with("key name \"web 1\" cannot name a key in signatures"), "{err}");
    }

    #[test]
    fn metrics_are_off_by_default_and_priced_from_the_defaults_and_the_file() {
        let c = Config::defaults();
        assert_eq!(c.metrics.listen_addr().unwrap(), None, "no port is opened unless asked");
        let mini = c.metrics.pricing["openai/gpt-4o-mini"];
        assert_eq!((mini.input_per_mtok, mini.output_per_mtok), (0.15, 0.60));
        let c = Config::parse(
            "[metrics]\nlisten = \"127.0.0.1:9464\"\n[metrics.pricing.\"acme/m1\"]\ninput_per_mtok = 1.0\n\
             output_per_mtok = 2.0\n",
        )
        .unwrap();
        assert_eq!(c.metrics.listen_addr().unwrap(), Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.metrics.pricing["acme/m1"].output_per_mtok, 2.0);
        assert!(c.metrics.pricing.contains_key("openai/gpt-4o-mini"), "the file adds to the shipped prices");
        let err = format!("{:#}", Config::parse("[metrics]\nlisten = \"9464\"\n").unwrap_err());
        assert!(err.starts_with("metrics.listen = \"9464\": invalid socket address syntax"), "{err}");
    }

    #[test]
    fn bad_ring_size_is_rejected() {
        let err = Config::parse("[capture]\nring_buffer_bytes = 5000\n").unwrap_err();
        assert!(format!("{err:#}").contains("power of two"), "{err:#}");
        // 2 GiB was accepted and cost 4.2 GB of memory.
        let err = Config::parse("[capture]\nring_buffer_bytes = 2147483648\n").unwrap_err();
        assert!(format!("{err:#}").contains("at most 268435456 (256 MiB)"), "{err:#}");
        assert_eq!(
            Config::parse("[capture]\nring_buffer_bytes = 268435456\n").unwrap().capture.ring_buffer_bytes,
            1 << 28
        );
    }

    #[test]
    fn config_files_are_read_bounded() {
        let err = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "cannot read config file /dev/zero: it is a character device, not a regular file: give the path of a \
             regular file"
        );
        let path = std::env::temp_dir().join(format!("aegis-config-cap-{}.toml", std::process::id()));
        let mut text = "[output]\nstdout = true\n".to_owned();
        text.push_str(&"# padding\n".repeat(MAX_CONFIG_BYTES as usize / 10));
        std::fs::write(&path, &text).unwrap();
        let err = Config::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(format!("{err:#}").contains("over the limit of 1048576 bytes"), "{err:#}");
    }
}
