//! Scenario tests: each drives the analyzer with explicit timestamps over one to three windows.

use std::time::Duration;

use super::*;

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

fn pod(name: &str) -> ObjectRef {
    ObjectRef::new("shop", name)
}

fn client() -> ObjectRef {
    pod("frontend")
}

fn svc() -> ObjectRef {
    ObjectRef::new("shop", "pricing")
}

fn backends(n: usize) -> Vec<ObjectRef> {
    (1..=n).map(|i| pod(&format!("pricing-{i}"))).collect()
}

fn analyzer() -> Analyzer {
    Analyzer::new(AnalysisConfig::default()).unwrap()
}

fn counters(requests: u64, source: RequestSource) -> Counters {
    Counters {
        bytes_sent: requests * 100,
        bytes_received: requests * 200,
        messages_sent: requests,
        messages_received: requests,
        requests,
        source,
    }
}

/// One input, at a time.
#[derive(Clone, Debug)]
enum Ev {
    Open {
        id: u64,
        backend: Option<String>,
        port: u16,
    },
    Sample {
        id: u64,
        requests: u64,
        source: RequestSource,
    },
    Close {
        id: u64,
        lifetime: Option<Duration>,
    },
}

impl Ev {
    /// Same-time order: samples, then closes, then opens.
    fn rank(&self) -> u8 {
        match self {
            Ev::Sample { .. } => 0,
            Ev::Close { .. } => 1,
            Ev::Open { .. } => 2,
        }
    }
}

/// A scenario: inputs collected in any order, applied in time order.
#[derive(Default)]
struct Script {
    evs: Vec<(u64, Ev)>,
}

impl Script {
    fn open(&mut self, at: u64, id: u64, backend: &str, port: u16) {
        self.evs.push((
            at,
            Ev::Open {
                id,
                backend: Some(backend.to_string()),
                port,
            },
        ));
    }

    fn sample(&mut self, at: u64, id: u64, requests: u64) {
        self.sample_from(at, id, requests, RequestSource::H2);
    }

    fn sample_from(&mut self, at: u64, id: u64, requests: u64, source: RequestSource) {
        self.evs.push((
            at,
            Ev::Sample {
                id,
                requests,
                source,
            },
        ));
    }

    fn close(&mut self, at: u64, id: u64, lifetime: Option<Duration>) {
        self.evs.push((at, Ev::Close { id, lifetime }));
    }

    /// A connection open over `[from, to)` (to = None: still open) carrying `rate` requests per
    /// second, sampled every second.
    fn conn(&mut self, id: u64, backend: &str, port: u16, from: u64, to: Option<u64>, rate: u64) {
        self.conn_from(id, backend, port, from, to, rate, RequestSource::H2);
    }

    #[allow(clippy::too_many_arguments)]
    fn conn_from(
        &mut self,
        id: u64,
        backend: &str,
        port: u16,
        from: u64,
        to: Option<u64>,
        rate: u64,
        source: RequestSource,
    ) {
        self.open(from, id, backend, port);
        let end = to.unwrap_or(from + 600 * S);
        let mut t = from + S;
        while t <= end {
            self.sample_from(t, id, rate * (t - from) / S, source);
            t += S;
        }
        if let Some(to) = to {
            self.close(to, id, Some(Duration::from_nanos(to - from)));
        }
    }

    /// Applies every input up to `until` (inclusive) in time order.
    fn run(&self, a: &mut Analyzer, until: u64) {
        let mut evs: Vec<_> = self.evs.iter().filter(|(t, _)| *t <= until).collect();
        evs.sort_by_key(|(t, e)| (*t, e.rank()));
        for (t, e) in evs {
            match e {
                Ev::Open { id, backend, port } => {
                    a.on_open(ConnOpen {
                        id: ConnId(*id),
                        client: client(),
                        service: svc(),
                        backend: backend.as_deref().map(pod),
                        local_port: *port,
                        at: *t,
                        recovered: false,
                    });
                }
                Ev::Sample {
                    id,
                    requests,
                    source,
                } => {
                    a.on_sample(ConnId(*id), *t, &counters(*requests, *source));
                }
                Ev::Close { id, lifetime } => {
                    a.on_close(ConnId(*id), *t, *lifetime);
                }
            }
        }
    }
}

fn balance(a: &Analyzer, now: u64) -> Balance {
    a.balance(&client(), &svc(), now).expect("key tracked")
}

#[test]
fn pick_first_pins_one_backend() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    s.open(0, 1, "pricing-2", 40000);
    for sec in 1..=30 {
        s.sample(sec * S, 1, 1000 * sec / 30);
    }
    s.run(&mut a, 30 * S);
    let b = balance(&a, 30 * S);
    assert_eq!(b.verdict, Verdict::PickFirst, "{}", b.reason);
    assert_eq!(b.requests, 1000);
    assert_eq!(b.requests_per_backend["pricing-2"], 1000);
    assert_eq!(b.requests_per_backend["pricing-1"], 0);
    assert_eq!((b.ready, b.connected), (3, 1));
    assert!((b.coverage.unwrap() - 1.0 / 3.0).abs() < 1e-9);
    assert!((b.skew.unwrap() - 3.0).abs() < 1e-9);
    assert_eq!(b.top_backend().unwrap().name, "pricing-2");
    assert!(
        b.reason.starts_with(
            "one backend (pricing-2) took 100% of 1000 requests over 1 connection(s) living 30 s \
             on average while 3 backends are ready. Fix: pricing is a ClusterIP service, which \
             balances connections, not calls."
        ),
        "{}",
        b.reason
    );
    let advice = b.advice.as_deref().expect("pick_first carries advice");
    assert!(b.reason.ends_with(advice), "{}", b.reason);
    assert!(advice.contains("round_robin"), "{advice}");
    assert!(
        advice.contains("there is none yet"),
        "no headless twin known: {advice}"
    );
}

