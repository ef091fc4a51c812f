//! The VMs of the matrix: Debian's kernel packages, booted with virtme-ng under qemu.
//!
//! virtme-ng (`vng`) boots a kernel image with the host's root filesystem shared
//! read-only over 9p (the overlays it puts on /etc, /usr, /var, /tmp... make them
//! writable, and discard the writes), runs one command as root and exits with its status.
//! These machines have no KVM, so qemu emulates the CPU (TCG): a boot takes about 25 s,
//! and everything in the VM runs several times slower than on the host.
//!
//! The kernels are Debian 12's `linux-image-<release>-unsigned` packages: the non-cloud
//! flavour, which carries the 9p modules the shared root needs (the cloud flavour does
//! not boot this way). [`ensure_tools`] installs the newest of each series when none is
//! there, with qemu, a static busybox (virtme-ng's initramfs), and a pinned virtme-ng.

use std::{
    collections::VecDeque,
    ffi::OsStr,
    fs::{self, File},
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{human, wait_or_kill};
use crate::{apt_update, install_debian, make_venv, nix_is_root, output, tools_dir};

/// Pinned: the VM's command line, shares and init come from virtme-ng, and its options
/// have changed between releases.
const VIRTME_NG_VERSION: &str = "1.42";
/// What the VMs need besides the kernels and virtme-ng (file, Debian package); objcopy
/// strips the binaries the VMs load (see `guest`).
const VM_PACKAGES: [(&str, &str); 3] = [
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/objcopy", "binutils"),
];
/// Each VM: 2 vCPUs (the machine's cores) and enough memory for the agent, the mock and
/// the clients.
const VM_CPUS: &str = "2";
const VM_MEMORY: &str = "3G";
/// Console lines kept for a failure message.
const CONSOLE_TAIL_LINES: usize = 40;

/// A series of Debian kernels the matrix boots. Its releases are
/// `{prefix}{N}{suffix}` ("6.1.0-57-amd64"); the largest N is the newest.
pub struct VmKernel {
    /// The series ("6.1"): the key of tests/kernels.toml and of `--kernel`.
    pub series: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's kernel, and its backported 6.12.
pub const VM_KERNELS: [VmKernel; 2] = [
    VmKernel { series: "6.1", prefix: "6.1.0-", suffix: "-amd64" },
    VmKernel { series: "6.12", prefix: "6.12.", suffix: "+deb12-amd64" },
];

impl VmKernel {
    /// N of a release of this series and flavour ("57" of "6.1.0-57-amd64"; None for
    /// "6.1.0-57-cloud-amd64").
    fn number(&self, release: &str) -> Option<u32> {
        release.strip_prefix(self.prefix)?.strip_suffix(self.suffix)?.parse().ok()
    }

    /// The newest release with its image in /boot and its modules in /lib/modules.
    pub fn installed(&self) -> Option<String> {
        fs::read_dir("/boot")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_owned))
            .filter(|release| Path::new("/lib/modules").join(release).is_dir())
            .filter_map(|release| Some((self.number(&release)?, release)))
            .max()
            .map(|(_, release)| release)
    }

    /// The package of the newest release in the package lists (`apt-get update` first).
    fn newest_package(&self) -> anyhow::Result<String> {
        let prefix = format!("linux-image-{}", self.prefix);
        let names = output(Command::new("apt-cache").args(["pkgnames", &prefix]))
            .context("apt-cache pkgnames failed: is this a Debian machine?")?;
        names
            .lines()
            .filter_map(|name| name.strip_prefix("linux-image-")?.strip_suffix("-unsigned"))
            .filter_map(|release| Some((self.number(release)?, release)))
            .max()
            .map(|(_, release)| format!("linux-image-{release}-unsigned"))
            .with_context(|| {
                format!(
                    "no linux-image-{}<N>{}-unsigned package in the package lists: is bookworm (and for 6.12 \
                     bookworm-updates or -security) in /etc/apt/sources.list?",
                    self.prefix, self.suffix
                )
            })
    }

    fn vmlinuz(release: &str) -> PathBuf {
        Path::new("/boot").join(format!("vmlinuz-{release}"))
    }
}

