//! Builds the eBPF programs (crate `fanout-ebpf`) for the BPF target with aya-build and leaves the
//! object in OUT_DIR, where `src/probe` embeds it with `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "fanout-ebpf")
        .ok_or_else(|| anyhow!("package fanout-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))?;
    // The shared crate is compiled into the eBPF object too.
    println!("cargo:rerun-if-changed={}", root_dir.join("../common/src"));
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
