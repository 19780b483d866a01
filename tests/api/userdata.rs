//! The user-data passes cloud-init's schema, for both bootstraps.
//!
//! The schema is cloud-init 22.4.2's `schema-cloud-config-v1.json` (JSON Schema draft 4), as
//! Debian 12 packages it, vendored in `tests/data/cloud-init/` (its README says where it came
//! from and how to update it). The check is what `cloud-init schema --config-file` does: the
//! `#cloud-config` header, a YAML mapping, then the schema (deprecations are not errors there
//! either). This schema allows unknown top-level keys; it rejects unknown keys in a user entry
//! and values of the wrong type.

use std::sync::LazyLock;

use labbook::config::{AcmeSettings, Bootstrap, Https};
use labbook::domain::Credential;
use labbook::ec2::userdata::{Account, render};

static CLOUD_CONFIG_SCHEMA: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let schema: serde_json::Value = serde_json::from_str(include_str!(
        "../data/cloud-init/schema-cloud-config-v1.json"
    ))
    .expect("the vendored schema is JSON");
    // Picks the draft the schema declares in `$schema` (draft 4).
    jsonschema::validator_for(&schema).expect("the vendored schema compiles")
});

/// The problems cloud-init's schema check finds in `user_data`; empty if it passes.
fn schema_errors(user_data: &str) -> Vec<String> {
    if !user_data.starts_with("#cloud-config") {
        return vec!["does not begin with \"#cloud-config\"".into()];
    }
    let config: serde_json::Value = match serde_yaml_ng::from_str(user_data) {
        Ok(v) => v,
        Err(e) => return vec![format!("not YAML: {e}")],
    };
    if !config.is_object() {
        return vec!["not a YAML mapping".into()];
    }
    CLOUD_CONFIG_SCHEMA
        .iter_errors(&config)
        .map(|e| format!("at '{}': {e}", e.instance_path()))
        .collect()
}

fn schema_check(user_data: &str) {
    let errors = schema_errors(user_data);
    assert!(
        errors.is_empty(),
        "user-data fails cloud-init's schema:\n{}\n--- user-data ---\n{user_data}",
        errors.join("\n")
    );
}

fn render_sample(bootstrap: Bootstrap) -> String {
    render_sample_with(bootstrap, &Https::Off)
}

fn render_sample_with(bootstrap: Bootstrap, https: &Https) -> String {
    let hash = "$6$saltsalt$abcdefghijklmnopqrstuvwxyz";
    let admin = Account {
        username: "labadmin",
        password_hash: hash,
    };
    let users = [Account {
        username: "ualice",
        password_hash: hash,
    }];
    render(bootstrap, https, &admin, &users).unwrap()
}

#[test]
fn both_bootstraps_pass_the_cloud_init_schema() {
    let creds = Credential::generate_set(3);
    let hashes: Vec<String> = creds.iter().map(|c| c.password.sha512_crypt()).collect();
    let users: Vec<Account<'_>> = creds
        .iter()
        .zip(&hashes)
        .map(|(c, h)| Account {
            username: c.username.as_str(),
            password_hash: h,
        })
        .collect();
    let admin_hash = labbook::domain::Password::generate().sha512_crypt();
    let admin = Account {
        username: "labadmin",
        password_hash: &admin_hash,
    };
    let https = lets_encrypt();
    for (bootstrap, https) in [
        (Bootstrap::JupyterHub, &https),
        (Bootstrap::JupyterHub, &Https::Off),
        (Bootstrap::Ssh, &https),
    ] {
        let data = render(bootstrap, https, &admin, &users).unwrap();
        schema_check(&data);
        for c in &creds {
            assert!(!data.contains(c.password.expose()));
        }
    }
}

