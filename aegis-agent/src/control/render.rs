//! What the CLI prints: the `blocks` table (or JSON), the enforcement mode, and one-line
//! summaries of the other replies. Pure functions of the reply and the time.
//!
//! Texts that came from other users (reasons, process names, cgroup paths) are printed
//! with control characters escaped, so that a block set by one operator cannot rewrite
//! another operator's terminal; the agent refuses such texts anyway.

use std::fmt::Write as _;

use super::{
    blocks::{Block, Emergency},
    mode::{EnforceMode, ModeState},
    protocol::{AgentStatus, Reply},
};

/// `secs` as `45s`, `14m 3s`, `2h 5m`, `3d 4h`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) { s.escape_debug().to_string() } else { s.to_owned() }
}

/// When a block ends, from `now_ms`.
fn expires_cell(block: &Block, now_ms: u64) -> String {
    match block.expires_unix_ms {
        None => "never".into(),
        Some(at) if at <= now_ms => "now".into(),
        // Rounded up: "in 1s" until it is gone.
        Some(at) => format!("in {}", human_duration((at - now_ms).div_ceil(1000))),
    }
}

/// `2026-11-26T17:00:00.123000Z` → `2026-11-26 17:00:00Z`.
fn short_time(rfc3339: &str) -> String {
    match rfc3339.get(..19) {
        Some(t) => format!("{}Z", t.replacen('T', " ", 1)),
        None => clean(rfc3339),
    }
}

/// `enforcement mode: observe (the config's enforce.mode); rule verdicts are recorded, ...`:
/// the mode, where it comes from, and what it means for traffic.
pub fn mode_line(mode: &ModeState) -> String {
    let effect = match mode.mode {
        EnforceMode::Observe => {
            "rule verdicts are recorded, not enforced (operator blocks, disables and emergency mode still act)"
        }
        EnforceMode::Enforce => "rule verdicts of block stop calls",
    };
    format!("enforcement mode: {}; {effect}", clean(&mode.to_string()))
}