#[test]
fn advice_names_the_headless_twin_and_round_robin_needs_none() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    a.set_service_facts(
        &svc(),
        ServiceFacts {
            headless: false,
            headless_twin: Some("pricing-headless".into()),
        },
    );
    let mut s = Script::default();
    s.open(0, 1, "pricing-2", 40000);
    for sec in 1..=30 {
        s.sample(sec * S, 1, 1000 * sec / 30);
    }
    s.run(&mut a, 30 * S);
    let b = balance(&a, 30 * S);
    assert_eq!(b.verdict, Verdict::PickFirst, "{}", b.reason);
    let advice = b.advice.expect("advice");
    assert!(
        advice.contains(
            "the headless service pricing-headless \
             (`dns:///pricing-headless.shop.svc.cluster.local:<port>`)"
        ),
        "{advice}"
    );

    // The same client on the headless service itself: no ClusterIP sermon, its own name.
    a.set_service_facts(
        &svc(),
        ServiceFacts {
            headless: true,
            headless_twin: None,
        },
    );
    let b = balance(&a, 30 * S);
    let advice = b.advice.expect("advice");
    assert!(!advice.contains("ClusterIP"), "{advice}");
    assert!(
        advice.contains("dns:///pricing.shop.svc.cluster.local"),
        "{advice}"
    );

    // round_robin and insufficient_data: nothing to fix.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    for id in 1..=3u64 {
        s.open(0, id, &format!("pricing-{id}"), 40000 + id as u16);
    }
    for sec in 1..=40 {
        for id in 1..=3 {
            s.sample(sec * S, id, 11 * sec);
        }
    }
    s.run(&mut a, 40 * S);
    let b = balance(&a, 40 * S);
    assert_eq!(
        (b.verdict, b.advice),
        (Verdict::RoundRobin, None),
        "{}",
        b.reason
    );
    assert!(!b.reason.contains("Fix:"), "{}", b.reason);
}

#[test]
fn a_tls_client_dialling_per_call_is_dial_per_request() {
    // The TLS twin of dial_per_request: each call is a new channel (here always to the first
    // resolved pod, as pick_first does per channel), its traffic about six messages (the
    // handshake's records), so opens per "request" is 1/6. The connection level decides.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(4), 0);
    let mut s = Script::default();
    for i in 0..300u64 {
        let t = i * 100 * MS;
        s.open(t, i, "pricing-1", 30000 + i as u16);
        s.sample_from(t + 10 * MS, i, 6, RequestSource::Messages);
        s.close(t + 30 * MS, i, Some(Duration::from_millis(30)));
    }
    let now = 30 * S;
    s.run(&mut a, now);
    let b = balance(&a, now);
    assert_eq!(b.verdict, Verdict::DialPerRequest, "{}", b.reason);
    assert_eq!(b.source, Some(RequestSource::Messages));
    assert!(
        b.opens_per_request.unwrap() < 0.2,
        "{:?}",
        b.opens_per_request
    );
    assert!(
        b.reason.contains("requests are estimated from messages"),
        "{}",
        b.reason
    );
    assert!(
        b.advice
            .as_deref()
            .unwrap()
            .starts_with("Create one channel per target"),
        "{:?}",
        b.advice
    );
}

#[test]
fn long_lived_tls_clients_get_the_verdicts_of_their_h2c_twins() {
    // pick_first over TLS: one connection, messages stand in for requests.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    s.open(0, 1, "pricing-2", 40000);
    for sec in 1..=30 {
        s.sample_from(sec * S, 1, 70 * sec, RequestSource::Messages);
    }
    s.run(&mut a, 30 * S);
    let b = balance(&a, 30 * S);
    assert_eq!(b.verdict, Verdict::PickFirst, "{}", b.reason);

    // round_robin over TLS: one reused connection per backend.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    for id in 1..=3u64 {
        s.open(0, id, &format!("pricing-{id}"), 40000 + id as u16);
    }
    for sec in 1..=40 {
        for id in 1..=3 {
            s.sample_from(sec * S, id, 23 * sec, RequestSource::Messages);
        }
    }
    s.run(&mut a, 40 * S);
    let b = balance(&a, 40 * S);
    assert_eq!(b.verdict, Verdict::RoundRobin, "{}", b.reason);
}