/// The check is not a no-op: small mistakes in the user-data are rejected.
#[test]
fn the_schema_rejects_invalid_user_data() {
    let jupyterhub = render_sample(Bootstrap::JupyterHub);
    assert!(schema_errors(&jupyterhub).is_empty());
    assert!(jupyterhub.contains("lock_passwd: false"));
    assert!(jupyterhub.contains("ssh_pwauth: false"));

    let cases = [
        (
            "a misspelled key in a user entry",
            jupyterhub.replace("lock_passwd: false", "lock_password: false"),
        ),
        (
            "a string where a boolean is expected",
            jupyterhub.replace("ssh_pwauth: false", "ssh_pwauth: 1"),
        ),
        (
            "no #cloud-config header",
            jupyterhub.replacen("#cloud-config\n", "", 1),
        ),
    ];
    for (what, data) in cases {
        assert_ne!(data, jupyterhub, "{what}: the case changes nothing");
        assert!(
            !schema_errors(&data).is_empty(),
            "{what}: accepted by the schema:\n{data}"
        );
    }
}

/// A directory of stubs for the tools a test's bootstrap must not run for real (apt on this
/// machine), each doing nothing.
fn stub_bin(dir: &std::path::Path, names: &[&str]) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in names {
        let path = bin.join(name);
        std::fs::write(&path, "#!/bin/bash\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap())
}

/// Runs the bootstrap script the user-data writes, as cloud-init's `runcmd` would, with the
/// console and the installer's address pointed at this machine (apt stubbed, no baked image);
/// returns its exit code and what it wrote to the console.
fn run_bootstrap(bootstrap: Bootstrap, installer_url: &str) -> (Option<i32>, String) {
    let user_data = render_sample(bootstrap);
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&user_data).unwrap();
    let script = config["write_files"][0]["content"].as_str().unwrap();
    let args: Vec<&str> = config["runcmd"][0]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let dir = std::env::temp_dir().join(format!("labbook-boot-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bootstrap"), script).unwrap();
    let status = std::process::Command::new("bash")
        .arg(dir.join("bootstrap"))
        .args(&args[1..])
        .env("PATH", stub_bin(&dir, &["apt-get"]))
        .env("LABBOOK_BAKED_MARKER", dir.join("baked"))
        .env("LABBOOK_CONSOLE", dir.join("console"))
        .env("LABBOOK_BOOTSTRAP_LOG", dir.join("log"))
        .env("LABBOOK_TLJH_URL", installer_url)
        .env("LABBOOK_RETRY_SECONDS", "0")
        .status()
        .unwrap();
    let console = std::fs::read_to_string(dir.join("console")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status.code(), console)
}

#[test]
fn a_bootstrap_whose_installer_cannot_be_fetched_fails_loudly() {
    // Nothing listens there: every download is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/bootstrap.py");
    let (code, console) = run_bootstrap(Bootstrap::JupyterHub, &url);
    assert_ne!(code, Some(0), "the script fails: {console}");
    assert_eq!(
        console.trim(),
        "labbook-bootstrap: failed: download The Littlest JupyterHub's installer (exit 7)",
        "curl's 'could not connect' is reported with its step"
    );
    assert!(
        console
            .trim_start()
            .starts_with(labbook::ec2::userdata::REPORT_FAILED)
    );
}

#[test]
fn an_ssh_bootstrap_reports_success_on_the_console() {
    let (code, console) = run_bootstrap(Bootstrap::Ssh, "http://127.0.0.1:9/unused");
    assert_eq!(code, Some(0));
    assert_eq!(console.trim(), labbook::ec2::userdata::REPORT_OK);
}

fn lets_encrypt() -> Https {
    Https::Acme(AcmeSettings {
        directory: labbook::config::LETS_ENCRYPT_DIRECTORY.into(),
        email: None,
    })
}

/// What the stubbed certbot does when the HTTPS bootstrap asks it for a certificate.
#[derive(Clone, Copy)]
enum Acme {
    /// Saves a certificate for the address it was asked for (made with openssl).
    Issues,
    /// Answers as Let's Encrypt does past its limits, with the problem's type.
    RateLimited,
    /// Past its limits as certbot prints it: the problem's detail only (the type is in
    /// certbot's log).
    RateLimitedDetail,
    /// The order is made, but the validation cannot connect to the machine's port 80.
    ValidationFails,
    /// Cannot connect to the directory.
    Unreachable,
}

