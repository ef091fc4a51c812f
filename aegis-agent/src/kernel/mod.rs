//! The kernel as the agent finds it: its eBPF objects, what the running kernel offers them
//! ([`features`]), and what each capability came to on this host ([`capability`]). A bottom
//! module: every stage may use it, it uses none of them.

pub mod btf;
pub mod capability;
pub mod features;
pub mod objects;

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified in the hybrid layout).
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right.starts_with("cgroup2 ").then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}
