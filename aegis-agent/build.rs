//! Builds the eBPF object (aegis-ebpf) for bpfel-unknown-none with the same pinned
//! toolchain as this crate, so rustc, aya-build and bpf-linker share one LLVM.
use anyhow::{Context as _, anyhow};

/// Must match xtask::TOOLCHAIN (the pinned toolchain; see xtask/src/main.rs).
const TOOLCHAIN: &str = "nightly-2026-10-30";

/// The eBPF binaries the agent embeds (`include_bytes_aligned!` in kernel/objects.rs).
const EBPF_OBJECTS: [&str; 4] = ["aegis-capture", "aegis-gate", "aegis-enforce", "aegis-watch"];

fn main() -> anyhow::Result<()> {
    // The fuzz targets (fuzz/, `cargo xtask fuzz`) link the agent's parsers and never load
    // a program: they set AYA_BUILD_SKIP=1 and get empty objects instead of a second eBPF
    // build, which would double the instrumented build's time. An agent built so has empty
    // programs and cannot load them: never ship one.
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        for name in EBPF_OBJECTS {
            std::fs::write(out.join(name), b"").with_context(|| format!("writing an empty {name}"))?;
        }
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    // aya-build watches the eBPF crate's directory; the shared types live next to it.
    if let Some(common) = packages.iter().find(|p| p.name.as_str() == "aegis-common")
        && let Some(dir) = common.manifest_path.parent()
    {
        println!("cargo::rerun-if-changed={dir}");
    }
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "aegis-ebpf")
        .ok_or_else(|| anyhow!("aegis-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN))
}
