//! cgroup v2 paths, for every stage: which cgroup a process is in, whether a cgroup is
//! within a scope (a tenant, a block's scope, the containment cgroup, a policy's tenant),
//! and the v2 path of what an operator typed (see [`Mounts::v2_path`]).
//!
//! A bottom module: it imports nothing of the crate.

/// Whether cgroup `path` is `scope` or below it, on a path-component boundary ("/a/b"
/// covers "/a/b/c", not "/a/bc"; "/" covers every cgroup; a trailing '/' on the scope is
/// ignored).
pub fn covers(scope: &str, path: &str) -> bool {
    let scope = scope.trim_end_matches('/');
    path == scope || path.strip_prefix(scope).is_some_and(|rest| rest.starts_with('/'))
}

/// The unified-hierarchy line of /proc/PID/cgroup ("0::/path").
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// Where the conventional cgroup file systems live; a path below it is a file system path
/// even on a host where nothing of cgroup v2 is mounted there.
const CGROUP_FS_DIR: &str = "/sys/fs/cgroup";

/// The cgroup mounts of this host, as `/proc/self/mountinfo` lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hosts in
    /// the hybrid layout).
    pub v2: Option<String>,
    /// The cgroup v1 hierarchies' mount points (/sys/fs/cgroup/memory, ...).
    pub v1: Vec<String>,
}

impl Mounts {
    /// Read from `/proc/self/mountinfo`; none known when it cannot be read.
    pub fn of_this_host() -> Self {
        std::fs::read_to_string("/proc/self/mountinfo").map(|t| Self::parse(&t)).unwrap_or_default()
    }

    /// From the text of a mountinfo file ("36 25 0:31 / /sys/fs/cgroup rw,... - cgroup2
    /// cgroup2 rw"): the mount point is the fifth field, the type the first after " - ".
    pub fn parse(mountinfo: &str) -> Self {
        let mut mounts = Self::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let Some(point) = left.split_whitespace().nth(4) else { continue };
            match right.split_whitespace().next() {
                Some("cgroup2") if mounts.v2.is_none() => mounts.v2 = Some(point.to_owned()),
                Some("cgroup") => mounts.v1.push(point.to_owned()),
                _ => {}
            }
        }
        mounts
    }

    /// The cgroup v2 path (as in /proc/PID/cgroup) of what an operator gave as a cgroup: a
    /// path under the cgroup v2 mount (`/sys/fs/cgroup/unified/team-a` on a hybrid host) is
    /// turned into the v2 path (`/team-a`); any other path is taken as a v2 path already,
    /// except one under a cgroup v1 hierarchy or under /sys/fs/cgroup outside the v2 mount,
    /// which is an error that says what to give instead. Operators copy both forms (from
    /// `systemctl status`, from `ls /sys/fs/cgroup`); taking a file system path as a v2 path
    /// made the agent look for `/sys/fs/cgroup/unified/sys/fs/cgroup/unified/...`.
    /// The result is not otherwise checked (see `control::parse_cgroup`).
    pub fn v2_path(&self, s: &str) -> Result<String, String> {
        let v2_hint = match &self.v2 {
            Some(root) => format!(
                "give the cgroup's path under the cgroup v2 mount {root}, or its cgroup v2 path as in \
                 /proc/PID/cgroup (e.g. /system.slice/app.service)"
            ),
            None => "no cgroup v2 file system is mounted on this host: the agent works with cgroup v2 only".to_owned(),
        };
        if let Some(root) = &self.v2
            && let Some(rest) = below(root, s)
        {
            // A v2 path that reads as a path under /sys/fs/cgroup would be taken as a file
            // system path when given again (`/sys/fs/cgroup/unified/sys/fs/cgroup/memory` on
            // a hybrid host): it is refused, so that a validated cgroup validates the same.
            if below(CGROUP_FS_DIR, rest).is_some() {
                return Err(format!(
                    "cgroup {s:?} names the cgroup v2 path {rest:?}, which reads as a file system path: {v2_hint}"
                ));
            }
            return Ok(if rest.is_empty() { "/".to_owned() } else { rest.to_owned() });
        }
        if let Some(v1) = self.v1.iter().find(|m| below(m, s).is_some()) {
            return Err(format!("cgroup {s:?} is in the cgroup v1 hierarchy mounted at {v1}: {v2_hint}"));
        }
        if below(CGROUP_FS_DIR, s).is_some() {
            return Err(format!("cgroup {s:?} is under {CGROUP_FS_DIR} but not in the cgroup v2 hierarchy: {v2_hint}"));
        }
        Ok(s.to_owned())
    }
}

