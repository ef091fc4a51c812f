//! Builds the Go test client (`clients/go_client.go`) with the `go` on PATH (Debian's
//! golang-go; `cargo xtask setup` installs it), plain and stripped (`-ldflags=-s -w`), into
//! OUT_DIR: `GO_CLIENT` and `GO_CLIENT_STRIPPED` name them for the tests. Standard library
//! only: no module, no network (GOPROXY=off). Without `go`, the paths name why instead and
//! the Go tests fail saying so; the other tests build and run.

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
}