#[test]
fn round_robin_spreads_over_reused_connections() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    for (id, port) in [(1, 40001), (2, 40002), (3, 40003)] {
        s.open(0, id, &format!("pricing-{id}"), port);
    }
    for sec in 1..=40 {
        for id in 1..=3 {
            let extra = if id == 2 && sec >= 20 { 10 } else { 0 };
            s.sample(sec * S, id, 11 * sec + extra);
        }
    }
    s.run(&mut a, 40 * S);
    let b = balance(&a, 40 * S);
    assert_eq!(b.verdict, Verdict::RoundRobin, "{}", b.reason);
    let per: Vec<u64> = b.requests_per_backend.values().copied().collect();
    assert_eq!(
        per,
        [330, 340, 330],
        "traffic before the window is not counted"
    );
    assert!((b.skew.unwrap() - 1.02).abs() < 1e-9, "{:?}", b.skew);
    assert_eq!(b.coverage, Some(1.0));
    assert_eq!(b.local_ports_start, [40001, 40002, 40003]);
    assert_eq!(b.local_ports_end, b.local_ports_start);
    assert!(b.ports_stable);
    assert_eq!(b.ports_reused, Some(1.0));
    assert_eq!((b.opens, b.closes, b.opens_per_sec), (0, 0, 0.0));
    assert_eq!(b.source, Some(RequestSource::H2));
    assert!(b.reason.contains("skew 1.02"), "{}", b.reason);
    assert!(b.reason.contains("same local ports"), "{}", b.reason);
    // The JSON API's shape.
    let json = serde_json::to_value(&b).unwrap();
    assert_eq!(json["verdict"], "round_robin");
    assert_eq!(json["source"], "h2");
    assert_eq!(json["requests_per_backend"]["pricing-2"], 340);
    assert_eq!(json["client"]["name"], "frontend");
    assert_eq!(
        json["lifetimes"]["bounds_seconds"]
            .as_array()
            .unwrap()
            .len(),
        LIFETIME_BOUNDS_SECONDS.len()
    );
}

#[test]
fn dial_per_request_even_when_spread() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    for i in 0..500u64 {
        let t = i * 60 * MS;
        s.open(t, i, &format!("pricing-{}", i % 3 + 1), 30000 + i as u16);
        s.sample(t + 10 * MS, i, 1);
        s.close(t + 20 * MS, i, Some(Duration::from_millis(20)));
    }
    let now = 30 * S + 20 * MS;
    s.run(&mut a, now);
    let b = balance(&a, now);
    assert_eq!(b.verdict, Verdict::DialPerRequest, "{}", b.reason);
    assert_eq!(b.coverage, Some(1.0));
    assert!(b.skew.unwrap() < 1.1, "{:?}", b.skew);
    // The window starts at 1 s: connections 17..500 opened in it.
    assert_eq!((b.opens, b.closes, b.requests), (483, 483, 483));
    assert_eq!(b.opens_per_request, Some(1.0));
    assert!((b.mean_lifetime_seconds.unwrap() - 0.02).abs() < 1e-9);
    assert!((b.opens_per_sec - 483.0 / 29.02).abs() < 1e-6);
    // All 20 ms lifetimes fall in the le=0.05 bucket.
    let idx = LIFETIME_BOUNDS_SECONDS
        .iter()
        .position(|b| *b == 0.05)
        .unwrap();
    assert_eq!(b.lifetimes.counts[idx], 483);
    assert_eq!(b.lifetimes.cumulative().last(), Some(&483));
    assert!(!b.ports_stable);
    assert!(
        b.reason.starts_with(
            "483 connection(s) opened for 483 requests (1.00 per request), living 20 ms"
        ),
        "{}",
        b.reason
    );
}

#[test]
fn max_connection_age_rotation_is_round_robin() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    let mut id = 0;
    let end = 65 * S;
    for b in 0..3u64 {
        // The server closes every connection after 10 s; the client reconnects at once.
        let mut from = 0;
        let mut to = b * 3 * S + 10 * S;
        while from < end {
            id += 1;
            let closes = (to <= end).then_some(to);
            s.conn(
                id,
                &format!("pricing-{}", b + 1),
                40000 + id as u16,
                from,
                closes,
                10,
            );
            from = to;
            to += 10 * S;
        }
    }
    s.run(&mut a, end);
    let b = balance(&a, end);
    assert_eq!(b.verdict, Verdict::RoundRobin, "{}", b.reason);
    assert!(!b.ports_stable);
    assert_eq!(b.ports_reused, Some(0.0), "every connection rotated");
    assert!(b.opens >= 6 && b.closes >= 6, "{} {}", b.opens, b.closes);
    assert!(b.opens_per_request.unwrap() < 0.02);
    assert!(b.mean_lifetime_seconds.unwrap() > 5.0);
    let ten_s = LIFETIME_BOUNDS_SECONDS
        .iter()
        .position(|b| *b == 10.0)
        .unwrap();
    assert_eq!(
        b.lifetimes.counts[ten_s], b.closes,
        "every lifetime is 10 s"
    );
    assert!(b.skew.unwrap() < 1.1);
    assert!(b.reason.contains("rotating"), "{}", b.reason);
}

