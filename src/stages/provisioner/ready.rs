//! What makes a machine ready, decided without I/O: what its console says of its bootstrap
//! ([`boot_outcome`]), and what one look at it means ([`decide`]). Each machine's bootstrap
//! reports its outcome on the serial console (`labbook-bootstrap: ok`, `labbook-bootstrap: ok
//! (http only: <why>)` when it could not set up HTTPS, or `labbook-bootstrap: failed: <step>
//! (exit N)`, see [`crate::ec2::userdata`]), which EC2's `GetConsoleOutput` returns without any
//! network path to the machine; with `LABBOOK_READY_PROBE` the machine must also answer (port
//! 22 in SSH mode, `/hub/health` in JupyterHub mode). The boot watch ([`super::watch`]) does
//! the looking.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Provisioner;
use crate::config::{Bootstrap, Probe};
use crate::ec2::userdata::{REPORT_FAILED, REPORT_OK};
use crate::store::slots::Slot;

/// How a failure reason of a machine that never became ready starts; the failure email says so
/// in plain words.
pub const NOT_READY: &str = "not ready:";

/// What a report of success adds when the machine serves its lab over plain HTTP.
const HTTP_ONLY: &str = "(http only:";

/// What a machine's console says of its bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// It succeeded; `http_only` says why it serves its lab over plain HTTP, if it does.
    Ok {
        http_only: Option<String>,
    },
    Failed(String),
    Pending,
}

/// The bootstrap's last report in `console`.
pub fn boot_outcome(console: &str) -> Boot {
    console
        .lines()
        .rev()
        .find_map(|line| {
            let line = line.trim();
            // The report may share its line with what was on the console before (a login
            // prompt), so it is looked for anywhere in the line.
            if let Some(at) = line.find(REPORT_OK) {
                let rest = line[at + REPORT_OK.len()..].trim();
                let http_only = rest
                    .strip_prefix(HTTP_ONLY)
                    .map(|why| why.trim().trim_end_matches(')').trim().to_owned());
                Some(Boot::Ok { http_only })
            } else {
                line.find(REPORT_FAILED)
                    .map(|at| Boot::Failed(line[at + REPORT_FAILED.len()..].trim().to_owned()))
            }
        })
        .unwrap_or(Boot::Pending)
}

/// What one look at a watched machine found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// EC2 does not show it (yet: its reads are eventually consistent), or could not be asked.
    Unknown,
    /// EC2 took it back before it was ready (`shutting-down`, `terminated`).
    Gone(String),
    /// Not yet running with a public address.
    Starting,
    /// Running with a public address as of now: its console is read from when it is expected
    /// to be ready.
    Runs,
    /// Running with a public address; `boot` is what its console says (`None`: running is
    /// ready, `LABBOOK_READINESS=running`), `answers` whether the probe answered.
    Running { boot: Option<Boot>, answers: bool },
}

/// What the boot watch does with a machine after a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ready: never looked at again while its booking runs.
    Ready { http_only: Option<String> },
    /// Look again then.
    Later(DateTime<Utc>),
    /// Retire it and launch its slot anew, at once. `counts`: it started but did not become
    /// ready (the slot's second such machine fails the booking); a machine EC2 took back
    /// before it ran does not count.
    Replace { why: String, counts: bool },
    /// The slot's second machine that did not become ready: the booking fails.
    Fail(String),
}

/// How long the watch waits for what, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// `LABBOOK_RUNNING_TIMEOUT_SECONDS`: launch to running with an address.
    pub running_timeout: Duration,
    /// `LABBOOK_READY_TIMEOUT_SECONDS`: launch to the bootstrap's report.
    pub ready_timeout: Duration,
    /// The image's expected boot (launch to ready): the first console read comes then.
    pub expected_boot: Duration,
}

/// The shortest readiness wait an image's recorded boots can bring.
pub const MIN_READY_TIMEOUT: Duration = Duration::from_secs(300);

impl Pace {
    /// The pace for machines of an image: the expected boot is the median of its recorded boots
    /// (else `expected`), and the readiness wait shrinks to three times their 90th percentile
    /// (at least [`MIN_READY_TIMEOUT`], never beyond `ready_timeout`): a machine from a baked
    /// image that boots in two minutes is replaced after minutes, not after the quarter of an
    /// hour a plain image needs.
    pub fn for_image(
        running_timeout: Duration,
        ready_timeout: Duration,
        expected: Duration,
        recorded: Option<crate::store::machines::BootTimes>,
    ) -> Self {
        let (expected_boot, ready_timeout) = match recorded {
            Some(t) => (
                t.median,
                ready_timeout.min((t.p90 * 3).max(MIN_READY_TIMEOUT)),
            ),
            None => (expected, ready_timeout),
        };
        Self {
            running_timeout,
            ready_timeout,
            expected_boot,
        }
    }

