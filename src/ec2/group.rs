//! labbook's own security group, used when `LABBOOK_SECURITY_GROUP_IDS` is not set: one per
//! installation (`labbook-lab`, or `labbook-lab-<installation>`), looked for only in the VPC
//! the machines launch into (the configured subnet's, else the default VPC), tagged
//! `labbook:managed` and `labbook:installation` when created, and its ingress (SSH, HTTP,
//! HTTPS from `LABBOOK_ALLOWED_CIDRS`) checked, and repaired, before it is used.

use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, ResourceType, SecurityGroup, Tag, TagSpecification,
};

use crate::config::{AcmeSettings, Bootstrap, Ec2Settings};

use super::{
    DEFAULT_INSTALLATION, Ec2, Ec2Error, SECURITY_GROUP_NAME, TAG_INSTALLATION, TAG_MANAGED,
    classify, ok,
};

/// What the group lets in: SSH, and HTTP(S) for JupyterHub.
const PORTS: [i32; 3] = [22, 80, 443];

/// Every IPv4 address: where Let's Encrypt's validation may come from.
const ANYWHERE: &str = "0.0.0.0/0";

impl Ec2 {
    /// This installation's group name.
    pub fn group_name(&self) -> String {
        match self.settings.installation.as_str() {
            DEFAULT_INSTALLATION => SECURITY_GROUP_NAME.to_owned(),
            other => format!("{SECURITY_GROUP_NAME}-{other}"),
        }
    }

    /// What the group lets in, one `(port, range)` each: [`PORTS`] from every range of
    /// `LABBOOK_ALLOWED_CIDRS` (a range named twice counts once).
    pub fn ingress(&self) -> Vec<(i32, &str)> {
        let mut rules: Vec<(i32, &str)> = Vec::new();
        for port in PORTS {
            for cidr in &self.settings.allowed_cidrs {
                if !rules.contains(&(port, cidr.as_str())) {
                    rules.push((port, cidr.as_str()));
                }
            }
        }
        rules
    }

    /// labbook's group in the launch VPC, its ingress repaired; created if missing.
    pub(super) async fn find_or_create_group(&self) -> Result<String, Ec2Error> {
        let vpc = self.launch_vpc().await?;
        let name = self.group_name();
        if challenge_shut_out(&self.settings) {
            tracing::warn!(
                allowed = ?self.settings.allowed_cidrs,
                "LABBOOK_ALLOWED_CIDRS keeps Let's Encrypt from the machines' port 80: they will get no certificate and serve their lab over plain HTTP (allow 0.0.0.0/0, or set LABBOOK_HTTPS=off)"
            );
        }
        if let Some(group) = self.find_group(&name, vpc.as_deref()).await? {
            let id = group.group_id().unwrap_or_default().to_owned();
            self.repair_ingress(&id, &group).await?;
            return Ok(id);
        }
        let created = self
            .client
            .create_security_group()
            .group_name(&name)
            .description("labbook lab machines: SSH, HTTP, HTTPS")
            .set_vpc_id(vpc.clone())
            .tag_specifications(self.group_tags())
            .send()
            .await;
        let group_id = match created {
            Ok(out) => out.group_id().unwrap_or_default().to_owned(),
            Err(e) => {
                let err = classify("CreateSecurityGroup", e);
                // Another replica created it a moment ago.
                if err.code() == Some("InvalidGroup.Duplicate") {
                    let found = self.find_group(&name, vpc.as_deref()).await?;
                    return found
                        .and_then(|g| g.group_id().map(str::to_owned))
                        .ok_or(err);
                }
                return Err(err);
            }
        };
        ok("CreateSecurityGroup");
        let rules = self.ingress();
        self.open_ingress(&group_id, &rules).await?;
        tracing::info!(group_id = %group_id, ingress = %describe(&rules), "created security group {name}");
        Ok(group_id)
    }

    fn group_tags(&self) -> TagSpecification {
        TagSpecification::builder()
            .resource_type(ResourceType::SecurityGroup)
            .tags(Tag::builder().key(TAG_MANAGED).value("true").build())
            .tags(
                Tag::builder()
                    .key(TAG_INSTALLATION)
                    .value(&self.settings.installation)
                    .build(),
            )
            .build()
    }

    /// The VPC the machines launch into: the configured subnet's, else the default VPC.
    async fn launch_vpc(&self) -> Result<Option<String>, Ec2Error> {
        if let Some(subnet) = &self.settings.subnet_id {
            let out = self
                .client
                .describe_subnets()
                .subnet_ids(subnet)
                .send()
                .await
                .map_err(|e| classify("DescribeSubnets", e))?;
            ok("DescribeSubnets");
            return Ok(out
                .subnets()
                .first()
                .and_then(|s| s.vpc_id())
                .map(str::to_owned));
        }
        let default = Filter::builder().name("isDefault").values("true").build();
        let out = self
            .client
            .describe_vpcs()
            .filters(default)
            .send()
            .await
            .map_err(|e| classify("DescribeVpcs", e))?;
        ok("DescribeVpcs");
        Ok(out
            .vpcs()
            .first()
            .and_then(|v| v.vpc_id())
            .map(str::to_owned))
    }