#[test]
fn stale_resolver_names_the_unconnected_backends() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(4), 0);
    let mut s = Script::default();
    s.conn(1, "pricing-1", 40001, 0, None, 10);
    s.conn(2, "pricing-2", 40002, 0, None, 10);
    s.run(&mut a, 45 * S);
    let b = balance(&a, 45 * S);
    assert_eq!(b.verdict, Verdict::StaleResolver, "{}", b.reason);
    assert_eq!((b.ready, b.connected), (4, 2));
    assert_eq!(b.coverage, Some(0.5));
    assert!(
        b.reason.starts_with(
            "2 of 4 ready backends (pricing-3, pricing-4) have had no connection for at least 45 s"
        ),
        "{}",
        b.reason
    );
    let unconnected: Vec<_> = b
        .backends
        .iter()
        .filter_map(|x| x.unconnected_seconds.map(|s| (x.name.as_str(), s)))
        .collect();
    assert_eq!(unconnected, [("pricing-3", 45.0), ("pricing-4", 45.0)]);
}

#[test]
fn stale_resolver_waits_a_window_after_pods_are_added() {
    let mut a = analyzer();
    let all = backends(4);
    a.set_ready_backends(&svc(), all[..2].to_vec(), 0);
    let mut s = Script::default();
    s.conn(1, "pricing-1", 40001, 0, None, 10);
    s.conn(2, "pricing-2", 40002, 0, None, 10);
    s.run(&mut a, 10 * S);
    // Scale-up at 10 s: the client does not re-resolve.
    a.set_ready_backends(&svc(), all.clone(), 10 * S);
    s.run(&mut a, 35 * S);
    let b = balance(&a, 35 * S);
    assert_eq!(b.verdict, Verdict::InsufficientData, "{}", b.reason);
    assert!(b.reason.contains("fit no pattern"), "{}", b.reason);
    let mut a = analyzer();
    a.set_ready_backends(&svc(), all[..2].to_vec(), 0);
    s.run(&mut a, 10 * S);
    a.set_ready_backends(&svc(), all, 10 * S);
    s.run(&mut a, 41 * S);
    let b = balance(&a, 41 * S);
    assert_eq!(b.verdict, Verdict::StaleResolver, "{}", b.reason);
    assert!(b.reason.contains("at least 31 s"), "{}", b.reason);
}

#[test]
fn insufficient_data_for_few_requests_or_a_short_observation() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    s.open(0, 1, "pricing-1", 40001);
    s.sample(10 * S, 1, 1);
    s.sample(20 * S, 1, 2);
    s.run(&mut a, 31 * S);
    let b = balance(&a, 31 * S);
    assert_eq!(b.verdict, Verdict::InsufficientData);
    assert!(b.reason.starts_with("only 2 request(s)"), "{}", b.reason);

    // Plenty of round-robin traffic, but not yet a window of it.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    for id in 1..=3 {
        s.conn(
            id,
            &format!("pricing-{id}"),
            40000 + id as u16,
            0,
            None,
            100,
        );
    }
    s.run(&mut a, 10 * S);
    let b = balance(&a, 10 * S);
    assert_eq!(b.verdict, Verdict::InsufficientData);
    assert_eq!(
        b.reason,
        "observed for 10 s so far, less than the 30 s needed"
    );
    assert_eq!(b.requests, 3000);
    assert!(
        (b.span_seconds - 10.0).abs() < 1e-9,
        "rates use the span seen"
    );
    s.run(&mut a, 30 * S);
    assert_eq!(balance(&a, 30 * S).verdict, Verdict::RoundRobin);
}

#[test]
fn sliding_window_forgets_old_traffic_but_not_live_idle_connections() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(3), 0);
    let mut s = Script::default();
    s.conn(1, "pricing-1", 40001, 0, Some(10 * S), 10);
    s.conn(2, "pricing-2", 40002, 0, None, 10);
    // Live, never used.
    s.open(0, 3, "pricing-3", 40003);
    s.run(&mut a, 20 * S);
    let b = balance(&a, 20 * S);
    assert_eq!(b.requests_per_backend["pricing-1"], 100);
    assert_eq!(b.connected, 3);

    s.run(&mut a, 70 * S);
    let b = balance(&a, 70 * S);
    let by_name = |n: &str| b.backends.iter().find(|x| x.name == n).unwrap();
    assert_eq!(b.requests_per_backend["pricing-1"], 0);
    assert!(
        !by_name("pricing-1").connected,
        "closed and idle for longer than the window"
    );
    assert_eq!(b.requests_per_backend["pricing-2"], 300);
    assert!(by_name("pricing-2").connected);
    let idle = by_name("pricing-3");
    assert!(idle.connected, "a live idle connection still counts");
    assert_eq!((idle.requests, idle.live_connections), (0, 1));
    assert_eq!((b.connected, b.connected_ready), (2, 2));
    assert!((b.coverage.unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(
        (b.closes, b.lifetimes.count),
        (0, 0),
        "the close fell out of the window"
    );
    assert_eq!(b.local_ports_start, [40002, 40003]);
    assert!(b.ports_stable);
}

#[test]
fn messages_fallback_is_reported_as_the_source() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(2), 0);
    let mut s = Script::default();
    for id in 1..=2 {
        let port = 40000 + id as u16;
        let backend = format!("pricing-{id}");
        s.conn_from(id, &backend, port, 0, None, 5, RequestSource::Messages);
    }
    s.run(&mut a, 31 * S);
    let b = balance(&a, 31 * S);
    assert_eq!(b.source, Some(RequestSource::Messages));
    assert_eq!(b.verdict, Verdict::RoundRobin, "{}", b.reason);
    assert_eq!(b.messages_sent, b.requests);
    assert_eq!(serde_json::to_value(&b).unwrap()["source"], "messages");
    assert_eq!(RequestSource::Messages.as_str(), "messages");

    // One parsed connection and one estimated: the figure is an estimate.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(2), 0);
    let mut s = Script::default();
    s.conn(1, "pricing-1", 40001, 0, None, 5);
    s.conn_from(2, "pricing-2", 40002, 0, None, 5, RequestSource::Messages);
    s.run(&mut a, 31 * S);
    assert_eq!(balance(&a, 31 * S).source, Some(RequestSource::Messages));
}