/// The HTTPS bootstrap as cloud-init runs it, every outside tool stubbed: IMDS is a directory
/// (`file://`), certbot a script, TLJH's installer and `tljh-config` scripts that log their
/// arguments. Nothing leaves this machine.
struct HttpsRun {
    code: Option<i32>,
    console: String,
    certbot_calls: Vec<String>,
    tljh_calls: Vec<String>,
    installer_ran: bool,
    tls_dir: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for HttpsRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const CERTBOT_STUB: &str = r#"#!/bin/bash
printf '%s\n' "$*" >>"$STUB_LOG/certbot"
while [ $# -gt 0 ]; do
  case $1 in
  --config-dir) state=$2 ;;
  --ip-address) ip=$2 ;;
  esac
  shift
done
case $STUB_ACME in
rate-limited) echo 'An unexpected error occurred: urn:ietf:params:acme:error:rateLimited :: too many certificates'; exit 1 ;;
rate-limited-detail) echo 'An unexpected error occurred:'
  echo 'too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s'
  exit 1 ;;
validation-fails) echo 'Certbot failed to authenticate some domains (authenticator: standalone).'
  echo '  Type:   connection'
  echo '  Detail: 203.0.113.7: Fetching http://203.0.113.7/.well-known/acme-challenge/x: Timeout during connect (likely firewall problem)'
  exit 1 ;;
unreachable) echo 'Failed to establish a new connection: [Errno 111] Connection refused'; exit 1 ;;
esac
live=$state/live/labbook
mkdir -p "$live"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj / \
  -addext "subjectAltName=IP:$ip" -keyout "$live/privkey.pem" -out "$live/cert.pem" 2>/dev/null
cp "$live/cert.pem" "$live/fullchain.pem"
"#;

