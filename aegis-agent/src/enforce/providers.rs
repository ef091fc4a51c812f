//! The provider address book: from a provider's name (`openai`) to the addresses the
//! kernel's connect programs should stop or redirect, kept fresh.
//!
//! A provider is a list of host patterns and ports:
//!
//! - exact names (`api.openai.com`), resolved with the system resolver (getaddrinfo, so
//!   `/etc/hosts` and nsswitch apply);
//! - wildcard suffixes (`*.openai.azure.com`, `*-aiplatform.googleapis.com`): a pattern
//!   cannot be resolved, so hosts matching it are *learned* from captured calls
//!   ([`ProviderBook::learn`]) and resolved from then on (at most
//!   [`BookSettings::max_learned_per_provider`] per provider);
//! - IP literals and CIDRs (`203.0.113.7`, `10.20.0.0/16`), used as they are.
//!
//! Built-in providers ([`BUILTIN`]) cover the well-known APIs; a `[providers.NAME]` table
//! in the agent's config ([`ProviderConfig`]) replaces a built-in one of the same name or
//! adds one.
//!
//! # Freshness
//!
//! DNS answers rotate (round-robin returns a subset per query) and change over time, so
//! resolved addresses accumulate with the time each was last seen, and an address is
//! dropped only when its host resolved successfully without it for
//! [`BookSettings::keep_secs`]. A failed resolution changes nothing: the previous
//! addresses stay (a DNS outage must not lift a block), and the failure is logged once
//! with what to do.
//!
//! [`ProviderBook::resolve_now`] resolves a provider at block time, so a block takes effect
//! with fresh addresses at once, and makes it *active*: the refresher
//! ([`ProviderBook::start_refresher`]) re-resolves active providers every
//! [`BookSettings::refresh_secs`] (and soon after a new host is learned for one), calling
//! back with the provider's name when its address set changed. [`ProviderBook::release`]
//! ends that when the provider's last block goes: the agent sends no DNS queries for
//! providers nobody blocked.
//!
//! Lookups run on worker threads with a deadline ([`BookSettings::resolve_timeout_ms`]):
//! a hung resolver never blocks the caller, and a host whose lookup still hangs is not
//! queried again until it returns, so hung lookups cannot pile up threads.
//!
//! Addresses are shared: a provider behind a CDN shares its addresses with other sites,
//! and blocking them by address stops those too (use a route or call-level block, or a
//! narrower `[providers.NAME]` entry, where that matters).
//!
//! Names: providers are lower case `[a-z0-9-]`. Lookups by name also accept the names the
//! call records use (`azure_openai`, `vertex_ai`): `_` reads as `-`, and `vertex-ai` is
//! `vertex`.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    fmt, io,
    net::{IpAddr, ToSocketAddrs as _},
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::sockdiag::{Destination, IpNet};
use crate::control::parse_dest;

/// The built-in providers: name and host patterns (port 443).
pub const BUILTIN: &[(&str, &[&str])] = &[
    ("openai", &["api.openai.com"]),
    ("anthropic", &["api.anthropic.com"]),
    ("gemini", &["generativelanguage.googleapis.com"]),
    ("vertex", &["aiplatform.googleapis.com", "*-aiplatform.googleapis.com"]),
    // Azure OpenAI resources, and those created from AI Foundry.
    ("azure-openai", &["*.openai.azure.com", "*.cognitiveservices.azure.com"]),
    ("mistral", &["api.mistral.ai", "codestral.mistral.ai"]),
    ("cohere", &["api.cohere.com", "api.cohere.ai"]),
    ("groq", &["api.groq.com"]),
    ("openrouter", &["openrouter.ai"]),
    ("together", &["api.together.xyz", "api.together.ai"]),
    ("deepseek", &["api.deepseek.com"]),
    ("xai", &["api.x.ai"]),
    ("perplexity", &["api.perplexity.ai"]),
    ("fireworks", &["api.fireworks.ai"]),
];

/// Other spellings of provider names (after `_` → `-`), as the call records write them.
const ALIASES: &[(&str, &str)] = &[("vertex-ai", "vertex")];

/// Longest provider name.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest host name (DNS).
const MAX_HOST_BYTES: usize = 253;
/// Lookups run at once, per resolution round.
const RESOLVER_THREADS: usize = 8;

/// One `[providers.NAME]` table of the agent's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Exact host names, wildcard suffixes (`*.example.com`, `*-api.example.com`), IP
    /// literals and CIDRs.
    pub hosts: Vec<String>,
    /// Destination ports; empty: every port.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
}

fn default_ports() -> Vec<u16> {
    vec![443]
}

/// The `[providers]` table: provider name to its config.
pub type ProvidersConfig = BTreeMap<String, ProviderConfig>;

/// How the book resolves and how long it keeps what it found.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BookSettings {
    /// Re-resolve active providers this often.
    pub refresh_secs: u64,
    /// Drop an address its host has not returned for this long (at least `refresh_secs`).
    pub keep_secs: u64,
    /// Hosts learned from captured calls, per provider; more are counted and not resolved.
    pub max_learned_per_provider: usize,
    /// Time allowed for one resolution round (all of a provider's hosts).
    pub resolve_timeout_ms: u64,
}

impl Default for BookSettings {
    fn default() -> Self {
        Self { refresh_secs: 30, keep_secs: 3600, max_learned_per_provider: 256, resolve_timeout_ms: 5000 }
    }
}

impl BookSettings {
    fn validate(&self) -> Result<(), String> {
        if self.refresh_secs == 0 {
            return Err("providers: refresh_secs must be at least 1".into());
        }
        if self.keep_secs < self.refresh_secs {
            return Err(format!(
                "providers: keep_secs ({}) must be at least refresh_secs ({}), or addresses would be dropped \
                 between two refreshes",
                self.keep_secs, self.refresh_secs
            ));
        }
        if self.resolve_timeout_ms == 0 {
            return Err("providers: resolve_timeout_ms must be more than 0".into());
        }
        Ok(())
    }
}