#[test]
fn recovered_connections_are_not_opens_and_their_first_sample_is_a_baseline() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(2), 0);
    for (id, b) in [(1, "pricing-1"), (2, "pricing-2")] {
        assert!(a.on_open(ConnOpen {
            id: ConnId(id),
            client: client(),
            service: svc(),
            backend: Some(pod(b)),
            local_port: 40000 + id as u16,
            at: 0,
            recovered: true,
        }));
        a.on_sample(ConnId(id), S, &counters(1_000_000, RequestSource::H2));
        for sec in 2..=31 {
            a.on_sample(
                ConnId(id),
                sec * S,
                &counters(1_000_000 + 10 * (sec - 1), RequestSource::H2),
            );
        }
    }
    let b = balance(&a, 31 * S);
    assert_eq!(b.opens, 0);
    assert_eq!(b.requests, 600, "the pre-daemon traffic is not a burst");
    assert_eq!(b.verdict, Verdict::RoundRobin, "{}", b.reason);
}

#[test]
fn late_backend_from_conntrack_attributes_later_requests() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(2), 0);
    a.on_open(ConnOpen {
        id: ConnId(1),
        client: client(),
        service: svc(),
        backend: None,
        local_port: 40001,
        at: 0,
        recovered: false,
    });
    a.on_sample(ConnId(1), S, &counters(5, RequestSource::H2));
    assert!(a.on_backend(ConnId(1), pod("pricing-2"), S + 1));
    a.on_sample(ConnId(1), 2 * S, &counters(12, RequestSource::H2));
    let b = balance(&a, 2 * S);
    assert_eq!((b.requests, b.requests_unattributed), (12, 5));
    assert_eq!(b.requests_per_backend["pricing-2"], 7);
    assert_eq!(b.backends[1].live_connections, 1);
    // Moving it (a corrected lookup) moves the live connection.
    assert!(a.on_backend(ConnId(1), pod("pricing-1"), 3 * S));
    let b = balance(&a, 3 * S);
    assert_eq!(
        (
            b.backends[0].live_connections,
            b.backends[1].live_connections
        ),
        (1, 0)
    );
    assert!(!a.on_backend(ConnId(9), pod("pricing-1"), 3 * S));
}

#[test]
fn gc_drops_gone_and_idle_keys_after_grace() {
    let mut a = analyzer();
    let open = |a: &mut Analyzer, id: u64, client: &str, service: &str, at: u64| {
        a.on_open(ConnOpen {
            id: ConnId(id),
            client: pod(client),
            service: ObjectRef::new("shop", service),
            backend: Some(pod("pricing-1")),
            local_port: 40000,
            at,
            recovered: false,
        })
    };
    // Idle: its only connection closed at 1 s.
    open(&mut a, 1, "idle", "pricing", 0);
    a.on_close(ConnId(1), S, None);
    // Gone client with a live connection (its close was lost).
    open(&mut a, 2, "gone", "pricing", 0);
    a.client_gone(&pod("gone"), 5 * S);
    // Gone service.
    open(&mut a, 3, "frontend", "old", 0);
    a.service_gone(&ObjectRef::new("shop", "old"), 5 * S);
    // Alive.
    open(&mut a, 4, "frontend", "pricing", 0);

    assert_eq!(a.gc(40 * S), 0);
    assert_eq!(a.stats().keys, 4);
    assert_eq!(a.gc(61 * S), 1, "idle key dropped");
    assert_eq!(a.gc(65 * S), 2, "gone client and service dropped");
    let st = a.stats();
    assert_eq!((st.keys, st.connections), (1, 1));
    assert_eq!((st.keys_collected, st.connections_collected), (3, 2));
    assert!(!a.on_close(ConnId(2), 66 * S, None));
    assert_eq!(a.stats().unmatched, 1);
    assert!(a.balance(&pod("frontend"), &svc(), 66 * S).is_some());
    assert_eq!(a.evaluate(66 * S).len(), 1);

    // A new open undoes the client's gone mark.
    open(&mut a, 5, "frontend", "pricing", 70 * S);
    a.client_gone(&pod("frontend"), 70 * S);
    open(&mut a, 6, "frontend", "pricing", 71 * S);
    assert_eq!(a.gc(200 * S), 0);
}

