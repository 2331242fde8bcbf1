//! Per-pod balance metrics: encoded at each scrape from the analyzer, so they are exactly what
//! the JSON API and `fanout verify` read, and a (client, service) key's series vanish with it
//! (after the grace period, see [`Analyzer::gc`]).
//!
//! Labels: `namespace`, `pod` (the client pod, always one of this node's), `service_namespace`,
//! `service`, and where it applies `backend_pod` (a pod name, `_unknown` or `_overflow`), `source`
//! (`h2` | `messages`), `direction` (`sent` | `received`) or `verdict`. Never an IP or a port. The
//! series count is capped by [`crate::analysis::AnalysisConfig::max_series`]; what the cap
//! refused is counted in `fanout_series_dropped_total`.

use std::{fmt, sync::Arc};

use tokio::sync::watch;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use crate::analysis::{Analyzer, AnalyzerStats, BackendTotals, Balance, KeyTotals, Nanos, Verdict};
use crate::identity::model::ObjectRef;

/// Encodes the latest [`BalanceSnapshot`] the pipeline published at each scrape.
pub struct BalanceCollector {
    snapshot: watch::Receiver<Arc<BalanceSnapshot>>,
}

impl fmt::Debug for BalanceCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BalanceCollector")
    }
}

impl BalanceCollector {
    pub fn new(snapshot: watch::Receiver<Arc<BalanceSnapshot>>) -> Self {
        BalanceCollector { snapshot }
    }
}

/// What the balance metrics show: the analyzer's totals, verdicts and stats at one instant. The
/// pipeline publishes one per tick; a scrape encodes the latest and never waits for the pipeline.
#[derive(Debug, Default)]
pub struct BalanceSnapshot {
    pub totals: Vec<KeyTotals>,
    pub balances: Vec<Balance>,
    pub stats: AnalyzerStats,
}

impl BalanceSnapshot {
    pub fn of(analyzer: &Analyzer, now: Nanos) -> Self {
        BalanceSnapshot {
            totals: analyzer.totals(),
            balances: analyzer.evaluate(now),
            stats: analyzer.stats(),
        }
    }
}

type Snapshot = BalanceSnapshot;

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn pair_labels<'a>(client: &'a ObjectRef, service: &'a ObjectRef) -> Labels<'a> {
    vec![
        ("namespace", client.namespace.as_str()),
        ("pod", client.name.as_str()),
        ("service_namespace", service.namespace.as_str()),
        ("service", service.name.as_str()),
    ]
}

fn with<'a>(mut base: Labels<'a>, extra: &[(&'static str, &'a str)]) -> Labels<'a> {
    base.extend_from_slice(extra);
    base
}

fn counter(m: &mut MetricEncoder<'_>, labels: &impl EncodeLabelSet, v: u64) -> fmt::Result {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, u64, f64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    m: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    v: V,
) -> fmt::Result {
    m.encode_family(labels)?.encode_gauge(&v)
}

/// One series per backend: an extra label (none when empty), its value, and the figure.
type Split = (&'static str, &'static str, fn(&BackendTotals) -> u64);

/// Encodes one counter or gauge family over every backend of every key.
fn backend_family(
    enc: &mut DescriptorEncoder<'_>,
    (name, help, kind): (&str, &str, MetricType),
    totals: &[KeyTotals],
    split: &[Split],
) -> fmt::Result {
    let is_counter = matches!(kind, MetricType::Counter);
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for k in totals {
        for b in &k.backends {
            for (label, value, get) in split {
                let mut extra = vec![("backend_pod", b.name.as_str())];
                if !label.is_empty() {
                    extra.push((label, value));
                }
                let labels = with(pair_labels(&k.client, &k.service), &extra);
                if is_counter {
                    counter(&mut m, &labels, get(b))?;
                } else {
                    gauge(&mut m, &labels, get(b))?;
                }
            }
        }
    }
    Ok(())
}