/// Why a provider name was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "unknown provider {name:?}: the known providers are {}; define others under [providers.NAME] in the \
         agent's config",
        known.join(", ")
    )]
    Unknown { name: String, known: Vec<String> },
}

/// A provider's addresses, as block rules need them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderAddresses {
    pub provider: String,
    /// Configured IPs and CIDRs, and every resolved address still kept (/32 or /128),
    /// sorted, without duplicates.
    pub nets: Vec<IpNet>,
    /// Sorted; empty: every port.
    pub ports: Vec<u16>,
}

impl ProviderAddresses {
    /// One destination per network and port.
    pub fn destinations(&self) -> Vec<Destination> {
        if self.ports.is_empty() {
            return self.nets.iter().map(|&net| Destination { net, port: None }).collect();
        }
        self.nets
            .iter()
            .flat_map(|&net| self.ports.iter().map(move |&port| Destination { net, port: Some(port) }))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// A host whose lookup failed in a resolution round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFailure {
    pub host: String,
    pub error: String,
}

/// The result of [`ProviderBook::resolve_now`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The provider's addresses after the round.
    pub addresses: ProviderAddresses,
    /// Whether they differ from before the round.
    pub changed: bool,
    /// Hosts that did not resolve (their previous addresses were kept).
    pub failed: Vec<HostFailure>,
    /// Wildcard patterns: hosts matching them are covered only once learned.
    pub wildcards: Vec<String>,
}

/// What [`ProviderBook::learn`] did with a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Learned {
    /// A new host of this provider, tracked from now on.
    New(String),
    /// Already tracked (a configured host or learned before).
    Known(String),
    /// Matches this provider, but its learned hosts are at the limit; counted.
    Overflow(String),
    /// Matches no provider's wildcard (or is not a host name).
    NoProvider,
}

/// A lookup's outcome: the addresses, or why there are none.
type Answer = Result<Vec<IpAddr>, String>;

/// A lookup function: host name to addresses.
pub type Resolver = Arc<dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// The system resolver (getaddrinfo).
pub fn system_resolver() -> Resolver {
    Arc::new(|host: &str| {
        let mut ips: Vec<IpAddr> = (host, 0u16).to_socket_addrs()?.map(|a| a.ip().to_canonical()).collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    })
}

/// The provider address book; clones share it.
#[derive(Clone)]
pub struct ProviderBook {
    inner: Arc<Inner>,
}

struct Inner {
    settings: BookSettings,
    providers: BTreeMap<String, Provider>,
    resolver: Resolver,
    state: Mutex<BTreeMap<String, Tracked>>,
    /// Hosts with a lookup under way.
    pending: Arc<Mutex<HashSet<String>>>,
    wake: Mutex<Wake>,
    wake_cv: Condvar,
}

struct Provider {
    exact: Vec<String>,
    /// Wildcard patterns without their `*`: `.openai.azure.com`.
    suffixes: Vec<String>,
    nets: Vec<IpNet>,
    ports: Vec<u16>,
}

#[derive(Default)]
struct Tracked {
    hosts: BTreeMap<String, HostState>,
    learned: usize,
    overflow: u64,
    overflow_logged: bool,
    /// Refreshed by the refresher (set by `resolve_now`, cleared by `release`).
    active: bool,
}

#[derive(Default)]
struct HostState {
    /// Address and when it was last returned.
    addrs: BTreeMap<IpAddr, Instant>,
    failing: bool,
}

#[derive(Default)]
struct Wake {
    stop: bool,
    /// Active providers with a newly learned host.
    dirty: BTreeSet<String>,
}

