//! The daemon's log: `tracing` events on stderr (journald or a file takes
//! them from there), as text or as one JSON object per line, filtered by
//! `RUST_LOG` when it is set, else by the config's `log_level`.

use std::io::IsTerminal;

use kuasar_sandboxer::config::{Config, LogFormat};
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The environment variable that overrides `log_level`.
const ENV: &str = "RUST_LOG";

/// Installs the daemon's logger. A `log_level` that is no valid filter is
/// an error; a bad `RUST_LOG` is reported in the log and ignored.
pub fn init(config: &Config) -> Result<(), String> {
    let env = std::env::var(ENV).ok();
    let (filter, warning) = filter(&config.log_level, env.as_deref())?;
    // Colours only for a person at a terminal, not in journald or files.
    let ansi = std::io::stderr().is_terminal();
    subscriber(config.log_format, filter, std::io::stderr, ansi)
        .try_init()
        .map_err(|e| format!("installing the logger: {e}"))?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// `RUST_LOG` if it is set and valid, else `log_level`; and what to warn
/// about.
fn filter(log_level: &str, env: Option<&str>) -> Result<(EnvFilter, Option<String>), String> {
    let mut warning = None;
    if let Some(v) = env.filter(|v| !v.trim().is_empty()) {
        match EnvFilter::try_new(v) {
            Ok(f) => return Ok((f, None)),
            Err(e) => warning = Some(format!("{ENV}={v:?} ignored ({e}); log_level applies")),
        }
    }
    let f = EnvFilter::try_new(log_level).map_err(|e| format!("log_level {log_level:?}: {e}"))?;
    Ok((f, warning))
}

fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(fmt.with_ansi(ansi).finish()),
        // The call's fields (method, namespace, id) under "span", the
        // event's own at the top level: one flat object to query.
        LogFormat::Json => Box::new(
            fmt.json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What `log_level` and `RUST_LOG` let through of a debug and a warn
    /// event, as text.
    fn logged(log_level: &str, env: Option<&str>) -> String {
        let (f, _) = filter(log_level, env).unwrap();
        let buf = Buf::default();
        let sub = subscriber(LogFormat::Text, f, buf.clone(), false);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("a debug line");
            tracing::warn!("a warning");
        });
        buf.text()
    }

    #[test]
    fn rust_log_overrides_the_configured_level() {
        let out = logged("warn", None);
        assert!(
            out.contains("a warning") && !out.contains("a debug line"),
            "{out}"
        );
        let out = logged("warn", Some("debug"));
        assert!(
            out.contains("a warning") && out.contains("a debug line"),
            "{out}"
        );
        let out = logged("debug", Some("error"));
        assert!(!out.contains("a warning"), "{out}");
        // Set but empty: the config's level.
        let out = logged("debug", Some(""));
        assert!(out.contains("a debug line"), "{out}");
    }

    #[test]
    fn a_bad_rust_log_is_ignored_with_a_warning_and_a_bad_level_is_an_error() {
        let (_, warning) = filter("info", Some("foo=bogus")).unwrap();
        assert!(warning.unwrap().contains("RUST_LOG=\"foo=bogus\" ignored"));
        let e = filter("foo=bogus", None).unwrap_err();
        assert!(e.contains("log_level \"foo=bogus\""), "{e}");
    }

    #[test]
    fn json_lines_carry_the_calls_fields() {
        let buf = Buf::default();
        let sub = subscriber(LogFormat::Json, EnvFilter::new("debug"), buf.clone(), false);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!(
                "call",
                method = "/containerd.task.v2.Task/Create",
                namespace = "default",
                id = tracing::field::Empty
            );
            span.record("id", "c1");
            span.in_scope(|| tracing::debug!(took_us = 1234u64, "done"));
        });
        let text = buf.text();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "DEBUG");
        assert_eq!(line["message"], "done");
        assert_eq!(line["took_us"], 1234);
        assert_eq!(line["span"]["name"], "call");
        assert_eq!(line["span"]["method"], "/containerd.task.v2.Task/Create");
        assert_eq!(line["span"]["namespace"], "default");
        assert_eq!(line["span"]["id"], "c1");
        assert!(line["timestamp"].is_string());
    }
}