/// The kernels `--kernel` names: a series, or `all`.
pub fn select(choice: &str) -> anyhow::Result<Vec<&'static VmKernel>> {
    if choice == "all" {
        return Ok(VM_KERNELS.iter().collect());
    }
    match VM_KERNELS.iter().find(|k| k.series == choice) {
        Some(kernel) => Ok(vec![kernel]),
        None => {
            let known: Vec<&str> = VM_KERNELS.iter().map(|k| k.series).collect();
            bail!("--kernel {choice}: the matrix boots {known:?} (or `all`)")
        }
    }
}

/// Installs what the VMs need when it is missing: qemu, busybox, the newest kernel of each
/// series, virtme-ng.
pub fn ensure_tools() -> anyhow::Result<()> {
    let mut missing: Vec<String> =
        VM_PACKAGES.iter().filter(|(file, _)| !Path::new(file).exists()).map(|(_, pkg)| (*pkg).to_owned()).collect();
    let kernels: Vec<&VmKernel> = VM_KERNELS.iter().filter(|k| k.installed().is_none()).collect();
    if !kernels.is_empty() {
        if !nix_is_root() {
            let series: Vec<&str> = kernels.iter().map(|k| k.series).collect();
            bail!(
                "no Debian kernel of series {series:?} for the kernel matrix: run `cargo xtask setup` as root (it \
                 installs linux-image-<release>-unsigned)"
            );
        }
        apt_update()?;
        for kernel in &kernels {
            missing.push(kernel.newest_package()?);
        }
    }
    let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
    install_debian(&missing)?;
    for kernel in kernels {
        if kernel.installed().is_none() {
            bail!(
                "installing a {} kernel left no /boot/vmlinuz-{}<N>{} with its /lib/modules folder",
                kernel.series,
                kernel.prefix,
                kernel.suffix
            );
        }
    }
    ensure_virtme_ng()
}

/// virtme-ng's own virtual environment (pip refuses to install into Debian's python,
/// PEP 668, and a venv keeps the pinned version apart from any other).
fn virtme_ng_dir() -> PathBuf {
    tools_dir().join(format!("virtme-ng-{VIRTME_NG_VERSION}"))
}

fn has_virtme_ng() -> bool {
    output(Command::new(virtme_ng_dir().join("bin/vng")).arg("--version"))
        .is_some_and(|v| v.split_whitespace().last() == Some(VIRTME_NG_VERSION))
}

/// virtme-ng, pinned, in a venv made by the python3 on PATH.
fn ensure_virtme_ng() -> anyhow::Result<()> {
    if has_virtme_ng() {
        return Ok(());
    }
    let dir = virtme_ng_dir();
    make_venv(&dir, &format!("virtme-ng=={VIRTME_NG_VERSION}"))?;
    if !has_virtme_ng() {
        bail!("virtme-ng {VIRTME_NG_VERSION} was installed into {} but its vng does not run", dir.display());
    }
    Ok(())
}

/// How a VM run ended.
pub struct Boot {
    /// vng's exit status; None when it was killed after the timeout.
    pub status: Option<ExitStatus>,
    pub timeout: Duration,
    pub wall: Duration,
    /// The console's last lines, for a failure message.
    pub console_tail: String,
}

impl Boot {
    /// "vng exited 0 after 3 min 10 s", "killed after the timeout of 2 h".
    pub fn outcome(&self) -> String {
        match self.status {
            Some(status) => format!("vng {status} after {}", human(self.wall)),
            None => format!("the VM was killed after the timeout of {}", human(self.timeout)),
        }
    }
}

