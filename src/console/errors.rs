//! Failures of the console's dependencies in plain words: what is wrong and what to set or
//! run, rather than a driver's message (`database "labbook" does not exist` becomes "run
//! `labbook migrate`, or set DATABASE_URL"). The driver's own text goes to the log.

/// What a database error means to the operator.
pub fn database(e: &sqlx::Error) -> String {
    tracing::warn!(error = %e, "console: the database could not be read");
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    match (code.as_deref(), e) {
        (Some("3D000"), _) => "The database named in DATABASE_URL does not exist. Run `labbook migrate` (it creates the database and its tables), or set DATABASE_URL to labbook's database.".into(),
        (Some("42P01" | "42703"), _) => "The database has no labbook tables yet, or older ones. Run `labbook migrate` with this DATABASE_URL.".into(),
        (Some("28P01" | "28000"), _) => "PostgreSQL refused the user or password in DATABASE_URL. Check them (the console needs read access and, for actions, write access).".into(),
        (_, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)) => "PostgreSQL does not answer at the address in DATABASE_URL. Start it, or set DATABASE_URL to where it runs.".into(),
        (_, sqlx::Error::PoolClosed) => "The console is shutting down.".into(),
        (Some(code), _) => format!("The database refused the query (PostgreSQL error {code}); the console's log has the details."),
        _ => "The database could not be read; the console's log has the details.".into(),
    }
}

/// What a broker error means to the operator.
pub fn broker(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    tracing::warn!(error = %text, "console: the broker could not be reached");
    let lower = text.to_lowercase();
    if lower.contains("access_refused") || lower.contains("authentication") {
        "RabbitMQ refused the user or password in AMQP_URL. Check them.".into()
    } else if lower.contains("not_found") || lower.contains("no queue") {
        "RabbitMQ has no labbook queues on the virtual host in AMQP_URL. Run `labbook topology`, or check the virtual host.".into()
    } else if lower.contains("cannot reach")
        || lower.contains("did not answer")
        || lower.contains("connection")
    {
        format!(
            "RabbitMQ does not answer at the address in AMQP_URL. Start it, or set AMQP_URL to where it runs. ({text})"
        )
    } else {
        format!("The broker could not be read: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_says_what_to_set() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(database(&io).contains("DATABASE_URL"));
        assert!(database(&sqlx::Error::PoolTimedOut).contains("Start it"));
        let away = anyhow::anyhow!("cannot reach the broker: connection refused");
        assert!(broker(&away).contains("AMQP_URL"));
    }
}
