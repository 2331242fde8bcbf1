//! The fanout daemon as a child process of the xtask tools (the demo and the soak).
//!
//! Invariants: a [`Daemon`] is only handed out once `/healthz` answered 200; it listens on a
//! loopback port nobody else had; dropping it stops it (SIGTERM, then SIGKILL after 10 s), so
//! no error path leaves a daemon with programs attached.

use std::{
    ffi::OsStr,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::http;

pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Daemon {
    /// Runs `bin run --listen <a free loopback port> <args>` with its stderr in `log` (opened by
    /// the caller: created or appended), and waits up to `limit` for `/healthz` (`log_path`
    /// names the log in errors).
    pub fn start(
        bin: &Path,
        args: &[impl AsRef<OsStr>],
        log: std::fs::File,
        log_path: &Path,
        limit: Duration,
    ) -> Result<Daemon> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(bin)
            .args(["run", "--listen", &addr.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut d = Daemon { child, addr };
        let end = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = http::get(addr, "/healthz") {
                return Ok(d);
            }
            if let Some(st) = d.child.try_wait()? {
                bail!("fanout exited with {st} (log: {})", log_path.display());
            }
            if Instant::now() > end {
                bail!(
                    "fanout not healthy after {limit:?} (log: {})",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits up to `limit` for the exit. Err when it did not stop in time or
    /// exited unsuccessfully.
    pub fn stop(&mut self, limit: Duration) -> Result<()> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("fanout exited with {st} on SIGTERM");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("fanout did not stop within {limit:?} of SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.stop(Duration::from_secs(10)).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
