//! Readiness before the instance details email: each machine's bootstrap reports on its serial
//! console, which EC2's `GetConsoleOutput` returns. The emulator's console is fixed, so a proxy in
//! front of it answers as EC2 documents: the copy buffered at the machine's start without
//! `Latest=true`, the live output (scripted by each test, or a boot clock) with it. The boot
//! watch follows machines as rows: no delivery is held while they boot.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use labbook::startup::Worker;
use labbook::store::{bookings, slots};

use crate::helpers::{
    TestEnv, booking_json, emails_to, eventually, instances_for, state_of, unique_id, wait_emails,
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
        ("LABBOOK_EXPECTED_BOOT_SECONDS", "1"),
        ("LABBOOK_BOOT_WATCH_TICK_MS", "200"),
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
    // Running, but still booting (the watch read their consoles): no instance email, the
    // booking still provisioning.
    eventually(WAIT, "both consoles read", || async {
        (proxy.console_reads().0 >= 2).then_some(())
    })
    .await;
    let store = env.store().await;
    let b = bookings::find(&store.pool, &id).await.unwrap().unwrap();
    assert_eq!(b.state.as_str(), "provisioning");
    let sent = wait_emails(&to, 1).await;
    assert_eq!(subjects(&sent), ["Booking Confirmation"]);
    proxy.set_console_default(&format!("{BOOTING}{OK}"));
    env.wait_state(&id, "provisioned").await;
    let sent = wait_emails(&to, 2).await;
    assert!(subjects(&sent).contains(&"JupyterHub Access Information".to_owned()));
    // The report is written minutes after the start: only the live console has it.
    let (live, buffered) = proxy.console_reads();
    assert!(live >= 2, "{live} live console reads");
    assert_eq!(buffered, 0, "the buffered copy never holds the report");
    env.stop().await;
}