impl fmt::Debug for ProviderBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderBook").field("providers", &self.names()).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProviderBook {
    /// The built-in providers with `config` over them, resolved by the system resolver.
    pub fn new(config: &ProvidersConfig, settings: BookSettings) -> Result<Self, String> {
        Self::with_resolver(config, settings, system_resolver())
    }

    /// [`ProviderBook::new`] with another lookup function.
    pub fn with_resolver(config: &ProvidersConfig, settings: BookSettings, resolver: Resolver) -> Result<Self, String> {
        settings.validate()?;
        let mut tables: BTreeMap<String, ProviderConfig> = BUILTIN
            .iter()
            .map(|(name, hosts)| {
                let hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
                ((*name).to_owned(), ProviderConfig { hosts, ports: default_ports() })
            })
            .collect();
        for (name, table) in config {
            check_provider_name(name)?;
            tables.insert(name.clone(), table.clone());
        }
        let mut providers = BTreeMap::new();
        let mut owners: BTreeMap<String, String> = BTreeMap::new();
        for (name, table) in tables {
            let provider = Provider::parse(&name, &table)?;
            for pattern in provider.exact.iter().chain(&provider.suffixes) {
                if let Some(other) = owners.insert(pattern.clone(), name.clone()) {
                    let shown =
                        if provider.suffixes.contains(pattern) { format!("*{pattern}") } else { pattern.clone() };
                    return Err(format!(
                        "providers: host {shown} is listed under both [providers.{other}] and [providers.{name}]; \
                         a host belongs to one provider"
                    ));
                }
            }
            providers.insert(name, provider);
        }
        let state = providers
            .iter()
            .map(|(name, p)| {
                let hosts = p.exact.iter().map(|h| (h.clone(), HostState::default())).collect();
                (name.clone(), Tracked { hosts, ..Tracked::default() })
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                providers,
                resolver,
                state: Mutex::new(state),
                pending: Arc::default(),
                wake: Mutex::default(),
                wake_cv: Condvar::new(),
            }),
        })
    }

    /// The provider names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.providers.keys().cloned().collect()
    }

    /// The book's name for `name` (case-insensitive; `azure_openai` is `azure-openai`,
    /// `vertex_ai` is `vertex`), or an error listing the known ones.
    pub fn canonical(&self, name: &str) -> Result<String, ProviderError> {
        let lower = name.trim().to_ascii_lowercase().replace('_', "-");
        let providers = &self.inner.providers;
        let found = if providers.contains_key(&lower) {
            Some(lower)
        } else {
            ALIASES.iter().find(|(alias, _)| *alias == lower).map(|(_, to)| (*to).to_owned())
        };
        found
            .filter(|n| providers.contains_key(n))
            .ok_or_else(|| ProviderError::Unknown { name: name.to_owned(), known: self.names() })
    }

    /// The provider a host belongs to (`host` may carry a port, any case). An exact name
    /// beats a wildcard, a longer wildcard a shorter one; an IP address is looked up in
    /// the configured IPs and CIDRs (the most specific wins).
    pub fn provider_for_host(&self, host: &str) -> Option<String> {
        let host = normalize_host(host)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self
                .inner
                .providers
                .iter()
                .flat_map(|(name, p)| p.nets.iter().filter(|n| n.contains(ip)).map(move |n| (n.prefix, name)))
                .max_by_key(|(prefix, _)| *prefix)
                .map(|(_, name)| name.clone());
        }
        self.match_name(&host).map(|(name, _)| name.to_owned())
    }

    /// A host seen in a captured call: when it matches a provider's wildcard and is not
    /// tracked yet, track it (resolved from then on, soon when the provider is active).
    pub fn learn(&self, host: &str) -> Learned {
        let Some(host) = normalize_host(host).filter(|h| h.parse::<IpAddr>().is_err() && valid_dns_name(h)) else {
            return Learned::NoProvider;
        };
        let Some((name, exact)) = self.match_name(&host) else { return Learned::NoProvider };
        let name = name.to_owned();
        if exact {
            return Learned::Known(name);
        }
        let max = self.inner.settings.max_learned_per_provider;
        let active = {
            let mut state = lock(&self.inner.state);
            let tracked = state.entry(name.clone()).or_default();
            if tracked.hosts.contains_key(&host) {
                return Learned::Known(name);
            }
            if tracked.learned >= max {
                tracked.overflow += 1;
                if !std::mem::replace(&mut tracked.overflow_logged, true) {
                    tracing::warn!(
                        provider = %name,
                        host = %host,
                        max,
                        "provider {name}: more than {max} hosts learned from captured calls; further new hosts are \
                         counted but not resolved, so connects to them are not blocked by address. List them \
                         under [providers.{name}] hosts in the agent's config, or raise \
                         max_learned_per_provider"
                    );
                }
                return Learned::Overflow(name);
            }
            tracked.learned += 1;
            tracked.hosts.insert(host.clone(), HostState::default());
            tracked.active
        };
        tracing::debug!(provider = %name, host = %host, "provider host learned");
        if active {
            lock(&self.inner.wake).dirty.insert(name.clone());
            self.inner.wake_cv.notify_all();
        }
        Learned::New(name)
    }

    /// Hosts of `provider` seen over the learned-host limit.
    pub fn learned_overflow(&self, provider: &str) -> Result<u64, ProviderError> {
        let name = self.canonical(provider)?;
        Ok(lock(&self.inner.state).get(&name).map_or(0, |t| t.overflow))
    }

    /// The host names of `provider` being resolved (configured and learned), sorted.
    pub fn tracked_hosts(&self, provider: &str) -> Result<Vec<String>, ProviderError> {
        let name = self.canonical(provider)?;
        Ok(lock(&self.inner.state).get(&name).map(|t| t.hosts.keys().cloned().collect()).unwrap_or_default())
    }

    /// The addresses of `provider` known now (no lookup).
    pub fn addresses(&self, provider: &str) -> Result<ProviderAddresses, ProviderError> {
        let name = self.canonical(provider)?;
        Ok(self.addresses_of(&name))
    }

    /// Resolve `provider` now (bounded by the resolve timeout) and keep it fresh from now
    /// on (the refresher re-resolves it until [`ProviderBook::release`]).
    pub fn resolve_now(&self, provider: &str) -> Result<Resolution, ProviderError> {
        let name = self.canonical(provider)?;
        lock(&self.inner.state).entry(name.clone()).or_default().active = true;
        Ok(self.refresh(&name, Instant::now()))
    }

    /// Resolve `provider`'s hosts once, quietly, without making it active: what resolves is
    /// kept, a failure changes nothing and is not logged (blocks report their own). For the
    /// blind-spot report, which needs every provider's addresses, blocked or not.
    pub fn resolve_quietly(&self, provider: &str) -> Result<ProviderAddresses, ProviderError> {
        let name = self.canonical(provider)?;
        let hosts: Vec<String> =
            lock(&self.inner.state).get(&name).map(|t| t.hosts.keys().cloned().collect()).unwrap_or_default();
        let results = self.lookup_all(&hosts);
        let now = Instant::now();
        if let Some(tracked) = lock(&self.inner.state).get_mut(&name) {
            for (host, result) in results {
                if let (Some(h), Ok(ips)) = (tracked.hosts.get_mut(&host), result) {
                    for ip in ips {
                        h.addrs.insert(ip.to_canonical(), now);
                    }
                }
            }
        }
        Ok(self.addresses_of(&name))
    }

    /// Stop refreshing `provider` (its last block is gone); what it resolved is kept.
    pub fn release(&self, provider: &str) -> Result<(), ProviderError> {
        let name = self.canonical(provider)?;
        if let Some(t) = lock(&self.inner.state).get_mut(&name) {
            t.active = false;
        }
        Ok(())
    }

    /// Start the refresher thread: every `refresh_secs` (and soon after a host is learned
    /// for one), active providers are resolved again, and `on_change(provider)` is called
    /// for each whose addresses changed. Stopped by [`Refresher::stop`] or on drop.
    pub fn start_refresher(&self, on_change: impl Fn(&str) + Send + 'static) -> io::Result<Refresher> {
        lock(&self.inner.wake).stop = false;
        let book = self.clone();
        let thread = std::thread::Builder::new()
            .name("aegis-providers".into())
            .spawn(move || book.refresher_loop(&on_change))?;
        Ok(Refresher { inner: self.inner.clone(), thread: Some(thread) })
    }

    fn refresher_loop(&self, on_change: &dyn Fn(&str)) {
        let period = Duration::from_secs(self.inner.settings.refresh_secs);
        let mut next = Instant::now() + period;
        loop {
            let due: Vec<String> = {
                let mut wake = lock(&self.inner.wake);
                loop {
                    if wake.stop {
                        return;
                    }
                    if !wake.dirty.is_empty() {
                        break;
                    }
                    let left = next.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    wake = self.inner.wake_cv.wait_timeout(wake, left).unwrap_or_else(|e| e.into_inner()).0;
                }
                let dirty = std::mem::take(&mut wake.dirty);
                drop(wake);
                if Instant::now() >= next {
                    next = Instant::now() + period;
                    lock(&self.inner.state).iter().filter(|(_, t)| t.active).map(|(n, _)| n.clone()).collect()
                } else {
                    dirty.into_iter().collect()
                }
            };
            for name in due {
                if lock(&self.inner.wake).stop {
                    return;
                }
                if self.refresh(&name, Instant::now()).changed {
                    tracing::debug!(provider = %name, "provider addresses changed");
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_change(&name))).is_err() {
                        tracing::error!(provider = %name, "the provider address change handler panicked");
                    }
                }
            }
        }
    }

    /// The provider `host` (normalised) belongs to by name, and whether by exact name.
    fn match_name(&self, host: &str) -> Option<(&str, bool)> {
        let providers = &self.inner.providers;
        if let Some((name, _)) = providers.iter().find(|(_, p)| p.exact.iter().any(|e| e == host)) {
            return Some((name, true));
        }
        providers
            .iter()
            .flat_map(|(name, p)| p.suffixes.iter().map(move |s| (name, s)))
            .filter(|(_, s)| host.len() > s.len() && host.ends_with(s.as_str()))
            .max_by_key(|(_, s)| s.len())
            .map(|(name, _)| (name.as_str(), false))
    }

    fn addresses_of(&self, name: &str) -> ProviderAddresses {
        let Some(p) = self.inner.providers.get(name) else { return ProviderAddresses::default() };
        let mut nets: BTreeSet<(IpAddr, u8)> = p.nets.iter().map(|n| (n.addr, n.prefix)).collect();
        if let Some(t) = lock(&self.inner.state).get(name) {
            for host in t.hosts.values() {
                nets.extend(host.addrs.keys().map(|&ip| (ip, IpNet::host(ip).prefix)));
            }
        }
        ProviderAddresses {
            provider: name.to_owned(),
            nets: nets.into_iter().map(|(addr, prefix)| IpNet { addr, prefix }).collect(),
            ports: p.ports.clone(),
        }
    }

    /// One resolution round of `name` (canonical) at `now`.
    fn refresh(&self, name: &str, now: Instant) -> Resolution {
        let before = self.addresses_of(name);
        let hosts: Vec<String> =
            lock(&self.inner.state).get(name).map(|t| t.hosts.keys().cloned().collect()).unwrap_or_default();
        let results = self.lookup_all(&hosts);
        let keep = Duration::from_secs(self.inner.settings.keep_secs);
        let mut failed = Vec::new();
        {
            let mut state = lock(&self.inner.state);
            let tracked = state.entry(name.to_owned()).or_default();
            for (host, result) in results {
                let Some(h) = tracked.hosts.get_mut(&host) else { continue };
                match result {
                    Ok(ips) => {
                        for ip in ips {
                            h.addrs.insert(ip.to_canonical(), now);
                        }
                        h.addrs.retain(|_, seen| now.saturating_duration_since(*seen) <= keep);
                        if std::mem::replace(&mut h.failing, false) {
                            tracing::info!(provider = %name, host = %host, addresses = h.addrs.len(), "{host} resolves again");
                        }
                    }
                    Err(error) => {
                        if !std::mem::replace(&mut h.failing, true) {
                            tracing::warn!(
                                provider = %name,
                                host = %host,
                                error = %error,
                                kept = h.addrs.len(),
                                "cannot resolve {host} (provider {name}): {error}; keeping its {} known addresses. \
                                 Check this host's resolver (/etc/resolv.conf, systemd-resolved), or list the \
                                 provider's addresses as IPs or CIDRs under [providers.{name}] hosts in the agent's \
                                 config",
                                h.addrs.len()
                            );
                        }
                        failed.push(HostFailure { host, error });
                    }
                }
            }
        }
        let addresses = self.addresses_of(name);
        let wildcards = self
            .inner
            .providers
            .get(name)
            .map_or_else(Vec::new, |p| p.suffixes.iter().map(|s| format!("*{s}")).collect());
        Resolution { changed: addresses != before, addresses, failed, wildcards }
    }

    /// Look every host up on worker threads, within the resolve timeout. A host still
    /// being looked up from an earlier round is not asked again.
    fn lookup_all(&self, hosts: &[String]) -> Vec<(String, Answer)> {
        let timeout = Duration::from_millis(self.inner.settings.resolve_timeout_ms);
        let mut results = Vec::with_capacity(hosts.len());
        let mut queue = VecDeque::new();
        {
            let mut pending = lock(&self.inner.pending);
            for host in hosts {
                if pending.insert(host.clone()) {
                    queue.push_back(host.clone());
                } else {
                    let error = "the previous lookup has not returned yet (the resolver hangs)".to_owned();
                    results.push((host.clone(), Err(error)));
                }
            }
        }
        let expected = queue.len();
        if expected == 0 {
            return results;
        }
        let queue = Arc::new(Mutex::new(queue));
        let (tx, rx) = mpsc::channel();
        let mut workers = 0;
        for _ in 0..expected.min(RESOLVER_THREADS) {
            let (queue, pending, resolver, tx) =
                (queue.clone(), self.inner.pending.clone(), self.inner.resolver.clone(), tx.clone());
            let spawned = std::thread::Builder::new().name("aegis-dns".into()).spawn(move || {
                loop {
                    let Some(host) = lock(&queue).pop_front() else { return };
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolver(&host)))
                        .unwrap_or_else(|_| Err(io::Error::other("the resolver panicked")));
                    lock(&pending).remove(&host);
                    let result = match result {
                        Ok(ips) if ips.is_empty() => Err("no addresses".to_owned()),
                        Ok(ips) => Ok(ips),
                        Err(e) => Err(e.to_string()),
                    };
                    if tx.send((host, result)).is_err() {
                        return;
                    }
                }
            });
            match spawned {
                Ok(_) => workers += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a resolver thread");
                    break;
                }
            }
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        let mut answered = HashSet::new();
        if workers > 0 {
            while answered.len() < expected {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok((host, result)) => {
                        answered.insert(host.clone());
                        results.push((host, result));
                    }
                    Err(_) => break,
                }
            }
        }
        // Hosts no worker took: not pending any more. Hosts a worker holds stay pending
        // until their lookup returns.
        let left: Vec<String> = lock(&queue).drain(..).collect();
        {
            let mut pending = lock(&self.inner.pending);
            for host in &left {
                pending.remove(host);
            }
        }
        for host in hosts {
            if !answered.contains(host) && !results.iter().any(|(h, _)| h == host) {
                let error = if workers == 0 {
                    "no resolver thread could be started".to_owned()
                } else {
                    format!("no answer within {} ms", timeout.as_millis())
                };
                results.push((host.clone(), Err(error)));
            }
        }
        results
    }
}