#[test]
fn caps_bound_keys_connections_and_backends() {
    let cfg = AnalysisConfig {
        max_keys: 2,
        max_connections: 3,
        max_backends_per_key: 1,
        ..AnalysisConfig::default()
    };
    let mut a = Analyzer::new(cfg).unwrap();
    let open = |a: &mut Analyzer, id: u64, client: &str, backend: &str| {
        a.on_open(ConnOpen {
            id: ConnId(id),
            client: pod(client),
            service: svc(),
            backend: Some(pod(backend)),
            local_port: 40000 + id as u16,
            at: 0,
            recovered: false,
        })
    };
    assert!(open(&mut a, 1, "c1", "pricing-1"));
    assert!(open(&mut a, 2, "c2", "pricing-1"));
    assert!(!open(&mut a, 3, "c3", "pricing-1"), "third key refused");
    assert_eq!(a.stats().dropped_key_cap, 1);
    assert!(a.balance(&pod("c3"), &svc(), S).is_none());
    // Over the backend cap: tracked, but unattributed.
    assert!(open(&mut a, 4, "c1", "pricing-2"));
    assert_eq!(a.stats().dropped_backend_cap, 1);
    a.on_sample(ConnId(4), S, &counters(9, RequestSource::H2));
    let b = a.balance(&pod("c1"), &svc(), S).unwrap();
    assert_eq!((b.requests, b.requests_unattributed), (9, 9));
    assert!(!open(&mut a, 5, "c2", "pricing-1"), "connection cap");
    assert_eq!(a.stats().dropped_connection_cap, 1);
    // Reusing a live id closes the old connection first.
    assert!(open(&mut a, 4, "c1", "pricing-1"));
    assert_eq!(a.stats().implicit_closes, 1);
    assert_eq!(a.stats().connections, 3);
    // Freed keys make room.
    for id in [1, 2, 4] {
        a.on_close(ConnId(id), S, None);
    }
    assert_eq!(a.gc(100 * S), 2);
    assert!(open(&mut a, 3, "c3", "pricing-1"));
}

#[test]
fn edge_cases_never_divide_by_zero() {
    // No readiness known: fair share over the connected backends.
    let mut a = analyzer();
    let mut s = Script::default();
    s.conn(1, "pricing-1", 40001, 0, None, 10);
    s.conn(2, "pricing-2", 40002, 0, None, 10);
    s.run(&mut a, 31 * S);
    let b = balance(&a, 31 * S);
    assert_eq!((b.ready, b.connected), (0, 2));
    assert_eq!(b.coverage, None);
    assert_eq!(b.skew, Some(1.0));
    assert_eq!(b.verdict, Verdict::InsufficientData);
    assert!(b.reason.starts_with("no ready backends"), "{}", b.reason);

    // One ready backend: pick_first is impossible by definition.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(1), 0);
    let mut s = Script::default();
    s.conn(1, "pricing-1", 40001, 0, None, 100);
    s.run(&mut a, 31 * S);
    let b = balance(&a, 31 * S);
    assert_eq!((b.skew, b.coverage), (Some(1.0), Some(1.0)));
    assert_eq!(b.verdict, Verdict::InsufficientData);
    assert!(
        b.reason.starts_with("only 1 backend is ready"),
        "{}",
        b.reason
    );

    // Nothing at all yet, evaluated at the open instant.
    let mut a = analyzer();
    a.set_ready_backends(&svc(), Vec::new(), 0);
    let mut s = Script::default();
    s.open(0, 1, "pricing-1", 40001);
    s.run(&mut a, 0);
    let b = balance(&a, 0);
    assert_eq!((b.opens_per_sec, b.closes_per_sec), (0.0, 0.0));
    assert_eq!(
        (b.skew, b.coverage, b.opens_per_request),
        (None, None, None)
    );
    assert_eq!(b.mean_lifetime_seconds, Some(0.0));
    assert_eq!(b.ports_reused, None);
    assert!(serde_json::to_string(&b).is_ok());
    // Evaluating before the events (a clock that went back) does not panic either.
    let _ = a.evaluate(0);
    assert!(a.balance(&pod("nobody"), &svc(), 0).is_none());
}

#[test]
fn thresholds_are_configurable() {
    // 70/15/15 over long-lived connections: no default rule matches.
    let scenario = |th: Thresholds| {
        let mut a = Analyzer::new(AnalysisConfig {
            thresholds: th,
            ..AnalysisConfig::default()
        })
        .unwrap();
        a.set_ready_backends(&svc(), backends(3), 0);
        let mut s = Script::default();
        s.conn(1, "pricing-1", 40001, 0, None, 70);
        s.conn(2, "pricing-2", 40002, 0, None, 15);
        s.conn(3, "pricing-3", 40003, 0, None, 15);
        s.run(&mut a, 31 * S);
        balance(&a, 31 * S)
    };
    let b = scenario(Thresholds::default());
    assert_eq!(b.verdict, Verdict::InsufficientData, "{}", b.reason);
    assert!(b.reason.contains("skew 2.10"), "{}", b.reason);
    let b = scenario(Thresholds {
        round_robin_max_skew: 2.5,
        ..Thresholds::default()
    });
    assert_eq!(b.verdict, Verdict::RoundRobin, "{}", b.reason);
    let b = scenario(Thresholds {
        pick_first_share: 0.6,
        ..Thresholds::default()
    });
    assert_eq!(b.verdict, Verdict::PickFirst, "{}", b.reason);
    assert!(
        b.reason.contains("took 70% of 3000 requests"),
        "{}",
        b.reason
    );
    let b = scenario(Thresholds {
        min_requests: 5000,
        ..Thresholds::default()
    });
    assert_eq!(b.verdict, Verdict::InsufficientData);
    let b = scenario(Thresholds {
        min_observation: Some(Duration::from_secs(60)),
        ..Thresholds::default()
    });
    assert!(b.reason.starts_with("observed for 31 s"), "{}", b.reason);
}

