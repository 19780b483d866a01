//! Readiness before the instance details email: each machine's bootstrap reports on its serial
//! console, which EC2's `GetConsoleOutput` returns. The emulator's console is fixed, so a proxy in
//! front of it answers with the console text each test scripts.

use std::time::Duration;

use labbook::startup::Worker;
use labbook::store::{bookings, slots};

use crate::helpers::{
    TestEnv, booking_json, eventually, instances_for, state_of, unique_id, wait_emails,
};
use crate::throttling::ThrottlingProxy;

const WAIT: Duration = Duration::from_secs(60);
const OK: &str = "[  58.2] cloud-init[901]: labbook-bootstrap: ok\n";
const FAILED: &str =
    "[  61.7] cloud-init[901]: labbook-bootstrap: failed: install-tljh (exit 22)\n";
const BOOTING: &str = "[   3.1] Cloud-init v. 25.1 running 'init-local'\n";

async fn env_behind(proxy: &ThrottlingProxy, extra: &[(&str, &str)]) -> TestEnv {
    let mut vars = vec![
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_READINESS", "bootstrap"),
        ("LABBOOK_RETRY_DELAYS_MS", "300,600"),
    ];
    vars.extend_from_slice(extra);
    TestEnv::with(&vars).await
}

fn subjects(emails: &[serde_json::Value]) -> Vec<String> {
    emails
        .iter()
        .map(|e| e["subject"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn the_instance_email_waits_until_every_bootstrap_reports_success() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(BOOTING);
    let mut env = env_behind(&proxy, &[]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("ready");
    let to = format!("{id}@example.org");
    let mut booking: serde_json::Value = serde_json::from_str(&booking_json(&id, 3, -1)).unwrap();
    booking["email"] = to.clone().into();
    env.publish_booking(&booking.to_string()).await;
    eventually(WAIT, "both machines running", || async {
        let running = instances_for(&id).await;
        (running.len() == 2 && running.iter().all(|i| state_of(i) == "running")).then_some(())
    })
    .await;
    // Running, but still booting: no instance email, the booking still provisioning.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let store = env.store().await;
    let b = bookings::find(&store.pool, &id).await.unwrap().unwrap();
    assert_eq!(b.state.as_str(), "provisioning");
    let sent = wait_emails(&to, 1).await;
    assert_eq!(subjects(&sent), ["Booking Confirmation"]);
    proxy.set_console_default(&format!("{BOOTING}{OK}"));
    env.wait_state(&id, "provisioned").await;
    let sent = wait_emails(&to, 2).await;
    assert!(subjects(&sent).contains(&"JupyterHub Access Information".to_owned()));
    env.stop().await;
}

#[tokio::test]
async fn a_machine_whose_bootstrap_fails_is_replaced_once() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(BOOTING);
    let mut env = env_behind(&proxy, &[]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("replace");
    // One machine; its first launch reports a failed install.
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    let first = eventually(WAIT, "the first machine", || async {
        instances_for(&id)
            .await
            .first()
            .and_then(|i| i.instance_id.clone())
    })
    .await;
    proxy.set_console(&first, FAILED);
    // Its replacement boots well.
    proxy.set_console_default(OK);
    env.wait_state(&id, "provisioned").await;
    let store = env.store().await;
    let slot = &slots::for_booking(&store.pool, &id).await.unwrap()[0];
    assert_ne!(
        slot.instance_id.as_deref(),
        Some(first.as_str()),
        "a new machine"
    );
    assert_eq!((slot.ready_failures, slot.generation), (1, 1));
    let all = instances_for(&id).await;
    let old = all
        .iter()
        .find(|i| i.instance_id.as_deref() == Some(&first));
    assert!(
        old.is_none_or(|i| state_of(i) != "running"),
        "the failed machine is terminated"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_machine_that_never_becomes_ready_fails_the_booking_in_plain_words() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(BOOTING);
    let mut env = env_behind(&proxy, &[("LABBOOK_READY_TIMEOUT_SECONDS", "2")]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("never");
    let to = format!("{id}@example.org");
    let mut booking: serde_json::Value = serde_json::from_str(&booking_json(&id, 2, -1)).unwrap();
    booking["email"] = to.clone().into();
    env.publish_booking(&booking.to_string()).await;
    env.wait_state(&id, "failed").await;
    let store = env.store().await;
    let b = bookings::find(&store.pool, &id).await.unwrap().unwrap();
    let reason = b.failure_reason.unwrap();
    assert!(
        reason.starts_with("not ready:") && reason.contains("twice"),
        "{reason}"
    );
    let sent = wait_emails(&to, 2).await;
    let failure = sent
        .iter()
        .find(|e| e["subject"] == "Booking Failed")
        .expect("the failure email");
    let text = failure["text"].as_str().unwrap();
    assert!(text.contains("started but did not become ready"), "{text}");
    assert!(
        !text.contains("bootstrap") && !text.contains("not ready:"),
        "no internals: {text}"
    );
    assert!(
        instances_for(&id)
            .await
            .iter()
            .all(|i| state_of(i) != "running"),
        "nothing left running"
    );
    env.stop().await;
}

#[tokio::test]
async fn an_ssh_machine_must_also_accept_connections_where_the_probe_points() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(OK);
    // The probe target: loopback, where nothing listens yet.
    let port = crate::helpers::free_port();
    let target = format!("127.0.0.1:{port}");
    let mut env = env_behind(
        &proxy,
        &[
            ("LABBOOK_BOOTSTRAP", "ssh"),
            ("LABBOOK_READY_PROBE", target.as_str()),
        ],
    )
    .await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("probe");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    eventually(WAIT, "the machine running", || async {
        (!instances_for(&id).await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let store = env.store().await;
    let state = bookings::find(&store.pool, &id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(
        state.as_str(),
        "provisioning",
        "not ready while port 22 does not answer"
    );
    let _sshd = tokio::net::TcpListener::bind(&target).await.unwrap();
    env.wait_state(&id, "provisioned").await;
    env.stop().await;
}
