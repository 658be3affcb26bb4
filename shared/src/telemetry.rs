//! Log and trace set-up shared by every sipwarden binary: `RUST_LOG`-style filtering, plain or
//! JSON lines, and — when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set — an OpenTelemetry layer exporting spans over OTLP/gRPC. The standard `OTEL_*`
//! variables apply: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`. Without an endpoint no OpenTelemetry code runs on any path.

use opentelemetry::propagation::{Extractor, Injector};
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

impl LogFormat {
    /// The `log.format` configuration value: `json`, else text.
    pub fn from_config(value: &str) -> LogFormat {
        if value == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
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

/// A binary's life: builds the multi-threaded Tokio runtime, installs logging and tracing for
/// `id` inside it (the OTLP channel lives there), runs `main` to completion and flushes the spans
/// still queued before returning its result.
pub fn run<T>(
    format: LogFormat,
    default_filter: &str,
    id: &Identity,
    main: impl std::future::Future<Output = T>,
) -> std::io::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let telemetry = {
        let _rt = rt.enter();
        init(format, default_filter, id)
    };
    let result = rt.block_on(main);
    let _rt = rt.enter();
    telemetry.shutdown();
    Ok(result)
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

/// Log lines to stderr in `format`, for the events `filter` passes. Spans are not logged and log
/// lines do not carry their span's fields (every line names what it concerns): with no exporter a
/// span then costs nothing — the edge opens one per SIP message, and formatting its fields for a
/// log layer that never prints them was a measurable share of the hot path.
fn log_layer<S>(format: LogFormat, filter: EnvFilter) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{filter_fn, FilterExt};
    let filter = filter_fn(|m| m.is_event()).and(filter);
    match format {
        LogFormat::Text => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
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
        // No exporter: logging alone.
        let _ = tracing_subscriber::registry()
            .with(log_layer(format, filter))
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
        .with(log_layer(format, filter))
        .with(otel)
        .try_init();
    Telemetry {
        provider: Some(provider),
    }
}

/// The OpenTelemetry context of the current tracing span (empty when not exporting), to carry a
/// trace across a queue or a process.
pub fn current_context() -> opentelemetry::Context {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    tracing::Span::current().context()
}

/// Makes `span` a child of `parent` (a context from [`current_context`] or [`extract`]).
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let _ = span.set_parent(parent);
}

/// Links `span` to the span of `other` (a further cause, e.g. the other bans of one batch).
pub fn add_link(span: &tracing::Span, other: &opentelemetry::Context) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let sc = other.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context into gRPC metadata (W3C `traceparent`), when exporting.
pub fn inject(span: &tracing::Span, md: &mut tonic::metadata::MetadataMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(md))
    });
}

/// The trace context a caller sent in gRPC metadata (empty when none).
pub fn extract(md: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(md)))
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A span for one gRPC request, child of the trace context the caller sent (W3C `traceparent`);
/// none for the Raft peer stream, whose messages are not requests anyone waits on.
pub fn grpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/sipwarden.v1.Peer/") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(target: "sipwarden_shared", "grpc", rpc = %path);
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    set_parent(&span, parent);
    span
}
