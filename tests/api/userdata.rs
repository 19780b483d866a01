//! The user-data passes cloud-init's schema, for both bootstraps.
//!
//! The schema is cloud-init 22.4.2's `schema-cloud-config-v1.json` (JSON Schema draft 4), as
//! Debian 12 packages it, vendored in `tests/data/cloud-init/` (its README says where it came
//! from and how to update it). The check is what `cloud-init schema --config-file` does: the
//! `#cloud-config` header, a YAML mapping, then the schema (deprecations are not errors there
//! either). This schema allows unknown top-level keys; it rejects unknown keys in a user entry
//! and values of the wrong type.

use std::sync::LazyLock;

use labbook::config::Bootstrap;
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
    let hash = "$6$saltsalt$abcdefghijklmnopqrstuvwxyz";
    let admin = Account {
        username: "labadmin",
        password_hash: hash,
    };
    let users = [Account {
        username: "ualice",
        password_hash: hash,
    }];
    render(bootstrap, &admin, &users).unwrap()
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
    for bootstrap in [Bootstrap::JupyterHub, Bootstrap::Ssh] {
        let data = render(bootstrap, &admin, &users).unwrap();
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
    assert!(jupyterhub.contains("package_update: true"));

    let cases = [
        (
            "a misspelled key in a user entry",
            jupyterhub.replace("lock_passwd: false", "lock_password: false"),
        ),
        (
            "a string where a boolean is expected",
            jupyterhub.replace("package_update: true", "package_update: 'true'"),
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

/// Runs the bootstrap script the user-data writes, as cloud-init's `runcmd` would, with the
/// console and the installer's address pointed at this machine; returns its exit code and
/// what it wrote to the console.
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
