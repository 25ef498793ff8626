//! Log lines on stderr: one line per state change, human-readable by default, JSON on request.
//! `-q` keeps only errors, `-v` adds debug lines; `CONSUL_LEADER_LOG` (an `EnvFilter` directive
//! such as `consul_leader=trace`) overrides both for troubleshooting (empty counts as unset).
//!
//! `run` wraps its whole life in one span that carries the key, the wrapper's pid, and, once known,
//! the session and the fencing token. In JSON every line carries those as top-level fields, so a
//! log pipeline can filter on them; the text format leaves them out, since its messages already
//! name what a reader needs.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt as tfmt};

use crate::cli::LogFormat;

/// The variable that overrides `-q` / `-v` with an `EnvFilter` directive.
pub const LOG_ENV: &str = "CONSUL_LEADER_LOG";

pub fn init(quiet: bool, verbose: bool, format: LogFormat) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, true) => "debug",
        (false, false) => "info",
    };
    let filter = std::env::var(LOG_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("consul_leader={default}")));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tfmt::layer()
                    .compact()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false)
                    // Spans are left out of this layer, so their fields never reach a text line.
                    .with_filter(filter_fn(|meta| meta.is_event())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tfmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(FlatJson)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// One JSON object per line: `timestamp`, `level`, `message`, the event's own fields, and the
/// fields of every span it happens in (innermost wins), all at the top level.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut object = Map::new();
        object.insert("timestamp".into(), Value::String(timestamp));
        object.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        event.record(&mut JsonVisitor(&mut object));
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                // `JsonFields` stores a span's fields as a JSON object.
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&fields.fields) {
                    for (k, v) in map {
                        object.entry(k).or_insert(v);
                    }
                }
            }
        }
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Collects an event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}