/// Boots `release` with `rwdir` shared read-write, runs `xtask vm-suite <plan>` in it, and
/// waits for the VM to end (or kills it after `timeout`). The console goes to the terminal,
/// each line prefixed with `[label]`, and to `console.log` in `rwdir`.
pub fn boot(release: &str, rwdir: &Path, plan: &Path, timeout: Duration, label: &str) -> anyhow::Result<Boot> {
    if rwdir.to_string_lossy().contains(char::is_whitespace) {
        // vng passes --rwdir to a shell unquoted.
        bail!("the results folder {} has white space in its path: vng cannot share it", rwdir.display());
    }
    let xtask = std::env::current_exe().context("where is xtask's own binary?")?;
    let mut path = vec![virtme_ng_dir().join("bin")];
    // vng runs `virtme-run` from PATH: it must be the venv's.
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let mut cmd = Command::new(virtme_ng_dir().join("bin/vng"));
    cmd.arg("--run")
        .arg(VmKernel::vmlinuz(release))
        // qemu emulates the CPU (TCG). These machines may have a /dev/kvm, but qemu aborts
        // with it ("failed to set MSR 0x10a"): no usable KVM.
        .arg("--disable-kvm")
        // The kernel's console too, not only the runner's output: when a VM dies at boot,
        // its last lines say why (kept in console.log; the terminal gets the runner's).
        .arg("--verbose")
        .args(["--cpus", VM_CPUS, "--memory", VM_MEMORY, "--name", &format!("aegis-matrix-{label}")])
        .arg("--rwdir")
        .arg(rwdir)
        .arg("--")
        .args([xtask.as_os_str(), OsStr::new("vm-suite"), plan.as_os_str()])
        .env("PATH", std::env::join_paths(path)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().context("cannot start vng")?;
    let console = Console::new(&rwdir.join("console.log"), label)?;
    let readers = [
        console.relay(child.stdout.take().expect("piped stdout")),
        console.relay(child.stderr.take().expect("piped stderr")),
    ];
    let status = wait_or_kill(&mut child, timeout)?;
    for reader in readers {
        let _ = reader.join();
    }
    Ok(Boot { status, timeout, wall: start.elapsed(), console_tail: console.tail() })
}

/// The VM's console: relayed to the terminal with a prefix, kept in a file, and its last
/// lines kept for failure messages.
#[derive(Clone)]
struct Console {
    prefix: String,
    file: Arc<Mutex<File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Console {
    fn new(path: &Path, label: &str) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { prefix: format!("[{label}] "), file: Arc::new(Mutex::new(file)), tail: Default::default() })
    }

    fn relay(&self, stream: impl Read + Send + 'static) -> std::thread::JoinHandle<()> {
        let console = self.clone();
        std::thread::spawn(move || {
            // Not `lines()`: a line that is not UTF-8 must not stop the relay (and block vng).
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                // The guest's console ends lines with \r\n.
                let line = line.trim_end_matches('\r');
                if !is_kernel_log(line) {
                    println!("{}{line}", console.prefix);
                }
                let _ = writeln!(console.file.lock().expect("console file"), "{line}");
                let mut tail = console.tail.lock().expect("console tail");
                if tail.len() == CONSOLE_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_owned());
            }
        })
    }

    fn tail(&self) -> String {
        let tail = self.tail.lock().expect("console tail");
        tail.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// A line of the kernel's log on the console ("[    1.234567] ..."): kept in console.log
/// and in the tail for failure messages, not relayed to the terminal.
fn is_kernel_log(line: &str) -> bool {
    line.strip_prefix('[').and_then(|rest| rest.split_once(']')).is_some_and(|(stamp, _)| {
        !stamp.trim().is_empty() && stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_of_the_plain_flavour_only() {
        let [old, new] = &VM_KERNELS;
        assert_eq!(old.number("6.1.0-57-amd64"), Some(57));
        assert_eq!(old.number("6.1.0-57-cloud-amd64"), None);
        assert_eq!(old.number("6.1.0-57-rt-amd64"), None);
        assert_eq!(old.number("6.12.118+deb12-amd64"), None);
        assert_eq!(new.number("6.12.118+deb12-amd64"), Some(118));
        assert_eq!(new.number("6.12.118+deb12-cloud-amd64"), None);
        assert_eq!(new.number("6.18.44"), None);
    }

    #[test]
    fn kernel_log_lines_stay_off_the_terminal() {
        assert!(is_kernel_log("[    0.123456] Linux version 6.12.118"));
        assert!(is_kernel_log("[12345.000001] reboot: Power down"));
        assert!(!is_kernel_log("runner: kernel 6.1.0-57-amd64, 17 s after boot"));
        assert!(!is_kernel_log("[] x"));
    }

    #[test]
    fn kernel_choice() {
        assert_eq!(select("all").unwrap().len(), 2);
        assert_eq!(select("6.12").unwrap()[0].series, "6.12");
        assert!(select("5.10").is_err());
    }
}
