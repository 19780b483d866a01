//! The account's vCPU quota and what already runs against it (docs/contract.md §1 item 11):
//! Service Quotas' applied value of "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z)
//! instances" (else its AWS default), the vCPUs of the instances that run in the account, and
//! the vCPUs of one machine of labbook's first instance type. The provisioner reads them when
//! it starts and at every sweep and keeps them in the database
//! ([`crate::store::capacity`]), where the intake compares each booking's needs with them.

use aws_sdk_ec2::types::{Filter, InstanceType};

use super::{Ec2, Ec2Error, TAG_MANAGED, classify, info, tag};

/// Service Quotas' code of the on-demand standard instances' vCPU quota.
pub const STANDARD_VCPU_QUOTA: &str = "L-1216C47A";

/// What the account allows and runs, as read now.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// The vCPUs the account may run (on-demand, standard families).
    pub quota_vcpus: f64,
    /// vCPUs of running and pending instances that are not this installation's machines.
    pub other_vcpus: i64,
    /// vCPUs of one machine of the first instance type.
    pub vcpus_per_machine: i32,
}

/// Why the capacity could not be read (e.g. no permission, or an emulator without Service
/// Quotas): the booking is not checked then.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuotaError(String);

impl From<Ec2Error> for QuotaError {
    fn from(err: Ec2Error) -> Self {
        Self(err.to_string())
    }
}

impl Ec2 {
    /// Reads the quota, the instances running and the vCPUs of a machine.
    pub async fn capacity(&self) -> Result<Capacity, QuotaError> {
        let quota_vcpus = self.vcpu_quota().await?;
        let vcpus_per_machine = self.vcpus_of(&self.settings.instance_type).await?;
        let other_vcpus = self.other_running_vcpus().await?;
        Ok(Capacity {
            quota_vcpus,
            other_vcpus,
            vcpus_per_machine,
        })
    }

    /// The quota's applied value, else its default (`GetServiceQuota` answers
    /// `NoSuchResourceException` for a quota never changed in some regions).
    async fn vcpu_quota(&self) -> Result<f64, QuotaError> {
        let applied = self
            .quotas
            .get_service_quota()
            .service_code("ec2")
            .quota_code(STANDARD_VCPU_QUOTA)
            .send()
            .await;
        let value = match applied {
            Ok(out) => out.quota().and_then(|q| q.value()),
            Err(err) => {
                let code = err
                    .as_service_error()
                    .map(|e| e.meta().code().unwrap_or(""));
                if code != Some("NoSuchResourceException") {
                    return Err(QuotaError(format!(
                        "servicequotas:GetServiceQuota: {}",
                        aws_sdk_servicequotas::error::DisplayErrorContext(&err)
                    )));
                }
                self.quotas
                    .get_aws_default_service_quota()
                    .service_code("ec2")
                    .quota_code(STANDARD_VCPU_QUOTA)
                    .send()
                    .await
                    .map_err(|e| {
                        QuotaError(format!(
                            "servicequotas:GetAWSDefaultServiceQuota: {}",
                            aws_sdk_servicequotas::error::DisplayErrorContext(&e)
                        ))
                    })?
                    .quota()
                    .and_then(|q| q.value())
            }
        };
        value.ok_or_else(|| QuotaError("the vCPU quota has no value".into()))
    }

    /// vCPUs of one instance of `instance_type` (`DescribeInstanceTypes`).
    async fn vcpus_of(&self, instance_type: &str) -> Result<i32, QuotaError> {
        let out = self
            .call("DescribeInstanceTypes", || async {
                self.client
                    .describe_instance_types()
                    .instance_types(InstanceType::from(instance_type))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeInstanceTypes", e))
            })
            .await?;
        out.instance_types()
            .first()
            .and_then(|t| t.v_cpu_info())
            .and_then(|v| v.default_v_cpus())
            .ok_or_else(|| QuotaError(format!("EC2 does not describe {instance_type}'s vCPUs")))
    }

    /// vCPUs of the account's running and pending instances that are not this installation's
    /// machines (those are counted from its bookings).
    async fn other_running_vcpus(&self) -> Result<i64, QuotaError> {
        let installation = self.settings.installation.as_str();
        let running = vec![
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(vec!["pending".into(), "running".into()]))
                .build(),
        ];
        let mut vcpus = 0i64;
        for i in self.instances_matching(running).await? {
            let ours = tag(&i, TAG_MANAGED) == Some("true")
                && info(&i).is_some_and(|i| i.belongs_to(installation));
            // The quota is for On-Demand instances of the standard families only: Spot and
            // other families (G, P, X, F, …) count against quotas of their own.
            let on_demand = i.instance_lifecycle().is_none();
            let standard = i
                .instance_type()
                .is_some_and(|t| counts_against_standard_quota(t.as_str()));
            if ours || !on_demand || !standard {
                continue;
            }
            let cpu = i.cpu_options();
            let n = cpu
                .and_then(|c| Some(c.core_count()? * c.threads_per_core().unwrap_or(1)))
                .unwrap_or(1);
            vcpus += i64::from(n.max(1));
        }
        Ok(vcpus)
    }
}

/// Whether an instance type's vCPUs count against L-1216C47A ("Running On-Demand Standard
/// (A, C, D, H, I, M, R, T, Z) instances").
fn counts_against_standard_quota(instance_type: &str) -> bool {
    let t = instance_type.to_ascii_lowercase();
    // Families whose letter is a standard one but that have quotas of their own.
    let own_quota = ["inf", "trn", "dl", "hpc", "mac"]
        .iter()
        .any(|prefix| t.starts_with(prefix));
    !own_quota
        && t.chars()
            .next()
            .is_some_and(|family| "acdhimrtz".contains(family))
}

#[cfg(test)]
mod tests {
    use super::counts_against_standard_quota;

    #[test]
    fn only_the_standard_families_count_against_the_quota() {
        for t in [
            "t3.small",
            "m7i.large",
            "c6g.xlarge",
            "r5.2xlarge",
            "z1d.large",
            "i4i.large",
        ] {
            assert!(counts_against_standard_quota(t), "{t}");
        }
        for t in [
            "g5.xlarge",
            "p4d.24xlarge",
            "x2idn.16xlarge",
            "inf2.xlarge",
            "trn1.2xlarge",
            "",
        ] {
            assert!(!counts_against_standard_quota(t), "{t}");
        }
    }
}
