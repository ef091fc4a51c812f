//! `cargo xtask deb`: the Debian package, built with `dpkg-deb` from the
//! `[package.metadata.deb]` table of `aegis-agent/Cargo.toml` (the table cargo-deb reads,
//! so either tool makes the same package), plus the shell completions and man pages the
//! binary generates; and the package check `cargo xtask test` runs: install into a clean
//! root, upgrade, remove, purge.
//!
//! The clean root is a directory with its own empty dpkg database and only what the
//! maintainer scripts call (a shell, `install`, `getent`, `groupadd` and their libraries,
//! copied from the host), and `/etc/passwd` and `/etc/group`. `dpkg --root` installs into it
//! and runs the scripts chrooted there, so nothing of the host is touched (the prerm's
//! `aegis-agent unpin` sees no bpffs in the chroot). The packages the agent depends on are
//! entered in the root's database with the host's versions (their files are the host's):
//! the dependency check is dpkg's own.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize;

use crate::{output, run, workspace_root};

#[derive(Deserialize)]
struct Manifest {
    package: Package,
}

#[derive(Deserialize)]
struct Package {
    /// A string, or `{ workspace = true }`.
    version: toml::Value,
    description: Option<String>,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    deb: DebMeta,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DebMeta {
    maintainer: String,
    section: String,
    priority: String,
    extended_description: String,
    assets: Vec<(String, String, String)>,
    conf_files: Vec<String>,
    maintainer_scripts: String,
}

fn manifest() -> anyhow::Result<(Package, PathBuf)> {
    let dir = workspace_root().join("aegis-agent");
    let text = fs::read_to_string(dir.join("Cargo.toml")).context("reading aegis-agent/Cargo.toml")?;
    let m: Manifest = toml::from_str(&text).context("aegis-agent/Cargo.toml: [package.metadata.deb]")?;
    Ok((m.package, dir))
}

/// The package version of the crate's, with `suffix` (e.g. `+upgrade1`).
pub fn version(suffix: &str) -> anyhow::Result<String> {
    let version = match manifest()?.0.version {
        toml::Value::String(v) => v,
        _ => {
            let text = fs::read_to_string(workspace_root().join("Cargo.toml")).context("reading Cargo.toml")?;
            let root: toml::Table = toml::from_str(&text).context("Cargo.toml")?;
            root.get("workspace")
                .and_then(|w| w.get("package"))
                .and_then(|p| p.get("version"))
                .and_then(toml::Value::as_str)
                .context("no [workspace.package] version in Cargo.toml")?
                .to_owned()
        }
    };
    Ok(format!("{version}{suffix}"))
}

/// `Depends:` of `binary`: libc6 at the newest GLIBC_ symbol version it needs, and the
/// package of every other library it links (as the host's dpkg knows them).
fn depends(binary: &Path) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let symbols = output(Command::new("objdump").arg("-T").arg(binary)).context("objdump -T failed")?;
    let glibc = symbols
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("(GLIBC_").or_else(|| w.strip_prefix("GLIBC_")))
        .filter_map(|v| {
            let v = v.trim_end_matches(')');
            let parts: Vec<u32> = v.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
            Some(parts)
        })
        .max()
        .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join("."));
    let mut deps = vec![("libc6".to_owned(), glibc)];
    let dynamic = output(Command::new("readelf").arg("-d").arg(binary)).context("readelf -d failed")?;
    for lib in dynamic.lines().filter_map(|l| l.split("Shared library: [").nth(1)).map(|l| l.trim_end_matches(']')) {
        if lib.starts_with("libc.so") || lib.starts_with("libm.so") || lib.starts_with("ld-linux") {
            continue;
        }
        let owner = output(Command::new("dpkg").args(["-S", &format!("*/{lib}")]))
            .and_then(|o| o.lines().next().and_then(|l| l.split(':').next()).map(str::to_owned))
            .with_context(|| format!("no package of the host provides {lib}"))?;
        if !deps.iter().any(|(p, _)| *p == owner) {
            deps.push((owner, None));
        }
    }
    Ok(deps)
}