fn run_https_bootstrap(acme: Acme, public_ip: Option<&str>, certbot_installed: bool) -> HttpsRun {
    let user_data = render_sample_with(Bootstrap::JupyterHub, &lets_encrypt());
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&user_data).unwrap();
    let script = config["write_files"][0]["content"].as_str().unwrap();
    let args: Vec<&str> = config["runcmd"][0]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let dir = std::env::temp_dir().join(format!("labbook-https-{}", uuid::Uuid::new_v4()));
    let (bin, logs, imds) = (dir.join("bin"), dir.join("logs"), dir.join("imds"));
    let acme_home = dir.join("certbot");
    for d in [
        &bin,
        &logs,
        &imds.join("latest/meta-data"),
        &acme_home.join("bin"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(imds.join("latest/api/token"), "token").unwrap_or_else(|_| {
        std::fs::create_dir_all(imds.join("latest/api")).unwrap();
        std::fs::write(imds.join("latest/api/token"), "token").unwrap();
    });
    if let Some(ip) = public_ip {
        std::fs::write(imds.join("latest/meta-data/public-ipv4"), ip).unwrap();
    }
    let stub = |path: std::path::PathBuf, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    if certbot_installed {
        // As a baked image leaves it: the pinned version, already there.
        std::fs::write(
            acme_home.join("labbook-version"),
            format!("{}\n", labbook::ec2::userdata::CERTBOT_VERSION),
        )
        .unwrap();
        stub(acme_home.join("bin/certbot"), CERTBOT_STUB);
    }
    let log_args =
        |name: &str| format!("#!/bin/bash\nprintf '%s\\n' \"$*\" >>\"$STUB_LOG/{name}\"\n");
    stub(bin.join("tljh-config"), &log_args("tljh-config"));
    stub(bin.join("apt-get"), &log_args("apt-get"));
    // `python3 -m venv` fails (no venv here); the installer only says it ran.
    stub(
        bin.join("python3"),
        &format!("{}[ \"$1\" != -m ] || exit 1\n", log_args("python3")),
    );
    std::fs::write(dir.join("installer.py"), "# TLJH's installer, stubbed\n").unwrap();
    std::fs::write(dir.join("bootstrap"), script).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let status = std::process::Command::new("bash")
        .arg(dir.join("bootstrap"))
        .args(&args[1..])
        .env("PATH", path)
        .env("STUB_LOG", &logs)
        .env(
            "STUB_ACME",
            match acme {
                Acme::Issues => "issues",
                Acme::RateLimited => "rate-limited",
                Acme::RateLimitedDetail => "rate-limited-detail",
                Acme::ValidationFails => "validation-fails",
                Acme::Unreachable => "unreachable",
            },
        )
        .env("LABBOOK_CONSOLE", dir.join("console"))
        .env("LABBOOK_BOOTSTRAP_LOG", dir.join("log"))
        .env(
            "LABBOOK_TLJH_URL",
            format!("file://{}", dir.join("installer.py").display()),
        )
        .env("LABBOOK_TLJH_INSTALLER", dir.join("tljh-bootstrap.py"))
        .env("LABBOOK_IMDS_URL", format!("file://{}", imds.display()))
        .env("LABBOOK_BAKED_MARKER", dir.join("baked"))
        .env("LABBOOK_ACME_HOME", &acme_home)
        .env("LABBOOK_ACME_STATE", dir.join("acme"))
        .env("LABBOOK_TLS_DIR", dir.join("tls"))
        .env("LABBOOK_RETRY_SECONDS", "0")
        .status()
        .unwrap();
    let read_lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(logs.join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let python = read_lines("python3");
    HttpsRun {
        code: status.code(),
        console: std::fs::read_to_string(dir.join("console")).unwrap_or_default(),
        certbot_calls: read_lines("certbot"),
        tljh_calls: read_lines("tljh-config"),
        installer_ran: python.iter().any(|l| l.contains("tljh-bootstrap.py")),
        tls_dir: dir.join("tls"),
        dir,
    }
}

impl HttpsRun {
    /// The console's last line: the bootstrap's report.
    fn report(&self) -> &str {
        self.console.trim().lines().last().unwrap_or_default()
    }

    fn https_settings(&self) -> Vec<&String> {
        self.tljh_calls
            .iter()
            .filter(|c| c.contains("https"))
            .collect()
    }
}

#[test]
fn an_https_bootstrap_gives_tljh_a_certificate_for_its_public_address() {
    let run = run_https_bootstrap(Acme::Issues, Some("203.0.113.7"), true);
    assert_eq!(run.code, Some(0), "{}", run.console);
    assert_eq!(run.report(), labbook::ec2::userdata::REPORT_OK);
    assert_eq!(run.certbot_calls.len(), 1);
    let call = &run.certbot_calls[0];
    for arg in [
        "certonly --standalone --non-interactive --agree-tos --register-unsafely-without-email",
        "--server https://acme-v02.api.letsencrypt.org/directory",
        "--ip-address 203.0.113.7 --preferred-profile shortlived",
    ] {
        assert!(call.contains(arg), "{arg:?} in {call}");
    }
    assert!(run.installer_ran, "TLJH is installed after the certificate");
    let cert = run.tls_dir.join("fullchain.pem");
    let key = run.tls_dir.join("privkey.pem");
    assert_eq!(
        run.https_settings(),
        [
            "set https.enabled true",
            &format!("set https.tls.cert {}", cert.display()),
            &format!("set https.tls.key {}", key.display()),
        ]
    );
    // The proxy is reloaded with them, after the logins are allowed.
    let at = |call: &str| run.tljh_calls.iter().position(|c| c == call).unwrap();
    assert!(at("add-item users.admin labadmin") < at("set https.enabled true"));
    assert_eq!(run.tljh_calls.last().unwrap(), "reload proxy");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is root's only");
    assert!(
        std::fs::read_to_string(&cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        run.console
            .contains("labbook-https: certificate for 203.0.113.7 in "),
        "{}",
        run.console
    );
}

#[test]
fn a_machine_without_a_certificate_serves_its_lab_over_http_and_says_why() {
    let cases = [
        (
            Acme::RateLimited,
            Some("203.0.113.7"),
            true,
            "rate limited by the ACME server",
            1,
        ),
        (
            Acme::RateLimitedDetail,
            Some("203.0.113.7"),
            true,
            "rate limited by the ACME server",
            1,
        ),
        // Not "could not be reached", though the detail says "connection" and "timeout": the
        // server answered, and a new order would fail alike.
        (
            Acme::ValidationFails,
            Some("203.0.113.7"),
            true,
            "the ACME server could not reach this machine on port 80",
            1,
        ),
        (
            Acme::Unreachable,
            Some("203.0.113.7"),
            true,
            "the ACME server could not be reached",
            3,
        ),
        (
            Acme::Issues,
            None,
            true,
            "no public IPv4 address in the instance metadata",
            0,
        ),
        (
            Acme::Issues,
            Some("203.0.113.7"),
            false,
            "the ACME client could not be installed",
            0,
        ),
    ];
    for (acme, ip, installed, why, orders) in cases {
        let run = run_https_bootstrap(acme, ip, installed);
        assert_eq!(run.code, Some(0), "{why}: {}", run.console);
        assert_eq!(
            run.report(),
            format!("labbook-bootstrap: ok (http only: {why})")
        );
        assert!(
            run.report().starts_with(labbook::ec2::userdata::REPORT_OK)
                && run
                    .report()
                    .contains(labbook::ec2::userdata::REPORT_HTTP_ONLY)
        );
        assert_eq!(run.certbot_calls.len(), orders, "{why}: certbot's runs");
        assert!(
            run.installer_ran,
            "{why}: the lab is installed all the same"
        );
        assert!(run.https_settings().is_empty(), "{why}: TLJH stays on HTTP");
        assert!(run.tljh_calls.iter().any(|c| c == "reload"));
        assert!(!run.tls_dir.exists(), "{why}: no certificate is installed");
    }
}

#[test]
fn the_image_builders_user_data_passes_the_cloud_init_schema() {
    let data = labbook::ec2::userdata::render_image().unwrap();
    schema_check(&data);
    assert!(!data.contains("passwd"), "no account in the image");
}

/// The image bake as cloud-init runs it on the builder, every outside tool stubbed and the
/// machine's files under a directory of its own (`LABBOOK_IMAGE_ROOT`).
struct BakeRun {
    code: Option<i32>,
    console: String,
    root: std::path::PathBuf,
    logs: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for BakeRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl BakeRun {
    fn calls(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(name)).unwrap_or_default()
    }
}

fn run_image_bake(certbot_installed: bool) -> BakeRun {
    use std::os::unix::fs::PermissionsExt;
    let user_data = labbook::ec2::userdata::render_image().unwrap();
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&user_data).unwrap();
    let script = config["write_files"][0]["content"].as_str().unwrap();
    assert_eq!(
        config["runcmd"][0][0].as_str(),
        Some(labbook::ec2::userdata::IMAGE_BAKE_PATH)
    );
    let dir = std::env::temp_dir().join(format!("labbook-bake-{}", uuid::Uuid::new_v4()));
    let (bin, logs, root) = (dir.join("bin"), dir.join("logs"), dir.join("root"));
    let acme_home = dir.join("certbot");
    for d in [
        &bin,
        &logs,
        &acme_home,
        &root.join("etc/ssh"),
        &root.join("var/log/journal"),
        &root.join("root"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let put = |path: std::path::PathBuf, text: &str| std::fs::write(path, text).unwrap();
    put(
        root.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    );
    put(root.join("etc/ssh/ssh_host_ed25519_key"), "secret\n");
    put(root.join("etc/ssh/ssh_host_ed25519_key.pub"), "public\n");
    put(
        root.join("etc/ssh/sshd_config"),
        "PasswordAuthentication no\n",
    );
    put(root.join("var/log/syslog"), "the builder's log\n");
    put(root.join("var/log/syslog.1"), "older\n");
    put(root.join("var/log/journal/system.journal"), "binary\n");
    put(root.join("root/.bash_history"), "history\n");
    if certbot_installed {
        put(
            acme_home.join("labbook-version"),
            &format!("{}\n", labbook::ec2::userdata::CERTBOT_VERSION),
        );
    }
    let stub = |name: &str, extra: &str| {
        let path = bin.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/bash\nprintf '%s\\n' \"$*\" >>\"$STUB_LOG/{name}\"\n{extra}"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    // `python3 -m venv` fails (no venv here); the installer only says it ran.
    stub("python3", "[ \"$1\" != -m ] || exit 1\n");
    stub("cloud-init", "");
    stub("journalctl", "");
    stub("systemctl", "");
    put(dir.join("installer.py"), "# TLJH's installer, stubbed\n");
    put(dir.join("bake"), script);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let status = std::process::Command::new("bash")
        .arg(dir.join("bake"))
        .env("PATH", path)
        .env("STUB_LOG", &logs)
        .env("LABBOOK_CONSOLE", dir.join("console"))
        .env("LABBOOK_IMAGE_LOG", dir.join("log"))
        .env(
            "LABBOOK_TLJH_URL",
            format!("file://{}", dir.join("installer.py").display()),
        )
        .env("LABBOOK_TLJH_INSTALLER", dir.join("tljh-bootstrap.py"))
        .env("LABBOOK_ACME_HOME", &acme_home)
        .env("LABBOOK_RETRY_SECONDS", "0")
        .env("LABBOOK_IMAGE_ROOT", &root)
        .status()
        .unwrap();
    BakeRun {
        code: status.code(),
        console: std::fs::read_to_string(dir.join("console")).unwrap_or_default(),
        root,
        logs,
        dir,
    }
}

#[test]
fn the_image_bake_installs_marks_and_seals_the_machine() {
    let run = run_image_bake(true);
    assert_eq!(run.code, Some(0), "{}", run.console);
    assert_eq!(run.console.trim(), labbook::ec2::userdata::IMAGE_REPORT_OK);
    // TLJH's installer ran, with no admin.
    let python = run.calls("python3");
    assert!(
        python.contains("tljh-bootstrap.py --user-requirements-txt-url"),
        "{python}"
    );
    assert!(!python.contains("--admin"), "{python}");
    let marker = std::fs::read_to_string(run.root.join("etc/labbook/baked")).unwrap();
    assert!(
        marker.contains(&format!("labbook_version={}\n", env!("CARGO_PKG_VERSION"))),
        "{marker}"
    );
    assert!(marker.contains("holds=tljh,certbot 5.8.0\n"), "{marker}");
    // Sealed: cloud-init's state, the machine id, host keys, logs and history cleared.
    // The image's hub serves nothing before a machine's bootstrap has set its logins.
    assert_eq!(run.calls("systemctl").trim(), "disable jupyterhub traefik");
    assert_eq!(run.calls("cloud-init").trim(), "clean --logs --machine-id");
    assert!(run.calls("journalctl").contains("--vacuum-time=1s"));
    let read = |p: &str| std::fs::read_to_string(run.root.join(p));
    assert_eq!(read("etc/machine-id").unwrap(), "");
    assert!(read("etc/ssh/ssh_host_ed25519_key").is_err());
    assert!(read("etc/ssh/ssh_host_ed25519_key.pub").is_err());
    assert!(
        read("etc/ssh/sshd_config").is_ok(),
        "sshd's own configuration stays"
    );
    assert_eq!(read("var/log/syslog").unwrap(), "");
    assert!(read("var/log/syslog.1").is_err());
    assert_eq!(read("var/log/journal/system.journal").unwrap(), "");
    assert!(read("root/.bash_history").is_err());
    assert!(
        !run.dir.join("tljh-bootstrap.py").exists(),
        "the installer is removed"
    );
    assert!(!run.dir.join("bake").exists(), "the script removes itself");
}

#[test]
fn an_image_bake_that_cannot_install_fails_naming_the_step_and_seals_nothing() {
    let run = run_image_bake(false);
    assert_ne!(run.code, Some(0));
    assert_eq!(
        run.console.trim(),
        "labbook-image: failed: install the ACME client (certbot 5.8.0) (exit 1)"
    );
    assert!(
        run.console
            .trim()
            .starts_with(labbook::ec2::userdata::IMAGE_REPORT_FAILED)
    );
    assert!(!run.root.join("etc/labbook/baked").exists());
    assert!(run.calls("cloud-init").is_empty());
    assert!(run.root.join("etc/ssh/ssh_host_ed25519_key").exists());
}
