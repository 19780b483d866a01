//! Logs and traces with `tracing`: readable lines by default, JSON lines for production,
//! `RUST_LOG` filtering; and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! ([`crate::config::TraceExport`]), the spans of every stage exported over OTLP/HTTP through
//! OpenTelemetry (docs/contract.md §4, version 3). The log sink is a parameter so tests can
//! capture what is logged.
//!
//! Exported: labbook's own spans (each message handled, each message published, each machine's
//! boot, each email sent) and the AWS SDK's operation spans (`EC2.RunInstances`, …) beneath
//! them, with the events logged inside them, the database's statements among them. Never the
//! SDK's inner spans, nor OpenTelemetry's own logs (they would export themselves).

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{DynFilterFn, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

use crate::config::TraceExport;

/// Whether spans are exported by this process.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans: work done only for a trace (a database read for a span's
/// parent) is skipped when it does not.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The trace export of a process, if it has one: flushed and shut down when dropped, so the
/// spans of its last moments are sent before it exits.
#[must_use = "dropping it stops the trace export"]
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans ended so far, waiting for the collector's answer.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(err) = provider.force_flush()
        {
            tracing::warn!(error = %err, "could not send the spans to the trace collector");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "could not send the last spans to the trace collector");
            }
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter` (for the logs; the
/// export has its own filter). With `traces`, spans go to its endpoint under `service` unless
/// `OTEL_SERVICE_NAME` names another. A second init in one process (several stages in one
/// test) keeps the first subscriber and exports nothing more.
pub fn init<W>(
    json: bool,
    default_filter: &str,
    sink: W,
    traces: Option<(&TraceExport, &str)>,
) -> Result<Telemetry, String>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours for a person at a terminal, plain text for files and log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(sink)
            .boxed()
    } else {
        fmt::layer()
            .with_target(false)
            .with_ansi(ansi)
            .with_writer(sink)
            .boxed()
    };
    let provider = traces
        .map(|(export, service)| provider(export, service))
        .transpose()?;
    let spans = provider.as_ref().map(|p| {
        let targets = exported();
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("labbook"))
            .with_filter(DynFilterFn::new(move |meta, cx| {
                // The AWS SDK's calls only inside one of labbook's spans: a loop's own calls
                // (the boot watch's looks, the sweep) are not traces of their own.
                let sdk_span = meta.is_span() && meta.target().starts_with("aws_sdk_");
                targets.would_enable(meta.target(), meta.level())
                    && (!sdk_span || cx.lookup_current().is_some())
            }))
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()
        .is_ok();
    match provider {
        Some(provider) if installed => {
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            opentelemetry::global::set_tracer_provider(provider.clone());
            EXPORTING.store(true, Ordering::Relaxed);
            Ok(Telemetry {
                provider: Some(provider),
            })
        }
        Some(provider) => {
            let _ = provider.shutdown();
            Ok(Telemetry::default())
        }
        None => Ok(Telemetry::default()),
    }
}

/// What the export keeps: labbook's spans and the events inside them from `info`, the AWS
/// SDK's one span per operation (`debug`), the database driver's one event per statement (its
/// SQL with `$n` placeholders, never the values bound to them; rows and time), as events of
/// the span that ran it; nothing of OpenTelemetry itself.
fn exported() -> Targets {
    Targets::new()
        .with_target("labbook", LevelFilter::INFO)
        .with_target("aws_sdk_ec2", LevelFilter::DEBUG)
        .with_target("aws_sdk_servicequotas", LevelFilter::DEBUG)
        .with_target("sqlx::query", LevelFilter::DEBUG)
        .with_default(LevelFilter::OFF)
}

fn provider(export: &TraceExport, service: &str) -> Result<SdkTracerProvider, String> {
    use secrecy::ExposeSecret;
    let headers = export
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.expose_secret().to_owned()))
        .collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(export.endpoint.clone())
        .with_protocol(if export.json {
            Protocol::HttpJson
        } else {
            Protocol::HttpBinary
        })
        .with_timeout(export.timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export traces: {e}"))?;
    let name = export
        .service_name
        .clone()
        .unwrap_or_else(|| service.to_owned());
    let resource = Resource::builder()
        .with_service_name(name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str =
    "info,lapin=warn,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn";