/// Build `out/aegis-agent_<version>_<arch>.deb` around `binary`. `compress`: dpkg-deb's
/// `-Z` (xz for releases, none for the check).
pub fn build(binary: &Path, version: &str, out: &Path, compress: &str) -> anyhow::Result<PathBuf> {
    let (package, crate_dir) = manifest()?;
    let meta = package.metadata.deb;
    let arch = output(Command::new("dpkg").arg("--print-architecture")).context("dpkg --print-architecture")?;
    let arch = arch.trim();
    let stage = out.join(format!("stage-{version}"));
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("DEBIAN"))?;
    for (src, dest, mode) in &meta.assets {
        let from = if src.starts_with("target/") { binary.to_owned() } else { crate_dir.join(src) };
        let to = if dest.ends_with('/') {
            stage.join(dest).join(from.file_name().context("an asset without a file name")?)
        } else {
            stage.join(dest)
        };
        fs::create_dir_all(to.parent().expect("a parent"))?;
        fs::copy(&from, &to).with_context(|| format!("asset {}", from.display()))?;
        let mode = u32::from_str_radix(mode, 8).with_context(|| format!("asset mode {mode}"))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    }
    // Completions and man pages, from the binary itself.
    let bin = stage.join("usr/bin/aegis-agent");
    for (shell, dest) in [
        ("bash", "usr/share/bash-completion/completions/aegis-agent"),
        ("zsh", "usr/share/zsh/vendor-completions/_aegis-agent"),
        ("fish", "usr/share/fish/vendor_completions.d/aegis-agent.fish"),
    ] {
        let text = output(Command::new(&bin).args(["completions", shell]))
            .with_context(|| format!("aegis-agent completions {shell} failed"))?;
        let path = stage.join(dest);
        fs::create_dir_all(path.parent().expect("a parent"))?;
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    }
    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    run(Command::new(&bin).args(["man", "--dir"]).arg(&man))?;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        run(Command::new("gzip").args(["-9n"]).arg(&page))?;
    }
    // The maintainer scripts; `#DEBHELPER#` takes the systemd unit's steps (debhelper's,
    // written out: the unit is neither enabled nor started by installing the package).
    let scripts = crate_dir.join(&meta.maintainer_scripts);
    let debhelper = [
        (
            "postinst",
            "if [ \"$1\" = \"configure\" ] && [ -d /run/systemd/system ]; then\n    systemctl --system daemon-reload >/dev/null || true\nfi\n",
        ),
        (
            "postrm",
            "if [ -d /run/systemd/system ]; then\n    systemctl --system daemon-reload >/dev/null || true\nfi\n",
        ),
    ];
    for name in ["preinst", "postinst", "prerm", "postrm"] {
        let own = fs::read_to_string(scripts.join(name)).ok();
        let helper = debhelper.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
        let text = match (own, helper) {
            (Some(own), helper) => own.replace("#DEBHELPER#", helper.unwrap_or("")),
            (None, Some(helper)) => format!("#!/bin/sh\nset -e\n{helper}"),
            (None, None) => continue,
        };
        let path = stage.join("DEBIAN").join(name);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(stage.join("DEBIAN/conffiles"), meta.conf_files.iter().map(|c| format!("{c}\n")).collect::<String>())?;
    let size_kib = dir_size(&stage)?.div_ceil(1024);
    let deps: Vec<String> = depends(binary)?
        .into_iter()
        .map(|(p, v)| match v {
            Some(v) => format!("{p} (>= {v})"),
            None => p,
        })
        .collect();
    let description = package.description.unwrap_or_else(|| "AegisPlane host agent".into());
    let extended: String = meta.extended_description.lines().map(|l| format!(" {l}\n")).collect();
    let control = format!(
        "Package: aegis-agent\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {}\nSection: {}\nPriority: {}\n\
         Installed-Size: {size_kib}\nDepends: {}\nDescription: {description}\n{extended}",
        meta.maintainer,
        meta.section,
        meta.priority,
        deps.join(", ")
    );
    fs::write(stage.join("DEBIAN/control"), control)?;
    let deb = out.join(format!("aegis-agent_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .arg(format!("-Z{compress}"))
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    fs::remove_dir_all(&stage)?;
    Ok(deb)
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() { dir_size(&e.path())? } else { m.len() };
    }
    Ok(total)
}

/// A clean root in `root`: an empty dpkg database, the tools the maintainer scripts call.
fn clean_root(root: &Path, deps: &[String]) -> anyhow::Result<()> {
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "etc", "tmp", "usr/bin", "usr/sbin"]
    {
        fs::create_dir_all(root.join(d))?;
    }
    // The host's entries for the packages the agent depends on (their files are the host's;
    // only the database entry is needed for dpkg's dependency check).
    let mut status = String::new();
    for p in deps {
        let stanza =
            output(Command::new("dpkg-query").args(["-s", p])).with_context(|| format!("dpkg-query -s {p}"))?;
        status.push_str(stanza.trim_end());
        status.push_str("\n\n");
    }
    // Their file lists: empty (their files are the host's, not the root's).
    for stanza in status.split("\n\n") {
        let field = |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        if let (Some(p), Some(arch)) = (field("Package:"), field("Architecture:")) {
            let list = if arch == "all" { format!("{p}.list") } else { format!("{p}:{arch}.list") };
            fs::write(root.join("var/lib/dpkg/info").join(list), "")?;
        }
    }
    fs::write(root.join("var/lib/dpkg/status"), status)?;
    // The scripts redirect to /dev/null.
    fs::create_dir_all(root.join("dev"))?;
    run(Command::new("mknod").args(["-m", "666"]).arg(root.join("dev/null")).args(["c", "1", "3"]))?;
    fs::write(root.join("var/lib/dpkg/available"), "")?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n")?;
    fs::write(root.join("etc/gshadow"), "root:*::\n")?;
    fs::write(root.join("etc/nsswitch.conf"), "passwd: files\ngroup: files\nshadow: files\ngshadow: files\n")?;
    if Path::new("/etc/login.defs").exists() {
        fs::copy("/etc/login.defs", root.join("etc/login.defs"))?;
    }
    // A merged /usr, as Debian's.
    for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        fs::create_dir_all(root.join(to))?;
        std::os::unix::fs::symlink(to, root.join(link))?;
    }
    let tools =
        ["/usr/bin/dash", "/usr/bin/install", "/usr/bin/getent", "/usr/sbin/groupadd", "/usr/bin/rm", "/usr/bin/true"];
    let mut libs = BTreeSet::new();
    for tool in tools {
        fs::copy(tool, root.join(tool.trim_start_matches('/')))?;
        let ldd = output(Command::new("ldd").arg(tool)).unwrap_or_default();
        libs.extend(ldd.split_whitespace().filter(|w| w.starts_with('/')).map(str::to_owned));
    }
    // NSS modules getent and groupadd load for `files`.
    for extra in ["/lib/x86_64-linux-gnu/libnss_files.so.2", "/usr/lib/x86_64-linux-gnu/libnss_files.so.2"] {
        if Path::new(extra).exists() {
            libs.insert(extra.to_owned());
        }
    }
    for lib in libs {
        let real = fs::canonicalize(&lib)?;
        let dest = root.join(real.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(dest.parent().expect("a parent"))?;
        fs::copy(&real, &dest)?;
        let named = root.join(lib.trim_start_matches('/'));
        if named != dest && !named.exists() {
            fs::create_dir_all(named.parent().expect("a parent"))?;
            std::os::unix::fs::symlink(&real, &named)?;
        }
    }
    std::os::unix::fs::symlink("dash", root.join("usr/bin/sh"))?;
    Ok(())
}

