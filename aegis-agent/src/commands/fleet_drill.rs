//! `aegis-agent drill --fleet NAME`: the drill on every host of the fleet (see
//! [`crate::fleet::drill`]). The next version of the fleet's policy carries the drill
//! request (signed with the fleet's keys, published to the collector like `fleet block`);
//! every agent that puts it in force runs the drill on its host and sends its signed result
//! with its report; this command waits for every enrolled agent's result up to
//! `--deadline`, writes each host's report and the aggregate (which hosts failed which step,
//! p50/p99 of each phase, which hosts did not run it and why, which never answered).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    collector::CollectorArgs,
    drill::RunArgs,
    exit,
    fleet::{SigningArgs, client, publish_next, runtime},
};
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    control::parse_duration,
    drill::{aggregate, report::DrillReport},
    fleet::drill::{DrillRequest, DrillResult, DrillStatus, ScenarioFile},
};

/// `drill --fleet`'s own options.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FleetDrillArgs {
    /// Run the drill on every host of this fleet, through the collector (the next version
    /// of the fleet's policy carries it); needs --signing-key, --collector and --ca.
    #[arg(long, value_name = "NAME")]
    pub fleet: Option<String>,
    /// A fleet signer's private key (repeat for a threshold above 1).
    #[arg(long = "signing-key", value_name = "PEM", requires = "fleet")]
    pub signing_keys: Vec<PathBuf>,
    /// The collector, https://host:port.
    #[arg(long, value_name = "URL", requires = "fleet")]
    pub collector: Option<String>,
    /// The CA of the collector's certificate (PEM).
    #[arg(long, value_name = "PEM", requires = "fleet")]
    pub ca: Option<PathBuf>,
    /// The operator's client certificate (PEM), with --key.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// How long to wait for every host's result.
    #[arg(long, value_parser = parse_duration, default_value = "20m", requires = "fleet")]
    pub deadline: Option<Duration>,
    /// A host that gets the policy later than this after publication does not start the
    /// drill (it answers `not_run`).
    #[arg(long, value_parser = parse_duration, default_value = "15m", requires = "fleet")]
    pub start_within: Option<Duration>,
}

/// One host that gave no report.
#[derive(Clone, Debug, Serialize)]
pub struct NoReport {
    pub host: String,
    pub status: DrillStatus,
    pub reason: String,
}

/// The fleet drill's report.
#[derive(Clone, Debug, Serialize)]
pub struct FleetDrillReport {
    pub drill: String,
    pub fleet: String,
    pub policy_version: u64,
    pub published_at: String,
    pub took_ms: u64,
    /// Enrolled agents.
    pub hosts: usize,
    /// Agents whose drill passed whole.
    pub passed: Vec<String>,
    /// Agents whose drill ran and failed somewhere (see `summary`).
    pub failed: Vec<String>,
    /// Agents that answered without a report (not run, or an error), with the reason.
    pub not_run: Vec<NoReport>,
    /// Agents that sent no result before the deadline.
    pub not_reported: Vec<String>,
    /// The reports of the hosts that ran it, aggregated.
    pub summary: aggregate::Summary,
}

impl FleetDrillReport {
    pub fn markdown(&self) -> String {
        let verdict = if self.passed.len() == self.hosts { "every host passed" } else { "NOT every host passed" };
        let mut md = format!(
            "# Fleet drill {} on fleet {}: {verdict}\n\nPolicy version {} published {}, took {:.1} s. {} hosts \
             enrolled: {} passed, {} failed, {} did not run it, {} sent no result.\n\n",
            self.drill,
            self.fleet,
            self.policy_version,
            self.published_at,
            self.took_ms as f64 / 1000.0,
            self.hosts,
            self.passed.len(),
            self.failed.len(),
            self.not_run.len(),
            self.not_reported.len()
        );
        for n in &self.not_run {
            let status = serde_json::to_value(n.status).ok().and_then(|v| v.as_str().map(str::to_owned));
            md += &format!("- `{}` {}: {}\n", n.host, status.unwrap_or_default(), n.reason.replace('\n', " "));
        }
        if !self.not_reported.is_empty() {
            md += &format!("- no result: {}\n", self.not_reported.join(", "));
        }
        if !self.not_run.is_empty() || !self.not_reported.is_empty() {
            md += "\n";
        }
        let summary = self.summary.markdown();
        // The summary's own title, one level down.
        md += &summary.replacen("# ", "## ", 1);
        md
    }
}