    /// Between looks at a machine still starting: 1 s, growing with its age to 10 s.
    fn starting_interval(&self, age: Duration) -> Duration {
        (age / 5).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// Between console reads of a machine still booting: a quarter of the expected boot,
    /// between 1 s and a minute.
    fn booting_interval(&self) -> Duration {
        (self.expected_boot / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// What to do with `slot`'s machine after a look found `seen` at `now`.
pub fn decide(slot: &Slot, seen: &Seen, pace: &Pace, now: DateTime<Utc>) -> Step {
    let launched = slot.launched_at.unwrap_or(now);
    let age = (now - launched).to_std().unwrap_or_default();
    let at = |after: Duration| now + chrono::Duration::from_std(after).unwrap_or_default();
    let deadline = launched + chrono::Duration::from_std(pace.ready_timeout).unwrap_or_default();
    let not_ready = |why: String| {
        if slot.ready_failures >= 1 {
            Step::Fail(format!(
                "{NOT_READY} the machine of slot {} started but did not become ready, twice ({why})",
                slot.slot
            ))
        } else {
            Step::Replace { why, counts: true }
        }
    };
    match seen {
        Seen::Gone(state) => Step::Replace {
            why: format!("EC2 stopped it before it was ready ({state})"),
            counts: false,
        },
        Seen::Unknown | Seen::Starting if age >= pace.running_timeout => not_ready(format!(
            "it did not run with a public address within {} s",
            pace.running_timeout.as_secs()
        )),
        Seen::Unknown | Seen::Starting => Step::Later(at(pace.starting_interval(age))),
        Seen::Running { boot: None, .. } => Step::Ready { http_only: None },
        Seen::Running {
            boot: Some(Boot::Ok { http_only }),
            answers: true,
        } => Step::Ready {
            http_only: http_only.clone(),
        },
        Seen::Running {
            boot: Some(Boot::Failed(step)),
            ..
        } => not_ready(format!("its bootstrap failed: {step}")),
        Seen::Running { .. } if now >= deadline => not_ready(format!(
            "its bootstrap did not report success within {} s",
            pace.ready_timeout.as_secs()
        )),
        Seen::Runs => {
            let expected = chrono::Duration::from_std(pace.expected_boot).unwrap_or_default();
            Step::Later((launched + expected).max(now).min(deadline))
        }
        Seen::Running { .. } => Step::Later(at(pace.booting_interval()).min(deadline)),
    }
}

impl Provisioner {
    /// Whether the slot's machine answers where trainees reach it (`LABBOOK_READY_PROBE`): in
    /// SSH mode port 22 accepts; in JupyterHub mode `/hub/health` answers 200, over HTTPS with
    /// the certificate verified for the machine's public IP, or over HTTP on a machine that
    /// serves its lab over HTTP (`LABBOOK_HTTPS=off`, or its bootstrap said it could not get
    /// a certificate: `http_only`).
    pub(super) async fn answers(&self, slot: &Slot, http_only: bool) -> bool {
        let https = self.settings.bootstrap == Bootstrap::JupyterHub
            && self.settings.https.acme().is_some()
            && !http_only;
        let port = match self.settings.bootstrap {
            Bootstrap::Ssh => 22,
            Bootstrap::JupyterHub if https => 443,
            Bootstrap::JupyterHub => 80,
        };
        let target = match &self.settings.probe {
            Probe::Off => return true,
            Probe::Target(target) => target.clone(),
            Probe::Machine => {
                // The certificate is for the public IP, not for EC2's DNS name.
                let address = if https {
                    slot.public_ip.as_deref().filter(|ip| !ip.is_empty())
                } else {
                    slot.address()
                };
                match address {
                    Some(address) => format!("{address}:{port}"),
                    None => return false,
                }
            }
        };
        let answer = match self.settings.bootstrap {
            Bootstrap::Ssh => tcp_accepts(&target).await,
            Bootstrap::JupyterHub if https => {
                hub_healthy_tls(&target, self.settings.probe_ca_file.as_deref()).await
            }
            Bootstrap::JupyterHub => hub_healthy(&target).await,
        };
        match answer {
            Ok(answers) => answers,
            Err(err) => {
                tracing::info!(
                    instance_id = slot.instance_id.as_deref().unwrap_or(""),
                    %target,
                    error = %err,
                    "the machine does not answer its readiness probe yet"
                );
                false
            }
        }
    }
}

/// The roots the HTTPS probe trusts: the public ones (Let's Encrypt's among them), and those
/// of `extra` (`LABBOOK_READY_PROBE_CA_FILE`, PEM). The error says what is wrong with the file.
pub fn probe_roots(extra: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| format!("{} is not PEM certificates: {e}", path.display()))?;
            roots.add(cert).map_err(|e| {
                format!(
                    "{} holds a certificate that cannot be a root: {e}",
                    path.display()
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
    }
    Ok(roots)
}

/// Whether `GET /hub/health` over TLS at `target` (`IP:PORT`) answers 200, the machine's
/// certificate verified for that IP address (what a trainee's browser checks).
async fn hub_healthy_tls(
    target: &str,
    extra_roots: Option<&std::path::Path>,
) -> std::io::Result<bool> {
    use std::io::{Error, ErrorKind};
    let (host, _) = target
        .rsplit_once(':')
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no port"))?;
    let ip: std::net::IpAddr = host.trim_matches(['[', ']']).parse().map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{host} is not an IP address"),
        )
    })?;
    let roots = probe_roots(extra_roots).map_err(|e| Error::new(ErrorKind::InvalidInput, e))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(target).await?;
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        let mut stream = connector.connect(name, tcp).await?;
        let request =
            format!("GET /hub/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 16];
        let n = stream.read(&mut head).await?;
        let status = String::from_utf8_lossy(&head[..n]);
        Ok::<bool, Error>(status.starts_with("HTTP/1.") && status.get(9..12) == Some("200"))
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or(Ok(false))
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `target` accepts a TCP connection (sshd listening).
async fn tcp_accepts(target: &str) -> std::io::Result<bool> {
    let connect = TcpStream::connect(target);
    Ok(tokio::time::timeout(PROBE_TIMEOUT, connect)
        .await
        .is_ok_and(|c| c.is_ok()))
}

/// Whether `GET /hub/health` at `target` answers 200 (JupyterHub's health check).
async fn hub_healthy(target: &str) -> std::io::Result<bool> {
    let exchange = async {
        let mut stream = TcpStream::connect(target).await?;
        let request =
            format!("GET /hub/health HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 16];
        let n = stream.read(&mut head).await?;
        let status = String::from_utf8_lossy(&head[..n]);
        Ok::<bool, std::io::Error>(
            status.starts_with("HTTP/1.") && status.get(9..12) == Some("200"),
        )
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or(Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_images_recorded_boots_set_its_expected_boot_and_shorten_its_wait() {
        use crate::store::machines::BootTimes;
        let (running, ready, expected) = (
            Duration::from_secs(600),
            Duration::from_secs(900),
            Duration::from_secs(600),
        );
        let plain = Pace::for_image(running, ready, expected, None);
        assert_eq!(
            (plain.expected_boot, plain.ready_timeout),
            (expected, ready)
        );
        let baked = BootTimes {
            median: Duration::from_secs(120),
            p90: Duration::from_secs(160),
        };
        let pace = Pace::for_image(running, ready, expected, Some(baked));
        assert_eq!(pace.expected_boot, Duration::from_secs(120));
        assert_eq!(
            pace.ready_timeout,
            Duration::from_secs(480),
            "three times the p90"
        );
        let fast = BootTimes {
            median: Duration::from_secs(20),
            p90: Duration::from_secs(30),
        };
        let pace = Pace::for_image(running, ready, expected, Some(fast));
        assert_eq!(
            pace.ready_timeout, MIN_READY_TIMEOUT,
            "never below five minutes"
        );
        let slow = BootTimes {
            median: Duration::from_secs(700),
            p90: Duration::from_secs(800),
        };
        let pace = Pace::for_image(running, ready, expected, Some(slow));
        assert_eq!(
            pace.ready_timeout, ready,
            "never beyond LABBOOK_READY_TIMEOUT_SECONDS"
        );
        let short = Pace::for_image(running, Duration::from_secs(3), expected, Some(baked));
        assert_eq!(
            short.ready_timeout,
            Duration::from_secs(3),
            "a shorter setting stays"
        );
    }

    #[test]
    fn the_last_report_on_the_console_counts() {
        assert_eq!(boot_outcome(""), Boot::Pending);
        assert_eq!(boot_outcome("Cloud-init v. 25.1 running\n"), Boot::Pending);
        let ok = Boot::Ok { http_only: None };
        let line = format!("[  42.1] cloud-init[812]: {REPORT_OK}\n");
        assert_eq!(boot_outcome(&line), ok);
        let after_prompt = format!("lab-0 login: {REPORT_OK}\n");
        assert_eq!(boot_outcome(&after_prompt), ok);
        let http = format!("{REPORT_OK} (http only: the ACME server did not answer)\n");
        assert_eq!(
            boot_outcome(&http),
            Boot::Ok {
                http_only: Some("the ACME server did not answer".into())
            }
        );
        let failed = format!("noise\n[ 61.0] {REPORT_FAILED} install-tljh (exit 22)\n");
        assert_eq!(
            boot_outcome(&failed),
            Boot::Failed("install-tljh (exit 22)".into())
        );
    }

    fn slot(launched_s_ago: i64, ready_failures: i32) -> Slot {
        Slot {
            booking_id: "b".into(),
            slot: 0,
            first_user: 0,
            user_count: 2,
            admin_username: "labadmin".into(),
            admin_password_encrypted: Vec::new(),
            admin_password_hash: String::new(),
            instance_id: Some("i-1".into()),
            instance_state: Some("running".into()),
            public_dns: None,
            public_ip: Some("203.0.113.7".into()),
            launched_at: Some(Utc::now() - chrono::Duration::seconds(launched_s_ago)),
            generation: 0,
            ready_failures,
            next_check_at: None,
            ready_at: None,
            console_reads: 0,
            console_buffered: false,
            http_only: None,
            image_id: None,
        }
    }

    const PACE: Pace = Pace {
        running_timeout: Duration::from_secs(600),
        ready_timeout: Duration::from_secs(900),
        expected_boot: Duration::from_secs(600),
    };

    fn later_in(step: &Step, now: DateTime<Utc>) -> i64 {
        match step {
            Step::Later(at) => (*at - now).num_seconds(),
            other => panic!("expected a later look, got {other:?}"),
        }
    }

    #[test]
    fn a_running_machine_is_first_read_when_it_is_expected_to_be_ready() {
        let now = Utc::now();
        assert_eq!(
            later_in(&decide(&slot(30, 0), &Seen::Runs, &PACE, now), now),
            570
        );
        // Past its expected boot already: read at once.
        assert_eq!(
            later_in(&decide(&slot(700, 0), &Seen::Runs, &PACE, now), now),
            0
        );
        // Then every quarter of the expected boot, at most a minute, never past the deadline.
        let pending = Seen::Running {
            boot: Some(Boot::Pending),
            answers: true,
        };
        assert_eq!(
            later_in(&decide(&slot(600, 0), &pending, &PACE, now), now),
            60
        );
        assert_eq!(
            later_in(&decide(&slot(880, 0), &pending, &PACE, now), now),
            20
        );
        let quick = Pace {
            expected_boot: Duration::from_secs(60),
            ..PACE
        };
        assert_eq!(
            later_in(&decide(&slot(60, 0), &pending, &quick, now), now),
            15
        );
    }

    #[test]
    fn a_machine_is_replaced_once_then_the_booking_fails() {
        let now = Utc::now();
        let failed = Seen::Running {
            boot: Some(Boot::Failed("install-tljh (exit 22)".into())),
            answers: true,
        };
        assert!(matches!(
            decide(&slot(100, 0), &failed, &PACE, now),
            Step::Replace { counts: true, ref why } if why.contains("install-tljh")
        ));
        assert!(matches!(
            decide(&slot(100, 1), &failed, &PACE, now),
            Step::Fail(ref why) if why.starts_with(NOT_READY) && why.contains("twice")
        ));
        let pending = Seen::Running {
            boot: Some(Boot::Pending),
            answers: true,
        };
        assert!(matches!(
            decide(&slot(901, 0), &pending, &PACE, now),
            Step::Replace { counts: true, ref why } if why.contains("within 900 s")
        ));
        // Taken back by EC2 before it ran: replaced without counting against the slot.
        let gone = Seen::Gone("terminated".into());
        assert!(matches!(
            decide(&slot(10, 1), &gone, &PACE, now),
            Step::Replace { counts: false, .. }
        ));
        assert!(matches!(
            decide(&slot(601, 0), &Seen::Starting, &PACE, now),
            Step::Replace { counts: true, .. }
        ));
    }

    #[test]
    fn ready_needs_the_report_and_the_probe() {
        let now = Utc::now();
        let ok = |answers| Seen::Running {
            boot: Some(Boot::Ok { http_only: None }),
            answers,
        };
        assert_eq!(
            decide(&slot(100, 0), &ok(true), &PACE, now),
            Step::Ready { http_only: None }
        );
        assert!(matches!(
            decide(&slot(100, 0), &ok(false), &PACE, now),
            Step::Later(_)
        ));
        let running = Seen::Running {
            boot: None,
            answers: false,
        };
        assert_eq!(
            decide(&slot(1, 0), &running, &PACE, now),
            Step::Ready { http_only: None }
        );
    }
}