/// The `blocks` table: the enforcement mode (when the agent reports it) and the emergency
/// state, then one row per active block, oldest first.
pub fn blocks_table(blocks: &[Block], emergency: &Emergency, mode: Option<&ModeState>, now_ms: u64) -> String {
    let mut out = mode.map(|m| format!("{}\n", mode_line(m))).unwrap_or_default();
    let _ = writeln!(out, "emergency mode: {}", clean(&emergency.to_string()));
    if blocks.is_empty() {
        out.push_str("no active blocks\n");
        return out;
    }
    let header = ["ID", "TARGET", "SCOPE", "FALLBACK", "EXPIRES", "SET BY", "SET AT", "REASON"].map(String::from);
    let rows: Vec<[String; 8]> = blocks
        .iter()
        .map(|b| {
            [
                clean(&b.id),
                clean(&b.spec.target.to_string()),
                clean(&b.spec.scope.to_string()),
                b.spec.fallback.map_or_else(|| "-".into(), |f| f.to_string()),
                expires_cell(b, now_ms),
                b.created_by.to_string(),
                short_time(&b.created_at),
                clean(&b.spec.reason),
            ]
        })
        .collect();
    let mut widths = [0usize; 8];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `blocks --json`: `{"mode": {...}, "emergency": {...}, "blocks": [...]}`, pretty-printed
/// (`mode` null from an agent that does not report it).
pub fn blocks_json(blocks: &[Block], emergency: &Emergency, mode: Option<&ModeState>) -> String {
    let value = serde_json::json!({ "mode": mode, "emergency": emergency, "blocks": blocks });
    let mut s = serde_json::to_string_pretty(&value).expect("blocks serialize");
    s.push('\n');
    s
}

/// A human summary of any reply (for `blocks`, the table). For `block`, print the id
/// alone on stdout (for scripts) and this on stderr.
pub fn reply_text(reply: &Reply, now_ms: u64) -> String {
    match reply {
        Reply::Blocked { block, report } => format!(
            "{}: blocked {} ({}){}, expires {}; {report}\n",
            block.id,
            clean(&block.spec.target.to_string()),
            clean(&block.spec.scope.to_string()),
            block.spec.fallback.map(|f| format!(", connects redirected to {f}")).unwrap_or_default(),
            expires_cell(block, now_ms)
        ),
        Reply::Unblocked { block, report } => format!(
            "{}: unblocked {} ({}); {report}\n",
            block.id,
            clean(&block.spec.target.to_string()),
            clean(&block.spec.scope.to_string())
        ),
        Reply::Blocks { blocks, emergency, mode } => blocks_table(blocks, emergency, mode.as_ref(), now_ms),
        Reply::Emergency { emergency, changed, report } => {
            let mut s = format!("emergency mode {}", clean(&emergency.to_string()));
            if *changed {
                let _ = write!(s, "; {report}");
            } else {
                for note in &report.notes {
                    let _ = write!(s, "; {note}");
                }
            }
            s.push('\n');
            s
        }
        // A switch kills nothing by itself: only the notes are worth printing.
        Reply::Enforce { mode, report, .. } => {
            let mut s = mode_line(mode);
            for note in &report.notes {
                let _ = write!(s, "; {note}");
            }
            s.push('\n');
            s
        }
        Reply::Status(status) => status_text(status),
        Reply::Checkpoint { size } => format!("decision log checkpoint signed: {size} entries\n"),
        Reply::Drills { drills } => {
            let mut s = format!("{} drills in progress\n", drills.len());
            for d in drills {
                let _ = writeln!(s, "{} in cgroup {} ({} blocks)", clean(&d.id), clean(&d.cgroup), d.blocks.len());
            }
            s
        }
    }
}

/// `status`: the agent's line, then what each kernel capability came to on this host.
fn status_text(s: &AgentStatus) -> String {
    let mut out = format!(
        "aegis-agent {} (pid {}, control protocol {}) serving since {}; {} active block{}; emergency mode {}",
        s.agent_version,
        s.pid,
        s.protocol,
        short_time(&s.started_at),
        s.blocks,
        if s.blocks == 1 { "" } else { "s" },
        clean(&s.emergency.to_string())
    );
    if let Some(mode) = &s.mode {
        let _ = write!(out, "; enforcement mode {}", clean(&mode.to_string()));
    }
    out.push('\n');
    if let Some(f) = &s.fleet {
        let _ = write!(out, "fleet {}: ", clean(&f.fleet));
        if f.version == 0 {
            out.push_str("no policy yet");
        } else {
            let _ = write!(out, "policy version {} in force since {}", f.version, short_time(&f.applied_at));
            if f.stale {
                let _ =
                    write!(out, ", EXPIRED at {} (the feed is frozen; its blocks stay in force)", clean(&f.expires));
            }
        }
        let _ = write!(out, "; {}", if f.connected { "connected" } else { "not connected" });
        if !f.last_error.is_empty() {
            let _ = write!(out, " ({})", clean(&f.last_error));
        }
        let refused: u64 = f.refused.values().sum();
        if refused > 0 {
            let _ = write!(
                out,
                "; {refused} polic{} refused, last: {}",
                if refused == 1 { "y" } else { "ies" },
                clean(&f.last_refusal)
            );
        }
        out.push('\n');
    }
    if !s.kernel.is_empty() {
        let _ = writeln!(out, "kernel {}", clean(&s.kernel));
    }
    if let Some(h) = &s.capture {
        let _ = writeln!(
            out,
            "capture {}: {} events, {} records ({} waiting for output.file, {} lost), kernel drops {} events / {} \
             bytes",
            if h.healthy { "healthy" } else { "UNHEALTHY" },
            h.events,
            h.records,
            h.records_pending,
            h.records_lost,
            h.kernel_dropped_events,
            h.kernel_dropped_bytes
        );
        for reason in &h.reasons {
            let _ = writeln!(out, "  because: {}", clean(reason));
        }
        if let Some(b) = &h.blind_spots {
            let _ = writeln!(
                out,
                "blind spots: {} connects to {} model endpoints, {} seen by capture, {} unseen ({} reported as \
                 blind_spot records), {} not followed, {} lost in the kernel; {} UDP (QUIC) flows ({} of them \
                 not named: gone first)",
                b.connects,
                b.endpoints,
                b.explained,
                b.blind,
                b.reports,
                b.overflow,
                b.events_lost,
                b.udp_flows,
                b.udp_unowned
            );
            match &b.sni {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "  SNI watch: {} ClientHellos, {} naming a provider, {} of them to an address not known as \
                         its endpoint ({} not named: gone first), {} unreadable, {} dropped by the kernel",
                        s.hellos, s.named, s.unknown_address, s.unowned, s.unreadable, s.dropped
                    );
                }
                None => {
                    let _ = writeln!(out, "  SNI watch: off (blind_spots.sni, or it could not start: see the log)");
                }
            }
        }
        if let Some(c) = &h.scoped {
            let _ = writeln!(
                out,
                "scoped capture: processes probed at their connect {}, at their start {} (exec of one of {} known \
                 programs) and {} (fork of a probed process), {} attach failures, {}",
                c.at_connect,
                c.at_exec,
                c.programs,
                c.at_fork,
                c.attach_failures,
                if c.process_events {
                    format!("{} process events lost", c.events_lost)
                } else {
                    "process events not read (probed at the connect only)".to_owned()
                }
            );
        }
    }
    for c in &s.capabilities {
        let _ = write!(out, "  {:<20} {:<12}", c.name.name(), c.state.name());
        let text: Vec<&str> = [c.detail.as_deref(), c.reason.as_deref()].into_iter().flatten().collect();
        let _ = writeln!(out, " {}", clean(&text.join("; ")));
        if let Some(impact) = &c.impact {
            let _ = writeln!(out, "  {:<20} {:<12} means: {}", "", "", clean(impact));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::{
            blocks::{Actor, BlockSpec, BlockTarget, Expiry, Scope, parse_dest},
            protocol::ApplyReport,
        },
        kernel::capability::{Capability, CapabilityStatus},
    };

    const NOW: u64 = 1_700_000_000_000;

    fn spec_of(target: BlockTarget, scope: Scope, expires: Option<Expiry>, reason: &str) -> BlockSpec {
        BlockSpec { target, scope, expires, fallback: None, reason: reason.into() }
    }

    fn block_of(id: &str, spec: BlockSpec) -> Block {
        let actor = Actor { uid: 0, gid: 0, pid: 4242, comm: "bash".into(), user: Some("root".into()) };
        Block::new(id.into(), spec, actor, NOW).unwrap()
    }

    fn block(id: &str, target: BlockTarget, scope: Scope, expires: Option<Expiry>, reason: &str) -> Block {
        block_of(id, spec_of(target, scope, expires, reason))
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(900), "15m");
        assert_eq!(human_duration(843), "14m 3s");
        assert_eq!(human_duration(7200), "2h");
        assert_eq!(human_duration(7500), "2h 5m");
        assert_eq!(human_duration(86_400), "1d");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }

    #[test]
    fn table() {
        let blocks = [
            block(
                "blk-00000001",
                BlockTarget::Provider("openai".into()),
                Scope::Host,
                Some(Expiry::AfterSecs(900)),
                "incident 42",
            ),
            block_of(
                "blk-00000002",
                BlockSpec {
                    fallback: Some("127.0.0.1:8443".parse().unwrap()),
                    ..spec_of(
                        BlockTarget::Dest(parse_dest("10.0.0.0/8:443").unwrap()),
                        Scope::Cgroup("/team-a".into()),
                        None,
                        "exfil \u{1b}[2J",
                    )
                },
            ),
        ];
        let mut emergency = Emergency::default();
        emergency.set(true, Some("/team-a"));
        let mode = ModeState::at_start(EnforceMode::Observe, None).0;
        let text = blocks_table(&blocks, &emergency, Some(&mode), NOW + 57_000);
        assert_eq!(
            text,
            "enforcement mode: observe (the config's enforce.mode); rule verdicts are recorded, not enforced (operator \
             blocks, disables and emergency mode still act)\n\
             emergency mode: on for cgroups /team-a\n\
             ID            TARGET               SCOPE           FALLBACK        EXPIRES    SET BY                       SET AT                REASON\n\
             blk-00000001  provider openai      host            -               in 14m 3s  root (uid 0, pid 4242 bash)  2023-11-14 22:13:20Z  incident 42\n\
             blk-00000002  dest 10.0.0.0/8:443  cgroup /team-a  127.0.0.1:8443  never      root (uid 0, pid 4242 bash)  2023-11-14 22:13:20Z  exfil \\u{1b}[2J\n"
        );
        // An agent that does not report its mode: no mode line.
        assert_eq!(blocks_table(&[], &Emergency::default(), None, NOW), "emergency mode: off\nno active blocks\n");

        let json: serde_json::Value = serde_json::from_str(&blocks_json(&blocks, &emergency, Some(&mode))).unwrap();
        assert_eq!(json["mode"]["mode"], "observe");
        assert_eq!(json["mode"]["configured"], "observe");
        assert_eq!(json["emergency"]["cgroups"][0], "/team-a");
        assert_eq!(json["blocks"][1]["spec"]["target"]["dest"]["prefix"], 8);
        assert_eq!(json["blocks"][0]["created_by"]["pid"], 4242);
        assert_eq!(json["blocks"][0]["expires_at"], "2023-11-14T22:28:20.000000Z");
        assert_eq!(json["blocks"][1]["spec"]["fallback"], "127.0.0.1:8443");
        assert!(json["blocks"][0]["spec"].get("fallback").is_none());
    }

    #[test]
    fn summaries() {
        let b = block(
            "blk-00000001",
            BlockTarget::Model("gpt-4o".into()),
            Scope::Exe("/usr/bin/python3".into()),
            None,
            "r",
        );
        let report = ApplyReport { killed_connections: 1, notes: vec!["2 map entries".into()] };
        assert_eq!(
            reply_text(&Reply::Blocked { block: b.clone(), report: report.clone() }, NOW),
            "blk-00000001: blocked model gpt-4o (exe /usr/bin/python3), expires never; killed 1 connection; 2 map entries\n"
        );
        let redirected = block_of(
            "blk-00000003",
            BlockSpec {
                fallback: Some("[::1]:8443".parse().unwrap()),
                ..spec_of(BlockTarget::Provider("openai".into()), Scope::Host, Some(Expiry::AfterSecs(60)), "r")
            },
        );
        assert_eq!(
            reply_text(&Reply::Blocked { block: redirected, report: ApplyReport::default() }, NOW),
            "blk-00000003: blocked provider openai (host), connects redirected to [::1]:8443, expires in 1m; killed 0 \
             connections\n"
        );
        assert_eq!(
            reply_text(&Reply::Unblocked { block: b, report: ApplyReport::default() }, NOW),
            "blk-00000001: unblocked model gpt-4o (exe /usr/bin/python3); killed 0 connections\n"
        );
        let on = Emergency { host: true, ..Emergency::default() };
        assert_eq!(
            reply_text(&Reply::Emergency { emergency: on.clone(), changed: true, report: ApplyReport::default() }, NOW),
            "emergency mode on host-wide; killed 0 connections\n"
        );
        let already =
            ApplyReport { killed_connections: 0, notes: vec!["emergency mode was already on host-wide".into()] };
        assert_eq!(
            reply_text(&Reply::Emergency { emergency: on.clone(), changed: false, report: already }, NOW),
            "emergency mode on host-wide; emergency mode was already on host-wide\n"
        );
        let actor = Actor { uid: 0, gid: 0, pid: 4242, comm: "bash\u{1b}[2J".into(), user: Some("root".into()) };
        let mut mode = ModeState::at_start(EnforceMode::Observe, None).0;
        mode.choose(EnforceMode::Enforce, &actor, NOW);
        assert_eq!(
            reply_text(&Reply::Enforce { mode: mode.clone(), changed: true, report: ApplyReport::default() }, NOW),
            "enforcement mode: enforce (set by root (uid 0, pid 4242 bash\\u{1b}[2J) at 2023-11-14T22:13:20.000000Z; \
             the config says observe); rule verdicts of block stop calls\n"
        );
        let already =
            ApplyReport { killed_connections: 0, notes: vec!["the enforcement mode was already enforce".into()] };
        assert!(
            reply_text(&Reply::Enforce { mode: mode.clone(), changed: false, report: already }, NOW)
                .ends_with("; rule verdicts of block stop calls; the enforcement mode was already enforce\n")
        );
        let mut status = AgentStatus {
            agent_version: "0.1.0".into(),
            protocol: 1,
            pid: 7,
            started_at: "2023-11-14T22:13:20.000000Z".into(),
            blocks: 1,
            emergency: on,
            mode: Some(ModeState::at_start(EnforceMode::Observe, None).0),
            kernel: "6.1.0-57-amd64".into(),
            capabilities: vec![
                CapabilityStatus::active(Capability::Capture, "probes on 2 TLS targets"),
                CapabilityStatus::unavailable(
                    Capability::ContentGate,
                    "the kernel refused eBPF program gate_write_enter",
                ),
            ],
            fleet: None,
            capture: None,
        };
        let expected = format!(
            "aegis-agent 0.1.0 (pid 7, control protocol 1) serving since 2023-11-14 22:13:20Z; 1 active block; \
             emergency mode on host-wide; enforcement mode observe (the config's enforce.mode)\nkernel \
             6.1.0-57-amd64\n  capture              active       probes on 2 TLS targets\n  content_gate         \
             unavailable  the kernel refused eBPF program gate_write_enter\n  {:33} means: {}\n",
            "",
            Capability::ContentGate.impact()
        );
        assert_eq!(reply_text(&Reply::Status(status.clone()), NOW), expected);
        status.capture = Some(Box::new(crate::control::protocol::CaptureHealth {
            healthy: false,
            reasons: vec!["the ring buffer reader has not run for 31 s".into()],
            state: crate::kernel::capability::State::Active,
            events: 120,
            records: 7,
            records_pending: 0,
            records_lost: 2,
            kernel_dropped_events: 3,
            kernel_dropped_bytes: 900,
            blind_spots: None,
            scoped: Some(Box::new(crate::capture::scope::ScopedCounts {
                at_connect: 3,
                at_exec: 2,
                at_fork: 1,
                programs: 1,
                process_events: true,
                ..Default::default()
            })),
        }));
        let text = reply_text(&Reply::Status(status.clone()), NOW);
        assert!(
            text.contains(
                "\ncapture UNHEALTHY: 120 events, 7 records (0 waiting for output.file, 2 lost), kernel drops 3 events \
                 / 900 bytes\n  because: the ring buffer reader has not run for 31 s\nscoped capture: processes probed at \
                 their connect 3, at their start 2 (exec of one of 1 known programs) and 1 (fork of a probed process), \
                 0 attach failures, 0 process events lost\n  capture              active"
            ),
            "{text}"
        );
        status.capture = None;
        status.mode = None;
        status.capabilities.clear();
        status.kernel.clear();
        assert!(reply_text(&Reply::Status(status), NOW).ends_with("; emergency mode on host-wide\n"));
    }
}