fn request(args: &RunArgs, within: Duration) -> anyhow::Result<DrillRequest> {
    let mut files = Vec::new();
    for f in &args.files {
        let text = crate::files::read_capped_to_string(
            f,
            crate::fleet::drill::MAX_SCENARIO_BYTES as u64,
            "a scenario file is at most 64 KiB",
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("scenario.toml").to_owned();
        files.push(ScenarioFile { name, text });
    }
    let request = DrillRequest {
        id: DrillRequest::new_id(),
        scenarios: args.scenarios.clone(),
        files,
        not_after: rfc3339_ms(now_unix_ms() + within.as_millis() as u64),
    };
    request.check().map_err(anyhow::Error::msg)?;
    Ok(request)
}

/// Run `drill --fleet`; the exit status: 0 every enrolled host passed, 1 not, 3 the drill
/// could not be published or followed, 64 usage.
pub fn run(args: &RunArgs) -> u8 {
    let f = &args.fleet;
    let (Some(fleet), Some(collector), Some(ca)) = (&f.fleet, &f.collector, &f.ca) else {
        eprintln!("aegis-agent drill --fleet: --collector and --ca are needed to reach the fleet");
        return exit::USAGE;
    };
    if f.signing_keys.is_empty() {
        eprintln!("aegis-agent drill --fleet: --signing-key is needed (the fleet's policy is signed)");
        return exit::USAGE;
    }
    let within = f.start_within.unwrap_or(Duration::from_secs(900));
    let request = match request(args, within) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aegis-agent drill --fleet: {e:#}");
            return exit::USAGE;
        }
    };
    let signing = SigningArgs {
        fleet: fleet.clone(),
        signing_keys: f.signing_keys.clone(),
        expires: Duration::from_secs(7 * 86400),
    };
    let collector =
        CollectorArgs { collector: collector.clone(), ca: ca.clone(), cert: f.cert.clone(), key: f.key.clone() };
    let deadline = f.deadline.unwrap_or(Duration::from_secs(1200));
    match follow(args, &request, &signing, &collector, deadline) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", report.markdown());
            }
            if report.passed.len() == report.hosts { exit::OK } else { exit::NO }
        }
        Err(e) => {
            eprintln!("aegis-agent drill --fleet: {e:#}");
            exit::ERROR
        }
    }
}

fn follow(
    args: &RunArgs,
    request: &DrillRequest,
    signing: &SigningArgs,
    collector: &CollectorArgs,
    deadline: Duration,
) -> anyhow::Result<FleetDrillReport> {
    let client = client(collector)?;
    let rt = runtime()?;
    let started = Instant::now();
    let names = if request.scenarios.is_empty() && request.files.is_empty() {
        "every built-in scenario".to_owned()
    } else {
        let mut n = request.scenarios.clone();
        n.extend(request.files.iter().map(|f| f.name.clone()));
        n.join(", ")
    };
    let note = format!("drill {}: {names}", request.id);
    let answer = publish_next(&client, &rt, signing, note, |doc| {
        doc.drill = Some(request.clone());
        Ok(())
    })?;
    eprintln!(
        "aegis-agent drill --fleet: {} ({names}) published as version {} of fleet {}; waiting up to {deadline:?} for \
         every host's result",
        request.id, answer.version, signing.fleet
    );
    let end = started + deadline;
    let mut reported = usize::MAX;
    let results = loop {
        let results = rt.block_on(client.drill_results(&request.id))?;
        let missing = results["not_reported"].as_array().map_or(0, Vec::len);
        let got = results["results"].as_array().map_or(0, Vec::len);
        if got != reported {
            eprintln!("aegis-agent drill --fleet: {got} results, {missing} hosts still drilling or silent");
            reported = got;
        }
        if missing == 0 || Instant::now() >= end {
            break results;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut reports: Vec<DrillReport> = Vec::new();
    let (mut passed, mut failed, mut not_run) = (Vec::new(), Vec::new(), Vec::new());
    for row in results["results"].as_array().into_iter().flatten() {
        let agent = row["agent"].as_str().unwrap_or("?").to_owned();
        let result: DrillResult = match serde_json::from_value(row["result"].clone()) {
            Ok(r) => r,
            Err(e) => {
                not_run.push(NoReport {
                    host: agent,
                    status: DrillStatus::Error,
                    reason: format!("the collector's copy of its result is not a drill result: {e}"),
                });
                continue;
            }
        };
        match (result.status, result.report) {
            (DrillStatus::Passed | DrillStatus::Failed, Some(mut report)) => {
                // The collector's name for the host (verified by its key), not its hostname.
                report.host = agent.clone();
                if report.passed {
                    passed.push(agent)
                } else {
                    failed.push(agent)
                }
                reports.push(report);
            }
            (status, _) => not_run.push(NoReport { host: agent, status, reason: result.reason }),
        }
    }
    let not_reported: Vec<String> = results["not_reported"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let report = FleetDrillReport {
        drill: request.id.clone(),
        fleet: signing.fleet.clone(),
        policy_version: answer.version,
        published_at: rfc3339_ms(answer.published_ms),
        took_ms: started.elapsed().as_millis() as u64,
        hosts: passed.len() + failed.len() + not_run.len() + not_reported.len(),
        passed,
        failed,
        not_run,
        not_reported,
        summary: aggregate::aggregate(&reports),
    };
    if let Some(dir) = &args.report {
        write(dir, &report, &reports)?;
    }
    Ok(report)
}

/// `DIR/<drill>.json` and `.md`, and each host's report as `DIR/<drill>/<host>.json`.
fn write(dir: &std::path::Path, report: &FleetDrillReport, reports: &[DrillReport]) -> anyhow::Result<()> {
    let hosts = dir.join(&report.drill);
    std::fs::create_dir_all(&hosts).map_err(|e| anyhow::anyhow!("cannot make {}: {e}", hosts.display()))?;
    for r in reports {
        let name: String = r
            .host
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
            .collect();
        let path = hosts.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(r)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let json = dir.join(format!("{}.json", report.drill));
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))?;
    let md = dir.join(format!("{}.md", report.drill));
    std::fs::write(&md, report.markdown()).map_err(|e| anyhow::anyhow!("{}: {e}", md.display()))?;
    eprintln!(
        "aegis-agent drill --fleet: report in {} and {}, each host's in {}",
        json.display(),
        md.display(),
        hosts.display()
    );
    Ok(())
}