fn dpkg(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .context("cannot run dpkg")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "dpkg --root {} {} failed:\n{text}", root.display(), args.join(" "));
    Ok(text)
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(fs::metadata(path).with_context(|| format!("{} is missing", path.display()))?.permissions().mode() & 0o7777)
}

/// The package check of `cargo xtask test`: two versions of the package around `binary`
/// (stripped), installed into a clean root, the second over the first (an operator's edit
/// of the config kept), removed (the config kept), purged (gone).
pub fn check(binary: &Path) -> anyhow::Result<()> {
    ensure!(crate::nix_is_root(), "the package check installs into a chroot: run as root");
    let dir = workspace_root().join("target/deb-check");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let stripped = dir.join("aegis-agent");
    run(Command::new("strip").arg("-o").arg(&stripped).arg(binary))?;
    let v1 = version("")?;
    let v2 = version("+check1")?;
    let deb1 = build(&stripped, &v1, &dir, "none")?;
    let deb2 = build(&stripped, &v2, &dir, "none")?;
    let fields = output(Command::new("dpkg-deb").arg("-f").arg(&deb1)).context("dpkg-deb -f")?;
    ensure!(fields.contains("Package: aegis-agent") && fields.contains("Depends: libc6 (>= "), "control: {fields}");
    let deps: Vec<String> = fields
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .unwrap_or_default()
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned())
        .filter(|d| !d.is_empty())
        .collect();
    let root = dir.join("root");
    clean_root(&root, &deps)?;
    let result = (|| -> anyhow::Result<()> {
        dpkg(&root, &["-i", deb1.to_str().expect("utf-8 path")])?;
        for (path, want) in [
            ("usr/bin/aegis-agent", 0o755),
            ("etc/aegis/aegis.toml", 0o600),
            ("lib/systemd/system/aegis-agent.service", 0o644),
            ("etc/logrotate.d/aegis-agent", 0o644),
            ("usr/share/bash-completion/completions/aegis-agent", 0o644),
            ("usr/share/man/man1/aegis-agent.1.gz", 0o644),
            ("var/log/aegis", 0o700),
        ] {
            let got = mode(&root.join(path))?;
            ensure!(got == want, "{path}: mode {got:o}, expected {want:o}");
        }
        let group = fs::read_to_string(root.join("etc/group"))?;
        ensure!(group.lines().any(|l| l.starts_with("aegis:")), "postinst did not create the group aegis:\n{group}");
        let status = dpkg(&root, &["-s", "aegis-agent"])?;
        ensure!(
            status.contains("Status: install ok installed") && status.contains(&format!("Version: {v1}")),
            "{status}"
        );
        ensure!(status.contains("/etc/aegis/aegis.toml"), "aegis.toml is not a conffile:\n{status}");
        // An operator's edit, then the upgrade: the edit stays (--force-confold: as apt
        // would keep it unattended).
        let conf = root.join("etc/aegis/aegis.toml");
        let edited = format!("{}\n# edited by the operator\n", fs::read_to_string(&conf)?);
        fs::write(&conf, &edited)?;
        dpkg(&root, &["--force-confold", "-i", deb2.to_str().expect("utf-8 path")])?;
        let status = dpkg(&root, &["-s", "aegis-agent"])?;
        ensure!(status.contains(&format!("Version: {v2}")), "not upgraded:\n{status}");
        ensure!(fs::read_to_string(&conf)? == edited, "the upgrade replaced the operator's config");
        // Remove: the program goes, the config stays; purge: the config goes too.
        dpkg(&root, &["-r", "aegis-agent"])?;
        ensure!(!root.join("usr/bin/aegis-agent").exists(), "the binary outlived remove");
        ensure!(conf.exists(), "remove took the operator's config");
        dpkg(&root, &["-P", "aegis-agent"])?;
        ensure!(!conf.exists(), "purge left the config");
        let status =
            Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-s", "aegis-agent"]).output()?;
        ensure!(
            !status.status.success() || String::from_utf8_lossy(&status.stdout).contains("not-installed"),
            "still installed after purge"
        );
        Ok(())
    })();
    let _ = fs::remove_dir_all(&dir);
    result?;
    eprintln!(
        "xtask: package check: {v1} installed into a clean root, upgraded to {v2} (config edit kept), removed, purged"
    );
    Ok(())
}

/// `cargo xtask deb`: the release package into `out`.
pub fn release(out: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(out)?;
    let bin = workspace_root().join("target/release/aegis-agent");
    if !bin.is_file() {
        bail!("{} is missing: the release build did not make it", bin.display());
    }
    build(&bin, &version("")?, out, "xz")
}
