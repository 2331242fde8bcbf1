# syntax=docker/dockerfile:1
#
# The fanout node agent's image, for CI systems with a Docker/BuildKit engine:
#
#   docker build -t fanout:0.1.0 .
#
# Without a container engine, `cargo xtask image` builds an equivalent image (one binary at
# /fanout and the glibc libraries it needs) as an OCI layout in target/image/.
#
# Base images are pinned by tag only: their digests could not be looked up where this file was
# written. Pin them by digest in your CI (`FROM image:tag@sha256:…`) for reproducible builds.
# The builder (bookworm, glibc 2.36) and the runtime image (Debian 12, glibc 2.36) must stay on
# the same Debian release, or the binary may need a newer glibc than the runtime image has.

# ---- builder: the release daemon with its eBPF programs embedded ------------------------------
FROM rust:1.95-bookworm AS builder

# The eBPF programs are built for bpfel-unknown-none with the nightly toolchain and
# `-Z build-std=core` (daemon/build.rs runs `rustup run nightly cargo build …` through aya-build),
# so nightly needs rust-src. As in xtask/src/setup.rs.
RUN rustup toolchain install nightly --profile minimal --component rust-src

# bpf-linker links the eBPF programs. It must use rustc's own LLVM: LLVM_PREFIX points at a
# directory whose lib/libLLVM.so is the nightly sysroot's libLLVM (as xtask/src/setup.rs does).
# The feature names nightly's LLVM major version; keep both in step with xtask/src/setup.rs.
ARG BPF_LINKER_VERSION=0.13.0
ARG BPF_LINKER_LLVM_FEATURE=llvm-22
RUN set -eux; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    llvm="$(find "$sysroot/lib" -maxdepth 1 \( -name 'libLLVM.so.*' -o -name 'libLLVM-*' \) | sort | head -n 1)"; \
    test -n "$llvm"; \
    mkdir -p /opt/fanout-llvm/lib; \
    ln -s "$llvm" /opt/fanout-llvm/lib/libLLVM.so; \
    LLVM_PREFIX=/opt/fanout-llvm cargo install bpf-linker \
        --version "$BPF_LINKER_VERSION" --locked --no-default-features \
        --features "$BPF_LINKER_LLVM_FEATURE"; \
    rustup run nightly bpf-linker --version

WORKDIR /src
COPY . .
# The target dir is a cache mount, so the binary is copied out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package fanout \
    && cp target/release/fanout /fanout

# ---- runtime: glibc and libgcc, no shell, no package manager ------------------------------------
FROM gcr.io/distroless/cc-debian12:latest

COPY --from=builder /fanout /fanout
# Root: the capabilities the DaemonSet grants (BPF, PERFMON, …) only take effect for uid 0
# without ambient capabilities. The root filesystem can be read-only: fanout writes nothing.
USER 0
ENTRYPOINT ["/fanout"]
CMD ["run"]
