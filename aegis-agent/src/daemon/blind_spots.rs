//! The daemon's blind-spot report: the connect watch loaded as a capability of its own, and
//! the service fed with the providers' addresses and capture's probed files.

use std::{
    path::Path,
    sync::{Arc, mpsc::SyncSender},
};

use crate::{
    capture::{
        Output,
        blindspot::{
            Endpoint, Endpoints,
            service::{Handle, Parts, Service},
            watch::ConnectWatch,
        },
        probes::Sources,
        scope::CaptureScope,
    },
    config::Config,
    enforce::providers::ProviderBook,
    kernel::{
        capability::{Capabilities, Capability, CapabilityStatus, ProgramStatus},
        features::Features,
    },
    sinks::record::Record,
};

/// The watch loaded and attached (reported as the `blind_spots` capability), and the
/// tracker capture is to feed; None when it is off or this kernel cannot run it.
pub fn load(config: &Config, features: &Features, caps: &Capabilities) -> Option<(Handle, ConnectWatch)> {
    let settings = &config.blind_spots;
    if !settings.enabled {
        caps.set(CapabilityStatus::off(Capability::BlindSpots, "blind_spots.enabled = false in the configuration"));
        return None;
    }
    let missing = features.missing(&Capability::BlindSpots.needs());
    if !missing.is_empty() {
        let reason = format!("this kernel lacks {}", missing.join(", "));
        caps.set(CapabilityStatus::unavailable(Capability::BlindSpots, reason));
        return None;
    }
    let btf = features.btf()?;
    // Until the providers are resolved, only their listed addresses are known; the ports
    // are every provider's (443 unless configured).
    match ConnectWatch::start(btf, Some(&[443])) {
        Ok(watch) => {
            let program = ProgramStatus {
                object: "watch".into(),
                program: "watch_connect".into(),
                verified_insns: watch.verified_insns(),
            };
            caps.set(
                CapabilityStatus::active(Capability::BlindSpots, "raw tracepoint inet_sock_set_state (TCP connects)")
                    .with_programs(vec![program]),
            );
            Some((Handle::new(settings), watch))
        }
        Err(e) => {
            caps.set(CapabilityStatus::unavailable(Capability::BlindSpots, format!("{e:#}")));
            None
        }
    }
}

/// Whether capture is to be scoped to the processes that talk to model endpoints: asked
/// for (`capture.scope`), and the connect watch that names them runs. Without it, every
/// process is probed (said once).
pub fn scoped_capture(config: &Config, watch_loaded: bool) -> bool {
    if config.capture.scope != CaptureScope::ModelProcesses {
        return false;
    }
    if !watch_loaded {
        tracing::warn!(
            "capture.scope = \"model_processes\" needs the blind_spots capability (the connect watch names the \
             processes to probe), which is not running: every process is probed instead (see `aegis-agent status`)"
        );
    }
    watch_loaded
}

/// What the service is built from.
pub struct Wiring<'a> {
    pub config: &'a Config,
    pub providers: &'a Arc<ProviderBook>,
    /// Capture's targets.
    pub sources: Sources,
    pub capture_active: bool,
}

/// Start the service on a loaded watch; `attach` gets the processes to probe (scoped capture).
pub fn start(
    wiring: Wiring<'_>,
    loaded: Option<(Handle, ConnectWatch)>,
    events: SyncSender<Output>,
    attach: Option<SyncSender<crate::capture::scope::ProbeRequest>>,
) -> Option<Service> {
    let Wiring { config, providers, sources, capture_active } = wiring;
    let (handle, watch) = loaded?;
    let book = providers.clone();
    let endpoints = move || {
        Endpoints(
            book.names()
                .into_iter()
                .filter_map(|name| {
                    let a = book.resolve_quietly(&name).ok()?;
                    Some(Endpoint { provider: a.provider, nets: a.nets, ports: a.ports })
                })
                .collect(),
        )
    };
    let book = providers.clone();
    let provider_for_host = move |host: &str| book.provider_for_host(host);
    let probed = move |path: &Path| {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|t| std::fs::canonicalize(&t.path).unwrap_or_else(|_| t.path.clone()) == real)
    };
    let report = move |r| {
        // Blocks while the output queue is full: a report is rare and must not be lost.
        let _ = events.send(Output::Record(Record::BlindSpot(r)));
    };
    let parts = Parts {
        watch,
        endpoints: Box::new(endpoints),
        provider_for_host: Box::new(provider_for_host),
        probed: Box::new(probed),
        capture_active,
        report: Box::new(report),
        attach,
    };
    match Service::start(&config.blind_spots, parts, handle) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the blind-spot threads: blind spots are not reported");
            None
        }
    }
}
