//! A real Prometheus server (Debian's `prometheus` package) for the live tests: started inside a
//! lab network namespace on its loopback, scraping what the test names, evaluating the project's
//! rule file, queried through its HTTP API.
//!
//! Invariants: it listens on 127.0.0.1 of the namespace it runs in, keeps its data in a
//! directory of its own that is deleted with it, and dropping a [`Prometheus`] kills it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::lab::Pod;

/// Percent-encodes a query string value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The rule file with every alert's `for:` set to `for_` (a test cannot wait ten minutes; the
/// expressions stay exactly as shipped).
pub fn with_short_for(rules: &str, for_: &str) -> String {
    rules
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("for:") {
                format!("{}for: {for_}", &l[..l.len() - t.len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub struct Prometheus {
    child: Child,
    /// Where it listens, inside `netns`.
    pub addr: SocketAddr,
    /// The namespace it runs in (as a lab pod, to connect from there).
    pub netns: Pod,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` in `netns` with `config` (prometheus.yml text) and the rule files
    /// `rules` (name, text), written to `dir`.
    pub fn start(netns: &Pod, config: &str, rules: &[(&str, String)], dir: &Path) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data"))?;
        for (name, text) in rules {
            std::fs::write(dir.join(name), text)?;
        }
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let check = Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(dir.join("prometheus.yml"))
            .output()
            .context("running promtool (install prometheus: cargo xtask setup)")?;
        if !check.status.success() {
            bail!(
                "promtool check config: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let addr: SocketAddr = "127.0.0.1:9091".parse()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.netns, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus (install it: cargo xtask setup)")?;
        let mut p = Prometheus {
            child,
            addr,
            netns: netns.clone(),
            dir: dir.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = p.get("/-/ready") {
                return Ok(p);
            }
            if let Some(st) = p.child.try_wait()? {
                bail!("prometheus exited with {st}: {}", p.log());
            }
            if Instant::now() > end {
                bail!("prometheus not ready after 30 s: {}", p.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` from inside the namespace.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let (addr, path) = (self.addr, path.to_string());
        Ok(self.netns.run(move || crate::http::get(addr, &path))??)
    }

    /// An instant query; the `data.result` array.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let (code, body) = self.get(&format!("/api/v1/query?query={}", urlencode(expr)))?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {expr}: not JSON ({code}): {body}"))?;
        if v["status"] != "success" {
            bail!("query {expr}: {code} {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Alerts in the `firing` state.
    pub fn firing(&self) -> Result<Vec<Value>> {
        let (_, body) = self.get("/api/v1/alerts")?;
        let v: Value = serde_json::from_str(&body).context("alerts: not JSON")?;
        Ok(v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing")
            .cloned()
            .collect())
    }

    /// Scrape targets and their health.
    pub fn targets(&self) -> Result<Vec<Value>> {
        let (_, body) = self.get("/api/v1/targets")?;
        let v: Value = serde_json::from_str(&body).context("targets: not JSON")?;
        Ok(v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_durations_are_shortened_and_nothing_else_changes() {
        let rules = "groups:\n  - name: a\n    rules:\n      - alert: X\n        expr: up == 0\n        for: 10m\n        labels: {severity: warning}";
        let short = with_short_for(rules, "0s");
        assert!(short.contains("        for: 0s"));
        assert_eq!(short.replace("for: 0s", "for: 10m"), rules);
    }

    #[test]
    fn encodes_promql() {
        assert_eq!(
            urlencode(r#"up{job="fanout"} == 1"#),
            "up%7Bjob%3D%22fanout%22%7D%20%3D%3D%201"
        );
    }
}
