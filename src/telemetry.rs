//! Logs and traces.
//!
//! Logs go through `tracing`: JSON lines by default, pretty for a terminal, filtered with
//! `RUST_LOG` (default `info`); panics are logged as events too. Traces are OpenTelemetry,
//! exported over OTLP/HTTP when `[telemetry] otlp_endpoint` (or the standard
//! `OTEL_EXPORTER_OTLP_*ENDPOINT` variables) says where: one consumer span per entry
//! following the messaging conventions, child of the producer's span when the entry
//! carries a W3C `traceparent` field. With traces off, no span is created per entry.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// Whether per-entry spans are wanted (checked on the hot path).
pub fn traces_on() -> bool {
    TRACES_ON.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up trace export to {endpoint}: {reason}; check telemetry.otlp_endpoint")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops trace export (blocking; call outside the async runtime).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "could not flush the last traces");
        }
    }
}

/// Where traces go, or `None` when they are off.
fn trace_endpoint(config: &TelemetryConfig) -> Option<String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    if !config.otlp_endpoint.is_empty() {
        let base = config.otlp_endpoint.trim_end_matches('/');
        return Some(if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        });
    }
    // The exporter reads these itself; an empty endpoint lets it.
    (env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some())
    .then(String::new)
}

pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    init_with_default(config, "info")
}

/// Like [`init`], with the filter used when `RUST_LOG` is not set.
pub fn init_with_default(
    config: &TelemetryConfig,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    let format = config.log_format;
    let env_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));

    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(env_filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(env_filter)
            .boxed(),
    };
    let mut provider = None;
    let otel = match trace_endpoint(config) {
        Some(endpoint) => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
            if !endpoint.is_empty() {
                use opentelemetry_otlp::WithExportConfig;
                builder = builder.with_endpoint(endpoint.clone());
            }
            let exporter = builder.build().map_err(|e| TelemetryError {
                endpoint: crate::config::redact_url(&endpoint),
                reason: streamworker_handlers::redact::redact_text(&e.to_string()),
            })?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            if std::env::var("OTEL_SERVICE_NAME").is_err() {
                resource = resource.with_service_name(config.service_name.clone());
            }
            let resource = resource
                .with_attributes(
                    config
                        .resource_attributes
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                        .chain([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))]),
                )
                .build();
            let sdk = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = sdk.tracer("streamworker");
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            provider = Some(sdk);
            TRACES_ON.store(true, Ordering::Relaxed);
            // Spans are the daemon's own (entries, handlers), whatever RUST_LOG says.
            let targets = Targets::new()
                .with_target("streamworker", LevelFilter::INFO)
                .with_target("streamworker_handlers", LevelFilter::INFO);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(targets),
            )
        }
        None => None,
    };
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed {
        std::panic::set_hook(Box::new(|info| {
            let message = panic_message(info.payload());
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            // A panic message may quote anything, a connection URL included.
            let message = streamworker_handlers::redact::redact_text(&message);
            tracing::error!(panic = %message, location = %location, "a task panicked");
        }));
    }
    Ok(Telemetry { provider })
}

/// Reads `traceparent`/`tracestate` from an entry's fields.
struct FieldExtractor<'a>(&'a [(Vec<u8>, Vec<u8>)]);

impl Extractor for FieldExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.as_slice() == key.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
            .collect()
    }
}

/// The consumer span for one entry: messaging conventions, child of the producer's span
/// when the entry carries `traceparent`. Returns the span and the `traceparent` to pass on.
pub fn entry_span(
    stream: &str,
    group: &str,
    consumer: &str,
    id: &impl std::fmt::Display,
    delivery_count: u64,
    fields: &[(Vec<u8>, Vec<u8>)],
) -> (tracing::Span, Option<String>) {
    let span = tracing::info_span!(
        target: "streamworker::entry",
        "process",
        otel.name = %format_args!("process {stream}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
        messaging.system = "redis",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %stream,
        messaging.consumer.group.name = %group,
        messaging.client.id = %consumer,
        messaging.message.id = %id,
        messaging.redis.delivery_count = delivery_count,
        streamworker.outcome = tracing::field::Empty,
    );
    if fields.iter().any(|(k, _)| k == b"traceparent") {
        let parent = TraceContextPropagator::new().extract(&FieldExtractor(fields));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    let context = span.context();
    let sc = context.span().span_context().clone();
    let traceparent = sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    });
    (span, traceparent)
}

/// Records an entry's outcome on its span (which then ends when dropped).
pub fn finish_span(span: &tracing::Span, outcome: &str, error: Option<&str>) {
    span.record("streamworker.outcome", outcome);
    if let Some(error) = error {
        span.record("otel.status_code", "ERROR");
        // Handler errors are redacted where they are made; errors made elsewhere (timeouts,
        // panics, Redis) pass here too, so the span export gets the same guarantee.
        let error = streamworker_handlers::redact::redact_text(error);
        span.record("otel.status_message", error.as_str());
    }
}

/// What a panic said: its message when it is a string (as `panic!` makes it).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
