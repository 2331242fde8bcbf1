//! The deployment artefacts, checked offline (no cluster, no network): the Helm chart and the
//! kustomize base (`deploy/tests/check_chart.py`: strict lint, schema, renders, invariants,
//! `kubernetes-validate --strict` on several Kubernetes versions, base = chart), the Prometheus
//! rules (`promtool check rules` and the `promtool test rules` unit tests) and the Grafana
//! dashboard (every query parses). Each fails with the tool's own output.

use std::{path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs `cmd` in the repository; panics with its output unless it succeeds.
fn check(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (run `cargo xtask setup`)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn chart_and_kustomize_base_pass_the_offline_checks() {
    let out = check(
        "deploy/tests/check_chart.py",
        Command::new("python3").arg("deploy/tests/check_chart.py"),
    );
    assert!(out.contains("check_chart: OK"), "{out}");
}

#[test]
fn alert_and_recording_rules_pass_promtool() {
    check(
        "promtool check rules",
        Command::new("promtool").args(["check", "rules", "deploy/prometheus/fanout.rules.yaml"]),
    );
    let tests: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/prometheus/tests"))
        .expect("deploy/prometheus/tests")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(tests.len() >= 3, "{tests:?}");
    let out = check(
        "promtool test rules",
        Command::new("promtool")
            .args(["test", "rules"])
            .args(&tests),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_dashboard_query_parses() {
    check(
        "deploy/tests/dashboard_queries.py --check",
        Command::new("python3").args([
            "deploy/tests/dashboard_queries.py",
            "--check",
            "--namespace",
            "shop",
            "--service",
            "api",
            "--client",
            ".*",
        ]),
    );
}

#[test]
fn the_plain_rule_file_and_dashboard_are_the_charts() {
    for (link, target) in [
        (
            "deploy/prometheus/fanout.rules.yaml",
            "deploy/helm/fanout/files/fanout.rules.yaml",
        ),
        (
            "deploy/grafana/fanout-dashboard.json",
            "deploy/helm/fanout/files/fanout-dashboard.json",
        ),
    ] {
        let (a, b) = (repo().join(link), repo().join(target));
        assert!(
            std::fs::symlink_metadata(&a)
                .expect(link)
                .file_type()
                .is_symlink(),
            "{link} is a symlink to the chart's copy (one source)"
        );
        assert_eq!(
            std::fs::canonicalize(&a).expect(link),
            std::fs::canonicalize(&b).expect(target)
        );
    }
}