    async fn find_group(
        &self,
        name: &str,
        vpc: Option<&str>,
    ) -> Result<Option<SecurityGroup>, Ec2Error> {
        let mut filters = vec![Filter::builder().name("group-name").values(name).build()];
        if let Some(vpc) = vpc {
            filters.push(Filter::builder().name("vpc-id").values(vpc).build());
        }
        let out = self
            .client
            .describe_security_groups()
            .set_filters(Some(filters))
            .send()
            .await
            .map_err(|e| classify("DescribeSecurityGroups", e))?;
        ok("DescribeSecurityGroups");
        Ok(out.security_groups().first().cloned())
    }

    /// Opens again what an existing group no longer lets in of [`Ec2::ingress`].
    async fn repair_ingress(&self, group_id: &str, group: &SecurityGroup) -> Result<(), Ec2Error> {
        let missing: Vec<(i32, &str)> = self
            .ingress()
            .into_iter()
            .filter(|(port, cidr)| !lets_in(group, *port, cidr))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(group_id, missing = %describe(&missing), "labbook's security group lacks some of its ingress rules; opening them");
        self.open_ingress(group_id, &missing).await
    }

    /// Opens each `(port, range)` of `rules` on labbook's group, one call each: EC2 refuses a
    /// whole call when one of its rules exists already (another replica, or an operator, opened
    /// it a moment ago), which would leave the call's other rules closed.
    async fn open_ingress(&self, group_id: &str, rules: &[(i32, &str)]) -> Result<(), Ec2Error> {
        for (port, cidr) in rules {
            let opened = self
                .client
                .authorize_security_group_ingress()
                .group_id(group_id)
                .ip_permissions(
                    IpPermission::builder()
                        .ip_protocol("tcp")
                        .from_port(*port)
                        .to_port(*port)
                        .ip_ranges(IpRange::builder().cidr_ip(*cidr).build())
                        .build(),
                )
                .send()
                .await;
            match opened.map_err(|e| classify("AuthorizeSecurityGroupIngress", e)) {
                Ok(_) => {}
                Err(err) if err.code() == Some("InvalidPermission.Duplicate") => {}
                Err(err) => return Err(err),
            }
            ok("AuthorizeSecurityGroupIngress");
        }
        Ok(())
    }
}

/// Whether `group` lets TCP `port` in from `cidr`.
fn lets_in(group: &SecurityGroup, port: i32, cidr: &str) -> bool {
    group.ip_permissions().iter().any(|p| {
        p.ip_protocol() == Some("tcp")
            && p.from_port().is_some_and(|from| from <= port)
            && p.to_port().is_some_and(|to| port <= to)
            && p.ip_ranges().iter().any(|r| r.cidr_ip() == Some(cidr))
    })
}

/// `22 from 198.51.100.0/24, 80 from 0.0.0.0/0, ...`, for the logs.
fn describe(rules: &[(i32, &str)]) -> String {
    rules
        .iter()
        .map(|(port, cidr)| format!("{port} from {cidr}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether JupyterHub machines ask Let's Encrypt for certificates while the allowed ranges keep
/// the internet from port 80: Let's Encrypt validates the `http-01` challenge from networks of
/// its own choosing, so every machine would serve plain HTTP. The ranges are not widened for
/// it: a machine that got no certificate serves its login page on port 80.
fn challenge_shut_out(settings: &Ec2Settings) -> bool {
    settings.bootstrap == Bootstrap::JupyterHub
        && settings
            .https
            .acme()
            .is_some_and(AcmeSettings::is_lets_encrypt)
        && !settings.allowed_cidrs.iter().any(|c| c == ANYWHERE)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Settings;

    fn ec2_settings(pairs: &[(&str, &str)]) -> Ec2Settings {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_map(&vars).unwrap().ec2
    }

    #[test]
    fn a_narrowed_list_is_flagged_only_where_it_keeps_lets_encrypt_out() {
        let narrowed = ("LABBOOK_ALLOWED_CIDRS", "198.51.100.0/24");
        assert!(challenge_shut_out(&ec2_settings(&[narrowed])));
        let staging = (
            "LABBOOK_ACME_DIRECTORY",
            "https://acme-staging-v02.api.letsencrypt.org/directory",
        );
        assert!(challenge_shut_out(&ec2_settings(&[narrowed, staging])));
        assert!(!challenge_shut_out(&ec2_settings(&[])), "0.0.0.0/0");
        let with_anywhere = ("LABBOOK_ALLOWED_CIDRS", "198.51.100.0/24,0.0.0.0/0");
        assert!(!challenge_shut_out(&ec2_settings(&[with_anywhere])));
        for other in [
            ("LABBOOK_HTTPS", "off"),
            ("LABBOOK_BOOTSTRAP", "ssh"),
            (
                "LABBOOK_ACME_DIRECTORY",
                "https://acme.internal.example/directory",
            ),
        ] {
            assert!(
                !challenge_shut_out(&ec2_settings(&[narrowed, other])),
                "{other:?}"
            );
        }
    }
}
