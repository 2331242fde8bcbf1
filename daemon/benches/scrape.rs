//! What the balance metrics cost as the series grow to the cap: the snapshot the pipeline builds
//! once per tick (totals and verdicts of every client/service pair), a scrape's encode of the
//! published snapshot (which never waits for the pipeline), and the text's size. Prints a
//! Markdown table; `cargo xtask bench` puts it in BENCHMARKS.md.
//!
//! Each pair is one client pod calling one service of 3 ready backends over one reused
//! connection per backend, sampled every second for a 30 s window, as round_robin does.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fanout::{
    analysis::{
        AnalysisConfig, Analyzer, BACKEND_SERIES, ConnId, ConnOpen, Counters, KEY_SERIES,
        RequestSource,
    },
    exposition::{balance::BalanceSnapshot, metrics::Metrics},
    identity::model::ObjectRef,
};

const S: u64 = 1_000_000_000;
const BACKENDS: usize = 3;
const SECONDS: u64 = 31;

/// `pairs` clients, each calling its own service (so every pair has its own backends too).
fn analyzer(pairs: usize) -> Analyzer {
    let mut a = Analyzer::new(AnalysisConfig::default()).expect("default config");
    let mut id = 0;
    for p in 0..pairs {
        let service = ObjectRef::new("shop", format!("svc-{p}"));
        let backends: Vec<ObjectRef> = (0..BACKENDS)
            .map(|b| ObjectRef::new("shop", format!("svc-{p}-{b}")))
            .collect();
        a.set_ready_backends(&service, backends.clone(), 0);
        for (b, backend) in backends.into_iter().enumerate() {
            id += 1;
            let opened = a.on_open(ConnOpen {
                id: ConnId(id),
                client: ObjectRef::new("shop", format!("client-{p}")),
                service: service.clone(),
                backend: Some(backend),
                local_port: 40000 + b as u16,
                at: 0,
                recovered: false,
            });
            assert!(opened, "pair {p} refused: under the cap by construction");
            for t in 1..=SECONDS {
                let n = 10 * t;
                a.on_sample(
                    ConnId(id),
                    t * S,
                    &Counters {
                        bytes_sent: 100 * n,
                        bytes_received: 200 * n,
                        messages_sent: n,
                        messages_received: n,
                        requests: n,
                        source: RequestSource::H2,
                    },
                );
            }
        }
    }
    a
}

fn now() -> u64 {
    SECONDS * S
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let per_pair = KEY_SERIES + BACKENDS * BACKEND_SERIES;
    let cap = AnalysisConfig::default().max_series;
    let sizes = [10, 100, cap / per_pair / 2, cap / per_pair];
    let runs = 9;
    println!(
        "| client/service pairs | series | pipeline snapshot per tick (median) | scrape (median) | \
         scrape ratio to {} pairs | text |",
        sizes[0]
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut base = None;
    for pairs in sizes {
        let a = analyzer(pairs);
        let series = a.stats().series;
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(BalanceSnapshot::default()));
        let mut m = Metrics::new();
        m.register_balance(rx);
        let (mut locked, mut whole, mut bytes) = (Vec::new(), Vec::new(), 0);
        for _ in 0..runs {
            let t = Instant::now();
            let snapshot = BalanceSnapshot::of(&a, now());
            locked.push(t.elapsed());
            tx.send_replace(Arc::new(snapshot));
            let t = Instant::now();
            let text = m.encode().expect("encode");
            whole.push(t.elapsed());
            bytes = text.len();
        }
        let (locked, whole) = (median(locked), median(whole));
        let base = *base.get_or_insert(whole.as_secs_f64());
        println!(
            "| {pairs} | {series} | {:.2} ms | {:.2} ms | {:.1} | {} KiB |",
            locked.as_secs_f64() * 1e3,
            whole.as_secs_f64() * 1e3,
            whole.as_secs_f64() / base,
            bytes / 1024
        );
    }
}
