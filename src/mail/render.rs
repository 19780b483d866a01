//! The emails of docs/contract.md §5, rendered from the templates in `templates/` (plain text
//! and HTML, compiled into the binary).

use minijinja::{Environment, context};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::EmailKind;

/// A rendered email, ready for a transport.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// A trainee login as the confirmation shows it.
#[derive(Debug, Serialize)]
pub struct UserLine {
    pub username: String,
    pub password: String,
}

/// One lab machine as the instance-details email shows it.
#[derive(Debug, Serialize)]
pub struct InstanceBlock {
    /// `https://<public IP>`, or `http://<public DNS, or IP>` (HTTPS off, SSH mode, or a
    /// machine that could not get a certificate): see [`instance_url`].
    pub url: String,
    /// The machine serves HTTP only because it could not get a certificate (HTTPS was on).
    pub http_only: bool,
    /// The machine's public DNS name or IP, for `ssh user@host`.
    pub host: String,
    pub usernames: Vec<String>,
    pub admin_username: String,
    pub admin_password: String,
}

/// What the instance block says of a machine that could not get a certificate.
pub const HTTP_ONLY_LINE: &str =
    "HTTPS could not be set up on this machine: its lab is served over plain HTTP.";

/// A machine's URL in the email and the `provisioned` event: `https://<public IP>` when it
/// serves HTTPS (its certificate is for the address), else `http://<public DNS, or IP>`.
pub fn instance_url(host: &str, public_ip: Option<&str>, serves_https: bool) -> String {
    match public_ip.filter(|ip| serves_https && !ip.is_empty()) {
        Some(ip) => format!("https://{ip}"),
        None => format!("http://{host}"),
    }
}

/// The templates, parsed once.
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        env.set_trim_blocks(false);
        for (name, source) in [
            (
                "confirmation.txt",
                include_str!("../../templates/confirmation.txt"),
            ),
            (
                "confirmation.html",
                include_str!("../../templates/confirmation.html"),
            ),
            (
                "instance_details.txt",
                include_str!("../../templates/instance_details.txt"),
            ),
            (
                "instance_details.html",
                include_str!("../../templates/instance_details.html"),
            ),
            ("failure.txt", include_str!("../../templates/failure.txt")),
            ("failure.html", include_str!("../../templates/failure.html")),
            ("updated.txt", include_str!("../../templates/updated.txt")),
            ("updated.html", include_str!("../../templates/updated.html")),
            (
                "cancelled.txt",
                include_str!("../../templates/cancelled.txt"),
            ),
            (
                "cancelled.html",
                include_str!("../../templates/cancelled.html"),
            ),
        ] {
            env.add_template(name, source)
                .expect("the bundled templates parse");
        }
        Self { env }
    }
}

impl Templates {
    fn render(
        &self,
        kind: EmailKind,
        subject: &str,
        ctx: minijinja::Value,
    ) -> Result<Rendered, minijinja::Error> {
        let name = kind.as_str();
        Ok(Rendered {
            subject: subject.to_owned(),
            text: self
                .env
                .get_template(&format!("{name}.txt"))?
                .render(&ctx)?,
            html: self
                .env
                .get_template(&format!("{name}.html"))?
                .render(&ctx)?,
        })
    }

    pub fn confirmation(
        &self,
        booking_id: &str,
        booking_time: &str,
        ends_at: &str,
        users: &[UserLine],
    ) -> Result<Rendered, minijinja::Error> {
        self.render(
            EmailKind::Confirmation,
            "Booking Confirmation",
            context! { booking_id, booking_time, ends_at, users },
        )
    }

    pub fn instance_details(
        &self,
        booking_id: &str,
        booking_time: &str,
        ends_at: &str,
        instances: &[InstanceBlock],
        jupyterhub: bool,
    ) -> Result<Rendered, minijinja::Error> {
        let subject = if jupyterhub {
            "JupyterHub Access Information"
        } else {
            "Lab Access Information"
        };
        self.render(
            EmailKind::InstanceDetails,
            subject,
            context! { booking_id, booking_time, ends_at, instances, jupyterhub,
            http_only_line => HTTP_ONLY_LINE },
        )
    }

    pub fn failure(
        &self,
        booking_id: &str,
        booking_time: &str,
        what_failed: &str,
    ) -> Result<Rendered, minijinja::Error> {
        self.render(
            EmailKind::Failure,
            "Booking Failed",
            context! { booking_id, booking_time, what_failed },
        )
    }

    /// `Booking Updated`: the booking as it is now, every current login, and what changed.
    pub fn updated(
        &self,
        booking_id: &str,
        (booking_time, ends_at): (&str, &str),
        users: &[UserLine],
        change: &str,
    ) -> Result<Rendered, minijinja::Error> {
        self.render(
            EmailKind::Updated,
            "Booking Updated",
            context! { booking_id, booking_time, ends_at, users, change },
        )
    }

