//! Readiness before the instance details email: machines that run are not yet machines that
//! answer. Each machine's bootstrap reports its outcome on the serial console
//! (`labbook-bootstrap: ok` or `labbook-bootstrap: failed: <step> (exit N)`, see
//! [`crate::ec2::userdata`]), which EC2's `GetConsoleOutput` returns without any network path to
//! the machine; with `LABBOOK_READY_PROBE` the machine must also answer (port 22 in SSH mode,
//! `/hub/health` in JupyterHub mode). A machine whose bootstrap failed or did not report within
//! `LABBOOK_READY_TIMEOUT_SECONDS` is replaced once (a new launch generation for its slot); if
//! the replacement does not become ready either, the booking fails.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Provisioner;
use crate::broker::StageError;
use crate::config::{Bootstrap, Probe, Readiness};
use crate::ec2::userdata::{REPORT_FAILED, REPORT_OK};
use crate::store::bookings;
use crate::store::slots::{self, Slot};

/// How a failure reason of a machine that never became ready starts; the failure email says so
/// in plain words.
pub const NOT_READY: &str = "not ready:";

/// What a machine's console says of its bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    Ok,
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
            if line.contains(REPORT_OK) {
                Some(Boot::Ok)
            } else {
                line.find(REPORT_FAILED)
                    .map(|at| Boot::Failed(line[at + REPORT_FAILED.len()..].trim().to_owned()))
            }
        })
        .unwrap_or(Boot::Pending)
}

impl Provisioner {
    /// Waits until every machine of the booking is ready. `None` when the booking stopped
    /// being provisioned meanwhile (cancelled, moved).
    pub(super) async fn wait_until_bootstrapped(
        &self,
        booking_id: &str,
    ) -> Result<Option<()>, StageError> {
        if self.settings.readiness == Readiness::Running {
            return Ok(Some(()));
        }
        let pool = &self.store.pool;
        let mut pending: Vec<Slot> = slots::for_booking(pool, booking_id).await?;
        let started = Instant::now();
        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(15))
                .without_max_times(),
        );
        loop {
            if !bookings::is_provisioning(pool, booking_id).await? {
                return Ok(None);
            }
            let mut still = Vec::new();
            for slot in pending {
                match self.check(&slot).await? {
                    Boot::Ok => {}
                    Boot::Pending => still.push(slot),
                    Boot::Failed(step) => {
                        return self
                            .not_ready(&slot, &format!("its bootstrap failed: {step}"))
                            .await;
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                tracing::info!(
                    waited_s = started.elapsed().as_secs(),
                    "every machine is ready"
                );
                return Ok(Some(()));
            }
            if started.elapsed() >= self.settings.ready_timeout {
                let why = format!(
                    "its bootstrap did not report success within {} s",
                    self.settings.ready_timeout.as_secs()
                );
                return self.not_ready(&pending[0], &why).await;
            }
            tracing::info!(
                waiting = pending.len(),
                waited_s = started.elapsed().as_secs(),
                "waiting for the machines' bootstraps"
            );
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(15))).await;
        }
    }

    /// The slot's machine's bootstrap outcome, and whether it answers when it reported success.
    async fn check(&self, slot: &Slot) -> Result<Boot, StageError> {
        let Some(instance_id) = &slot.instance_id else {
            return Ok(Boot::Pending);
        };
        let boot = boot_outcome(&self.ec2.console_output(instance_id).await?);
        if boot == Boot::Ok && !self.answers(slot).await {
            return Ok(Boot::Pending);
        }
        Ok(boot)
    }

    /// Whether the machine answers where trainees reach it (`LABBOOK_READY_PROBE`).
    async fn answers(&self, slot: &Slot) -> bool {
        let port = match self.settings.bootstrap {
            Bootstrap::Ssh => 22,
            Bootstrap::JupyterHub => 80,
        };
        let target = match &self.settings.probe {
            Probe::Off => return true,
            Probe::Target(target) => target.clone(),
            Probe::Machine => match slot.address() {
                Some(address) => format!("{address}:{port}"),
                None => return false,
            },
        };
        let answer = match self.settings.bootstrap {
            Bootstrap::Ssh => tcp_accepts(&target).await,
            Bootstrap::JupyterHub => hub_healthy(&target).await,
        };
        answer.unwrap_or(false)
    }

    /// The slot's machine did not become ready: replaced once, then the booking fails.
    async fn not_ready(&self, slot: &Slot, why: &str) -> Result<Option<()>, StageError> {
        let Some(instance_id) = &slot.instance_id else {
            return Err(StageError::transient(anyhow::anyhow!(
                "slot {} has no machine",
                slot.slot
            )));
        };
        if slot.ready_failures >= 1 {
            return Err(StageError::Permanent(format!(
                "{NOT_READY} the machine of slot {} started but did not become ready, twice ({why})",
                slot.slot
            )));
        }
        tracing::warn!(slot = slot.slot, %instance_id, reason = why, "the machine did not become ready; it is replaced");
        // Retired first, then forgotten by its slot, then terminated: a crash anywhere leaves
        // it to be terminated (by the next message of the booking, or the sweep), and the
        // slot's count of machines that did not become ready is kept.
        let pool = &self.store.pool;
        slots::retire(pool, &slot.booking_id, instance_id).await?;
        slots::replace_instance(pool, instance_id, true).await?;
        self.terminate_retired(Some(&slot.booking_id)).await?;
        Err(StageError::transient(anyhow::anyhow!(
            "the machine of slot {} did not become ready ({why}); a replacement is launched on the next attempt",
            slot.slot
        )))
    }
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
    fn the_last_report_on_the_console_counts() {
        assert_eq!(boot_outcome(""), Boot::Pending);
        assert_eq!(boot_outcome("Cloud-init v. 25.1 running\n"), Boot::Pending);
        let ok = format!("[  42.1] cloud-init[812]: {REPORT_OK}\n");
        assert_eq!(boot_outcome(&ok), Boot::Ok);
        let after_prompt = format!("lab-0 login: {REPORT_OK}\n");
        assert_eq!(boot_outcome(&after_prompt), Boot::Ok);
        let failed = format!("noise\n[ 61.0] {REPORT_FAILED} install-tljh (exit 22)\n");
        assert_eq!(
            boot_outcome(&failed),
            Boot::Failed("install-tljh (exit 22)".into())
        );
    }
}