/// What follows `dir` in `path` when `path` is `dir` or below it ("" or "/rest"), on a
/// component boundary; a trailing '/' on either is ignored.
fn below<'a>(dir: &str, path: &'a str) -> Option<&'a str> {
    let dir = dir.trim_end_matches('/');
    let rest = path.strip_prefix(dir)?.trim_end_matches('/');
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Remove the cgroup directory `dir` (under the cgroup v2 mount), killing the processes
/// still in it first (for a cgroup made for processes of one's own, such as a drill's);
/// whether it existed.
pub fn remove_dir_killing(dir: &std::path::Path) -> std::io::Result<bool> {
    for _ in 0..50 {
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(_) => String::new(),
        };
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(std::io::Error::new(e.kind(), format!("cannot remove the cgroup {}: {e}", dir.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_on_component_boundaries() {
        assert!(covers("/system.slice/app.service", "/system.slice/app.service"));
        assert!(covers("/system.slice/app.service/", "/system.slice/app.service/worker"));
        assert!(!covers("/system.slice/app.service", "/system.slice/app.service2"));
        assert!(covers("/", "/user.slice"));
        assert!(covers("/", "/"));
        assert!(covers("/a", "/a/b"));
        assert!(covers("/a", "/a"));
        assert!(!covers("/a", "/ab"));
        assert!(!covers("/a/b", "/a"));
    }

    #[test]
    fn the_unified_line_is_read() {
        let text = "12:pids:/legacy\n0::/user.slice/session-1.scope\n";
        assert_eq!(parse_proc_cgroup(text).as_deref(), Some("/user.slice/session-1.scope"));
        assert_eq!(parse_proc_cgroup("1:name=systemd:/x\n"), None);
    }

    /// A host in the hybrid layout (v1 controllers, v2 at /sys/fs/cgroup/unified), as
    /// this repository's test machine is.
    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
36 22 0:31 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mounts_are_read_from_mountinfo() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(m.v2.as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(m.v1, ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/systemd"]);
        assert_eq!(Mounts::parse(UNIFIED), Mounts { v2: Some("/sys/fs/cgroup".into()), v1: vec![] });
        assert_eq!(Mounts::parse("garbage\n\n1 2 3\n"), Mounts::default());
    }

    #[test]
    fn file_system_paths_become_v2_paths() {
        let hybrid = Mounts::parse(HYBRID);
        assert_eq!(hybrid.v2_path("/sys/fs/cgroup/unified/team-a/job-1"), Ok("/team-a/job-1".into()));
        assert_eq!(hybrid.v2_path("/sys/fs/cgroup/unified/team-a/"), Ok("/team-a".into()));
        assert_eq!(hybrid.v2_path("/sys/fs/cgroup/unified"), Ok("/".into()));
        assert_eq!(hybrid.v2_path("/sys/fs/cgroup/unified/"), Ok("/".into()));
        let unified = Mounts::parse(UNIFIED);
        assert_eq!(unified.v2_path("/sys/fs/cgroup/system.slice/app.service"), Ok("/system.slice/app.service".into()));
        assert_eq!(unified.v2_path("/sys/fs/cgroup"), Ok("/".into()));
        // v2 paths are left as they are, whatever the layout.
        for m in [&hybrid, &unified, &Mounts::default()] {
            assert_eq!(m.v2_path("/system.slice/app.service"), Ok("/system.slice/app.service".into()));
            assert_eq!(m.v2_path("/"), Ok("/".into()));
            // A component boundary: a cgroup named like the mount's start is a v2 path.
            assert_eq!(m.v2_path("/sys"), Ok("/sys".into()));
            assert_eq!(m.v2_path("/sys/fs/cgroupx/a"), Ok("/sys/fs/cgroupx/a".into()));
        }
        assert_eq!(hybrid.v2_path("/sys/fs/cgroup/unifiedx"), Err(
            "cgroup \"/sys/fs/cgroup/unifiedx\" is under /sys/fs/cgroup but not in the cgroup v2 hierarchy: give the \
             cgroup's path under the cgroup v2 mount /sys/fs/cgroup/unified, or its cgroup v2 path as in \
             /proc/PID/cgroup (e.g. /system.slice/app.service)"
                .into()
        ));
    }

    #[test]
    fn paths_outside_the_v2_mount_are_refused_with_what_to_give() {
        let hybrid = Mounts::parse(HYBRID);
        assert_eq!(
            hybrid.v2_path("/sys/fs/cgroup/memory/team-a"),
            Err("cgroup \"/sys/fs/cgroup/memory/team-a\" is in the cgroup v1 hierarchy mounted at \
                 /sys/fs/cgroup/memory: give the cgroup's path under the cgroup v2 mount /sys/fs/cgroup/unified, \
                 or its cgroup v2 path as in /proc/PID/cgroup (e.g. /system.slice/app.service)"
                .into())
        );
        assert!(hybrid.v2_path("/sys/fs/cgroup").unwrap_err().contains("not in the cgroup v2 hierarchy"));
        // Fuzz finding: what is accepted validates the same when given again.
        let err = hybrid.v2_path("/sys/fs/cgroup/unified/sys/fs/cgroup/memoryvice").unwrap_err();
        assert!(err.contains("reads as a file system path"), "{err}");
        let unified = Mounts::parse(UNIFIED);
        assert!(unified.v2_path("/sys/fs/cgroup/sys/fs/cgroup/x").is_err());
        assert_eq!(unified.v2_path("/sys/fs/cgroup/sys/fs/x"), Ok("/sys/fs/x".into()));
        assert_eq!(
            Mounts::default().v2_path("/sys/fs/cgroup/team-a"),
            Err("cgroup \"/sys/fs/cgroup/team-a\" is under /sys/fs/cgroup but not in the cgroup v2 hierarchy: no \
                 cgroup v2 file system is mounted on this host: the agent works with cgroup v2 only"
                .into())
        );
    }
}
