//! Log and trace set-up shared by every sipwarden binary: `RUST_LOG`-style filtering, plain or
//! JSON lines, and — when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set — an OpenTelemetry layer exporting spans over OTLP/gRPC. The standard `OTEL_*`
//! variables apply: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`. Without an endpoint no OpenTelemetry code runs on any path.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use tracing_subscriber::{filter::Targets, fmt, prelude::*, EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, one line per event.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What a process reports itself as: its default service name and resource attributes (edge id,
/// site, node id, …).
pub struct Identity {
    pub service: &'static str,
    pub attributes: Vec<(&'static str, String)>,
}

/// Keeps the trace pipeline; [`Telemetry::shutdown`] flushes spans still queued.
#[must_use = "call shutdown() before exiting so queued spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued and stops the pipeline.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("opentelemetry: shutdown: {e}");
            }
        }
    }
}

/// The OTLP endpoint from the environment, when tracing is asked for.
pub fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

/// Builds the span pipeline for `id` when an endpoint is configured. Must run inside a Tokio
/// runtime (the gRPC channel lives there).
fn tracer_provider(id: &Identity) -> Option<SdkTracerProvider> {
    otlp_endpoint()?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("opentelemetry: cannot build the OTLP exporter, tracing off: {e}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, when set, is read by the SDK and wins.
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(id.service);
    }
    let resource = resource
        .with_attributes(
            id.attributes
                .iter()
                .map(|(k, v)| KeyValue::new(*k, v.clone())),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Some(provider)
}

/// Log lines to stderr in `format`.
fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    match format {
        LogFormat::Text => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
}

/// Installs the global subscriber. `default_filter` applies to log lines when `RUST_LOG` is unset;
/// spans of sipwarden's own crates at `info` and above (and security events, as events of the
/// message's span) are exported whatever the log filter.
/// Calling it twice is harmless (the second call is ignored), which keeps tests simple.
pub fn init(format: LogFormat, default_filter: &str, id: &Identity) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let Some(provider) = tracer_provider(id) else {
        // No exporter: one global filter, as cheap as logging alone.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(log_layer(format))
            .try_init();
        return Telemetry { provider: None };
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sipwarden"))
        .with_filter(
            Targets::new()
                .with_target("sipwarden_edge", tracing::Level::INFO)
                .with_target("sipwarden_controller", tracing::Level::INFO)
                .with_target("sipwarden_shared", tracing::Level::INFO)
                // Security events become events of the message's span.
                .with_target("security", tracing::Level::WARN),
        );
    let _ = tracing_subscriber::registry()
        .with(log_layer(format).with_filter(filter))
        .with(otel)
        .try_init();
    Telemetry {
        provider: Some(provider),
    }
}