/// The refresher thread; stops on [`Refresher::stop`] or drop.
pub struct Refresher {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Refresher {
    /// Stop the thread and wait for it (at most for the round under way, which is
    /// bounded by the resolve timeout per provider).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        lock(&self.inner.wake).stop = true;
        self.inner.wake_cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl Provider {
    fn parse(name: &str, table: &ProviderConfig) -> Result<Self, String> {
        let at = |what: String| format!("[providers.{name}] {what}");
        if table.hosts.is_empty() {
            return Err(at("has no hosts: list host names, wildcards (*.example.com), IPs or CIDRs".into()));
        }
        let mut p = Self { exact: Vec::new(), suffixes: Vec::new(), nets: Vec::new(), ports: Vec::new() };
        for entry in &table.hosts {
            match parse_host_entry(entry).map_err(|e| at(format!("hosts: {e}")))? {
                Pattern::Exact(h) => p.exact.push(h),
                Pattern::Suffix(s) => p.suffixes.push(s),
                Pattern::Net(n) => p.nets.push(n),
            }
        }
        for v in [&mut p.exact, &mut p.suffixes] {
            v.sort();
            v.dedup();
        }
        p.nets.sort_by_key(|n| (n.addr, n.prefix));
        p.nets.dedup();
        if table.ports.contains(&0) {
            return Err(at("ports: 0 is not a port (leave ports empty for every port)".into()));
        }
        p.ports = table.ports.clone();
        p.ports.sort_unstable();
        p.ports.dedup();
        Ok(p)
    }
}

enum Pattern {
    Exact(String),
    Suffix(String),
    Net(IpNet),
}

fn check_provider_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "[providers.{name}]: a provider name is 1 to {MAX_NAME_BYTES} lower-case letters, digits and '-' (e.g. \
             openai, azure-openai, my-gateway)"
        ));
    }
    Ok(())
}

