//! Every eBPF program of the agent loads on this kernel, each capability comes up, and every
//! program stays under a quarter of the verifier's instruction limit. `kernel_report` prints
//! the table (program, processed instructions, share of the limit, states); the kernel matrix
//! (`cargo xtask test`) runs the same binary on Debian's 6.1 and 6.12 kernels.

use serde_json::Value;

#[test]
fn every_program_loads_well_within_the_verifier_budget() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kernel_report"))
        .output()
        .expect("running kernel_report (needs root)");
    let table = String::from_utf8_lossy(&out.stderr);
    eprintln!("{table}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kernel_report output: {e}"));
    assert!(out.status.success(), "kernel_report failed: over budget {}", report["over_budget"]);
    let programs = report["programs"].as_array().expect("programs");
    assert_eq!(programs.len(), 23, "{table}");
    let budget = report["programs"][0]["limit"].as_u64().unwrap() / 4;
    for p in programs {
        assert_eq!(p["loaded"], true, "{p}");
        let n = p["processed_insns"].as_u64().unwrap_or_else(|| panic!("no verifier statistics for {p}"));
        assert!(n > 0 && n <= budget, "{p}");
        assert!(p["peak_states"].as_u64().is_some(), "{p}");
    }
    for c in report["capabilities"].as_array().expect("capabilities") {
        assert_eq!(c["state"], "active", "{c}");
    }
}