fn encode_snapshot(s: &Snapshot, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
    backend_family(
        &mut enc,
        (
            "fanout_connections_opened",
            "Connections this node's pods opened to a service, by backend pod (counted once the \
             backend is known; _unknown when it is not a second after the open)",
            MetricType::Counter,
        ),
        &s.totals,
        &[("", "", |b| b.totals.opened)],
    )?;
    backend_family(
        &mut enc,
        (
            "fanout_connections_closed",
            "Connections this node's pods closed to a service, by backend pod",
            MetricType::Counter,
        ),
        &s.totals,
        &[("", "", |b| b.totals.closed)],
    )?;
    backend_family(
        &mut enc,
        (
            "fanout_connections_active",
            "Live connections of this node's pods to a service, by backend pod",
            MetricType::Gauge,
        ),
        &s.totals,
        &[("", "", |b| b.active)],
    )?;
    {
        let mut m = enc.encode_descriptor(
            "fanout_connection_duration_seconds",
            "Lifetime of closed connections of this node's pods to a service",
            None,
            MetricType::Histogram,
        )?;
        for k in &s.totals {
            let h = &k.lifetimes;
            let buckets: Vec<(f64, u64)> = h
                .bounds_seconds
                .iter()
                .copied()
                .chain(std::iter::once(f64::MAX))
                .zip(h.counts.iter().copied())
                .collect();
            m.encode_family(&pair_labels(&k.client, &k.service))?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)?;
        }
    }
    backend_family(
        &mut enc,
        (
            "fanout_requests",
            "Requests of this node's pods to a service, by backend pod and source: h2 = HTTP/2 \
             streams the client opened, messages = sendmsg calls (TLS or unparsable traffic)",
            MetricType::Counter,
        ),
        &s.totals,
        &[
            ("source", "h2", |b| b.totals.requests_h2),
            ("source", "messages", |b| b.totals.requests_messages),
        ],
    )?;
    backend_family(
        &mut enc,
        (
            "fanout_bytes",
            "Bytes this node's pods exchanged with a service, by backend pod and direction",
            MetricType::Counter,
        ),
        &s.totals,
        &[
            ("direction", "sent", |b| b.totals.bytes_sent),
            ("direction", "received", |b| b.totals.bytes_received),
        ],
    )?;
    type Count = (&'static str, &'static str, fn(&Balance) -> usize);
    let counts: [Count; 2] = [
        (
            "fanout_service_backends_ready",
            "Ready backend pods of the service",
            |b| b.ready,
        ),
        (
            "fanout_service_backends_connected",
            "Backend pods the client pod was connected to in the window (fan-out)",
            |b| b.connected,
        ),
    ];
    for (name, help, get) in counts {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for b in &s.balances {
            gauge(&mut m, &pair_labels(&b.client, &b.service), get(b) as u64)?;
        }
    }
    {
        // One series per ready backend of each service a client here calls (not per client:
        // alerts join it with a client's connections to name the ready backends it never uses).
        let ready: std::collections::BTreeSet<(&str, &str, &str)> = s
            .balances
            .iter()
            .flat_map(|b| {
                b.backends.iter().filter(|bb| bb.ready).map(|bb| {
                    (
                        b.service.namespace.as_str(),
                        b.service.name.as_str(),
                        bb.name.as_str(),
                    )
                })
            })
            .collect();
        let mut m = enc.encode_descriptor(
            "fanout_service_backend_ready",
            "1 for each ready backend pod of a service this node's pods call",
            None,
            MetricType::Gauge,
        )?;
        for (ns, svc, backend) in ready {
            let labels = [
                ("service_namespace", ns),
                ("service", svc),
                ("backend_pod", backend),
            ];
            gauge(&mut m, &labels.to_vec(), 1i64)?;
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "fanout_request_skew_ratio",
            "Largest backend's share of the window's requests / fair share (1 = even); absent \
             without requests to a known backend",
            None,
            MetricType::Gauge,
        )?;
        for b in &s.balances {
            if let Some(skew) = b.skew {
                gauge(&mut m, &pair_labels(&b.client, &b.service), skew)?;
            }
        }
    }
    {
        let mut m = enc.encode_descriptor(
            "fanout_lb_verdict",
            "1 for the client pod's current load-balancing verdict for the service, 0 for the \
             others",
            None,
            MetricType::Gauge,
        )?;
        for b in &s.balances {
            for v in Verdict::ALL {
                let labels = with(
                    pair_labels(&b.client, &b.service),
                    &[("verdict", v.as_str())],
                );
                gauge(&mut m, &labels, i64::from(b.verdict == v))?;
            }
        }
    }
    let dropped =
        s.stats.dropped_series_cap + s.stats.dropped_key_cap + s.stats.dropped_backend_cap;
    let mut m = enc.encode_descriptor(
        "fanout_series_dropped",
        "Client/service pairs (their opens) and backends (counted as _overflow) refused by the \
         series, pair or backend caps",
        None,
        MetricType::Counter,
    )?;
    m.encode_counter::<NoLabelSet, u64, f64>(&dropped, None)?;
    let mut m = enc.encode_descriptor(
        "fanout_balance_series",
        "Per-pod balance series budgeted now, against the --max-series cap",
        None,
        MetricType::Gauge,
    )?;
    m.encode_gauge(&(s.stats.series as u64))
}