    /// `Booking Cancelled`, saying whether machines were stopped or will not be started.
    pub fn cancelled(
        &self,
        booking_id: &str,
        booking_time: &str,
        what_happened: &str,
    ) -> Result<Rendered, minijinja::Error> {
        self.render(
            EmailKind::Cancelled,
            "Booking Cancelled",
            context! { booking_id, booking_time, what_happened },
        )
    }
}

/// The `Message-ID` of a booking's email of one kind: stable, so a duplicate is recognisable,
/// and valid RFC 5322 (`id-left` is a dot-atom; the booking id's other characters are
/// replaced, and a hash of the exact id keeps it unique).
/// An email of a later revision (`revision` > 0) has the revision in its id.
pub fn message_id(booking_id: &str, kind: EmailKind, revision: u32, domain: &str) -> String {
    let safe: String = booking_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let digest = Sha256::digest(booking_id.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let kind = kind.as_str().replace('_', "-");
    match revision {
        0 => format!("<labbook.{kind}.{safe}.{hash}@{domain}>"),
        r => format!("<labbook.{kind}.r{r}.{safe}.{hash}@{domain}>"),
    }
}

/// The `Message-ID` of copy `copy` of an email whose own id is `original`: the same for copy
/// 0, else with `.copyN` in it, so a mail client shows a resend rather than dropping it as a
/// duplicate of the email it already has.
pub fn copy_message_id(original: String, copy: u32) -> String {
    match (copy, original.split_once('@')) {
        (0, _) | (_, None) => original,
        (n, Some((left, domain))) => format!("{left}.copy{n}@{domain}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_copy_has_an_id_of_its_own() {
        let id = message_id("b-1", EmailKind::InstanceDetails, 2, "example.org");
        assert_eq!(copy_message_id(id.clone(), 0), id);
        let copy = copy_message_id(id.clone(), 1);
        assert!(
            copy.starts_with("<labbook.instance-details.r2.b-1.")
                && copy.ends_with(".copy1@example.org>"),
            "{copy}"
        );
    }

    #[test]
    fn confirmation_keeps_the_original_lines() {
        let users = [
            UserLine {
                username: "ualice".into(),
                password: "Pw1".into(),
            },
            UserLine {
                username: "ubob".into(),
                password: "Pw2".into(),
            },
        ];
        let r = Templates::default()
            .confirmation(
                "course-1",
                "2026-12-01T01:00:00Z",
                "2026-12-01T04:00:00Z",
                &users,
            )
            .unwrap();
        assert_eq!(r.subject, "Booking Confirmation");
        let lines: Vec<&str> = r.text.lines().collect();
        assert!(lines.contains(&"Booking ID: course-1"));
        assert!(lines.contains(&"Booking Time: 2026-12-01T01:00:00Z"));
        assert!(lines.contains(&"Username: ualice, Password: Pw1"));
        assert!(lines.contains(&"Username: ubob, Password: Pw2"));
        assert!(r.html.contains("<code>ualice</code>"));
    }

    #[test]
    fn instance_blocks_come_in_order() {
        let instances = [InstanceBlock {
            url: "http://ec2-1.example".into(),
            http_only: false,
            host: "ec2-1.example".into(),
            usernames: vec!["ua".into(), "ub".into()],
            admin_username: "labadmin".into(),
            admin_password: "Secret1".into(),
        }];
        let t = Templates::default();
        let r = t.instance_details("b", "t", "e", &instances, true).unwrap();
        assert_eq!(r.subject, "JupyterHub Access Information");
        let lines: Vec<&str> = r.text.lines().collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| *l == needle)
                .unwrap_or_else(|| panic!("{needle} in {lines:?}"))
        };
        assert!(at("Instance URL: http://ec2-1.example") < at("- ua"));
        assert!(at("- ua") < at("- ub"));
        assert!(at("- ub") < at("Username: labadmin"));
        assert!(at("Username: labadmin") < at("Password: Secret1"));
        let ssh = t
            .instance_details("b", "t", "e", &instances, false)
            .unwrap();
        assert_eq!(ssh.subject, "Lab Access Information");
        // In SSH mode each login's command line is there too; the contract's lines stay.
        let ssh_lines: Vec<&str> = ssh.text.lines().collect();
        for line in [
            "Instance URL: http://ec2-1.example",
            "- ua",
            "SSH: ssh ua@ec2-1.example",
            "SSH: ssh ub@ec2-1.example",
            "SSH: ssh labadmin@ec2-1.example",
        ] {
            assert!(ssh_lines.contains(&line), "{line} in {ssh_lines:?}");
        }
        assert!(
            !r.text.contains("SSH: ssh"),
            "JupyterHub mode has no ssh lines"
        );
        assert!(ssh.html.contains("<code>ssh ua@ec2-1.example</code>"));
    }

    #[test]
    fn urls_follow_https() {
        let dns = "ec2-203-0-113-7.compute-1.amazonaws.com";
        let ip = Some("203.0.113.7");
        assert_eq!(instance_url(dns, ip, true), "https://203.0.113.7");
        assert_eq!(instance_url(dns, ip, false), format!("http://{dns}"));
        // Without a public IP there is no certificate to name it.
        assert_eq!(instance_url(dns, None, true), format!("http://{dns}"));
        assert_eq!(instance_url("203.0.113.7", ip, false), "http://203.0.113.7");
    }

    #[test]
    fn a_machine_without_a_certificate_gets_its_http_url_and_one_line_saying_so() {
        let block = |url: &str, http_only| InstanceBlock {
            url: url.into(),
            http_only,
            host: "ec2-1.example".into(),
            usernames: vec!["ua".into()],
            admin_username: "labadmin".into(),
            admin_password: "Secret1".into(),
        };
        let instances = [
            block("https://203.0.113.7", false),
            block("http://ec2-2.example", true),
        ];
        let r = Templates::default()
            .instance_details("b", "t", "e", &instances, true)
            .unwrap();
        let lines: Vec<&str> = r.text.lines().collect();
        let at = |needle: &str| lines.iter().position(|l| *l == needle);
        let https = at("Instance URL: https://203.0.113.7").expect("the HTTPS block");
        let http = at("Instance URL: http://ec2-2.example").expect("the HTTP block");
        let notice = at(HTTP_ONLY_LINE).expect("the HTTP-only line");
        assert_eq!(notice, http + 1, "right under the machine's URL: {lines:?}");
        assert_eq!(lines.iter().filter(|l| **l == HTTP_ONLY_LINE).count(), 1);
        assert!(https < http);
        // The contract's order stays: URL, users, admin login.
        let second = &lines[http..];
        let in_second = |needle: &str| second.iter().position(|l| *l == needle).unwrap();
        assert!(in_second("- ua") < in_second("Username: labadmin"));
        assert!(r.html.contains("203.0.113.7"));
        assert_eq!(r.html.matches(HTTP_ONLY_LINE).count(), 1);
    }

    #[test]
    fn updated_and_cancelled_keep_the_contract_lines() {
        let users = [UserLine {
            username: "ualice".into(),
            password: "Pw1".into(),
        }];
        let t = Templates::default();
        let times = ("2026-12-01T01:00:00Z", "2026-12-01T04:00:00Z");
        let r = t.updated("course-1", times, &users, "moved").unwrap();
        assert_eq!(r.subject, "Booking Updated");
        let lines: Vec<&str> = r.text.lines().collect();
        for line in [
            "Booking ID: course-1",
            "Booking Time: 2026-12-01T01:00:00Z",
            "Booking Ends: 2026-12-01T04:00:00Z",
            "Username: ualice, Password: Pw1",
        ] {
            assert!(lines.contains(&line), "{line} in {lines:?}");
        }
        let c = t
            .cancelled("course-1", times.0, "No lab machines will be started.")
            .unwrap();
        assert_eq!(c.subject, "Booking Cancelled");
        assert!(c.text.lines().any(|l| l == "Booking ID: course-1"));
        assert!(c.text.contains("No lab machines will be started."));
    }

    #[test]
    fn html_is_escaped() {
        let users = [UserLine {
            username: "<script>".into(),
            password: "a&b".into(),
        }];
        let r = Templates::default()
            .confirmation("x", "t", "e", &users)
            .unwrap();
        assert!(!r.html.contains("<script>"));
        assert!(r.html.contains("a&amp;b"));
    }

    #[test]
    fn message_ids_are_valid_and_distinct() {
        let a = message_id("course:42..x", EmailKind::Confirmation, 0, "example.org");
        assert!(
            a.starts_with("<labbook.confirmation.course-42--x.") && a.ends_with("@example.org>"),
            "{a}"
        );
        assert!(!a[1..a.find('@').unwrap()].contains(".."));
        assert_ne!(
            a,
            message_id("course:42..x", EmailKind::Failure, 0, "example.org")
        );
        assert_ne!(
            a,
            message_id("course-42--x", EmailKind::Confirmation, 0, "example.org")
        );
        let r2 = message_id("course:42..x", EmailKind::Updated, 2, "example.org");
        assert!(r2.starts_with("<labbook.updated.r2.course-42--x."), "{r2}");
        assert_ne!(
            r2,
            message_id("course:42..x", EmailKind::Updated, 3, "example.org")
        );
    }
}
