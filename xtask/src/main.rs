//! `cargo xtask`: set-up, build, run, test, fuzzing and benchmarks for the AegisPlane workspace.
//!
//! xtask itself builds with whatever stable toolchain the machine has; everything else is
//! built with the pinned nightly ([`TOOLCHAIN`]) that aya 0.16 needs, installed on first
//! use together with rust-src and a bpf-linker linked against that toolchain's own LLVM
//! (see ../shared/PLATFORM.md for why they must share one LLVM), and cargo-fuzz. Nothing
//! here needs a toolchain to install itself from a rust-toolchain.toml, which fresh
//! machines refuse.

mod bench;
mod contain;
mod deb;
mod fuzz;
mod matrix;
mod prcurve;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The pinned toolchain; also named in aegis-agent/build.rs.
pub const TOOLCHAIN: &str = "nightly-2026-10-30";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and benchmarks use (binary, package).
const PACKAGES: [(&str, &str); 13] = [
    ("/usr/bin/curl", "curl"),
    ("/usr/bin/openssl", "openssl"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ("/usr/bin/pkg-config", "pkg-config"),
    ("/usr/bin/node", "nodejs"),
    ("/usr/bin/python3", "python3"),
    ("/usr/sbin/bpftool", "bpftool"),
    ("/usr/bin/setpriv", "util-linux"),
    // The man page test renders with groff; the package check reads the binary's symbols.
    ("/usr/bin/groff", "groff-base"),
    ("/usr/bin/objdump", "binutils"),
    // The Go test client (tests/clients/go_client.go), built by the tests crate's build script.
    ("/usr/bin/go", "golang-go"),
    // BoringSSL (Debian's build for Android's tools) and its headers: the C test client
    // (tests/clients/tls_client.c) is built against it.
    ("/usr/lib/x86_64-linux-gnu/android/libssl.so.0", "android-libboringssl"),
    ("/usr/include/android/openssl/ssl.h", "android-libboringssl-dev"),
];

#[derive(Parser)]
#[command(about = "AegisPlane build tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: pinned toolchain, rust-src, bpf-linker, test packages, and
    /// what the kernel matrix boots (qemu, busybox, Debian kernels, virtme-ng).
    Setup,
    /// Set up, then build the agent (with its eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the agent in the foreground with its embedded defaults.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments after `--` go to `aegis-agent run`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, build, and run every test (unit and real-kernel integration; needs root) on
    /// the host, every fuzz target for a few seconds (not when arguments select tests), then
    /// the kernel matrix (see `matrix`), and print the matrix's table.
    Test {
        /// Only the host's `cargo test`: skip the kernel matrix.
        #[arg(long)]
        host_only: bool,
        /// Arguments after `--` go to `cargo test`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the fuzz targets (fuzz/, cargo-fuzz): one, or all in turn.
    Fuzz {
        /// A target (`http1`, `encoding`, `sse`, `exchange`, `rulepack`, `gitleaks`,
        /// `control`, `config`, `evidence`); all when omitted.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Targets run at once (each takes one core).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// The kernel matrix only: the real-kernel suite and `kernel_report` in VMs booted on
    /// Debian's kernels (and `kernel_report` on the host), then one table. Needs root.
    Matrix(matrix::MatrixArgs),
    /// Inside a matrix VM (started by `matrix`, not by hand): runs the plan it is given.
    #[command(hide = true)]
    VmSuite {
        /// The plan file the host wrote into the VM's shared results folder.
        plan: PathBuf,
    },
    /// Formatting check, and clippy with warnings denied over every crate: the user-space
    /// ones, and the eBPF crate for its BPF target.
    Lint,
    /// The Debian package (release build) into `--out`: the assets of
    /// `[package.metadata.deb]` in aegis-agent/Cargo.toml, completions and man pages.
    Deb {
        #[arg(long, default_value = "target/debian")]
        out: PathBuf,
        /// Instead: the package check `test` runs (debug build, clean root, install,
        /// upgrade, remove, purge). Needs root.
        #[arg(long)]
        check: bool,
    },
    /// Evaluations against held-out data. `detection`: recall and false positives of the
    /// rules, the learned classifier and both on the classifier's held-out split, then the
    /// classifier's scoring throughput per core (optimised, scoring module alone).
    Eval {
        /// What to evaluate: `detection`.
        what: String,
    },
    /// Train the injection classifier: fetch the pinned corpora with pip (into
    /// `--cache`), build the dataset and its fixed split, train, and write
    /// `packaging/models/injection_classifier.bin` and `tools/classifier/data/`. Needs
    /// python3 (a virtual environment with numpy, scipy, scikit-learn and PyYAML is made in
    /// the cache) and the PyPI registry.
    TrainDetector {
        #[arg(long, default_value = "target/classifier-cache")]
        cache: PathBuf,
    },
    /// Benchmarks; each prints its figures and ratios against a baseline from the same run.
    Bench {
        #[command(subcommand)]
        which: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(workspace_root())?;
    match cli.task {
        Task::Setup => {
            setup()?;
            matrix::setup()
        }
        Task::Build { release } => {
            setup()?;
            build_agent(release)
        }
        Task::Run { release, args } => {
            setup()?;
            build_agent(release)?;
            let bin = agent_bin(release);
            let mut cmd = Command::new(&bin);
            cmd.arg("run").args(args);
            run(&mut cmd)
        }
        Task::Test { host_only, args } => {
            setup()?;
            if !host_only {
                // Before the long part: a tool that cannot be installed fails the run at once.
                matrix::setup()?;
            }
            let evidence_python = ensure_evidence_python()?;
            build_agent(false)?;
            // aegis-ebpf is built for the BPF target by aegis-agent's build script, not for the host.
            let selected = !args.is_empty();
            let host = run(cargo()
                .args(["test", "--workspace", "--exclude", "aegis-ebpf"])
                .args(args)
                .env("AEGIS_TEST_EVIDENCE_PYTHON", evidence_python));
            let fuzz = if selected {
                eprintln!("xtask: fuzz smoke run skipped (test arguments given); `cargo xtask fuzz` runs the targets");
                Ok(())
            } else {
                fuzz::smoke()
            };
            // The package: built, installed into a clean root, upgraded, removed, purged.
            let package = if selected { Ok(()) } else { deb::check(&agent_bin(false)) };
            let host = host.and(fuzz).and(package);
            if host_only {
                return host;
            }
            // A host failure does not stop the matrix: CI gets every kernel's results in one run.
            matrix::run(&matrix::MatrixArgs::default(), matrix::HostTests::from(host))
        }
        Task::Fuzz { target, seconds, jobs } => {
            setup()?;
            fuzz::fuzz(target.as_deref(), seconds, jobs)
        }
        Task::Matrix(args) => {
            setup()?;
            matrix::setup()?;
            build_agent(false)?;
            matrix::run(&args, matrix::HostTests::NotRun)
        }
        Task::VmSuite { plan } => matrix::run_in_vm(&plan),
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Deb { check: true, .. } => {
            setup()?;
            build_agent(false)?;
            deb::check(&agent_bin(false))
        }
        Task::Deb { out, .. } => {
            setup()?;
            build_agent(true)?;
            let deb = deb::release(&workspace_root().join(out))?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Eval { what } => {
            if what != "detection" {
                bail!("cargo xtask eval {what}: unknown evaluation; the one there is: detection");
            }
            setup()?;
            eval_detection()
        }
        Task::TrainDetector { cache } => train_detector(&workspace_root().join(cache)),
        Task::Bench { which } => {
            setup()?;
            bench::run(which)
        }
    }
}

/// `cargo fmt --check`, then clippy (warnings denied) on the workspace and on the eBPF
/// crate built for `bpfel-unknown-none` (its own target directory: another target, another
/// `core`).
fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("the tree is not formatted: run `cargo +nightly-2026-10-30 fmt --all`")?;
    run(cargo().args(["clippy", "--workspace", "--exclude", "aegis-ebpf", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo()
        .args([
            "clippy",
            "--package",
            "aegis-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("CARGO_TARGET_DIR", workspace_root().join("target/bpf-lint"))
        .args(["--", "-D", "warnings"]))
}

/// The trainer's Python packages, pinned (`cargo xtask train-detector`).
const TRAINER_PACKAGES: &[&str] = &["numpy==2.4.6", "scipy==1.17.1", "scikit-learn==1.9.1", "PyYAML==6.0.4"];

/// `cargo xtask train-detector`: a virtual environment in `cache` with the trainer's
/// packages, then `tools/classifier/train.py` (which downloads the pinned corpora with pip
/// into `cache` and checks their hashes).
fn train_detector(cache: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(cache)?;
    let venv = cache.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("python3 -m venv failed: install python3 and python3-venv")?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(TRAINER_PACKAGES)).context(
        "pip could not install the trainer's packages: is the PyPI registry reachable (or PIP_INDEX_URL set)?",
    )?;
    run(Command::new(&python).arg(workspace_root().join("tools/classifier/train.py")).arg(cache))
        .context("training failed; if pip download failed above, the PyPI registry is not reachable")
}

/// `cargo xtask eval detection`: the ignored `rules::eval::detection` test (the test
/// profile: the same build as the unit tests) writes `report.md` and the curve's points into
/// `target/eval-detection`, xtask draws `pr.png` there, then `tools/classifier/bench.rs`
/// built with `rustc -O` around the scoring module alone (seconds to build, no release
/// build of the agent) measures the throughput, appended to the report.
fn eval_detection() -> anyhow::Result<()> {
    let root = workspace_root();
    let report_dir = root.join("target/eval-detection");
    std::fs::create_dir_all(&report_dir)?;
    run(cargo()
        .args([
            "test",
            "-p",
            "aegis-agent",
            "--lib",
            "--",
            "--ignored",
            "--nocapture",
            "--exact",
            "rules::eval::detection",
        ])
        .env("AEGIS_EVAL_OUT", &report_dir))?;
    let [model, both] = prcurve::draw(&report_dir)?;
    let out = root.join("target/eval-classifier");
    std::fs::create_dir_all(&out)?;
    let mut rustc = Command::new("rustc");
    rustc.arg(format!("+{TOOLCHAIN}")).env("PATH", path_with_tools());
    for var in ["RUSTC", "RUSTUP_TOOLCHAIN"] {
        rustc.env_remove(var);
    }
    run(rustc
        .args(["--edition", "2024", "-O", "-o"])
        .arg(out.join("bench"))
        .arg(root.join("tools/classifier/bench.rs")))?;
    let bench = Command::new(out.join("bench"))
        .arg(root.join("packaging/models/injection_classifier.bin"))
        .arg(root.join("tools/classifier/data/heldout.jsonl"))
        .output()?;
    anyhow::ensure!(bench.status.success(), "the classifier bench failed: {}", String::from_utf8_lossy(&bench.stderr));
    let throughput = String::from_utf8_lossy(&bench.stdout);
    let mut report = std::fs::read_to_string(report_dir.join("report.md"))?;
    report.push_str(&format!(
        "Held-out split, every threshold of the model: blue, the model alone; red, rules + model (a text \
         the rules flag counts at every threshold); green dot, the rules alone; the big dots are the \
         operating point (model alone: recall {:.1}%, precision {:.1}%; rules + model: recall {:.1}%, \
         precision {:.1}%). x: recall, y: precision, grid lines every 0.1.\n\n## Throughput per core\n\n\
         Scoring alone, optimised (`rustc -O`), one thread:\n\n```\n{throughput}```\n",
        100.0 * model.0,
        100.0 * model.1,
        100.0 * both.0,
        100.0 * both.1,
    ));
    std::fs::write(report_dir.join("report.md"), &report)?;
    println!("\n{}\nreport: {}", throughput.trim_end(), report_dir.join("report.md").display());
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_owned()
}

/// Where bpf-linker, the LLVM link farm and virtme-ng live (outside target/, so `cargo
/// clean` does not cost a 50 s rebuild).
pub fn tools_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("aegisplane").join(format!("tools-{TOOLCHAIN}"))
}

/// `cargo +TOOLCHAIN` with bpf-linker on PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{TOOLCHAIN}"));
    cmd.env("PATH", path_with_tools());
    // Set by the stable cargo that runs xtask; would confuse the nested pinned cargo.
    for var in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO"] {
        cmd.env_remove(var);
    }
    cmd
}

fn path_with_tools() -> OsString {
    let mut paths = vec![tools_dir().join("bin")];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(paths).expect("PATH entries are valid")
}

pub fn agent_bin(release: bool) -> PathBuf {
    workspace_root().join("target").join(if release { "release" } else { "debug" }).join("aegis-agent")
}

pub fn build_agent(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "aegis-agent"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> anyhow::Result<()> {
    ensure_toolchain()?;
    ensure_bpf_linker()?;
    fuzz::ensure_cargo_fuzz()?;
    ensure_packages()
}

fn ensure_toolchain() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    let has_src = || {
        output(Command::new("rustc").arg(format!("+{TOOLCHAIN}")).args(["--print", "sysroot"]))
            .map(|s| Path::new(s.trim()).join("lib/rustlib/src/rust/library/core").exists())
            .unwrap_or(false)
    };
    if installed.lines().any(|l| l.starts_with(TOOLCHAIN)) && has_src() {
        return Ok(());
    }
    eprintln!("xtask: installing toolchain {TOOLCHAIN} with rust-src, clippy, rustfmt");
    // Never let rustup replace itself as a side effect.
    let _ = Command::new("rustup").args(["set", "auto-self-update", "disable"]).status();
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src,clippy,rustfmt",
    ]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let tools = tools_dir();
    let linker = tools.join("bin/bpf-linker");
    if output(Command::new(&linker).arg("--version")).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {TOOLCHAIN}'s LLVM (about a minute)");
    let sysroot = output(Command::new("rustc").arg(format!("+{TOOLCHAIN}")).args(["--print", "sysroot"]))
        .context("rustc of the pinned toolchain does not run")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name())
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so.") && n.to_string_lossy().contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}: is the toolchain complete?", lib.display()))?;
    let prefix = tools.join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in [OsString::from("libLLVM.so"), so.clone()] {
        let link = prefix.join("lib").join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&so), &link)?;
    }
    run(cargo()
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--root"])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix))
}

fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PACKAGES.iter().filter(|(file, _)| !Path::new(file).exists()).map(|(_, pkg)| *pkg).collect();
    install_debian(&missing)
}

/// Make `dir` a Python virtual environment (by the python3 on PATH) holding `requirement`
/// from PyPI: pip refuses to install into Debian's python (PEP 668), and a venv keeps a
/// pinned version apart from any other.
pub fn make_venv(dir: &Path, requirement: &str) -> anyhow::Result<()> {
    eprintln!("xtask: installing {requirement} into {} (pip, in a venv)", dir.display());
    let has_venv =
        || Command::new("python3").args(["-c", "import ensurepip, venv"]).output().is_ok_and(|o| o.status.success());
    if !has_venv() {
        // Debian's python3 ships venv's pip bootstrap separately.
        let debian = output(Command::new("python3").args(["-c", "import sys; print(sys.prefix)"]))
            .is_some_and(|p| p.trim() == "/usr");
        if !debian {
            bail!(
                "the python3 on PATH cannot make a venv (no ensurepip): install its venv module, or put another python3 first on PATH"
            );
        }
        install_debian(&["python3-venv"])?;
    }
    let _ = std::fs::remove_dir_all(dir);
    run(Command::new("python3").args(["-m", "venv"]).arg(dir))
        .with_context(|| format!("cannot make a venv in {} with the python3 on PATH", dir.display()))?;
    run(Command::new(dir.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .arg(requirement))
    .with_context(|| format!("cannot install {requirement} from PyPI (network? proxy?)"))
}

/// securesystemslib, for the test that has it verify the agent's DSSE envelopes
/// (tests/tests/evidence.rs), pinned, with its `crypto` extra (pyca/cryptography, for
/// Ed25519).
const SECURESYSTEMSLIB_VERSION: &str = "1.6.0";

/// The python of the venv holding securesystemslib, made when missing; the tests find it in
/// `$AEGIS_TEST_EVIDENCE_PYTHON`.
fn ensure_evidence_python() -> anyhow::Result<PathBuf> {
    let dir = tools_dir().join(format!("securesystemslib-{SECURESYSTEMSLIB_VERSION}"));
    let python = dir.join("bin/python");
    let installed = || {
        output(Command::new(&python).args([
            "-c",
            "import cryptography, securesystemslib.dsse, securesystemslib; print(securesystemslib.__version__)",
        ]))
        .is_some_and(|v| v.trim() == SECURESYSTEMSLIB_VERSION)
    };
    if !installed() {
        make_venv(&dir, &format!("securesystemslib[crypto]=={SECURESYSTEMSLIB_VERSION}"))?;
        if !installed() {
            bail!(
                "securesystemslib {SECURESYSTEMSLIB_VERSION} was installed into {} but does not import",
                dir.display()
            );
        }
    }
    Ok(python)
}

/// `apt-get install` the given packages (root only; otherwise say what to install).
pub fn install_debian(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("missing packages {packages:?}: install them (apt-get install {})", packages.join(" "));
    }
    eprintln!("xtask: installing {packages:?}");
    apt_update()?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `apt-get update`, once per xtask run: several set-up steps may need fresh package lists.
pub fn apt_update() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if !DONE.load(Ordering::Relaxed) {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        DONE.store(true, Ordering::Relaxed);
    }
    Ok(())
}

pub fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}