impl Collector for BalanceCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let snapshot = self.snapshot.borrow().clone();
        encode_snapshot(&snapshot, encoder)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use super::*;
    use crate::{
        analysis::{AnalysisConfig, ConnId, ConnOpen, Counters, RequestSource},
        exposition::metrics::Metrics,
    };

    const S: u64 = 1_000_000_000;

    fn shop(name: &str) -> ObjectRef {
        ObjectRef::new("shop", name)
    }

    fn sample(requests: u64) -> Counters {
        Counters {
            bytes_sent: requests * 10,
            bytes_received: requests * 20,
            messages_sent: requests,
            messages_received: requests,
            requests,
            source: RequestSource::H2,
        }
    }

    /// frontend → pricing over 3 reused connections, 100 requests each, for 31 s; one more
    /// connection whose backend never became known, closed after 2 s.
    fn round_robin() -> Arc<Mutex<Analyzer>> {
        let mut a = Analyzer::new(AnalysisConfig::default()).expect("config");
        let ready: Vec<ObjectRef> = (1..=3).map(|i| shop(&format!("pricing-{i}"))).collect();
        a.set_ready_backends(&shop("pricing"), ready.clone(), 0);
        for (i, b) in ready.iter().enumerate() {
            let id = ConnId(i as u64 + 1);
            a.on_open(ConnOpen {
                id,
                client: shop("frontend"),
                service: shop("pricing"),
                backend: Some(b.clone()),
                local_port: 40000 + i as u16,
                at: 0,
                recovered: false,
            });
            for t in 1..=31 {
                a.on_sample(id, t * S, &sample(100 * t / 31));
            }
        }
        a.on_open(ConnOpen {
            id: ConnId(9),
            client: shop("frontend"),
            service: shop("pricing"),
            backend: None,
            local_port: 41000,
            at: 10 * S,
            recovered: false,
        });
        a.on_close(ConnId(9), 12 * S, Some(Duration::from_secs(2)));
        Arc::new(Mutex::new(a))
    }

    fn scrape(analyzer: &Arc<Mutex<Analyzer>>) -> String {
        let snapshot = {
            let a = analyzer.lock().unwrap();
            BalanceSnapshot::of(&a, 31 * S)
        };
        let (_tx, rx) = watch::channel(Arc::new(snapshot));
        let mut m = Metrics::new();
        m.register_balance(rx);
        m.encode().expect("encode")
    }

    const PAIR: &str =
        r#"namespace="shop",pod="frontend",service_namespace="shop",service="pricing""#;

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line}\n{text}"
        );
    }

    #[test]
    fn per_pod_series_carry_the_analysis() {
        let a = round_robin();
        let text = scrape(&a);
        for i in 1..=3 {
            let b = format!(r#"{PAIR},backend_pod="pricing-{i}""#);
            has(&text, &format!("fanout_connections_opened_total{{{b}}} 1"));
            has(&text, &format!("fanout_connections_closed_total{{{b}}} 0"));
            has(&text, &format!("fanout_connections_active{{{b}}} 1"));
            has(
                &text,
                &format!(r#"fanout_requests_total{{{b},source="h2"}} 100"#),
            );
            has(
                &text,
                &format!(r#"fanout_requests_total{{{b},source="messages"}} 0"#),
            );
            has(
                &text,
                &format!(r#"fanout_bytes_total{{{b},direction="sent"}} 1000"#),
            );
            has(
                &text,
                &format!(r#"fanout_bytes_total{{{b},direction="received"}} 2000"#),
            );
        }
        let unknown = format!(r#"{PAIR},backend_pod="_unknown""#);
        has(
            &text,
            &format!("fanout_connections_opened_total{{{unknown}}} 1"),
        );
        has(
            &text,
            &format!("fanout_connections_closed_total{{{unknown}}} 1"),
        );
        has(&text, &format!("fanout_connections_active{{{unknown}}} 0"));
        has(
            &text,
            &format!("fanout_connection_duration_seconds_count{{{PAIR}}} 1"),
        );
        has(
            &text,
            &format!("fanout_connection_duration_seconds_sum{{{PAIR}}} 2.0"),
        );
        has(
            &text,
            &format!(r#"fanout_connection_duration_seconds_bucket{{le="1.0",{PAIR}}} 0"#),
        );
        has(
            &text,
            &format!(r#"fanout_connection_duration_seconds_bucket{{le="5.0",{PAIR}}} 1"#),
        );
        has(
            &text,
            &format!(r#"fanout_connection_duration_seconds_bucket{{le="+Inf",{PAIR}}} 1"#),
        );
        has(&text, &format!("fanout_service_backends_ready{{{PAIR}}} 3"));
        for i in 1..=3 {
            has(
                &text,
                &format!(
                    r#"fanout_service_backend_ready{{service_namespace="shop",service="pricing",backend_pod="pricing-{i}"}} 1"#
                ),
            );
        }
        has(
            &text,
            &format!("fanout_service_backends_connected{{{PAIR}}} 3"),
        );
        has(&text, &format!("fanout_request_skew_ratio{{{PAIR}}} 1.0"));
        for v in Verdict::ALL {
            let want = i64::from(v == Verdict::RoundRobin);
            has(
                &text,
                &format!(r#"fanout_lb_verdict{{{PAIR},verdict="{v}"}} {want}"#),
            );
        }
        has(&text, "fanout_series_dropped_total 0");
        assert!(text.ends_with("# EOF\n"));
        // The same figures as the API's.
        let b = a
            .lock()
            .unwrap()
            .balance(&shop("frontend"), &shop("pricing"), 31 * S);
        let b = b.expect("balance");
        assert_eq!(
            (b.verdict, b.ready, b.connected),
            (Verdict::RoundRobin, 3, 3)
        );
        // The window (30 s) lost the first second's 3 requests; the counter keeps them.
        assert_eq!(b.requests_per_backend["pricing-2"], 97);
    }

    #[test]
    fn series_of_a_gone_pod_vanish_after_the_grace_period() {
        let a = round_robin();
        {
            let mut g = a.lock().unwrap();
            g.client_gone(&shop("frontend"), 31 * S);
            g.gc(31 * S + 60 * S);
        }
        let text = scrape(&a);
        assert!(!text.contains(r#"pod="frontend""#), "{text}");
        has(&text, "fanout_balance_series 0");
        // The family descriptions stay, so dashboards see empty families, not unknown names.
        assert!(text.contains("# TYPE fanout_lb_verdict gauge"), "{text}");
    }

    #[test]
    fn refusals_of_the_series_cap_are_counted() {
        let mut a = Analyzer::new(AnalysisConfig {
            max_series: 1,
            ..AnalysisConfig::default()
        })
        .expect("config");
        let refused = !a.on_open(ConnOpen {
            id: ConnId(1),
            client: shop("frontend"),
            service: shop("pricing"),
            backend: None,
            local_port: 40000,
            at: 0,
            recovered: false,
        });
        assert!(refused);
        let text = scrape(&Arc::new(Mutex::new(a)));
        has(&text, "fanout_series_dropped_total 1");
    }
}