fn parse_host_entry(entry: &str) -> Result<Pattern, String> {
    let t = entry.trim();
    if let Some(suffix) = t.strip_prefix('*') {
        let suffix = suffix.trim_end_matches('.').to_ascii_lowercase();
        let rest = suffix.strip_prefix(['.', '-']).unwrap_or("");
        if !valid_dns_name(rest) || !rest.contains('.') {
            return Err(format!(
                "{entry:?} is not a wildcard this agent reads: '*' then '.' or '-' then a domain of at least two \
                 labels, e.g. *.openai.azure.com or *-aiplatform.googleapis.com"
            ));
        }
        return Ok(Pattern::Suffix(suffix));
    }
    if t.contains("://") {
        return Err(format!("{entry:?} is a URL: list the host name alone (e.g. gw.example.com)"));
    }
    let head = t.trim_start_matches('[').split(['/', ']']).next().unwrap_or("");
    if head.parse::<IpAddr>().is_ok() {
        let dest = parse_dest(t).map_err(|e| format!("{e} (without a port: ports go under ports)"))?;
        if dest.port.is_some() {
            return Err(format!("{entry:?} has a port: list ports under ports, not in hosts"));
        }
        return IpNet::new(dest.net, dest.prefix).map(Pattern::Net).ok_or_else(|| format!("{entry:?}: bad prefix"));
    }
    if t.contains(':') {
        return Err(format!("{entry:?} has a port: list ports under ports, not in hosts"));
    }
    let host = t.trim_end_matches('.').to_ascii_lowercase();
    if !valid_dns_name(&host) {
        return Err(format!(
            "{entry:?} is not a host name, a wildcard (*.example.com), an IP address or a CIDR (10.0.0.0/8)"
        ));
    }
    Ok(Pattern::Exact(host))
}