#[tokio::test]
async fn where_ec2_refuses_the_live_console_the_buffered_copy_is_read() {
    let proxy = ThrottlingProxy::start().await;
    proxy.refuse_latest_console();
    proxy.set_console_default(OK);
    let mut env = env_behind(&proxy, &[]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("buffered");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    env.wait_state(&id, "provisioned").await;
    let store = env.store().await;
    let slot = &slots::for_booking(&store.pool, &id).await.unwrap()[0];
    assert!(slot.console_buffered, "remembered for the machine");
    let (live, buffered) = proxy.console_reads();
    assert_eq!(live, 1, "asked for the live console once, then never again");
    assert!(buffered >= 1);
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
    // Its bootstrap reported ok (the watch read its console twice, probing after each read).
    eventually(WAIT, "the console read twice", || async {
        (proxy.console_reads().0 >= 2).then_some(())
    })
    .await;
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

#[tokio::test]
async fn a_machine_that_never_reports_is_replaced_while_the_others_become_ready() {
    let proxy = ThrottlingProxy::start().await;
    proxy.boot_machines_after(Duration::from_millis(1500));
    let mut env = env_behind(&proxy, &[("LABBOOK_READY_TIMEOUT_SECONDS", "4")]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("silent");
    env.publish_booking(&booking_json(&id, 6, -1)).await;
    let store = env.store().await;
    let first: Vec<slots::Slot> = eventually(WAIT, "three machines launched", || async {
        let s = slots::for_booking(&store.pool, &id).await.unwrap();
        (s.len() == 3 && s.iter().all(|s| s.instance_id.is_some())).then_some(s)
    })
    .await;
    // Slot 1's machine never reports; the others boot in a second and a half.
    let silent = first[1].instance_id.clone().unwrap();
    proxy.set_console(&silent, BOOTING);
    let others_ready = eventually(WAIT, "the other machines ready", || async {
        let s = slots::for_booking(&store.pool, &id).await.unwrap();
        let ready = [&s[0], &s[2]].iter().all(|s| s.ready_at.is_some());
        (ready && s[1].instance_id.as_deref() == Some(silent.as_str())).then_some(s)
    })
    .await;
    assert!(
        others_ready[1].ready_at.is_none(),
        "the silent one is not ready"
    );
    env.wait_state(&id, "provisioned").await;
    let done = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_ne!(
        done[1].instance_id.as_deref(),
        Some(silent.as_str()),
        "slot 1 replaced"
    );
    assert_eq!((done[1].generation, done[1].ready_failures), (1, 1));
    for k in [0, 2] {
        assert_eq!(
            done[k].instance_id, first[k].instance_id,
            "slot {k} kept its machine"
        );
        assert_eq!(
            done[k].ready_at, others_ready[k].ready_at,
            "and was not looked at again"
        );
        assert_eq!(done[k].generation, 0);
    }
    let running: Vec<_> = instances_for(&id)
        .await
        .into_iter()
        .filter(|i| state_of(i) == "running")
        .collect();
    assert_eq!(running.len(), 3, "one machine per slot");
    env.stop().await;
}

#[tokio::test]
async fn a_grown_booking_waits_for_its_new_machines_only() {
    let proxy = ThrottlingProxy::start().await;
    proxy.boot_machines_after(Duration::from_millis(300));
    let mut env = env_behind(&proxy, &[]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("grown");
    let to = format!("{id}@example.org");
    let at = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut booking: serde_json::Value =
        serde_json::from_str(&crate::helpers::booking_at(&id, 2, at, 180)).unwrap();
    booking["email"] = to.clone().into();
    env.publish_booking(&booking.to_string()).await;
    env.wait_state(&id, "provisioned").await;
    let store = env.store().await;
    let old = slots::for_booking(&store.pool, &id)
        .await
        .unwrap()
        .remove(0);
    let old_id = old.instance_id.clone().unwrap();
    // Hours later its console no longer holds the report (EC2 keeps its last 64 KiB).
    proxy.set_console(&old_id, "[ 9000.1] systemd[1]: Started session-42.scope.\n");
    let reads_before = proxy.console_reads();
    booking["revision"] = 1.into();
    booking["number_of_users"] = 4.into();
    env.publish_booking(&booking.to_string()).await;
    let grown = eventually(WAIT, "the new machine ready", || async {
        let b = bookings::find(&store.pool, &id).await.unwrap().unwrap();
        (b.state.as_str() == "provisioned" && b.provisioned_revision == Some(1)).then_some(())
    });
    grown.await;
    let now = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(now.len(), 2);
    assert_eq!(
        now[0].instance_id.as_deref(),
        Some(old_id.as_str()),
        "untouched"
    );
    assert_eq!(now[0].ready_at, old.ready_at, "not re-checked");
    assert_eq!(now[0].console_reads, old.console_reads);
    let reads_after = proxy.console_reads();
    assert!(reads_after.0 > reads_before.0, "the new machine was read");
    let details = wait_emails(&to, 4).await;
    let last = details
        .iter()
        .rfind(|e| e["subject"] == "JupyterHub Access Information")
        .unwrap();
    let text = last["text"].as_str().unwrap();
    assert_eq!(
        text.matches("Instance URL:").count(),
        2,
        "every machine: {text}"
    );
    env.stop().await;
}

#[tokio::test]
async fn machines_booting_hold_no_delivery() {
    // One delivery at a time: were a boot held in a delivery, the second booking would launch
    // only after the first booking's machines were ready.
    let proxy = ThrottlingProxy::start().await;
    let boot = Duration::from_secs(6);
    proxy.boot_machines_after(boot);
    let mut env = env_behind(&proxy, &[("LABBOOK_PREFETCH", "1")]).await;
    env.spawn(&Worker::ALL).await;
    let ids: Vec<String> = (0..3).map(|k| unique_id(&format!("burst{k}"))).collect();
    for id in &ids {
        env.publish_booking(&booking_json(id, 2, -1)).await;
    }
    for id in &ids {
        env.wait_state(id, "provisioned").await;
    }
    let store = env.store().await;
    let mut launches = Vec::new();
    for id in &ids {
        let slot = slots::for_booking(&store.pool, id).await.unwrap().remove(0);
        launches.push(proxy.launched_at(&slot.instance_id.unwrap()).unwrap());
    }
    let first = *launches.iter().min().unwrap();
    let last = *launches.iter().max().unwrap();
    assert!(
        last.duration_since(first) < boot,
        "every booking launched before the first one's machines were ready ({:?} apart)",
        last.duration_since(first)
    );
    env.stop().await;
}

/// The provisioner as its own process, behind the proxy.
fn spawn_provisioner(env: &TestEnv, proxy: &ThrottlingProxy) -> Child {
    Command::new(env!("CARGO_BIN_EXE_labbook-provisioner"))
        .env_clear()
        .envs(&env.vars)
        .envs([
            ("AWS_ENDPOINT_URL", proxy.url.as_str()),
            ("LABBOOK_READINESS", "bootstrap"),
            ("LABBOOK_EXPECTED_BOOT_SECONDS", "1"),
            ("LABBOOK_BOOT_WATCH_TICK_MS", "200"),
            ("LABBOOK_METRICS_ADDR", "127.0.0.1:0"),
        ])
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Bookings whose machines are launched and booting in a provisioner process, which `stop`
/// then stops; another replica must finish them with one machine per slot and one email each.
async fn stopped_mid_boot(stop: impl FnOnce(&mut Child)) {
    let proxy = ThrottlingProxy::start().await;
    proxy.boot_machines_after(Duration::from_secs(4));
    let mut env = env_behind(&proxy, &[]).await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Notifier])
        .await;
    let mut child = spawn_provisioner(&env, &proxy);
    let ids: Vec<String> = (0..3).map(|k| unique_id(&format!("mid-boot{k}"))).collect();
    for id in &ids {
        let mut b: serde_json::Value = serde_json::from_str(&booking_json(id, 3, -1)).unwrap();
        b["email"] = format!("{id}@example.org").into();
        env.publish_booking(&b.to_string()).await;
    }
    let store = env.store().await;
    for id in &ids {
        eventually(WAIT, "the machines launched and booting", || async {
            let s = slots::for_booking(&store.pool, id).await.unwrap();
            (s.len() == 2
                && s.iter()
                    .all(|s| s.instance_id.is_some() && s.ready_at.is_none()))
            .then_some(())
        })
        .await;
    }
    stop(&mut child);
    env.spawn(&[Worker::Provisioner]).await;
    for id in &ids {
        env.wait_state(id, "provisioned").await;
    }
    env.stop().await;
    env.drain().await;
    for id in &ids {
        let live: Vec<_> = instances_for(id)
            .await
            .into_iter()
            .filter(|i| state_of(i) != "terminated")
            .collect();
        assert_eq!(
            live.len(),
            2,
            "one machine per slot, nothing launched twice"
        );
        let subjects = subjects(&emails_to(&format!("{id}@example.org")).await);
        let details = subjects
            .iter()
            .filter(|s| *s == "JupyterHub Access Information")
            .count();
        assert_eq!(details, 1, "one instance email: {subjects:?}");
    }
}

#[tokio::test]
async fn a_provisioner_killed_mid_boot_loses_and_repeats_nothing() {
    stopped_mid_boot(|child| {
        child.kill().unwrap();
        child.wait().unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_provisioner_stopped_mid_boot_exits_within_seconds_and_another_finishes() {
    stopped_mid_boot(|child| {
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        // Within 5 s of SIGTERM, or the helper fails the test.
        let status = crate::shutdown::wait_exit(child, Duration::from_secs(5));
        assert_eq!(status.code(), Some(0));
    })
    .await;
}

/// A certificate authority of the test's own (openssl), and two certificates it signed for
/// the machine: one for 127.0.0.2 (the wrong address), one for 127.0.0.1.
struct TestCa {
    dir: std::path::PathBuf,
}

impl TestCa {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_id("labbook-probe-ca"));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "1"],
            &["-subj", "/CN=labbook test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat());
        for (name, ip) in [("wrong", "127.0.0.2"), ("right", "127.0.0.1")] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            run(&[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", "/CN=lab machine"],
            ]
            .concat());
            let ext = format!("{name}.ext");
            std::fs::write(
                dir.join(&ext),
                format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
            )
            .unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &ext,
            ]);
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn server_config(&self, name: &str) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        std::sync::Arc::new(config)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JupyterHub health endpoint over TLS on loopback, serving the certificate it is given;
/// counts the connections it took.
struct HubOverTls {
    target: String,
    config: tokio::sync::watch::Sender<std::sync::Arc<rustls::ServerConfig>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HubOverTls {
    async fn start(config: std::sync::Arc<rustls::ServerConfig>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::watch::channel(config);
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = tokio_rustls::TlsAcceptor::from(rx.borrow().clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = [0u8; 512];
                    if tls.read(&mut request).await.unwrap_or(0) > 0 {
                        let answer =
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                        let _ = tls.write_all(answer.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        Self {
            target,
            config: tx,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HubOverTls {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_jupyterhub_machine_is_ready_once_its_certificate_is_valid_for_its_address() {
    let ca = TestCa::new();
    let hub = HubOverTls::start(ca.server_config("wrong")).await;
    let proxy = ThrottlingProxy::start().await;
    proxy.set_console_default(OK);
    let ca_file = ca.path("ca.pem");
    let mut env = env_behind(
        &proxy,
        &[
            ("LABBOOK_HTTPS", "letsencrypt"),
            ("LABBOOK_READY_PROBE", hub.target.as_str()),
            ("LABBOOK_READY_PROBE_CA_FILE", ca_file.as_str()),
        ],
    )
    .await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("tls-probe");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    // The bootstrap reported ok, but the certificate is for another address: probed, not ready.
    eventually(WAIT, "the machine probed twice", || async {
        (hub.connections() >= 2).then_some(())
    })
    .await;
    let store = env.store().await;
    let state = bookings::find(&store.pool, &id)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(
        state.as_str(),
        "provisioning",
        "not ready while its certificate is not valid for its address"
    );
    hub.config.send(ca.server_config("right")).unwrap();
    env.wait_state(&id, "provisioned").await;
    env.stop().await;
}
