//! Builds the Go test client (`clients/go_client.go`) with the `go` on PATH (Debian's
//! golang-go; `cargo xtask setup` installs it), plain and stripped (`-ldflags=-s -w`), into
//! OUT_DIR: `GO_CLIENT` and `GO_CLIENT_STRIPPED` name them for the tests. Standard library
//! only: no module, no network (GOPROXY=off). Without `go`, the paths name why instead and
//! the Go tests fail saying so; the other tests build and run.
//!
//! Builds the C client (`clients/tls_client.c`) with `cc` four ways: against BoringSSL
//! (Debian's android-libboringssl-dev); with OpenSSL's static libraries (libssl-dev's
//! `libssl.a`), plain and stripped; and as a shared object with OpenSSL compiled in and
//! nothing exported but its entry point (as a Python extension module carries a TLS copy):
//! `TLS_CLIENT_BORINGSSL`, `TLS_CLIENT_STATIC`, `TLS_CLIENT_STATIC_STRIPPED`,
//! `TLS_CLIENT_MODULE` (a path, or `!why`, as for Go).

use std::{path::PathBuf, process::Command};

fn main() {
    let src =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("clients/go_client.go");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=PATH");
    // Built again when go appears or changes (a missing path reruns the script every build).
    let go = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("go")).find(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/go"));
    println!("cargo:rerun-if-changed={}", go.display());
    for (var, name, ldflags) in
        [("GO_CLIENT", "aegis-go-client", None), ("GO_CLIENT_STRIPPED", "aegis-go-client-stripped", Some("-s -w"))]
    {
        let bin = out.join(name);
        let mut cmd = Command::new(&go);
        cmd.arg("build").arg("-trimpath").arg("-o").arg(&bin);
        if let Some(flags) = ldflags {
            cmd.arg(format!("-ldflags={flags}"));
        }
        cmd.arg(&src)
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOCACHE", out.join("go-cache"))
            .env("CGO_ENABLED", "0");
        let value = match cmd.output() {
            Ok(o) if o.status.success() => bin.display().to_string(),
            Ok(o) => {
                let why = format!("go build failed: {}", String::from_utf8_lossy(&o.stderr).trim());
                println!("cargo:warning=Go test client not built ({why})");
                format!("!{why}")
            }
            Err(e) => {
                let why = format!("cannot run go ({e}): install golang-go (cargo xtask setup does)");
                println!("cargo:warning=Go test client not built ({why})");
                format!("!{why}")
            }
        };
        println!("cargo:rustc-env={var}={value}");
    }
    c_clients(&out);
}

/// The C client, built the four ways of the module doc.
fn c_clients(out: &std::path::Path) {
    let src =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("clients/tls_client.c");
    println!("cargo:rerun-if-changed={}", src.display());
    const BORING: &str = "/usr/lib/x86_64-linux-gnu/android";
    const LIBS: &str = "/usr/lib/x86_64-linux-gnu";
    for lib in [format!("{BORING}/libssl.so"), format!("{LIBS}/libssl.a")] {
        println!("cargo:rerun-if-changed={lib}");
    }
    let boring_flags = vec![
        "-I/usr/include/android".to_owned(),
        src.display().to_string(),
        format!("-L{BORING}"),
        "-lssl".into(),
        "-lcrypto".into(),
        format!("-Wl,-rpath,{BORING}"),
    ];
    let static_flags = vec![
        src.display().to_string(),
        format!("{LIBS}/libssl.a"),
        format!("{LIBS}/libcrypto.a"),
        "-ldl".into(),
        "-pthread".into(),
    ];
    let mut stripped_flags = static_flags.clone();
    stripped_flags.push("-s".into());
    let mut module_flags: Vec<String> =
        ["-shared", "-fPIC", "-Dmain=tls_client_main", "-Wl,--exclude-libs,ALL"].map(String::from).into();
    module_flags.extend(static_flags.iter().cloned());
    for (var, name, flags, package) in [
        ("TLS_CLIENT_BORINGSSL", "aegis-tls-client-boringssl", boring_flags, "android-libboringssl-dev"),
        ("TLS_CLIENT_STATIC", "aegis-tls-client-static", static_flags, "libssl-dev"),
        ("TLS_CLIENT_STATIC_STRIPPED", "aegis-tls-client-static-stripped", stripped_flags, "libssl-dev"),
        ("TLS_CLIENT_MODULE", "aegis_tls_module.so", module_flags, "libssl-dev"),
    ] {
        let bin = out.join(name);
        let built = Command::new("cc").args(["-O2", "-o"]).arg(&bin).args(&flags).output();
        let value = match built {
            Ok(o) if o.status.success() => bin.display().to_string(),
            Ok(o) => {
                let why = format!(
                    "cc failed (is {package} installed? cargo xtask setup installs it): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                println!("cargo:warning=C test client {name} not built ({why})");
                format!("!{why}")
            }
            Err(e) => {
                let why = format!("cannot run cc ({e})");
                println!("cargo:warning=C test client {name} not built ({why})");
                format!("!{why}")
            }
        };
        println!("cargo:rustc-env={var}={value}");
    }
}
