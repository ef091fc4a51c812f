//! `aegis-agent drill`: run drills against the running agent (see `crate::drill`), list and
//! show the built-in scenarios, and the history of drills.

use std::path::PathBuf;

use super::exit;
use crate::{
    config::Config,
    drill::{self, report, scenario::Scenario},
};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DrillArgs {
    #[command(subcommand)]
    pub command: Option<DrillCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A built-in scenario to run (repeatable); none and no --scenario-file: every one.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// A scenario file of your own (repeatable; start from `aegis-agent drill show NAME`).
    #[arg(long = "scenario-file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Write the report (`<drill id>.json` and `.md`) into this directory.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Print the report as JSON instead of Markdown.
    #[arg(long)]
    pub json: bool,
    /// The agent's configuration (its control socket, records file, incidents, evidence).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hold each containment this long before going on (tests, demos).
    #[arg(long, hide = true, value_name = "MS", default_value_t = 0)]
    pub hold_contained_ms: u64,
    #[command(flatten)]
    pub fleet: super::fleet_drill::FleetDrillArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum DrillCommand {
    /// The built-in scenarios.
    Scenarios,
    /// A built-in scenario's file, to copy and edit (`> my-drill.toml`).
    Show { name: String },
    /// Several hosts' reports (`--report DIR`'s JSON files) as one: which hosts failed which
    /// step, and the p50 and p99 of each phase.
    Aggregate {
        #[arg(required = true, value_name = "REPORT.json")]
        reports: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Past drills, oldest first, with the trend of the time to containment.
    History {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    path.map_or_else(|| Ok(Config::defaults()), Config::load)
}

/// Run the command; its exit status: 0 every phase passed (or done), 1 a phase failed or
/// something was left behind, 3 the drill could not run, 64 usage.
pub fn run(args: &DrillArgs) -> u8 {
    match &args.command {
        Some(DrillCommand::Scenarios) => {
            for (name, text) in drill::scenario::BUILT_IN {
                match Scenario::parse(text, name) {
                    Ok(s) => println!("{name:<20} {}", s.scenario.title),
                    Err(e) => println!("{name:<20} invalid: {e:#}"),
                }
            }
            exit::OK
        }
        Some(DrillCommand::Show { name }) => match Scenario::built_in_text(name) {
            Some(text) => {
                print!("{text}");
                exit::OK
            }
            None => {
                eprintln!("aegis-agent drill show: {:#}", Scenario::built_in(name).unwrap_err());
                exit::USAGE
            }
        },
        Some(DrillCommand::History { json, config }) => {
            let result = load_config(config.as_deref()).and_then(|c| report::read_history(&drill::history_path(&c)));
            match result {
                Ok((entries, bad)) => {
                    if *json {
                        println!("{}", serde_json::to_string(&entries).unwrap_or_default());
                    } else if entries.is_empty() {
                        println!("no drill has run on this host yet: `aegis-agent drill` runs every built-in scenario");
                    } else {
                        print!("{}", report::history_table(&entries));
                    }
                    if bad > 0 {
                        eprintln!("aegis-agent drill history: {bad} lines of the history could not be read (skipped)");
                    }
                    exit::OK
                }
                Err(e) => {
                    eprintln!("aegis-agent drill history: {e:#}");
                    exit::ERROR
                }
            }
        }
        Some(DrillCommand::Aggregate { reports, json }) => aggregate(reports, *json),
        None => run_drill(&args.run),
    }
}

/// Largest report read.
const MAX_REPORT_BYTES: u64 = 16 << 20;

fn aggregate(files: &[PathBuf], json: bool) -> u8 {
    let mut reports = Vec::new();
    let mut unreadable = 0;
    for f in files {
        let parsed = crate::files::read_capped_to_string(f, MAX_REPORT_BYTES, "a drill report is a JSON file")
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|t| {
                serde_json::from_str::<report::DrillReport>(&t).map_err(|e| anyhow::anyhow!("not a drill report: {e}"))
            });
        match parsed {
            Ok(r) => reports.push(r),
            Err(e) => {
                unreadable += 1;
                eprintln!("aegis-agent drill aggregate: {}: {e:#} (left out)", f.display());
            }
        }
    }
    let summary = drill::aggregate::aggregate(&reports);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else {
        print!("{}", summary.markdown());
    }
    if unreadable > 0 {
        eprintln!("aegis-agent drill aggregate: {unreadable} of {} reports could not be read", files.len());
    }
    if unreadable == 0 && summary.failed.is_empty() && !reports.is_empty() { exit::OK } else { exit::NO }
}

fn run_drill(args: &RunArgs) -> u8 {
    if args.fleet.fleet.is_some() {
        return super::fleet_drill::run(args);
    }
    let mut scenarios = Vec::new();
    let names: Vec<&str> = if args.scenarios.is_empty() && args.files.is_empty() {
        drill::scenario::BUILT_IN.iter().map(|(n, _)| *n).collect()
    } else {
        args.scenarios.iter().map(String::as_str).collect()
    };
    for name in names {
        match Scenario::built_in(name) {
            Ok(s) => scenarios.push(s),
            Err(e) => {
                eprintln!("aegis-agent drill: {e:#}");
                return exit::USAGE;
            }
        }
    }
    for file in &args.files {
        match Scenario::from_file(file) {
            Ok(s) => scenarios.push(s),
            Err(e) => {
                eprintln!("aegis-agent drill: {e:#}");
                return exit::USAGE;
            }
        }
    }
    let config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aegis-agent drill: {e:#}");
            return exit::ERROR;
        }
    };
    if let Err(e) = drill::run::catch_signals() {
        eprintln!("aegis-agent drill: {e:#}");
        return exit::ERROR;
    }
    let id = drill::new_id();
    eprintln!(
        "aegis-agent drill: {id}: {} scenarios against the agent at {}",
        scenarios.len(),
        config.control.socket.display()
    );
    let report =
        match drill::run::run(&config, &id, &scenarios, std::time::Duration::from_millis(args.hold_contained_ms)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("aegis-agent drill: the drill could not run: {e:#}");
                return exit::ERROR;
            }
        };
    if let Err(e) = report::append_history(&drill::history_path(&config), &report.history_entry()) {
        eprintln!("aegis-agent drill: the history was not updated: {e:#}");
    }
    if let Some(dir) = &args.report {
        match report.write(dir) {
            Ok((json, md)) => eprintln!("aegis-agent drill: report in {} and {}", json.display(), md.display()),
            Err(e) => {
                eprintln!("aegis-agent drill: {e:#}");
                return exit::ERROR;
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report.markdown());
    }
    if let Some(s) = &report.stopped {
        eprintln!("aegis-agent drill: stopped early: {s}");
    }
    if report.passed { exit::OK } else { exit::NO }
}
