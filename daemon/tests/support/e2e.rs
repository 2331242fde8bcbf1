//! What the root end-to-end tests share: gRPC lab clients that call until stopped, and a parser
//! for `/metrics` scrapes.

#![allow(dead_code)] // each test uses a different part of it

use std::{net::SocketAddr, time::Duration};

use fanout::agent::{Agent, AgentOptions};
use xtask::{
    grpc::{ClientReport, GrpcClient, Policy, StopHandle, Target},
    lab::Pod,
};

/// A gRPC client calling on its own thread until stopped (or [`CLIENT_DEADLINE`] passes), so
/// a test reads the agent while the traffic certainly still flows, however slow the machine.
pub struct Running {
    stop: StopHandle,
    thread: std::thread::JoinHandle<Result<ClientReport, String>>,
}

/// Bounds every client in these tests.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

impl Running {
    pub fn start(pod: &Pod, policy: Policy, target: Target, pace: Duration) -> Running {
        let client = GrpcClient::start(pod, policy, target, CLIENT_DEADLINE).expect("client");
        let stop = client.stop_handle();
        let thread = std::thread::spawn(move || {
            // The count only bounds the loop; the stop ends it.
            client.calls(100_000, pace).map_err(|e| e.to_string())?;
            client.finish().map_err(|e| e.to_string())
        });
        Running { stop, thread }
    }

    /// Stops the client, which closes its connections, and returns what it did.
    pub fn stop(self) -> ClientReport {
        self.stop.stop();
        self.thread
            .join()
            .expect("client thread")
            .expect("client report")
    }
}

/// One sample of a scrape: name, labels and value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    pub fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// The samples of one `/metrics` scrape (the text format; label values here never hold quotes).
#[derive(Debug)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest)),
                None => (series, Vec::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
            };
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Scrape { samples }
    }

    /// The value of the one sample of `name` with `labels`; panics unless exactly one matches.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.matches(name, labels))
            .collect();
        assert_eq!(m.len(), 1, "{name} {labels:?}: {m:?}");
        m[0].value
    }

    /// The sum over every sample of `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.matches(name, labels))
            .map(|s| s.value)
            .sum()
    }
}

/// `k="v",k2="v2"}` (after the opening brace) into pairs; values may hold escapes and commas.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = text.chars();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim_start_matches(',');
        if key.is_empty() || key == "}" {
            return labels;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "a quoted value for {key} in {text}"
        );
        let mut value = String::new();
        loop {
            match chars.next().expect("closing quote") {
                '\\' => value.push(chars.next().expect("escaped character")),
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.to_string(), value));
    }
}

/// Starts an agent on an ephemeral loopback port that polls every 20 ms, after `tune` adjusted
/// the options, and waits until it is ready (startup recovery done).
pub async fn start_agent_with(tune: impl FnOnce(&mut AgentOptions)) -> Agent {
    let mut opts = AgentOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        poll_interval: Duration::from_millis(20),
        ..AgentOptions::default()
    };
    tune(&mut opts);
    let agent = Agent::start(opts).await.expect("agent starts");
    tokio::time::timeout(Duration::from_secs(30), agent.ready())
        .await
        .expect("startup recovery finishes");
    agent
}