#[test]
fn config_is_validated() {
    let bad = |window: u64, bucket: u64| {
        Analyzer::new(AnalysisConfig {
            window: Duration::from_millis(window),
            bucket: Duration::from_millis(bucket),
            ..AnalysisConfig::default()
        })
        .map(|_| ())
    };
    assert_eq!(bad(30_000, 0), Err(ConfigError::ZeroBucket));
    assert!(matches!(
        bad(500, 1000),
        Err(ConfigError::WindowShorterThanBucket { .. })
    ));
    assert!(matches!(
        bad(3_600_001, 1000),
        Err(ConfigError::TooManyBuckets { slots: 3601 })
    ));
    assert_eq!(bad(10_000, 250), Ok(()));
}

#[test]
fn extreme_inputs_do_not_panic() {
    let mut a = analyzer();
    a.set_ready_backends(&svc(), backends(2), 0);
    for id in 1..=2 {
        a.on_open(ConnOpen {
            id: ConnId(id),
            client: client(),
            service: svc(),
            backend: Some(pod(&format!("pricing-{id}"))),
            local_port: 40000,
            at: 5 * S,
            recovered: false,
        });
        let huge = Counters {
            bytes_sent: u64::MAX,
            bytes_received: u64::MAX,
            messages_sent: u64::MAX,
            messages_received: u64::MAX,
            requests: u64::MAX,
            source: RequestSource::H2,
        };
        a.on_sample(ConnId(id), 6 * S, &huge);
        // Counters that go backwards, and a time before the open.
        a.on_sample(ConnId(id), S, &counters(1, RequestSource::Messages));
    }
    let b = balance(&a, 6 * S);
    assert_eq!(b.requests, u64::MAX);
    assert!(serde_json::to_string(&b).is_ok());
    // A clock jump to the end of time.
    a.on_sample(ConnId(1), u64::MAX, &counters(2, RequestSource::H2));
    a.on_close(ConnId(2), u64::MAX, Some(Duration::MAX));
    let _ = a.evaluate(u64::MAX);
    let _ = a.evaluate(0);
    assert_eq!(a.gc(u64::MAX), 0, "a live connection keeps its key");
}

fn open_at(a: &mut Analyzer, id: u64, client: &str, backend: Option<&str>, at: u64) -> bool {
    a.on_open(ConnOpen {
        id: ConnId(id),
        client: pod(client),
        service: svc(),
        backend: backend.map(pod),
        local_port: 40000 + id as u16,
        at,
        recovered: false,
    })
}

fn slot<'a>(t: &'a KeyTotals, name: &str) -> &'a BackendTotals {
    t.backends
        .iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no {name} in {t:?}"))
}

#[test]
fn totals_count_every_open_close_request_and_byte_under_its_backend() {
    let mut a = analyzer();
    // A pod dialled directly: counted at the open.
    assert!(open_at(&mut a, 1, "frontend", Some("pricing-1"), S));
    // ClusterIP connections: the backend arrives later (conntrack), never, or after the close.
    assert!(open_at(&mut a, 2, "frontend", None, S));
    assert!(open_at(&mut a, 3, "frontend", None, S));
    assert!(open_at(&mut a, 4, "frontend", None, S));
    let t = a.totals();
    assert_eq!(slot(&t[0], "pricing-1").totals.opened, 1);
    assert_eq!(slot(&t[0], BACKEND_UNKNOWN).active, 3);
    assert_eq!(slot(&t[0], BACKEND_UNKNOWN).totals.opened, 0, "not yet");

    a.on_backend(ConnId(2), pod("pricing-2"), S + 5 * MS);
    // Connection 3's backend stays unknown: counted under _unknown a second after its open.
    a.on_sample(ConnId(3), S + 500 * MS, &counters(1, RequestSource::H2));
    assert_eq!(
        a.totals()[0].backends.len(),
        3,
        "pricing-1, pricing-2, _unknown"
    );
    a.on_sample(ConnId(3), 2 * S, &counters(2, RequestSource::H2));
    for id in [1, 2] {
        a.on_sample(ConnId(id), 2 * S, &counters(10, RequestSource::H2));
    }
    a.on_sample(ConnId(2), 3 * S, &counters(15, RequestSource::Messages));
    a.on_close(ConnId(2), 4 * S, Some(Duration::from_secs(3)));
    // Closes before anything was known: one open and one close under _unknown.
    a.on_close(ConnId(4), 4 * S, Some(Duration::from_millis(3)));

    let t = a.totals();
    assert_eq!(t.len(), 1);
    let (p1, p2, unknown) = (
        slot(&t[0], "pricing-1"),
        slot(&t[0], "pricing-2"),
        slot(&t[0], BACKEND_UNKNOWN),
    );
    assert_eq!((p1.totals.opened, p1.totals.closed, p1.active), (1, 0, 1));
    assert_eq!(p1.totals.requests_h2, 10);
    assert_eq!(
        (p1.totals.bytes_sent, p1.totals.bytes_received),
        (1000, 2000)
    );
    assert_eq!((p2.totals.opened, p2.totals.closed, p2.active), (1, 1, 0));
    assert_eq!(
        (p2.totals.requests_h2, p2.totals.requests_messages),
        (10, 5)
    );
    assert_eq!(
        (unknown.totals.opened, unknown.totals.closed, unknown.active),
        (2, 1, 1)
    );
    assert_eq!(unknown.totals.requests_h2, 2);
    assert_eq!(t[0].lifetimes.count, 2);
    assert_eq!(t[0].lifetimes.sum_seconds, 3.003);
    let idx = |secs: f64| LIFETIME_BOUNDS_SECONDS.iter().position(|b| secs <= *b);
    assert_eq!(t[0].lifetimes.counts[idx(0.003).unwrap()], 1);
    assert_eq!(t[0].lifetimes.counts[idx(3.0).unwrap()], 1);
    // The window figures agree with the totals while everything is inside one window.
    let b = balance(&a, 4 * S);
    assert_eq!(b.requests_per_backend["pricing-1"], p1.totals.requests_h2);
    assert_eq!(b.requests_per_backend["pricing-2"], 15);
    assert_eq!(b.requests_unattributed, 2);
}

