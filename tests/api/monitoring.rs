//! The dashboard and the alert rules in `deploy/monitoring/` against what a running worker
//! really serves: every series they name is in its `/metrics` (or is one the provisioner's
//! readiness loop or the scheduler's timer adds, listed as such in the checker).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use labbook::startup::Worker;

use crate::helpers::{TestEnv, booking_json, eventually, unique_id};

#[tokio::test]
async fn the_dashboard_and_alerts_name_only_series_a_running_worker_exports() {
    let mut env = TestEnv::new().await;
    let addr = env
        .spawn_with(&Worker::ALL, &[("LABBOOK_METRICS_ADDR", "127.0.0.1:0")])
        .await
        .expect("the metrics endpoint is on");
    let base = format!("http://{addr}");
    eventually(Duration::from_secs(20), "ready", || async {
        (reqwest::get(format!("{base}/readyz")).await.ok()?.status() == 200).then_some(())
    })
    .await;
    // One booking through, so the histograms have observations too.
    let id = unique_id("metered");
    env.publish_booking(&booking_json(&id, 1, 0)).await;
    env.wait_state(&id, "provisioned").await;
    let scraped = eventually(
        Duration::from_secs(20),
        "the instance email timed",
        || async {
            let text = reqwest::get(format!("{base}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("labbook_instance_email_seconds_count 1")
                .then_some(text)
        },
    )
    .await;

    let root = env!("CARGO_MANIFEST_DIR");
    let mut check = Command::new("python3")
        .arg(format!("{root}/deploy/monitoring/check_series.py"))
        .args(["--metrics", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scraped.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}\n--- /metrics:\n{scraped}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("all in the scraped /metrics"), "{said}");
    env.stop().await;
}