/// Letters, digits, '-' and '_' in non-empty dot-separated labels of at most 63 bytes.
fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HOST_BYTES
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Lower case, without a port, brackets or a trailing dot; `None` when empty.
fn normalize_host(host: &str) -> Option<String> {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(inside, _)| inside)
    } else if h.matches(':').count() == 1 {
        h.split_once(':').map_or(h, |(name, _)| name)
    } else {
        h
    };
    let h = h.trim_end_matches('.').to_ascii_lowercase();
    (!h.is_empty()).then_some(h)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn config(toml_text: &str) -> ProvidersConfig {
        toml::from_str(toml_text).unwrap()
    }

    /// A resolver answering from a table the test changes; counts its calls.
    #[derive(Clone, Default)]
    struct Script {
        answers: Arc<Mutex<HashMap<String, Answer>>>,
        calls: Arc<AtomicUsize>,
    }

    impl Script {
        fn set(&self, host: &str, answer: Result<&[&str], &str>) {
            let answer = answer.map(|ips| ips.iter().map(|s| ip(s)).collect()).map_err(str::to_owned);
            lock(&self.answers).insert(host.to_owned(), answer);
        }

        fn resolver(&self) -> Resolver {
            let me = self.clone();
            Arc::new(move |host: &str| {
                me.calls.fetch_add(1, Ordering::SeqCst);
                match lock(&me.answers).get(host) {
                    Some(Ok(ips)) => Ok(ips.clone()),
                    Some(Err(e)) => Err(io::Error::other(e.clone())),
                    None => Err(io::Error::new(io::ErrorKind::NotFound, "Name or service not known")),
                }
            })
        }
    }

    fn nets(a: &ProviderAddresses) -> Vec<String> {
        a.nets.iter().map(|n| format!("{}/{}", n.addr, n.prefix)).collect()
    }

    #[test]
    fn localhost_resolves_with_the_system_resolver() {
        let book =
            ProviderBook::new(&config("[local]\nhosts = [\"LocalHost.\"]\nports = [8443]\n"), BookSettings::default())
                .unwrap();
        let r = book.resolve_now("local").unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(r.changed);
        let found = nets(&r.addresses);
        assert!(found.contains(&"127.0.0.1/32".to_owned()), "{found:?}");
        assert!(r.addresses.nets.iter().all(|n| n.addr.is_loopback()), "{found:?}");
        let hosts_file = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let v6_listed = hosts_file.lines().any(|l| {
            let mut f = l.split('#').next().unwrap_or("").split_whitespace();
            f.next() == Some("::1") && f.any(|n| n == "localhost")
        });
        if v6_listed {
            assert!(found.contains(&"::1/128".to_owned()), "{found:?}");
        }
        assert_eq!(r.addresses.ports, [8443]);
        assert!(
            r.addresses.destinations().contains(&Destination { net: IpNet::host(ip("127.0.0.1")), port: Some(8443) })
        );
        assert_eq!(book.addresses("local").unwrap(), r.addresses);
        assert_eq!(book.tracked_hosts("local").unwrap(), ["localhost"]);
    }

    #[test]
    fn exact_beats_wildcard() {
        let book = ProviderBook::with_resolver(
            &config(
                "[corp]\nhosts = [\"special.openai.azure.com\"]\n\
                 [corp-eu]\nhosts = [\"*.eu.openai.azure.com\"]\n\
                 [lab]\nhosts = [\"10.20.0.0/16\", \"10.20.30.0/24\", \"2001:db8::/32\"]\n",
            ),
            BookSettings::default(),
            Script::default().resolver(),
        )
        .unwrap();
        let p = |h: &str| book.provider_for_host(h);
        assert_eq!(p("api.openai.com").as_deref(), Some("openai"));
        assert_eq!(p("API.OpenAI.com:443").as_deref(), Some("openai"));
        assert_eq!(p("api.openai.com.").as_deref(), Some("openai"));
        assert_eq!(p("api.openai.com.evil.example"), None);
        assert_eq!(p("evilapi.openai.com"), None);
        assert_eq!(p("myres.openai.azure.com").as_deref(), Some("azure-openai"));
        assert_eq!(p("Special.OpenAI.Azure.com:443").as_deref(), Some("corp"), "exact beats wildcard");
        assert_eq!(p("x.eu.openai.azure.com").as_deref(), Some("corp-eu"), "longer wildcard wins");
        assert_eq!(p("openai.azure.com"), None, "the wildcard needs something before it");
        assert_eq!(p("res.cognitiveservices.azure.com").as_deref(), Some("azure-openai"));
        assert_eq!(p("aiplatform.googleapis.com").as_deref(), Some("vertex"));
        assert_eq!(p("us-central1-aiplatform.googleapis.com").as_deref(), Some("vertex"));
        assert_eq!(p("generativelanguage.googleapis.com").as_deref(), Some("gemini"));
        assert_eq!(p("10.20.1.1:443").as_deref(), Some("lab"));
        assert_eq!(p("[2001:db8::5]:443").as_deref(), Some("lab"));
        assert_eq!(p("2001:db8::5").as_deref(), Some("lab"));
        assert_eq!(p("10.21.0.1"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("localhost:11434"), None);
    }

    #[test]
    fn learning_is_bounded_and_counted() {
        let script = Script::default();
        let settings = BookSettings { max_learned_per_provider: 3, ..BookSettings::default() };
        let book = ProviderBook::with_resolver(&ProvidersConfig::new(), settings, script.resolver()).unwrap();
        let az = || "azure-openai".to_owned();
        for (i, host) in ["a.openai.azure.com:443", "B.openai.azure.com", "c.openai.azure.com."].iter().enumerate() {
            assert_eq!(book.learn(host), Learned::New(az()), "{i}");
        }
        assert_eq!(book.learn("a.openai.azure.com"), Learned::Known(az()));
        assert_eq!(book.learn("d.openai.azure.com"), Learned::Overflow(az()));
        assert_eq!(book.learn("e.openai.azure.com"), Learned::Overflow(az()));
        assert_eq!(book.learned_overflow("azure-openai"), Ok(2));
        assert_eq!(book.learned_overflow("openai"), Ok(0));
        // Other providers have their own bound.
        assert_eq!(book.learn("europe-west4-aiplatform.googleapis.com"), Learned::New("vertex".into()));
        assert_eq!(book.learn("api.openai.com"), Learned::Known("openai".into()), "configured hosts are tracked");
        assert_eq!(book.learn("example.com"), Learned::NoProvider);
        assert_eq!(book.learn("a b.openai.azure.com"), Learned::NoProvider, "not a host name");
        assert_eq!(book.learn("10.0.0.1:443"), Learned::NoProvider);
        assert_eq!(
            book.tracked_hosts("azure_openai").unwrap(),
            ["a.openai.azure.com", "b.openai.azure.com", "c.openai.azure.com"]
        );

        // Learned hosts are resolved with the provider.
        script.set("a.openai.azure.com", Ok(&["192.0.2.1"]));
        script.set("b.openai.azure.com", Ok(&["192.0.2.2", "2001:db8::2"]));
        script.set("c.openai.azure.com", Ok(&["192.0.2.1"]));
        let r = book.resolve_now("azure-openai").unwrap();
        assert_eq!(nets(&r.addresses), ["192.0.2.1/32", "192.0.2.2/32", "2001:db8::2/128"]);
        assert_eq!(r.wildcards, ["*.cognitiveservices.azure.com", "*.openai.azure.com"]);
        assert_eq!(script.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn churn_is_retained_and_stale_addresses_expire() {
        let script = Script::default();
        let book = ProviderBook::with_resolver(
            &config("[rr]\nhosts = [\"api.rr.example\", \"other.rr.example\"]\n"),
            BookSettings { keep_secs: 3600, ..BookSettings::default() },
            script.resolver(),
        )
        .unwrap();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        script.set("api.rr.example", Ok(&["192.0.2.1", "192.0.2.2"]));
        script.set("other.rr.example", Ok(&["198.51.100.9"]));
        let r = book.refresh("rr", at(0));
        assert!(r.changed && r.failed.is_empty());
        assert_eq!(nets(&r.addresses), ["192.0.2.1/32", "192.0.2.2/32", "198.51.100.9/32"]);

        // Round-robin: another subset. The earlier addresses stay.
        script.set("api.rr.example", Ok(&["192.0.2.2", "192.0.2.3"]));
        let r = book.refresh("rr", at(30));
        assert!(r.changed);
        assert_eq!(nets(&r.addresses), ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32", "198.51.100.9/32"]);
        let r = book.refresh("rr", at(60));
        assert!(!r.changed, "nothing new");

        // 192.0.2.1 was last seen at 0, 192.0.2.2 and .3 at 60: kept for keep_secs, no more.
        script.set("api.rr.example", Ok(&["192.0.2.3"]));
        let r = book.refresh("rr", at(3600));
        assert!(!r.changed, "192.0.2.1 was seen 3600 s ago: kept");
        let r = book.refresh("rr", at(3601));
        assert!(r.changed);
        assert_eq!(nets(&r.addresses), ["192.0.2.2/32", "192.0.2.3/32", "198.51.100.9/32"]);

        // The resolver fails: everything is kept, the failure reported, even long after
        // keep_secs (a DNS outage must lift no block).
        script.set("api.rr.example", Err("Temporary failure in name resolution"));
        let r = book.refresh("rr", at(4000));
        assert!(!r.changed);
        assert_eq!(
            r.failed,
            [HostFailure { host: "api.rr.example".into(), error: "Temporary failure in name resolution".into() }]
        );
        let r = book.refresh("rr", at(9000));
        assert!(!r.changed);
        assert_eq!(nets(&r.addresses), ["192.0.2.2/32", "192.0.2.3/32", "198.51.100.9/32"]);

        // Back: what it no longer returns goes; the other host's address, seen at every
        // round, stays.
        script.set("api.rr.example", Ok(&["192.0.2.4"]));
        let r = book.refresh("rr", at(9001));
        assert!(r.changed && r.failed.is_empty());
        assert_eq!(nets(&r.addresses), ["192.0.2.4/32", "198.51.100.9/32"]);
    }

    #[test]
    fn literals_and_cidrs_need_no_dns() {
        let script = Script::default();
        let book = ProviderBook::with_resolver(
            &config(
                "[lab]\nhosts = [\"10.1.0.0/16\", \"192.0.2.7\", \"[2001:db8::]/32\", \"::1\"]\nports = [8443, 443]\n",
            ),
            BookSettings::default(),
            script.resolver(),
        )
        .unwrap();
        let r = book.resolve_now("lab").unwrap();
        assert_eq!(script.calls.load(Ordering::SeqCst), 0);
        assert!(!r.changed, "configured: known before any lookup");
        assert_eq!(nets(&r.addresses), ["10.1.0.0/16", "192.0.2.7/32", "::1/128", "2001:db8::/32"]);
        assert_eq!(r.addresses.ports, [443, 8443]);
        let d = r.addresses.destinations();
        assert_eq!(d.len(), 8);
        assert_eq!(d[0], Destination { net: IpNet::new(ip("10.1.0.0"), 16).unwrap(), port: Some(443) });

        let any_port = ProviderBook::with_resolver(
            &config("[lab]\nhosts = [\"10.1.0.0/16\"]\nports = []\n"),
            BookSettings::default(),
            script.resolver(),
        )
        .unwrap();
        assert_eq!(
            any_port.addresses("lab").unwrap().destinations(),
            [Destination { net: IpNet::new(ip("10.1.0.0"), 16).unwrap(), port: None }]
        );
    }

    #[test]
    fn names_and_errors() {
        let book = ProviderBook::with_resolver(
            &config("[openai]\nhosts = [\"openai-gw.corp.example\"]\n[my-gw]\nhosts = [\"gw.corp.example\"]\n"),
            BookSettings::default(),
            Script::default().resolver(),
        )
        .unwrap();
        assert_eq!(book.canonical("OpenAI"), Ok("openai".into()));
        assert_eq!(book.canonical("azure_openai"), Ok("azure-openai".into()));
        assert_eq!(book.canonical("vertex_ai"), Ok("vertex".into()));
        assert_eq!(book.provider_for_host("api.openai.com"), None, "the config replaced the built-in hosts");
        assert_eq!(book.provider_for_host("openai-gw.corp.example").as_deref(), Some("openai"));
        let err = book.resolve_now("nope").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown provider \"nope\": the known providers are anthropic, azure-openai, cohere, deepseek, fireworks, \
             gemini, groq, mistral, my-gw, openai, openrouter, perplexity, together, vertex, xai; define others under \
             [providers.NAME] in the agent's config"
        );
        assert!(matches!(book.addresses("nope"), Err(ProviderError::Unknown { .. })));

        let bad = |toml_text: &str| {
            ProviderBook::with_resolver(&config(toml_text), BookSettings::default(), Script::default().resolver())
                .unwrap_err()
        };
        assert_eq!(
            bad("[My_GW]\nhosts = [\"x.example\"]\n"),
            "[providers.My_GW]: a provider name is 1 to 64 lower-case letters, digits and '-' (e.g. openai, \
             azure-openai, my-gateway)"
        );
        assert_eq!(
            bad("[gw]\nhosts = []\n"),
            "[providers.gw] has no hosts: list host names, wildcards (*.example.com), IPs or CIDRs"
        );
        assert_eq!(
            bad("[gw]\nhosts = [\"*.com\"]\n"),
            "[providers.gw] hosts: \"*.com\" is not a wildcard this agent reads: '*' then '.' or '-' then a domain \
             of at least two labels, e.g. *.openai.azure.com or *-aiplatform.googleapis.com"
        );
        assert_eq!(
            bad("[gw]\nhosts = [\"gw.example:8443\"]\n"),
            "[providers.gw] hosts: \"gw.example:8443\" has a port: list ports under ports, not in hosts"
        );
        assert_eq!(
            bad("[gw]\nhosts = [\"10.0.0.1:8443\"]\n"),
            "[providers.gw] hosts: \"10.0.0.1:8443\" has a port: list ports under ports, not in hosts"
        );
        assert!(bad("[gw]\nhosts = [\"10.0.0.1/8\"]\n").contains("has host bits set"));
        assert_eq!(
            bad("[gw]\nhosts = [\"https://gw.example\"]\n"),
            "[providers.gw] hosts: \"https://gw.example\" is a URL: list the host name alone (e.g. gw.example.com)"
        );
        assert!(bad("[gw]\nhosts = [\"gw.example/v1\"]\n").contains("is not a host name"));
        assert_eq!(
            bad("[gw]\nhosts = [\"x.example\"]\nports = [0]\n"),
            "[providers.gw] ports: 0 is not a port (leave ports empty for every port)"
        );
        assert_eq!(
            bad("[gw]\nhosts = [\"api.anthropic.com\"]\n"),
            "providers: host api.anthropic.com is listed under both [providers.anthropic] and [providers.gw]; a host \
             belongs to one provider"
        );
        let unknown_key = toml::from_str::<ProvidersConfig>("[gw]\nhost = [\"x\"]\n").unwrap_err().to_string();
        assert!(unknown_key.contains("unknown field `host`"), "{unknown_key}");
        let settings = BookSettings { keep_secs: 10, refresh_secs: 30, ..BookSettings::default() };
        assert!(ProviderBook::new(&ProvidersConfig::new(), settings).unwrap_err().contains("keep_secs (10)"));
    }

    #[test]
    fn a_hung_resolver_does_not_block_the_caller() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let resolver: Resolver = Arc::new(move |host: &str| {
            if host == "hang.example" {
                let _ = lock(&release_rx).recv();
                return Ok(vec![ip("192.0.2.99")]);
            }
            Ok(vec![ip("192.0.2.1")])
        });
        let book = ProviderBook::with_resolver(
            &config("[gw]\nhosts = [\"hang.example\", \"ok.example\"]\n"),
            BookSettings { resolve_timeout_ms: 200, ..BookSettings::default() },
            resolver,
        )
        .unwrap();
        let started = Instant::now();
        let r = book.resolve_now("gw").unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert_eq!(nets(&r.addresses), ["192.0.2.1/32"]);
        assert_eq!(r.failed, [HostFailure { host: "hang.example".into(), error: "no answer within 200 ms".into() }]);
        // Still hung: not asked again.
        let r = book.resolve_now("gw").unwrap();
        assert_eq!(
            r.failed,
            [HostFailure {
                host: "hang.example".into(),
                error: "the previous lookup has not returned yet (the resolver hangs)".into()
            }]
        );
        release_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&book.inner.pending).contains("hang.example") {
            assert!(Instant::now() < deadline, "the lookup never returned");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn refresher_reports_changes_and_stops() {
        let script = Script::default();
        script.set("a.openai.azure.com", Ok(&["192.0.2.1"]));
        script.set("b.openai.azure.com", Ok(&["192.0.2.2"]));
        let book =
            ProviderBook::with_resolver(&ProvidersConfig::new(), BookSettings::default(), script.resolver()).unwrap();
        book.learn("a.openai.azure.com");
        let r = book.resolve_now("azure-openai").unwrap();
        assert_eq!(nets(&r.addresses), ["192.0.2.1/32"]);
        let (tx, rx) = mpsc::channel();
        let refresher = book.start_refresher(move |p| tx.send(p.to_owned()).unwrap()).unwrap();
        // A new host for an active provider is resolved without waiting for the period.
        assert_eq!(book.learn("b.openai.azure.com"), Learned::New("azure-openai".into()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "azure-openai");
        assert_eq!(nets(&book.addresses("azure-openai").unwrap()), ["192.0.2.1/32", "192.0.2.2/32"]);
        // Inactive providers are not resolved.
        book.release("azure-openai").unwrap();
        let calls = script.calls.load(Ordering::SeqCst);
        book.learn("c.openai.azure.com");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(script.calls.load(Ordering::SeqCst), calls);
        let started = Instant::now();
        refresher.stop();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