#[test]
fn recovered_connections_are_not_opens_and_their_baseline_is_not_traffic() {
    let mut a = analyzer();
    a.on_open(ConnOpen {
        id: ConnId(1),
        client: client(),
        service: svc(),
        backend: Some(pod("pricing-1")),
        local_port: 40001,
        at: S,
        recovered: true,
    });
    a.on_sample(ConnId(1), 2 * S, &counters(1000, RequestSource::H2));
    a.on_sample(ConnId(1), 3 * S, &counters(1004, RequestSource::H2));
    a.on_close(ConnId(1), 4 * S, None);
    let t = a.totals();
    let p1 = slot(&t[0], "pricing-1");
    assert_eq!((p1.totals.opened, p1.totals.closed), (0, 1));
    assert_eq!(p1.totals.requests_h2, 4);
    assert_eq!(p1.totals.bytes_sent, 400);
    assert_eq!(t[0].lifetimes.count, 0, "its age is only a lower bound");
}

#[test]
fn series_cap_refuses_keys_and_sends_new_backends_to_overflow() {
    let mut a = Analyzer::new(AnalysisConfig {
        max_series: KEY_SERIES + BACKEND_SERIES,
        ..AnalysisConfig::default()
    })
    .unwrap();
    assert!(open_at(&mut a, 1, "frontend", Some("pricing-1"), S));
    assert!(open_at(&mut a, 2, "frontend", Some("pricing-2"), S));
    assert!(open_at(&mut a, 3, "frontend", None, S));
    a.on_backend(ConnId(3), pod("pricing-3"), S);
    assert!(
        !open_at(&mut a, 4, "checkout", Some("pricing-1"), S),
        "a second key is over the cap"
    );
    let st = a.stats();
    assert_eq!(st.dropped_series_cap, 3);
    assert_eq!(st.series, KEY_SERIES + BACKEND_SERIES);
    let t = a.totals();
    assert_eq!(t.len(), 1);
    let over = slot(&t[0], BACKEND_OVERFLOW);
    assert_eq!((over.totals.opened, over.active), (2, 2));
    a.on_sample(ConnId(2), 2 * S, &counters(7, RequestSource::H2));
    a.on_close(ConnId(2), 3 * S, None);
    let t = a.totals();
    let over = slot(&t[0], BACKEND_OVERFLOW);
    assert_eq!(
        (over.totals.requests_h2, over.totals.closed, over.active),
        (7, 1, 1)
    );
    assert!(t[0].backends.iter().all(|b| b.name != BACKEND_UNKNOWN));
    // Nothing is lost in the window figures either: the overflow's requests are unattributed.
    assert_eq!(balance(&a, 3 * S).requests_unattributed, 7);
}

#[test]
fn series_of_gone_clients_disappear_after_the_grace_period() {
    let mut a = analyzer();
    assert!(open_at(&mut a, 1, "frontend", Some("pricing-1"), S));
    assert!(open_at(&mut a, 2, "checkout", Some("pricing-1"), S));
    assert_eq!(a.stats().series, 2 * (KEY_SERIES + BACKEND_SERIES));
    a.client_gone(&pod("frontend"), 2 * S);
    a.gc(2 * S + 59 * S);
    assert_eq!(a.totals().len(), 2, "kept through the grace period");
    a.gc(2 * S + 60 * S);
    let t = a.totals();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].client, pod("checkout"));
    assert_eq!(a.stats().series, KEY_SERIES + BACKEND_SERIES);
}
