//! Logging with `tracing`: readable lines by default, JSON lines for production, `RUST_LOG`
//! filtering. The sink is a parameter so tests can capture what is logged.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init<W>(json: bool, default_filter: &str, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    // Colours for a person at a terminal, plain text for files and log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(sink),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(sink),
            )
            .try_init()
    };
    // A second init (several stages in one test process) keeps the first subscriber.
    let _ = result;
}

/// The filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str =
    "info,lapin=warn,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn";
