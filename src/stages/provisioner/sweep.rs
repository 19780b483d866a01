//! The sweep: the safety net that terminates machines of bookings that are over.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Provisioner;
use crate::broker::StageError;
use crate::store::bookings;

impl Provisioner {
    /// Terminates the machines of bookings that are over (ended, failed, cancelled, or past
    /// their end by more than `grace`) which are still running: launched by an attempt that
    /// raced the teardown or a cancellation, or left by a teardown that could not finish; the
    /// retired machines of bookings that moved; and machines of launches whose outcome was
    /// never known when their slot moved on. Only bookings this database
    /// knows are touched, so several labbook installations may share an AWS account.
    pub async fn sweep(&self, grace: chrono::Duration) -> Result<usize, StageError> {
        let mut terminated = self.resolve_lost_launches(None).await?;
        terminated += self.terminate_retired(None).await?;
        let running = self.ec2.find_managed(None).await?;
        let mut booking_ids: Vec<&str> = running
            .iter()
            .filter_map(|i| i.booking_id.as_deref())
            .collect();
        booking_ids.sort_unstable();
        booking_ids.dedup();
        for id in booking_ids {
            let Some(booking) = bookings::find(&self.store.pool, id).await? else {
                continue;
            };
            if booking.state.is_over() || booking.ends_at() + grace < Utc::now() {
                let n = self.terminate_all(id).await?;
                tracing::warn!(booking_id = id, terminated = n, state = %booking.state, "sweep: terminated machines of a booking that is over");
                terminated += n;
            }
        }
        Ok(terminated)
    }
}

/// Sweeps every `every` until `shutdown` fires (see [`Provisioner::sweep`]).
pub async fn run_sweeper(
    provisioner: Arc<Provisioner>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let grace = chrono::Duration::minutes(5);
    let mut quota_unreadable = false;
    loop {
        provisioner.read_capacity(&mut quota_unreadable).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(err) = provisioner.sweep(grace).await {
            tracing::warn!(error = %err, "sweep failed; trying again next time");
        }
    }
}

impl Provisioner {
    /// Reads the account's vCPU quota and what runs against it, for the intake's check
    /// ([`crate::store::capacity`]). Where it cannot be read (no `servicequotas:GetServiceQuota`
    /// permission, an emulator without Service Quotas) bookings are not checked: said once.
    pub async fn read_capacity(&self, unreadable: &mut bool) {
        match self.ec2.capacity().await {
            Ok(c) => {
                if let Err(err) = crate::store::capacity::save(&self.store.pool, &c).await {
                    tracing::warn!(error = %err, "cannot keep the account's vCPU quota");
                    return;
                }
                metrics::gauge!("labbook_vcpu_quota").set(c.quota_vcpus);
                if std::mem::take(unreadable) {
                    tracing::info!(
                        quota_vcpus = c.quota_vcpus,
                        "the account's vCPU quota is read again"
                    );
                }
            }
            Err(err) if !*unreadable => {
                *unreadable = true;
                tracing::warn!(error = %err, "cannot read the account's vCPU quota: bookings are not checked against it until it can be read");
            }
            Err(err) => tracing::debug!(error = %err, "cannot read the account's vCPU quota"),
        }
    }
}
